"""Export a cube from the store as a ``.mcube`` file for given recipients, and import one.

Export = (for LoRA cubes) embed a watermark keyed on the owner's secret and the recipients → re-describe
and sign the manifest → seal → record the export in the owner's ledger. Import = ``seal.open_file``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memfed.crypto import ledger
from memfed.crypto.identity import Identity, PublicIdentity
from memfed.crypto.seal import (
    WM_MARK_ID,
    WM_RECIPIENTS,
    WM_SCHEME,
    SealResult,
    manifest_for_export,
    seal_file,
)
from memfed.crypto.stream import DEFAULT_CHUNK_SIZE
from memfed.cube.digest import payload_digest
from memfed.cube.manifest import CubeManifest, ref_string
from memfed.errors import InvalidArgumentError, StorageError
from memfed.mip.v1 import cube_pb2, envelope_pb2

if TYPE_CHECKING:
    from memfed.node.store import CubeStore


def mark_id_for(recipients: Sequence[PublicIdentity]) -> str:
    """What a watermark is keyed on: the recipient's id, or for a file shared by several recipients an id
    of the sorted set (a leak of a shared file can only be traced to the group that received it)."""
    ids = sorted({r.recipient_id for r in recipients})
    if len(ids) == 1:
        return ids[0]
    return "group-" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    seal: SealResult
    source_digest: str
    watermarked: bool
    mark_id: str
    host_aware: bool = False  # the mark was shaped on the base model (see memfed.crypto.watermark)


def export_cube(
    store: CubeStore,
    cube_id: str,
    version: str | None,
    identity: Identity,
    recipients: Sequence[PublicIdentity],
    out: Path,
    *,
    watermark: bool = True,
    host: Callable[[cube_pb2.BaseModelFingerprint], Any | None] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ExportResult:
    """Seal ``cube_id@version`` from ``store`` into ``out`` for ``recipients``.

    LoRA cubes are watermarked unless ``watermark=False``; other kinds are sealed as stored (streamed
    from the store's payload file, never loaded whole). ``host``, called only for a LoRA cube being
    watermarked, is given the cube's base-model fingerprint and returns that model (checked) or None:
    with the model the mark is host-aware (it leaves the adapted model's outputs practically unchanged),
    without it model-free (see memfed.crypto.watermark).
    """
    if not recipients:
        raise InvalidArgumentError("export needs at least one recipient", hint="pass --to PUBFILE")
    source = store.get_manifest(cube_id, version)
    mark_id = mark_id_for(recipients)
    marked = watermark and source.kind == cube_pb2.CUBE_KIND_LORA
    stats = None
    if marked:
        from memfed.crypto.watermark import SCHEME, mark_payload

        cube = store.get(source.cube_id, source.version)  # LoRA payloads are small: in memory
        stats = _host_stats(source, cube.payload, host)
        payload = mark_payload(cube.payload, identity.watermark_secret(), mark_id, stats=stats)
        m = manifest_for_export(source)
        m.digest = payload_digest(payload)
        m.payload.size_bytes = len(payload)
        m.annotations[WM_SCHEME] = SCHEME
        m.annotations[WM_MARK_ID] = mark_id
        m.annotations[WM_RECIPIENTS] = ",".join(sorted({r.recipient_id for r in recipients}))
        info = envelope_pb2.WatermarkInfo(scheme=SCHEME, recipient_id=mark_id)
        result = seal_file(
            out, m, io.BytesIO(payload), identity, recipients, chunk_size=chunk_size, watermark=info
        )
        ledger.append(
            identity.directory,
            ledger.ExportRecord(
                mark_id=mark_id,
                recipients=sorted({r.recipient_id for r in recipients}),
                fingerprints=sorted({r.fingerprint for r in recipients}),
                cube_ref=ref_string(source),
                source_digest=source.digest,
                marked_digest=m.digest,
                scheme=SCHEME,
            ),
        )
    else:
        m = manifest_for_export(source)
        path = store.payload_path(source.digest)
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by the `with` below)
        except OSError as exc:
            raise StorageError(f"cannot read the payload of {ref_string(source)}: {exc.strerror}") from exc
        with f:
            result = seal_file(out, m, f, identity, recipients, chunk_size=chunk_size)
    return ExportResult(
        Path(out), result, source.digest, marked, mark_id, host_aware=marked and stats is not None
    )


def _host_stats(source: CubeManifest, payload: bytes, host: Callable[..., Any] | None) -> Any:
    """The watermark's host statistics from the cube's base model, or None (model-free mark)."""
    model = host(source.base_model) if host is not None else None
    if model is None:
        return None
    from memfed.crypto.watermark import host_stats
    from memfed.cube.fingerprint import check_base_model
    from memfed.cube.payload import decode_tensors

    check_base_model(source.base_model, model, what=f"cube {ref_string(source)}")
    scaling = {t.module: float(t.scaling) for t in source.payload.lora.targets}
    return host_stats(model, decode_tensors(payload), scaling=scaling)


def exported_manifest(result: ExportResult) -> CubeManifest:
    return result.seal.manifest
