"""Conversions between MIP messages and the node's own types, and the checks requests get on the way in.

Nothing here talks to gRPC: the servicer calls these, and errors raised here are ``memfed.errors`` types
that the service edge turns into status codes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from memfed.client import MAX_CHUNK_SIZE
from memfed.cube.manifest import CubeManifest, check_cube_id, manifest_to_bytes, parse_semver, ref_string
from memfed.errors import InvalidArgumentError, MemfedError, NotFoundError
from memfed.mip.v1 import cube_pb2, envelope_pb2, node_service_pb2
from memfed.node.generation import RowRequest, RowResult
from memfed.node.store import CubeStore

pb = node_service_pb2
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def check_ref(ref: pb.CubeRef, what: str = "cube") -> None:
    """A CubeRef must name a valid cube id, and its version (when given) must be semver."""
    if not ref.cube_id:
        raise InvalidArgumentError(
            f"the request names no {what} (CubeRef.cube_id is empty)",
            hint="name it as NAME or NAME@VERSION",
        )
    try:
        check_cube_id(ref.cube_id)
        if ref.version:
            parse_semver(ref.version)
    except MemfedError as exc:
        raise InvalidArgumentError(exc.message, hint=exc.hint) from exc


def ref_message(m: CubeManifest) -> pb.CubeRef:
    return pb.CubeRef(cube_id=m.cube_id, version=m.version, digest=m.digest)


def resolve_ref(store: CubeStore, ref: pb.CubeRef, *, node: str = "this node") -> CubeManifest:
    """The stored manifest a CubeRef means: an exact version, else the current one; a digest pins the
    content (a version whose payload is another digest is refused as not found)."""
    check_ref(ref)
    name = f"{ref.cube_id}@{ref.version}" if ref.version else ref.cube_id
    hint = "list its cubes with `memfed module list --node ADDR`, or push the cube there first"
    try:
        if ref.digest and not ref.version:
            matches = [
                m for m in store.list(ref.cube_id, include_expired=True)
                if m.cube_id == ref.cube_id and m.digest == ref.digest
            ]  # fmt: skip
            if not matches:
                raise NotFoundError(f"no version of cube {ref.cube_id!r} with digest {ref.digest} on {node}")
            return matches[-1]
        m = store.get_manifest(ref.cube_id, ref.version or None)
    except NotFoundError as exc:
        # The store's message names its folder; a remote caller needs the cube and the node instead.
        raise NotFoundError(f"no cube {name!r} on {node}", hint=hint) from exc
    if ref.digest and m.digest != ref.digest:
        raise NotFoundError(
            f"cube {ref_string(m)} on {node} has payload {m.digest}, not the requested {ref.digest}",
            hint="the version was republished with other content, or the reference is stale",
        )
    return m


def signed_manifest(m: CubeManifest) -> cube_pb2.SignedManifest:
    """The manifest as it goes on the wire. The store keeps no producer signature yet, so the message is
    unsigned; the crypto layer's sealed streams carry signed manifests."""
    return cube_pb2.SignedManifest(manifest=manifest_to_bytes(m))


def chunk_size_of(requested: int, default: int) -> int:
    if requested == 0:
        return default
    if not 0 < requested <= MAX_CHUNK_SIZE:
        raise InvalidArgumentError(
            f"chunk_size {requested} is out of range", hint=f"ask for 1..{MAX_CHUNK_SIZE} bytes, or 0"
        )
    return requested


def chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))


def check_resume(size: int, chunk_size: int, start: int) -> None:
    count = chunk_count(size, chunk_size)
    if start and start >= count:
        raise InvalidArgumentError(
            f"resume_from_chunk {start} is past the payload's {count} chunks of {chunk_size} bytes",
            hint="resume from the first chunk not yet received, with the same chunk_size",
        )


def chunk_messages(payload: bytes, chunk_size: int, start: int = 0) -> Iterator[pb.CubeStreamMessage]:
    """The payload as Chunk messages of ``chunk_size`` bytes, from chunk ``start`` on (resume)."""
    view = memoryview(payload)
    count = chunk_count(len(view), chunk_size)
    for i in range(start, count):
        data = bytes(view[i * chunk_size : (i + 1) * chunk_size])
        yield pb.CubeStreamMessage(chunk=envelope_pb2.Chunk(index=i, data=data, last=i == count - 1))


def page(items: Sequence[CubeManifest], page_size: int, token: str) -> tuple[list[CubeManifest], str]:
    """One page of a listing and the token of the next (empty at the end). Tokens are offsets."""
    size = page_size or DEFAULT_PAGE_SIZE
    if size > MAX_PAGE_SIZE:
        raise InvalidArgumentError(
            f"page_size {page_size} is too large", hint=f"ask for at most {MAX_PAGE_SIZE}"
        )
    try:
        start = int(token) if token else 0
    except ValueError:
        start = -1
    if start < 0:
        raise InvalidArgumentError(
            f"page_token {token!r} is not one this node issued", hint="start again with an empty page_token"
        )
    end = start + size
    return list(items[start:end]), str(end) if end < len(items) else ""


def module_names(row: pb.GenerateRow, resolve: dict[int, str]) -> tuple[str, ...]:
    """The module names of one row; digest-pinned refs were resolved to exact versions in ``resolve``
    (keyed by the index of the ref in the row)."""
    names = []
    for i, ref in enumerate(row.modules):
        if i in resolve:
            names.append(resolve[i])
        else:
            names.append(f"{ref.cube_id}@{ref.version}" if ref.version else ref.cube_id)
    return tuple(names)


def row_request(row: pb.GenerateRow, modules: tuple[str, ...]) -> RowRequest:
    return RowRequest(
        prompt=row.prompt,
        modules=modules,
        max_new_tokens=row.max_new_tokens or 32,
        conversation_id=row.conversation_id,
        task=row.task,
    )


def result_message(r: RowResult) -> pb.GenerateResult:
    return pb.GenerateResult(
        text=r.text,
        memory_used=list(r.memory_used),
        new_tokens=r.new_tokens,
        reused_tokens=r.reused_tokens,
        seconds=getattr(r, "seconds", 0.0),
    )
