"""Conversions between MIP messages and the node's own types, and the checks requests get on the way in.

Nothing here talks to gRPC: the servicer calls these, and errors raised here are ``memfed.errors`` types
that the service edge turns into status codes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from memfed.client import MAX_CHUNK_SIZE
from memfed.cube.manifest import CubeManifest, check_cube_id, manifest_to_bytes, parse_semver, ref_string
from memfed.errors import InvalidArgumentError, MemfedError, NotFoundError
from memfed.mip.v1 import cube_pb2, node_service_pb2
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


def chunk_messages(payload: bytes, chunk_size: int, start: int = 0) -> Iterator[bytes]:
    """The payload as encoded Chunk messages of ``chunk_size`` bytes, from chunk ``start`` on (resume)."""
    view = memoryview(payload)
    count = chunk_count(len(view), chunk_size)
    for i in range(start, count):
        data = view[i * chunk_size : (i + 1) * chunk_size]
        yield chunk_wire_prefix(i, len(data), i == count - 1) + data


# -- payload chunks on the wire ------------------------------------------------------------------------
#
# Chunk messages carry the payload, so they are encoded and decoded here by hand rather than by protobuf:
# serializing a 1 MiB ``bytes`` field through the protobuf runtime costs ~0.6 ms (most of a sealed
# transfer's sending side), and reading ``chunk.data`` back copies it again. The encoding is ordinary
# protobuf (CubeStreamMessage{chunk: Chunk{index, last, data}}, data written last so the prefix can be
# built before the bytes exist), so any protobuf reader reads it; the decoder takes that exact layout
# without copying and hands anything else to the protobuf runtime.


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A received payload chunk: ``data`` is a view into the received message (no copy)."""

    index: int
    data: memoryview
    last: bool


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def chunk_wire_prefix(index: int, size: int, last: bool) -> bytes:
    """The encoded ``CubeStreamMessage{chunk{index, last, data}}`` up to the first byte of its ``size``
    data bytes: the prefix followed by the data is the whole message."""
    inner = b"\x08" + _varint(index) + (b"\x18\x01" if last else b"") + b"\x12" + _varint(size)
    return b"\x1a" + _varint(len(inner) + size) + inner


def encode_stream_message(msg: pb.CubeStreamMessage | bytes) -> bytes:
    """FetchCube's response serializer: chunks come encoded already (``chunk_wire_prefix``)."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def _read_varint(raw: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(raw) or shift > 63:
            raise ValueError("truncated varint")
        b = raw[at]
        value |= (b & 0x7F) << shift
        at += 1
        if b < 0x80:
            return value & 0xFFFF_FFFF_FFFF_FFFF, at  # as protobuf reads an overlong varint
        shift += 7


def _fast_chunk(raw: bytes) -> ChunkView | None:
    """The chunk in ``raw`` when it is a lone chunk message of known fields, else None."""
    if not raw or raw[0] != 0x1A:
        return None
    try:
        length, at = _read_varint(raw, 1)
        if at + length != len(raw):
            return None
        index, last, data = 0, False, memoryview(b"")
        while at < len(raw):
            key, at = _read_varint(raw, at)
            if key == 0x08:
                index, at = _read_varint(raw, at)
            elif key == 0x18:
                flag, at = _read_varint(raw, at)
                last = flag != 0
            elif key == 0x12:
                n, at = _read_varint(raw, at)
                if at + n > len(raw):
                    return None
                data = memoryview(raw)[at : at + n]
                at += n
            else:
                return None
    except ValueError:
        return None
    return ChunkView(index, data, last)


def decode_stream_message(raw: bytes) -> pb.CubeStreamMessage | ChunkView:
    """FetchCube's response deserializer: a chunk as a ``ChunkView``, any other message as protobuf."""
    fast = _fast_chunk(raw)
    if fast is not None:
        return fast
    try:
        msg = pb.CubeStreamMessage.FromString(raw)
    except DecodeError:  # an empty message: the receiver refuses it as "an unreadable message"
        return pb.CubeStreamMessage()
    if msg.WhichOneof("body") == "chunk":
        c = msg.chunk
        return ChunkView(c.index, memoryview(c.data), c.last)
    return msg


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
