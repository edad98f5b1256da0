"""Payload encoding: safetensors only. Nothing here can execute code from the bytes it reads."""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING

from memfed.errors import IntegrityError
from memfed.mip.v1 import cube_pb2

if TYPE_CHECKING:
    import torch

_DTYPES: dict[str, int] = {
    "F32": cube_pb2.DTYPE_F32,
    "F16": cube_pb2.DTYPE_F16,
    "BF16": cube_pb2.DTYPE_BF16,
    "F64": cube_pb2.DTYPE_F64,
    "I8": cube_pb2.DTYPE_I8,
    "U8": cube_pb2.DTYPE_U8,
    "I32": cube_pb2.DTYPE_I32,
    "I64": cube_pb2.DTYPE_I64,
    "BOOL": cube_pb2.DTYPE_BOOL,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def encode_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize tensors to safetensors bytes (contiguous CPU copies; deterministic for equal input)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)


def decode_tensors(payload: bytes) -> dict[str, torch.Tensor]:
    """Deserialize safetensors bytes; a malformed payload raises IntegrityError."""
    from safetensors.torch import load

    read_header(payload)  # clear error before safetensors' own
    try:
        return load(payload)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise IntegrityError(f"payload is not a valid safetensors file: {exc}") from exc


def read_header(payload: bytes) -> dict[str, dict]:
    """Parse the safetensors JSON header without touching tensor data."""
    if len(payload) < 8:
        raise IntegrityError(f"payload of {len(payload)} bytes is too short for safetensors")
    (n,) = struct.unpack("<Q", payload[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(payload):
        raise IntegrityError(
            "payload's safetensors header length is out of range (truncated or foreign file)"
        )
    try:
        header = json.loads(payload[8 : 8 + n])
    except ValueError as exc:
        raise IntegrityError(f"payload's safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise IntegrityError("payload's safetensors header is not a JSON object")
    return header


def describe_tensors(payload: bytes) -> list[cube_pb2.TensorInfo]:
    """TensorInfo entries (name, dtype, shape) for the manifest, sorted by name."""
    header = read_header(payload)
    out = []
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        out.append(
            cube_pb2.TensorInfo(
                name=name,
                dtype=_DTYPES.get(entry["dtype"], cube_pb2.DTYPE_UNSPECIFIED),
                shape=entry["shape"],
            )
        )
    return out


def dominant_dtype(tensors: list[cube_pb2.TensorInfo]) -> int:
    """The dtype holding most elements (what a user means by 'the cube's dtype')."""
    counts: dict[int, int] = {}
    for t in tensors:
        n = 1
        for d in t.shape:
            n *= d
        counts[t.dtype] = counts.get(t.dtype, 0) + n
    return max(counts, key=counts.__getitem__) if counts else cube_pb2.DTYPE_UNSPECIFIED
