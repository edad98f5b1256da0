"""``memfed bench seal``: sealing and opening ``.mcube`` files against their straight-line floors.

Per payload size (2.4 MB: a rank-16 q/v LoRA of a 12-layer, 768-wide model; 256 MB: a large module),
in the same process and run, each side best of 5 (medians reported too), sides alternating:

* seal: ``export_cube`` (store payload file → signed, HPKE-wrapped, chunked AES-256-GCM ``.mcube``,
  temp file + fsync + rename + dir fsync) of an already watermarked payload, vs the floor: read the
  payload file in 1 MiB chunks, ``AESGCM.encrypt_into`` a reused buffer, write, fsync.
* open: ``open_file`` (envelope, signature, HPKE unwrap, chunk authentication, SHA-256 digest, base-model
  check, safetensors check, then ``CubeStore.put_stream``: temp file, fsync, rename, index commit) into
  a fresh store, vs the floor: read, ``decrypt_into`` a reused buffer, SHA-256 the plaintext, write,
  fsync.

Parts, so a reader sees what bounds a verified open: AES-256-GCM alone and SHA-256 alone in GB/s over
the 256 MB payload in memory, and the watermark embedding time of a 2.4 MB LoRA (torch; reported
separately, as the issue asks, since sealing starts from an already watermarked payload).

Peak memory: a child process seals an empty payload (the payload-free baseline: imports, keys, buffers)
and reads its RSS, resets its peak-RSS mark (``/proc/self/clear_refs`` ← 5), seals the 256 MB payload
from a file and reads the peak (``VmHWM``); the metric is peak − baseline. (``ru_maxrss`` is useless
here: Linux carries it across ``exec`` from the parent, which held the payload.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from memfed.bench.harness import BenchResult
from memfed.bench.store import bench_dir, filesystem_type
from memfed.cube import new_manifest, payload_digest
from memfed.mip.v1 import cube_pb2

CHUNK = 1 << 20
TAG = 16
SIZES = (("2_4mb", 2_400_000), ("256mb", 256 * 1024 * 1024))


def _fingerprint() -> cube_pb2.BaseModelFingerprint:
    fp = cube_pb2.BaseModelFingerprint(
        architecture="LlamaForCausalLM",
        model_type="llama",
        name="bench",
        config_digest=hashlib.sha256(b"bench config").digest(),
        shapes_digest=hashlib.sha256(b"bench shapes").digest(),
        sample_seed=1,
        num_parameters=1,
        fingerprint_id="bench",
    )
    fp.weight_sample.extend([0.25])
    return fp


def _payload(size: int, seed: int) -> bytes:
    """A safetensors file of ``size`` bytes: one fp32 tensor of random values (numpy, no torch)."""
    n = (size - 128) // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (size - 8 - len(header) - 4 * n)
    data = np.random.default_rng(seed).standard_normal(n, dtype=np.float32).tobytes()
    return len(header).to_bytes(8, "little") + header + data


def floor_seal(src: Path, dst: Path, key: bytes) -> None:
    """The straight-line floor of sealing: read, AES-256-GCM in 1 MiB chunks into a reused buffer, write,
    fsync."""
    aead = AESGCM(key)
    inbuf, outbuf = bytearray(CHUNK), bytearray(CHUNK + TAG)
    iv, ov = memoryview(inbuf), memoryview(outbuf)
    i = 0
    with open(src, "rb", buffering=0) as fi, open(dst, "xb", buffering=0) as fo:
        while n := fi.readinto(iv):
            aead.encrypt_into(i.to_bytes(12, "big"), iv[:n], b"", ov[: n + TAG])
            fo.write(ov[: n + TAG])
            i += 1
        os.fsync(fo.fileno())


def floor_open(src: Path, dst: Path, key: bytes) -> bytes:
    """The straight-line floor of opening: read, ``decrypt_into`` a reused buffer, SHA-256, write, fsync."""
    aead = AESGCM(key)
    inbuf, outbuf = bytearray(CHUNK + TAG), bytearray(CHUNK)
    iv, ov = memoryview(inbuf), memoryview(outbuf)
    sha = hashlib.sha256()
    i = 0
    with open(src, "rb", buffering=0) as fi, open(dst, "xb", buffering=0) as fo:
        while n := fi.readinto(iv):
            aead.decrypt_into(i.to_bytes(12, "big"), iv[:n], b"", ov[: n - TAG])
            sha.update(ov[: n - TAG])
            fo.write(ov[: n - TAG])
            i += 1
        os.fsync(fo.fileno())
    return sha.digest()


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _gbps(size: int, seconds: float) -> float:
    return size / seconds / 1e9


def _measure_size(work: Path, key: str, size: int, repeats: int) -> dict[str, list[float]]:
    from memfed.crypto.exchange import export_cube
    from memfed.crypto.identity import init_identity
    from memfed.crypto.seal import open_file
    from memfed.crypto.signing import TrustedKeys
    from memfed.node.store import CubeStore

    d = work / key
    d.mkdir()
    alice, bob = init_identity(d / "alice"), init_identity(d / "bob")
    payload = _payload(size, seed=size)
    host = _fingerprint()
    m = new_manifest(
        cube_id=f"bench-{key}", version="1.0.0", kind="steering", digest=payload_digest(payload),
        size_bytes=len(payload), base_model=host,
    )  # fmt: skip
    times: dict[str, list[float]] = {"seal": [], "seal_floor": [], "open": [], "open_floor": []}
    aes_key = os.urandom(32)
    with CubeStore(d / "store_a") as sa:
        sa.put(m, payload)
        del payload
        src = sa.payload_path(m.digest)
        for rep in range(repeats):
            out, floor_out = d / f"x{rep}.mcube", d / f"floor{rep}.bin"
            # Alternate which side goes first, so drift from other load falls on both.
            pair = [
                (
                    "seal",
                    lambda o=out: export_cube(sa, m.cube_id, None, alice, [bob.public], o, watermark=False),
                ),
                ("seal_floor", lambda fo=floor_out: floor_seal(src, fo, aes_key)),
            ]
            for name, fn in pair if rep % 2 == 0 else pair[::-1]:
                times[name].append(_time(fn))
            with CubeStore(d / f"store_b{rep}") as sb:  # a fresh store (its layout made untimed)
                pair = [
                    (
                        "open",
                        lambda o=out, s=sb: open_file(
                            o, s, bob, TrustedKeys([alice.public]), host_fingerprint=host
                        ),
                    ),
                    ("open_floor", lambda fo=floor_out, r=rep: floor_open(fo, d / f"plain{r}.bin", aes_key)),
                ]
                for name, fn in pair if rep % 2 == 0 else pair[::-1]:
                    times[name].append(_time(fn))
            for p in (out, floor_out, d / f"plain{rep}.bin"):
                p.unlink()
            shutil.rmtree(d / f"store_b{rep}")
    return times


_PEAK_CHILD = r"""
import io, json, os, resource, sys
from pathlib import Path
from memfed.crypto.identity import init_identity
from memfed.crypto.seal import seal_file
from memfed.cube import new_manifest, payload_digest
d = Path(sys.argv[1]); size = int(sys.argv[2])
a, b = init_identity(d / "a"), init_identity(d / "b")
src = d / "payload.bin"
with open(src, "wb") as f:  # written 1 MiB at a time: the child never holds the payload
    for _ in range(size >> 20):
        f.write(os.urandom(1 << 20))
