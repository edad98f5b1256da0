"""``NodeClient``: a typed Python client for a node's MIP ``NodeService`` (gRPC).

    from memfed.client import NodeClient, Row

    with NodeClient("127.0.0.1:7711") as node:
        node.put_cube(cube)                                  # chunked upload, verified by the node
        node.activate("legal_expert")
        [answer] = node.generate(["What governs this contract?"])
        mixed = node.generate([Row("q1", modules=("legal_expert",)), Row("q2", base_only=True)])

Every method raises the ``memfed.errors`` type the node raised (NotFoundError, IncompatibleModelError,
CapacityError, ...), carrying the node's message and hint: the node sends the error's type and hint in
trailing metadata (``ERROR_METADATA_KEY``); without it (a proxy, an old node) the gRPC status code picks
the type. A call that runs past its deadline raises ``DeadlineExceededError``.

This module is the wire convention both ends share (the metadata key, the chunk size, message limits)
and never imports torch: a script that only talks to nodes stays light.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import grpc

from memfed import errors
from memfed.cube.core import MemCube
from memfed.cube.manifest import (
    LIFECYCLE_NAMES,
    CubeManifest,
    lifecycle_name,
    manifest_from_bytes,
    manifest_to_bytes,
    parse_ref,
)
from memfed.errors import (
    CallCancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    MemfedError,
)
from memfed.mip.v1 import cube_pb2, envelope_pb2, node_service_pb2, node_service_pb2_grpc

pb = node_service_pb2

DEFAULT_PORT = 7711
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"
CHUNK_SIZE = 1 << 20  # payload bytes per stream message
MAX_CHUNK_SIZE = 4 << 20
# Room for a chunk plus framing, and for a page of manifests or a batch of generated texts.
MAX_MESSAGE_BYTES = 16 << 20
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
# Trailing metadata of a failed call: JSON {"type": <memfed.errors class name>, "message", "hint"}.
ERROR_METADATA_KEY = "memfed-error-bin"
SERVICE_NAME = "memfed.mip.v1.NodeService"


_BY_NAME: dict[str, type[MemfedError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, MemfedError)
}

_BY_STATUS: dict[grpc.StatusCode, type[MemfedError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.DATA_LOSS: errors.IntegrityError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.LifecycleError,
    grpc.StatusCode.UNIMPLEMENTED: errors.UnsupportedError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthenticationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.CapacityError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CallCancelledError,
}


def error_payload(exc: MemfedError) -> bytes:
    """The trailing-metadata value a node sends with a failed call (see ``error_from_rpc``)."""
    return json.dumps({"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}).encode()


def error_from_rpc(exc: grpc.RpcError, *, address: str = "") -> MemfedError:
    """The typed memfed error a failed call stands for, with the node's message and hint."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    info: dict[str, Any] = {}
    metadata = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in metadata or ():
        if key == ERROR_METADATA_KEY:
            try:
                info = json.loads(value)
            except (ValueError, TypeError):
                info = {}
    cls = _BY_NAME.get(str(info.get("type", ""))) or _BY_STATUS.get(code)
    if cls is None and code == grpc.StatusCode.UNAVAILABLE:
        cls = errors.UnavailableError
    if code == grpc.StatusCode.UNAVAILABLE and not info:
        where = f" at {address}" if address else ""
        return errors.UnavailableError(
            f"cannot reach the node{where}: {details}",
            hint="check the address and that `memfed node serve` is running there",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not info:
        return DeadlineExceededError(
            f"the node did not answer before the deadline: {details}",
            hint="give the call more time (--timeout) or ask for less work (fewer rows or new tokens)",
        )
    if cls is None:
        return MemfedError(f"the node failed the call ({code.name}): {details}")
    if info:
        return cls(str(info.get("message") or details), hint=info.get("hint"))
    return cls(details)


# -- results ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One generation row: a prompt and what serves it.

    ``modules`` (``cube_id`` or ``cube_id@version``) run for this row only. A row with no modules and no
    ``task`` runs the node's active modules; ``base_only`` runs the bare model regardless; ``task`` lets
    the node's scheduler route (the module bound to the task, else plaintext retrieval).
    """

    prompt: str
    modules: tuple[str, ...] = ()
    max_new_tokens: int = 32
    conversation_id: str = ""
    task: str = ""
    base_only: bool = False


@dataclass(frozen=True)
class Generation:
    """What one row produced, and which memories served it (``param:``, ``kv:``, ``text:``)."""

    text: str
    memory_used: tuple[str, ...] = ()
    new_tokens: int = 0
    reused_tokens: int = 0
    seconds: float = 0.0  # time on the activation-memory path (conversation rows)
    batch_rows: int = 0  # rows in the node-side batch this row ran in


@dataclass(frozen=True)
class NodeHealth:
    node_id: str
    memfed_version: str
    base_model: cube_pb2.BaseModelFingerprint = field(repr=False)
    resident_modules: int
    active_modules: tuple[str, ...]
    device_bytes_used: int
    device_budget_bytes: int
    host_bytes_used: int
    host_budget_bytes: int
    queued_rows: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "memfed_version": self.memfed_version,
            "base_model": {
                "architecture": self.base_model.architecture,
                "name": self.base_model.name,
                "fingerprint_id": self.base_model.fingerprint_id,
            },
            "resident_modules": self.resident_modules,
            "active_modules": list(self.active_modules),
            "device_bytes_used": self.device_bytes_used,
            "device_budget_bytes": self.device_budget_bytes,
            "host_bytes_used": self.host_bytes_used,
            "host_budget_bytes": self.host_budget_bytes,
            "queued_rows": self.queued_rows,
            "device": self.device,
        }


@dataclass(frozen=True)
class PushResult:
    ref: str
    already_present: bool


@dataclass(frozen=True)
class LoadResult:
    ref: str
    size_bytes: int
    seconds: float
    device_bytes_used: int
    device_budget_bytes: int


@dataclass(frozen=True)
class ActivateResult:
    ref: str
    state: str
    seconds: float
    active: tuple[str, ...]


@dataclass(frozen=True)
class TransitionResult:
    ref: str
    from_state: str
    to_state: str


@dataclass(frozen=True)
class RollbackResult:
    previous: str
    current: str


@dataclass(frozen=True)
class FeedbackResult:
    """What the node did with one rating: the version it is recorded against, items pending on the module,
    and the evolve state ("recorded", "waiting" or "started": an evolve step runs in the background)."""

    module: str
    feedback_id: int
    pending: int
    decision: str
    reason: str


# -- references ---------------------------------------------------------------------------------------


def cube_ref(ref: str | pb.CubeRef) -> pb.CubeRef:
    """``"name"``, ``"name@1.2.0"`` or ``"name@1.2.0#sha256:…"`` (pins exact content) -> ``CubeRef``."""
    if isinstance(ref, pb.CubeRef):
        return ref
    if not isinstance(ref, str) or not ref:
        raise InvalidArgumentError(f"a cube reference must be NAME or NAME@VERSION, not {ref!r}")
    text, _, digest = ref.partition("#")
    cube_id, version = parse_ref(text)
    return pb.CubeRef(cube_id=cube_id, version=version or "", digest=digest)


def ref_text(ref: pb.CubeRef) -> str:
    """``CubeRef`` -> ``name@version`` (``name`` when the version is open)."""
    return f"{ref.cube_id}@{ref.version}" if ref.version else ref.cube_id


def _state_number(state: str | int) -> int:
    if isinstance(state, int):
        return state
    number = LIFECYCLE_NAMES.get(state.lower())
    if number is None:
        raise InvalidArgumentError(
            f"unknown lifecycle state {state!r}", hint=f"use one of {', '.join(LIFECYCLE_NAMES)}"
        )
    return number


def cube_stream(cube: MemCube, chunk_size: int = CHUNK_SIZE) -> Iterator[pb.CubeStreamMessage]:
    """A plain cube as MIP stream messages: the manifest, then the payload in ``chunk_size`` pieces."""
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidArgumentError(f"chunk_size must be 1..{MAX_CHUNK_SIZE} bytes, not {chunk_size}")
    signed = cube_pb2.SignedManifest(manifest=manifest_to_bytes(cube.manifest))
    yield pb.CubeStreamMessage(plain_manifest=signed)
    view = memoryview(cube.payload)
    count = max(1, -(-len(view) // chunk_size))
    for i in range(count):
        data = bytes(view[i * chunk_size : (i + 1) * chunk_size])
        yield pb.CubeStreamMessage(chunk=envelope_pb2.Chunk(index=i, data=data, last=i == count - 1))


# -- the client ----------------------------------------------------------------------------------------


class NodeClient:
    """A blocking client for one node. Thread-safe (one channel, shared by every call).

    ``timeout``: seconds per call unless a method is given its own (None = no deadline).
    ``credentials``: ``grpc.ssl_channel_credentials(...)`` for a TLS node; None = plaintext (loopback or a
    trusted network only). ``metadata``: sent with every call.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.metadata = tuple(metadata)
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self.stub = node_service_pb2_grpc.NodeServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NodeClient({self.address!r})"

    def _call(self, method: Any, request: Any, timeout: float | object | None = ..., **kw: Any) -> Any:
        t = self.timeout if timeout is ... else timeout
        try:
            return method(request, timeout=t, metadata=self.metadata, **kw)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, address=self.address) from None

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the node accepts connections (UnavailableError after ``timeout`` seconds)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise errors.UnavailableError(
                f"no node answered at {self.address} within {timeout:g}s",
                hint="start one with `memfed node serve`, or check --node",
            ) from None

    # -- node and cubes ---------------------------------------------------------------------------------

    def health(self, *, timeout: float | object | None = ...) -> NodeHealth:
        r = self._call(self.stub.Health, pb.HealthRequest(), timeout)
        return NodeHealth(
            node_id=r.node_id,
            memfed_version=r.memfed_version,
            base_model=r.base_model,
            resident_modules=r.resident_modules,
            active_modules=tuple(r.active_modules),
            device_bytes_used=r.device_bytes_used,
            device_budget_bytes=r.device_budget_bytes,
            host_bytes_used=r.host_bytes_used,
            host_budget_bytes=r.host_budget_bytes,
            queued_rows=r.queued_rows,
            device=r.device,
        )

    def list_cubes(
        self, prefix: str = "", states: Iterable[str | int] = (), *, page_size: int = 100
    ) -> list[CubeManifest]:
        """Manifests of the node's cubes (all but expired unless ``states`` says otherwise)."""
        numbers = [_state_number(s) for s in states]
        out: list[CubeManifest] = []
        token = ""
        while True:
            req = pb.ListCubesRequest(
                cube_id_prefix=prefix, states=numbers, page_size=page_size, page_token=token
            )
            r = self._call(self.stub.ListCubes, req)
            out.extend(r.cubes)
            token = r.next_page_token
            if not token:
                return out

    def show(self, ref: str | pb.CubeRef) -> CubeManifest:
        """The manifest of one cube version (``name`` = its current version)."""
        signed = self._call(self.stub.GetManifest, pb.GetManifestRequest(ref=cube_ref(ref)))
        return manifest_from_bytes(signed.manifest)

    def put_cube(
        self, cube: MemCube, *, chunk_size: int = CHUNK_SIZE, timeout: float | object | None = ...
    ) -> PushResult:
        """Upload a cube as a chunk stream. The node stores it only once the whole payload verified
        against the manifest's digest and fits its model; a cut stream leaves nothing behind."""
        r = self._call(self.stub.PushCube, cube_stream(cube, chunk_size), timeout)
        return PushResult(ref=ref_text(r.stored), already_present=r.already_present)

    def get_cube(
        self,
        ref: str | pb.CubeRef,
        *,
        chunk_size: int = 0,
        timeout: float | object | None = ...,
    ) -> MemCube:
        """Download a cube and verify it: the manifest must parse and the payload match its digest."""
        req = pb.FetchCubeRequest(ref=cube_ref(ref), chunk_size=chunk_size)
        t = self.timeout if timeout is ... else timeout
        manifest: CubeManifest | None = None
        parts: list[bytes] = []
        expect = 0
        try:
            for msg in self.stub.FetchCube(req, timeout=t, metadata=self.metadata):
                kind = msg.WhichOneof("body")
                if kind == "plain_manifest" and manifest is None:
                    manifest = manifest_from_bytes(msg.plain_manifest.manifest)
                elif kind == "chunk" and manifest is not None:
                    if msg.chunk.index != expect:
                        raise errors.IntegrityError(
                            f"chunk {msg.chunk.index} arrived where chunk {expect} was expected"
                        )
                    parts.append(msg.chunk.data)
                    expect += 1
                else:
                    raise errors.IntegrityError(f"unexpected {kind} message in the cube stream")
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, address=self.address) from None
        if manifest is None:
            raise errors.IntegrityError("the node sent an empty cube stream")
        cube = MemCube(manifest, b"".join(parts))
        cube.verify()
        return cube

    # -- modules on the model -----------------------------------------------------------------------------

    def load(self, ref: str | pb.CubeRef, *, pin: bool = False) -> LoadResult:
        r = self._call(self.stub.Load, pb.LoadRequest(ref=cube_ref(ref), pin=pin))
        return LoadResult(
            ref_text(r.loaded), r.size_bytes, r.seconds, r.device_bytes_used, r.device_budget_bytes
        )

    def evict(self, ref: str | pb.CubeRef, *, tier: str = "device") -> str:
        """Move a module down one tier; returns where it is now ("host" or "disk")."""
        return self._call(self.stub.Evict, pb.EvictRequest(ref=cube_ref(ref), tier=tier)).now_in

    def activate(self, ref: str | pb.CubeRef, *, pin: bool = False) -> ActivateResult:
        r = self._call(self.stub.Activate, pb.ActivateRequest(ref=cube_ref(ref), pin=pin))
        return ActivateResult(ref_text(r.activated), lifecycle_name(r.state), r.seconds, tuple(r.active))

    def deactivate(self, ref: str | pb.CubeRef | None = None) -> tuple[str, ...]:
        """Deactivate one module (``None``: all of them); returns the modules still active."""
        req = pb.DeactivateRequest(ref=cube_ref(ref)) if ref else pb.DeactivateRequest()
        return tuple(self._call(self.stub.Deactivate, req).active)

    def bind_task(self, task: str, ref: str | pb.CubeRef | None) -> tuple[str, ...]:
        """Route Generate rows naming ``task`` (and no modules) to module ``ref``; ``None`` unbinds it.
        Returns every binding on the node, as ``"task=module"``."""
        req = pb.BindTaskRequest(task=task, ref=cube_ref(ref) if ref else None)
        return tuple(self._call(self.stub.BindTask, req).bindings)

    def generate(
        self, rows: Sequence[Row | str], *, timeout: float | object | None = ...
    ) -> list[Generation]:
        """Generate for every row (a plain string is a row with default settings), in order."""
        request = pb.GenerateRequest(rows=[_row_message(r) for r in rows])
        r = self._call(self.stub.Generate, request, timeout)
        return [
            Generation(
                text=g.text,
                memory_used=tuple(g.memory_used),
                new_tokens=g.new_tokens,
                reused_tokens=g.reused_tokens,
                seconds=g.seconds,
                batch_rows=r.batch_rows,
            )
            for g in r.results
        ]

    # -- lifecycle and merging -----------------------------------------------------------------------------

    def transition(self, ref: str | pb.CubeRef, target: str | int, *, reason: str = "") -> TransitionResult:
        req = pb.TransitionRequest(ref=cube_ref(ref), target=_state_number(target), reason=reason)
        r = self._call(self.stub.Transition, req)
        return TransitionResult(
            ref_text(cube_ref(ref)), lifecycle_name(r.from_state), lifecycle_name(r.to_state)
        )

    def archive(self, ref: str | pb.CubeRef, *, reason: str = "") -> TransitionResult:
        """Move a cube to cold storage (it cannot be loaded until restored)."""
        return self.transition(ref, "archived", reason=reason)

    def restore(self, ref: str | pb.CubeRef, *, reason: str = "") -> TransitionResult:
        """Bring an archived or expired cube back (ACTIVATED): the "time machine"."""
        return self.transition(ref, "activated", reason=reason)

    def expire(self, ref: str | pb.CubeRef, *, reason: str = "") -> TransitionResult:
        return self.transition(ref, "expired", reason=reason)

    def rollback(self, cube_id: str, *, to_version: str = "", reason: str = "") -> RollbackResult:
        req = pb.RollbackRequest(cube_id=cube_id, to_version=to_version, reason=reason)
        r = self._call(self.stub.Rollback, req)
        return RollbackResult(previous=ref_text(r.previous), current=ref_text(r.current))

    def feedback(
        self,
        ref: str | pb.CubeRef,
        *,
        prompt: str,
        answer: str,
        good: bool,
        correction: str = "",
        on_behalf_of: str = "",
        capability: pb.CapabilityToken | None = None,
    ) -> FeedbackResult:
        """Rate an answer ``ref`` gave (the module's current version when ``ref`` names none)."""
        req = pb.FeedbackRequest(
            ref=cube_ref(ref), prompt=prompt, answer=answer, good=good, correction=correction,
            on_behalf_of=on_behalf_of, capability=capability,
        )  # fmt: skip
        r = self._call(self.stub.Feedback, req)
        return FeedbackResult(ref_text(r.module), r.feedback_id, r.pending, r.decision, r.reason)

    def merge(
        self,
        sources: Sequence[str | pb.CubeRef],
        *,
        cube_id: str,
        method: str = "cat",
        weights: Sequence[float] | None = None,
        version: str = "1.0.0",
        density: float = 1.0,
        rank: int = 0,
        seed: int = 0,
        timeout: float | object | None = ...,
    ) -> CubeManifest:
        """Merge LoRA modules on the node into a new MERGED cube; returns its manifest."""
        req = pb.MergeRequest(
            sources=[cube_ref(s) for s in sources],
            weights=list(weights or ()),
            method=method,
            cube_id=cube_id,
            version=version,
            density=density,
            rank=rank,
            seed=seed,
        )
        return self._call(self.stub.Merge, req, timeout).manifest


def _row_message(row: Row | str) -> pb.GenerateRow:
    if isinstance(row, str):
        row = Row(row)
    return pb.GenerateRow(
        prompt=row.prompt,
        modules=[cube_ref(m) for m in row.modules],
        max_new_tokens=row.max_new_tokens,
        conversation_id=row.conversation_id,
        task=row.task,
        base_only=row.base_only,
    )


__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_ADDRESS",
    "ERROR_METADATA_KEY",
    "ActivateResult",
    "CallCancelledError",
    "DeadlineExceededError",
    "Generation",
    "LoadResult",
    "NodeClient",
    "NodeHealth",
    "PushResult",
    "RollbackResult",
    "Row",
    "TransitionResult",
    "cube_ref",
    "cube_stream",
    "error_from_rpc",
]
