"""Payload chunks on the wire: the hand-made encoding is plain protobuf both ways, and the receiver's
file sink writes exactly the payload's bytes with and without direct I/O."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError

from memfed.mip.v1 import envelope_pb2
from memfed.mip.v1 import node_service_pb2 as pb
from memfed.node.service.serde import (
    ChunkView,
    chunk_messages,
    chunk_wire_prefix,
    decode_stream_message,
    encode_stream_message,
)
from memfed.node.service.sync import _PayloadSink


@pytest.mark.parametrize(
    ("index", "data", "last"), [(0, b"", True), (0, b"x" * 300, False), (2**32 - 1, os.urandom(70_000), True)]
)
def test_encoded_chunk_is_the_protobuf_message(index: int, data: bytes, last: bool) -> None:
    wire = chunk_wire_prefix(index, len(data), last) + data
    msg = pb.CubeStreamMessage.FromString(wire)
    assert msg.WhichOneof("body") == "chunk"
    assert (msg.chunk.index, msg.chunk.data, msg.chunk.last) == (index, data, last)
    view = decode_stream_message(wire)
    assert isinstance(view, ChunkView) and (view.index, bytes(view.data), view.last) == (index, data, last)


def test_decoder_reads_what_the_protobuf_runtime_writes() -> None:
    """Another implementation may order fields or omit defaults differently: still a chunk."""
    data = os.urandom(5000)
    wire = pb.CubeStreamMessage(chunk=envelope_pb2.Chunk(index=7, data=data, last=True)).SerializeToString()
    view = decode_stream_message(wire)
    assert isinstance(view, ChunkView) and (view.index, bytes(view.data), view.last) == (7, data, True)
    header = pb.CubeStreamMessage(sealed_header=envelope_pb2.SealedCubeHeader(format_version=1))
    got = decode_stream_message(header.SerializeToString())
    assert isinstance(got, pb.CubeStreamMessage) and got.WhichOneof("body") == "sealed_header"
    assert encode_stream_message(header) == header.SerializeToString()
    assert encode_stream_message(wire) is wire


def test_decoder_does_not_take_a_damaged_chunk_as_a_chunk() -> None:
    wire = chunk_wire_prefix(3, 100, False) + b"y" * 100
    with pytest.raises(DecodeError):
        pb.CubeStreamMessage.FromString(wire[:-10])  # a truncated message is not protobuf either
    got = decode_stream_message(wire[:-10])  # so the receiver gets an empty one, which it refuses
    assert isinstance(got, pb.CubeStreamMessage) and got.WhichOneof("body") is None
    overlong = b"\x1a\x0f\x08" + b"\x80" * 9 + b"\x02" + b"\x12\x02ab"  # index 2**64 wraps, as in protobuf
    view = decode_stream_message(overlong)
    assert isinstance(view, ChunkView) and view.index == pb.CubeStreamMessage.FromString(overlong).chunk.index
    extra = wire[:1] + bytes([wire[1] + 2]) + wire[2:] + b"\x20\x01"  # an unknown field 4 in the chunk
    msg = decode_stream_message(extra)
    assert isinstance(msg, ChunkView) and msg.index == 3 and bytes(msg.data) == b"y" * 100


def test_plain_chunk_messages_resume_and_cover_the_payload() -> None:
    payload = os.urandom(1000)
    got = [pb.CubeStreamMessage.FromString(w).chunk for w in chunk_messages(payload, 300, start=1)]
    assert [c.index for c in got] == [1, 2, 3] and [c.last for c in got] == [False, False, True]
    assert b"".join(c.data for c in got) == payload[300:]


@pytest.mark.parametrize("chunk", [16 << 10, 1000])  # direct I/O where aligned; plain writes otherwise
def test_payload_sink_writes_exactly_the_payload(tmp_path: Path, chunk: int) -> None:
    payload = os.urandom(5 * chunk + 123)
    path = tmp_path / "p.part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, payload[:chunk])  # a kept prefix (a resumed transfer)
        sink = _PayloadSink(fd, chunk)
        if chunk % 4096:
            assert not sink.direct  # direct I/O needs aligned chunks
        buf = sink.buffer()
        for off in range(chunk, len(payload), chunk):
            part = payload[off : off + chunk]
            buf[: len(part)] = part
            sink.append(buf, len(part))
        sink.close()
        assert not sink.direct
    finally:
        os.close(fd)
    assert path.read_bytes() == payload