def seal(path, n):
    digest = "sha256:" + "0" * 64  # not checked when sealing; the opener would refuse it
    m = new_manifest(cube_id="peak", version="1.0.0", kind="plaintext", digest=digest, size_bytes=n)
    with open(path, "rb", buffering=0) as f:
        seal_file(d / "out.mcube", m, f, a, [b.public])
def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
empty = d / "empty.bin"; empty.write_bytes(b"")
seal(empty, 0)
base = status_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)
seal(src, size)
peak = status_kb("VmHWM")
print(json.dumps({"baseline_rss_kb": base, "peak_rss_kb": peak}))
"""


def _peak_extra_mb(work: Path, size: int) -> tuple[float, dict[str, int]]:
    d = work / "peak"
    d.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD, str(d), str(size)], capture_output=True, text=True, check=True
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return (data["peak_rss_kb"] - data["baseline_rss_kb"]) / 1024, data


def _watermark_embed_ms() -> float | None:
    """Median time to watermark a 2.4 MB rank-16 q/v LoRA payload (12 layers, 768 wide)."""
    try:
        import torch

        from memfed.crypto.watermark import mark_payload
        from memfed.cube.payload import encode_tensors
    except ImportError:
        return None
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(12):
        for mod in ("q_proj", "v_proj"):
            base = f"model.layers.{layer}.self_attn.{mod}"
            tensors[f"{base}.lora_A.weight"] = torch.randn(16, 768, generator=g) * 0.02
            tensors[f"{base}.lora_B.weight"] = torch.randn(768, 16, generator=g) * 0.02
    payload = encode_tensors(tensors)
    secret = os.urandom(32)
    runs = [_time(lambda: mark_payload(payload, secret, "bench-recipient")) for _ in range(5)]
    return statistics.median(runs) * 1e3


def _host_aware_mark_ms() -> dict[str, float]:
    """Host-aware marking on the embedded model (an all-linear rank-8 LoRA, 28 layers): the base-model
    statistics (sampling + one backward pass per batch) and the embedding, each a median of 3, in ms."""
    try:
        import torch

        from memfed.crypto.watermark import host_stats, mark_tensors
        from memfed.node.models import default_model_dir, load_host_model
        from memfed.node.runtime import ModuleRuntime
    except ImportError:
        return {}
    model, _ = load_host_model(default_model_dir())
    g = torch.Generator().manual_seed(0)
    tensors = {}
    out_layer = model.get_output_embeddings()
    for name, (n_in, n_out) in ModuleRuntime(model).linear_layers.items():
        if model.get_submodule(name) is out_layer:
            continue  # PEFT's all-linear leaves the output layer alone; so does this LoRA
        tensors[f"{name}.lora_A.weight"] = torch.randn(8, n_in, generator=g) * 0.05
        tensors[f"{name}.lora_B.weight"] = torch.randn(n_out, 8, generator=g) * 0.05
    secret = os.urandom(32)
    stats_runs, mark_runs = [], []
    for _ in range(3):
        t = time.perf_counter()
        stats = host_stats(model, tensors, scaling=2.0)
        stats_runs.append(time.perf_counter() - t)
        mark_runs.append(_time(lambda st=stats: mark_tensors(tensors, secret, "bench-recipient", stats=st)))
    return {
        "watermark_host_stats_ms": statistics.median(stats_runs) * 1e3,
        "watermark_host_aware_embed_ms": statistics.median(mark_runs) * 1e3,
    }


def run(*, quick: bool = False) -> BenchResult:
    """Measure; see the module docstring. ``quick`` uses 2 repetitions and a 64 MiB large payload."""
    repeats = 2 if quick else 5
    sizes = (SIZES[0], ("256mb", 64 * 1024 * 1024)) if quick else SIZES
    parent = bench_dir()
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="seal-", dir=parent))
    result = BenchResult()
    load_before = os.getloadavg()[0]
    try:
        for key, size in sizes:
            t = _measure_size(work, key, size, repeats)
            for name, v in t.items():
                result.metrics[f"{name}_{key}_best_s"] = min(v)
                result.metrics[f"{name}_{key}_median_s"] = statistics.median(v)
            result.ratios[f"seal_{key}_vs_floor"] = min(t["seal"]) / min(t["seal_floor"])
            result.ratios[f"open_{key}_vs_floor"] = min(t["open"]) / min(t["open_floor"])
            result.ratios[f"seal_{key}_vs_floor_median"] = statistics.median(t["seal"]) / statistics.median(
                t["seal_floor"]
            )
            result.ratios[f"open_{key}_vs_floor_median"] = statistics.median(t["open"]) / statistics.median(
                t["open_floor"]
            )
            if key == "256mb":
                result.metrics["seal_gbps_256mb"] = _gbps(size, min(t["seal"]))
                result.metrics["open_gbps_256mb"] = _gbps(size, min(t["open"]))
                result.metrics["seal_floor_gbps_256mb"] = _gbps(size, min(t["seal_floor"]))
                result.metrics["open_floor_gbps_256mb"] = _gbps(size, min(t["open_floor"]))
        # Headline ratios: the large payload (the 2.4 MB ones are reported per size above).
        result.ratios["seal_vs_floor"] = result.ratios["seal_256mb_vs_floor"]
        result.ratios["open_vs_floor"] = result.ratios["open_256mb_vs_floor"]

        # Parts: AES-GCM alone and SHA-256 alone over the large payload in memory.
        big = sizes[1][1]
        data = memoryview(os.urandom(big))
        out = memoryview(bytearray(CHUNK + TAG))
        aead = AESGCM(os.urandom(32))

        def aes_only() -> None:
            for i, off in enumerate(range(0, big, CHUNK)):
                aead.encrypt_into(i.to_bytes(12, "big"), data[off : off + CHUNK], b"", out)

        result.metrics["aes_gcm_gbps"] = _gbps(big, min(_time(aes_only) for _ in range(3)))
        result.metrics["sha256_gbps"] = _gbps(big, min(_time(lambda: hashlib.sha256(data)) for _ in range(3)))

        extra_mb, raw = _peak_extra_mb(work, sizes[1][1])
        result.metrics["seal_256mb_peak_extra_mb"] = extra_mb
        wm = _watermark_embed_ms()
        if wm is not None:
            result.metrics["watermark_embed_ms"] = wm
        result.metrics.update(_host_aware_mark_ms())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.baseline = {
        "name": "straight-line AES-256-GCM file sealing/opening with cryptography's AESGCM",
        "seal_floor": "FileIO.readinto 1 MiB reused buffer → AESGCM.encrypt_into reused buffer → write; "
        "fsync",
        "open_floor": "readinto → AESGCM.decrypt_into reused buffer → hashlib.sha256.update → write; fsync",
        "memfed_seal": "export_cube from the store's payload file (no watermark: payload already marked)",
        "memfed_open": "open_file into a fresh CubeStore (store layout created untimed)",
        "statistic": "best of N (ratios); medians reported alongside",
        "repeats": repeats,
        "peak_memory_method": "child process: VmRSS after sealing an empty payload, then clear_refs=5 and "
        f"VmHWM after sealing 256 MB from a file ({raw})",
        "directory": str(parent),
        "filesystem": filesystem_type(parent),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }
    return result
