"""Build, validate, serialize and display cube manifests.

The manifest itself is defined once, in ``proto/memfed/mip/v1/cube.proto``; this module only works with
the generated ``CubeManifest`` class, so there is no second Python definition to drift from the wire.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from memfed.cube.digest import check_digest_string
from memfed.errors import InvalidManifestError
from memfed.mip.v1 import cube_pb2

# What a grant may allow on a cube. ``feedback`` is its own grant: rating a module's answers steers how it
# evolves (memfed.node.evolve), which is more than using it and less than administering it.
ACCESS_ACTIONS = ("read", "use", "export", "admin", "feedback")

FORMAT_VERSION = 1
CubeManifest = cube_pb2.CubeManifest

_CUBE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.\-]+))?(?:\+([0-9A-Za-z.\-]+))?$"
)

KIND_NAMES: dict[str, int] = {
    "lora": cube_pb2.CUBE_KIND_LORA,
    "adapter": cube_pb2.CUBE_KIND_ADAPTER,
    "edit": cube_pb2.CUBE_KIND_EDIT,
    "steering": cube_pb2.CUBE_KIND_STEERING,
    "plaintext": cube_pb2.CUBE_KIND_PLAINTEXT,
    "editor": cube_pb2.CUBE_KIND_EDITOR,
}
LIFECYCLE_NAMES: dict[str, int] = {
    "generated": cube_pb2.LIFECYCLE_STATE_GENERATED,
    "activated": cube_pb2.LIFECYCLE_STATE_ACTIVATED,
    "merged": cube_pb2.LIFECYCLE_STATE_MERGED,
    "archived": cube_pb2.LIFECYCLE_STATE_ARCHIVED,
    "expired": cube_pb2.LIFECYCLE_STATE_EXPIRED,
}
PRIORITY_NAMES: dict[str, int] = {
    "low": cube_pb2.PRIORITY_LOW,
    "normal": cube_pb2.PRIORITY_NORMAL,
    "high": cube_pb2.PRIORITY_HIGH,
    "critical": cube_pb2.PRIORITY_CRITICAL,
}
# Kinds whose payload is weights and so must name the base model they were made for.
PARAMETRIC_KINDS = frozenset(KIND_NAMES[k] for k in ("lora", "adapter", "edit", "steering", "editor"))


def _name_of(table: dict[str, int], value: int) -> str:
    for name, number in table.items():
        if number == value:
            return name
    return "unspecified"


def kind_name(kind: int) -> str:
    """``CUBE_KIND_LORA`` -> ``"lora"``."""
    return _name_of(KIND_NAMES, kind)


def lifecycle_name(state: int) -> str:
    """``LIFECYCLE_STATE_ARCHIVED`` -> ``"archived"``."""
    return _name_of(LIFECYCLE_NAMES, state)


def parse_semver(version: str) -> tuple[int, int, int, str]:
    """Split a semantic version into (major, minor, patch, prerelease); raise on malformed input."""
    m = _SEMVER_RE.match(version)
    if not m:
        raise InvalidManifestError(
            f"version {version!r} is not a semantic version", hint="use MAJOR.MINOR.PATCH, e.g. 1.0.0"
        )
    return int(m[1]), int(m[2]), int(m[3]), m[4] or ""


def semver_key(version: str) -> tuple[int, int, int, int, str]:
    """Sort key that orders versions as semver does (a prerelease sorts before its release)."""
    major, minor, patch, pre = parse_semver(version)
    return major, minor, patch, 0 if pre else 1, pre


def check_cube_id(cube_id: str) -> str:
    """Return ``cube_id`` if it is a valid stable name, else raise."""
    if not _CUBE_ID_RE.match(cube_id):
        raise InvalidManifestError(
            f"cube id {cube_id!r} is not valid",
            hint="start with a letter or digit; use letters, digits, '_', '.', '-'; at most 128 characters",
        )
    return cube_id


def new_manifest(
    *,
    cube_id: str,
    version: str,
    kind: str | int,
    digest: str,
    size_bytes: int,
    base_model: cube_pb2.BaseModelFingerprint | None = None,
    payload: cube_pb2.PayloadDescription | None = None,
    origin: cube_pb2.Origin | None = None,
    owner: str = "",
    version_chain: Iterable[str] = (),
    tags: Iterable[str] = (),
    ttl_seconds: int = 0,
    priority: str | int = "normal",
    grants: Iterable[cube_pb2.Grant] = (),
    lifecycle: str | int = "generated",
    created_at: datetime | None = None,
    annotations: dict[str, str] | None = None,
) -> CubeManifest:
    """Assemble and validate a manifest. The payload digest and size are required: a manifest always
    describes exact bytes."""
    m = CubeManifest(
        format_version=FORMAT_VERSION,
        cube_id=cube_id,
        version=version,
        digest=digest,
        owner=owner,
        ttl_seconds=ttl_seconds,
        kind=KIND_NAMES[kind] if isinstance(kind, str) else kind,
        priority=PRIORITY_NAMES[priority] if isinstance(priority, str) else priority,
        lifecycle=LIFECYCLE_NAMES[lifecycle] if isinstance(lifecycle, str) else lifecycle,
    )
    m.version_chain.extend(version_chain)
    m.tags.extend(tags)
    m.created_at.FromDatetime(created_at or datetime.now(UTC))
    if origin is not None:
        m.origin.CopyFrom(origin)
    if base_model is not None:
        m.base_model.CopyFrom(base_model)
    if payload is not None:
        m.payload.CopyFrom(payload)
    m.payload.size_bytes = size_bytes
    m.access_control.grants.extend(grants)
    if annotations:
        m.annotations.update(annotations)
    validate_manifest(m)
    return m


def validate_manifest(m: CubeManifest) -> None:
    """Raise InvalidManifestError naming the first field that is missing or malformed."""
    if m.format_version != FORMAT_VERSION:
        raise InvalidManifestError(
            f"manifest format_version {m.format_version} is not supported (this memfed reads "
            f"{FORMAT_VERSION})",
            hint="upgrade memfed or ask the producer for a v1 cube",
        )
    check_cube_id(m.cube_id)
    parse_semver(m.version)
    check_digest_string(m.digest)
    for parent in m.version_chain:
        check_digest_string(parent)
    if m.digest in m.version_chain:
        raise InvalidManifestError(f"cube {m.cube_id}@{m.version} lists its own digest as a parent")
    if m.kind not in KIND_NAMES.values():
        raise InvalidManifestError(f"cube {m.cube_id}@{m.version} has no valid kind ({m.kind})")
    if m.lifecycle not in LIFECYCLE_NAMES.values():
        raise InvalidManifestError(f"cube {m.cube_id}@{m.version} has no valid lifecycle state")
    if not m.HasField("created_at"):
        raise InvalidManifestError(f"cube {m.cube_id}@{m.version} has no created_at")
    if m.kind in PARAMETRIC_KINDS:
        bm = m.base_model
        if not (bm.architecture and len(bm.config_digest) == 32 and len(bm.shapes_digest) == 32):
            raise InvalidManifestError(
                f"{kind_name(m.kind)} cube {m.cube_id}@{m.version} does not name its base model",
                hint="a parametric cube needs base_model with architecture, config and shapes digests",
            )
    if m.kind == cube_pb2.CUBE_KIND_LORA and m.payload.WhichOneof("spec") != "lora":
        raise InvalidManifestError(f"lora cube {m.cube_id}@{m.version} has no LoRA spec in its payload")
    for grant in m.access_control.grants:
        bad = set(grant.actions) - set(ACCESS_ACTIONS)
        if bad or not grant.principal:
            raise InvalidManifestError(
                f"grant {grant.principal!r} {list(grant.actions)} in {m.cube_id}@{m.version} is malformed",
                hint=f"principals are node:/user:/group: names; actions are {', '.join(ACCESS_ACTIONS)}",
            )


def manifest_to_bytes(m: CubeManifest) -> bytes:
    """Deterministic wire form (stable for equal manifests within one protobuf version)."""
    return m.SerializeToString(deterministic=True)


def manifest_from_bytes(data: bytes) -> CubeManifest:
    """Parse and validate wire bytes; malformed input raises InvalidManifestError."""
    m = CubeManifest()
    try:
        m.ParseFromString(data)
    except DecodeError as exc:
        raise InvalidManifestError(f"manifest bytes do not parse: {exc}") from exc
    validate_manifest(m)
    return m


def manifest_to_dict(m: CubeManifest) -> dict[str, Any]:
    """JSON-ready dict with proto field names (for ``--json`` output and ``cube show``)."""
    return json_format.MessageToDict(m, preserving_proto_field_name=True)


def manifest_to_json(m: CubeManifest) -> str:
    return json.dumps(manifest_to_dict(m), indent=2, sort_keys=True)


def ref_string(m: CubeManifest) -> str:
    """``cube_id@version``: how people and the CLI name a cube version."""
    return f"{m.cube_id}@{m.version}"


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"legal@1.2.0"`` -> ``("legal", "1.2.0")``; ``"legal"`` -> ``("legal", None)`` (newest)."""
    cube_id, _, version = ref.partition("@")
    check_cube_id(cube_id)
    if version:
        parse_semver(version)
    return cube_id, version or None
