"""Payload encoding: safetensors only. Nothing here can execute code from the bytes it reads."""

from __future__ import annotations

import json
import struct
import warnings
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


_TORCH_DTYPES = {
    "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8),
    "I8": ("int8", 1), "U8": ("uint8", 1), "I32": ("int32", 4), "I64": ("int64", 8), "BOOL": ("bool", 1),
}  # fmt: skip
_FLOAT_CODES = frozenset({"F32", "F16", "BF16", "F64"})


_Entry = tuple[str, str, list[int], int, int]  # name, dtype code, shape, begin, end (relative to data)


def _entries(
    payload: bytes | bytearray | memoryview,
) -> tuple[int, list[tuple[str, str, list[int], int, int]]]:
    """(data start, [(name, dtype code, shape, begin, end)]) with every entry checked against the buffer."""
    header = read_header(payload)  # type: ignore[arg-type]
    start = 8 + struct.unpack("<Q", bytes(payload[:8]))[0]
    size = len(payload) - start
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code = entry["dtype"]
            itemsize = _TORCH_DTYPES[code][1]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"payload tensor {name!r} has a malformed header entry") from exc
        count = 1
        for d in shape:
            count *= d
        if not 0 <= begin <= end <= size or end - begin != count * itemsize or min(shape, default=1) < 0:
            raise IntegrityError(f"payload tensor {name!r} lies outside the payload or has a wrong size")
        out.append((name, code, shape, begin, end))
    return start, out


def tensor_views(payload: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Tensors that *view* the payload's bytes (no copy): the fast path for loading a verified cube.

    The tensors keep ``payload`` alive and must be treated as read-only. Offsets and shapes are checked
    against the buffer, so a malformed header raises IntegrityError, never reads out of bounds.
    """
    return _views(payload, *_entries(payload))


def checked_views(payload: bytes | bytearray | memoryview) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``tensor_views`` and ``nonfinite_tensors`` in one header parse: (views, names holding NaN/Inf)."""
    start, entries = _entries(payload)
    return _views(payload, start, entries), _nonfinite(payload, start, entries)


def _views(
    payload: bytes | bytearray | memoryview, start: int, entries: list[_Entry]
) -> dict[str, torch.Tensor]:
    import torch

    out: dict[str, torch.Tensor] = {}
    flats: dict[str, torch.Tensor] = {}  # one view of the whole data region per dtype: slicing it is cheap
    data_bytes = len(payload) - start
    with warnings.catch_warnings():  # bytes are read-only; callers never write to these views
        warnings.simplefilter("ignore", UserWarning)
        for name, code, shape, begin, end in entries:
            torch_name, itemsize = _TORCH_DTYPES[code]
            dtype = getattr(torch, torch_name)
            if begin == end:
                out[name] = torch.empty(shape, dtype=dtype)
                continue
            if begin % itemsize == 0:
                flat = flats.get(code)
                if flat is None:
                    flat = flats[code] = torch.frombuffer(
                        payload, dtype=dtype, count=data_bytes // itemsize, offset=start
                    )
                out[name] = flat[begin // itemsize : end // itemsize].view(shape)
            else:  # an unaligned tensor (not written by safetensors): a view of its own bytes
                count = (end - begin) // itemsize
                out[name] = torch.frombuffer(payload, dtype=dtype, count=count, offset=start + begin).view(
                    shape
                )
    return out


# Exponent bits of each float format: all ones = Inf or NaN. Checked on the raw bits with numpy, in
# chunks: exact for every format (bf16 included, which numpy has no type for), single-threaded (torch's
# parallel isfinite stalls for milliseconds when the other core is busy) and without float conversions.
_EXPONENT_MASKS = {"F32": ("<u4", 0x7F800000), "F64": ("<u8", 0x7FF0000000000000),
                   "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}  # fmt: skip
_CHECK_CHUNK = 1 << 20  # elements


def _has_nonfinite(payload: bytes | bytearray | memoryview, code: str, offset: int, nbytes: int) -> bool:
    import numpy as np

    if code in ("F32", "F64"):  # min and max propagate NaN and reach ±Inf: two SIMD passes, no temporaries
        values = np.frombuffer(
            payload,
            dtype="<f4" if code == "F32" else "<f8",
            count=nbytes // (4 if code == "F32" else 8),
            offset=offset,
        )
        return not (np.isfinite(values.max()) and np.isfinite(values.min()))
    kind, mask = _EXPONENT_MASKS[code]
    dtype = np.dtype(kind)
    count = nbytes // dtype.itemsize
    bits = np.frombuffer(payload, dtype=dtype, count=count, offset=offset)
    m = dtype.type(mask)
    buf = np.empty(min(count, _CHECK_CHUNK), dtype=dtype)
    for lo in range(0, count, _CHECK_CHUNK):
        part = bits[lo : lo + _CHECK_CHUNK]
        out = buf[: len(part)]
        np.bitwise_and(part, m, out=out)
        if (out == m).any():
            return True
    return False


def nonfinite_tensors(payload: bytes | bytearray | memoryview) -> list[str]:
    """Names of floating-point payload tensors holding NaN or Inf ([] when all are finite).

    Tensors of one float format that lie back to back are checked in one pass (the usual cube: checking
    tensor by tensor costs a call each, which dominated loading a module).
    """
    return _nonfinite(payload, *_entries(payload))


def _nonfinite(payload: bytes | bytearray | memoryview, start: int, entries: list[_Entry]) -> list[str]:
    floats = sorted((e for e in entries if e[1] in _FLOAT_CODES and e[3] != e[4]), key=lambda e: e[3])
    bad: list[str] = []
    run: list[_Entry] = []

    def flush() -> None:
        if run and _has_nonfinite(payload, run[0][1], start + run[0][3], run[-1][4] - run[0][3]):
            bad.extend(e[0] for e in run if _has_nonfinite(payload, e[1], start + e[3], e[4] - e[3]))
        run.clear()

    for e in floats:
        if run and (e[1] != run[-1][1] or e[3] != run[-1][4]):
            flush()
        run.append(e)
    flush()
    return sorted(bad)
