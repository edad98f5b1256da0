"""``memfed bench store``: put/get of a cube vs raw file I/O of the same bytes.

What is compared, per payload size (2.4 MB: a rank-16 q/v LoRA of a 12-layer, 768-wide model; 64 MiB:
a rank-16 q/k/v/o LoRA of a 7B-class Llama, 32 layers x 4096 wide; both real safetensors encodings of
random fp32 factors):

* ``put``: ``CubeStore.put`` (hash-while-write, temp file, fsync, rename, directory fsync, index commit)
  vs writing the same bytes to a new file with one ``os.write`` and ``os.fsync``.
* ``get``: ``CubeStore.get`` (index lookup, manifest parse, read with the XXH3-128 local check of the
  bytes whose SHA-256 was verified at put; see memfed.node.store_files) vs reading the
  whole file into memory: the faster of ``FileIO.read()`` and ``readinto`` a buffer allocated for the
  read (a buffer reused across reads would skip the page faults that any API returning fresh bytes
  pays, so it is not the same work).

Every repetition uses a new payload (a different safetensors metadata value, so a new digest: the store
cannot deduplicate) and new destination files for both sides, so both pay the same page-fault and
allocation costs. Both read back the file they just wrote, from the page cache. Sides alternate order
each repetition so drift from other load on the machine falls on both. Figures are medians.

What bounds ``get``: the verifying hash. SHA-256 (≈1.6-2.1 GB/s here; ``sha256_*_s``) alone would cost
up to 4x a raw read when the VM hands out warm memory (≈10 ms for 64 MiB), which is why the store
verifies reads with a local XXH3-128 check (``xxh3_*_s``), overlapped with the read on a worker, so a
get costs about max(read, hash). ``*_vs_raw_get`` ratios report each hash's floor next to the measured ratio;
``baseline.load_average_1m`` says whether another job held the cores (then the two run one after the
other).
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from memfed.bench.harness import BenchResult
from memfed.cube import new_manifest, payload_digest
from memfed.cube.manifest import CubeManifest
from memfed.cube.payload import describe_tensors, dominant_dtype, encode_tensors
from memfed.mip.v1 import cube_pb2

if TYPE_CHECKING:
    from memfed.node.store import CubeStore


@dataclass(frozen=True)
class _Shape:
    """A LoRA to synthesize: ``layers`` x ``modules`` targets of ``rank`` on ``width``-wide linears."""

    key: str  # metric name part, e.g. "2_4mb"
    layers: int
    modules: tuple[str, ...]
    width: int
    rank: int


SHAPES = (
    _Shape("2_4mb", layers=12, modules=("q_proj", "v_proj"), width=768, rank=16),
    _Shape("64mb", layers=32, modules=("q_proj", "k_proj", "v_proj", "o_proj"), width=4096, rank=16),
)


def bench_dir() -> Path:
    """Where to run: ``$MEMFED_BENCH_DIR``, else the user's cache dir (a real disk, where a store
    would live; /tmp may be tmpfs, where fsync is free and a put comparison means nothing)."""
    env = os.environ.get("MEMFED_BENCH_DIR")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "memfed" / "bench"


def filesystem_type(path: Path) -> str:
    """The mounted filesystem type holding ``path`` (Linux /proc/mounts), or "unknown"."""
    try:
        real = str(path.resolve())
        best, fstype = "", "unknown"
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
        return fstype
    except OSError:
        return "unknown"


def _fingerprint() -> cube_pb2.BaseModelFingerprint:
    """A synthetic base-model fingerprint (the bench measures storage, not model matching)."""
    return cube_pb2.BaseModelFingerprint(
        architecture="LlamaForCausalLM",
        model_type="llama",
        name="bench-synthetic",
        config_digest=hashlib.sha256(b"memfed bench config").digest(),
        shapes_digest=hashlib.sha256(b"memfed bench shapes").digest(),
    )


def _make_tensors(shape: _Shape):  # type: ignore[no-untyped-def]
    import torch

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(shape.layers):
        for mod in shape.modules:
            base = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            tensors[f"{base}.lora_A.weight"] = torch.randn(shape.rank, shape.width, generator=g)
            tensors[f"{base}.lora_B.weight"] = torch.randn(shape.width, shape.rank, generator=g) * 0.01
    return tensors


def _cube(shape: _Shape, tensors, rep: int) -> tuple[CubeManifest, bytes]:  # type: ignore[no-untyped-def]
    payload = encode_tensors(tensors, metadata={"memfed.bench.rep": str(rep)})
    infos = describe_tensors(payload)
    desc = cube_pb2.PayloadDescription(
        dtype=dominant_dtype(infos),
        lora=cube_pb2.LoraSpec(rank=shape.rank, alpha=2.0 * shape.rank, target_modules=list(shape.modules)),
    )
    desc.tensors.extend(infos)
    manifest = new_manifest(
        cube_id=f"bench_lora_{shape.key}",
        version=f"1.0.{rep}",
        kind="lora",
        digest=payload_digest(payload),
        size_bytes=len(payload),
        base_model=_fingerprint(),
        payload=desc,
        origin=cube_pb2.Origin(method="manual", description="memfed bench store"),
    )
    return manifest, payload


def _raw_put(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        off = 0
        while off < len(view):
            off += os.write(fd, view[off:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _raw_read(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.readall()


def _raw_readinto(path: Path) -> bytearray:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(buf)
        return buf


def _raw_readinto_hugepages(path: Path) -> bytes:
    """The raw read at its best here: into a new bytes whose pages are advised huge (the same
    allocation the store uses), so it pays the same, fewer, page faults."""
    from memfed.node.store_files import finish_bytes, new_bytes

    with open(path, "rb", buffering=0) as f:
        obj, view = new_bytes(os.fstat(f.fileno()).st_size)
        off = 0
        while off < len(view):
            off += f.readinto(view[off:])
        return finish_bytes(obj, view)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def _measure(
    store: CubeStore, raw_dir: Path, shape: _Shape, repeats: int
) -> tuple[int, dict[str, list[float]]]:
    """Seconds per repetition for each side and operation, and the payload size."""
    # All payloads are made before any timing: torch's thread pool keeps spinning for a while after
    # each op and would steal the CPU the timed code runs on.
    tensors = _make_tensors(shape)
    cubes = [_cube(shape, tensors, rep) for rep in range(repeats + 1)]
    del tensors
    time.sleep(0.5)
    size = len(cubes[0][1])
    keys = ("put", "get", "raw_put", "raw_read", "raw_readinto", "raw_readinto_hugepages")
    times: dict[str, list[float]] = {k: [] for k in keys}
    for rep in range(-1, repeats):  # rep -1 warms up both sides and is not counted
        manifest, payload = cubes.pop(0)
        raw_path = raw_dir / f"{shape.key}-{rep + 1}.bin"
        raw_path2 = raw_dir / f"{shape.key}-{rep + 1}.readinto.bin"
        gc.collect()
        sample: dict[str, float] = {}
        order = ("raw", "memfed") if rep % 2 == 0 else ("memfed", "raw")
        for side in order:
            if side == "raw":
                sample["raw_put"], _ = _timed(_raw_put, raw_path, payload)
            else:
                sample["put"], _ = _timed(store.put, manifest, payload)
        raw_path3 = raw_dir / f"{shape.key}-{rep + 1}.hugepages.bin"
        _raw_put(raw_path2, payload)  # new files for the other read variants, untimed
        _raw_put(raw_path3, payload)
        for side in order:
            if side == "raw":
                sample["raw_read"], got = _timed(_raw_read, raw_path)
                assert got == payload
                sample["raw_readinto"], got = _timed(_raw_readinto, raw_path2)
                assert got == payload
                sample["raw_readinto_hugepages"], got = _timed(_raw_readinto_hugepages, raw_path3)
                assert got == payload
            else:
                sample["get"], got = _timed(store.get, manifest.cube_id, manifest.version)
                assert got.payload == payload
            del got
        store.delete(manifest.cube_id, manifest.version)
        raw_path.unlink()
        raw_path2.unlink()
        raw_path3.unlink()
        if rep >= 0:
            for key, value in sample.items():
                times[key].append(value)
    return size, times


def run(*, quick: bool = False) -> BenchResult:
    """Measure; see the module docstring. ``quick`` uses 3 repetitions instead of 7."""
    from memfed.node.store import CubeStore

    repeats = 3 if quick else 7
    parent = bench_dir()
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="store-", dir=parent))
    fstype = filesystem_type(work)
    load_before = os.getloadavg()[0]
    result = BenchResult()
    try:
        raw_dir = work / "raw"
        raw_dir.mkdir()
        with CubeStore(work / "store") as store:
            for shape in SHAPES:
                size, times = _measure(store, raw_dir, shape, repeats)
                med = {key: statistics.median(v) for key, v in times.items()}
                raw_get = min(med["raw_read"], med["raw_readinto"], med["raw_readinto_hugepages"])
                k = shape.key
                result.metrics[f"size_{k}_bytes"] = float(size)
                result.metrics[f"put_{k}_s"] = med["put"]
                result.metrics[f"get_{k}_s"] = med["get"]
                result.metrics[f"raw_put_{k}_s"] = med["raw_put"]
                result.metrics[f"raw_get_{k}_s"] = raw_get
                result.metrics[f"raw_get_read_{k}_s"] = med["raw_read"]
                result.metrics[f"raw_get_readinto_{k}_s"] = med["raw_readinto"]
                result.metrics[f"raw_get_readinto_hugepages_{k}_s"] = med["raw_readinto_hugepages"]
                # The floors of a verified write (SHA-256) and read (XXH3): hashing the payload in memory.
                floor = os.urandom(size)
                for name, fn in (("sha256", hashlib.sha256), ("xxh3", xxhash.xxh3_128)):
                    result.metrics[f"{name}_{k}_s"] = statistics.median(
                        _timed(fn, floor)[0] for _ in range(5)
                    )
                del floor
                result.ratios[f"put_{k}_vs_raw"] = med["put"] / med["raw_put"]
                result.ratios[f"get_{k}_vs_raw"] = med["get"] / raw_get
                # What hashing alone costs next to the raw read: the least a store that checks that hash
                # on every read can reach without a second free core to overlap on.
                for name in ("sha256", "xxh3"):
                    result.ratios[f"{name}_{k}_vs_raw_get"] = result.metrics[f"{name}_{k}_s"] / raw_get
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result.baseline = {
        "name": "raw file I/O of the same bytes",
        "put": "os.open(O_CREAT|O_EXCL) of a new file, os.write of the whole buffer, os.fsync, close",
        "get": (
            "whole-file read into memory from the page cache: the fastest of FileIO.read() (new bytes), "
            "FileIO.readinto a bytearray allocated for the read, and readinto a new bytes whose pages are "
            "advised huge (the store's own allocation); all three reported"
        ),
        "memfed_put": "CubeStore.put: hash-while-write temp file, fsync, rename, dir fsync, SQLite commit",
        "memfed_get": (
            "CubeStore.get: index lookup + manifest parse + read into a new bytes (huge pages advised "
            "from 8 MiB) with XXH3-128 verification (recorded at put, when SHA-256 was checked against the "
            "manifest) overlapped on a worker thread"
        ),
        "payload": "safetensors encoding of random fp32 LoRA factors; a new digest each repetition",
        "repeats": repeats,
        "statistic": "median",
        "directory": str(parent),
        "filesystem": fstype,
        "index_synchronous": "FULL",
        # CPU contention changes the get ratio most: a verified read needs the CPU of a read plus a
        # hash, overlapped on two cores when they are free, serialized when another job holds them.
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }
    if fstype in ("tmpfs", "ramfs"):
        result.baseline["warning"] = (
            "bench directory is on tmpfs: fsync is free, put ratios are not disk figures"
        )
    return result
