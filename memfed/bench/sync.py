"""``memfed bench sync``: node→node transfer, authorization latency and the registry under load.

Three parts, each in the same run as its baseline:

* transfer: a 64 MiB cube pulled by node B from node A over mutual TLS on loopback — catalog lookup and
  capability token from the registry, A seals it for B (HPKE + chunked AES-256-GCM; the seal is redone
  every repetition), streams it, B checks the header (signature, catalog), authenticates every chunk and
  appends its plaintext to its partial file while hashing it (SHA-256 digest, XXH3 local check), then
  its store adopts that file (fsync, rename, index row): the payload is written once — against the
  baseline: a raw ``grpc.aio`` server stream of the same 64 MiB in 1 MiB messages, no TLS, no protobuf
  (identity serializers), read by a sync client that only counts bytes. ``ratios.transfer_vs_raw_grpc``
  = our throughput / the raw stream's. ``ratios.mtls_stream_vs_raw_grpc`` is the floor under it: the
  same raw stream with mutual TLS and nothing else (``metrics.floor_mtls_stream_s``), and
  ``ratios.transfer_vs_mtls_stream`` how close to that floor we are. Measured in the same run, the
  floors under the receiving side
  (``metrics.floor_*``): writing + fsyncing 64 MiB to a fresh file, and SHA-256 over 64 MiB; and the
  part of our time spent adopting (``metrics.transfer_adopt_median_s``: fsync, rename, commit).
* authorize: ``Registry.is_allowed`` (deny-by-default lookup over grants and groups, plus one
  hash-chained audit append and commit) on SQLite with 10,000 cubes and 1,000 grants, mixed allow and
  deny; p50/p99 over 2,000 calls.
* load: the registry as its own process (`memfed registry serve`, mutual TLS) and 200 concurrent clients
  (one TLS channel each, grpc.aio) calling LookupVersions and IssueToken for 60 s: requests/s, p99 and
  errors (``metrics.load_errors``; the goal is zero).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memfed.bench.harness import BenchResult
from memfed.bench.store import bench_dir

SIZE = 64 << 20
CHUNK = 1 << 20
SWEEP = (4 << 20, 16 << 20, SIZE)  # payload sizes of the throughput-vs-size series (the last is SIZE)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


# -- baseline: raw gRPC stream ------------------------------------------------------------------------

RAW_OPTS = [("grpc.max_send_message_length", 4 << 20), ("grpc.max_receive_message_length", 4 << 20)]


def _raw_server_main(payload_file: str, port_file: str, tls_dir: str) -> None:
    """The baseline's server, in its own process (``python -m memfed.bench.sync raw-server F P T``): a
    ``grpc.aio`` server stream of the file's bytes in 1 MiB messages, identity serializers, on two ports:
    one plain (the baseline) and one with mutual TLS from ``T`` (the transport floor)."""
    import grpc

    from memfed.registry.tls import TlsFiles

    data = Path(payload_file).read_bytes()
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]

    async def serve() -> None:
        async def stream(request: bytes, context: Any) -> Any:
            n = int(request) if request else len(data)  # the first n bytes (the size sweep)
            for c in chunks[: -(-n // CHUNK)]:
                yield c

        handler = grpc.method_handlers_generic_handler(
            "raw.Raw", {"Get": grpc.unary_stream_rpc_method_handler(stream)}
        )
        server = grpc.aio.server(options=RAW_OPTS)
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        tls_port = server.add_secure_port(
            "127.0.0.1:0", TlsFiles.from_dir(Path(tls_dir)).server_credentials()
        )
        await server.start()
        tmp = Path(port_file + ".tmp")
        tmp.write_text(f"{port} {tls_port}")
        tmp.rename(port_file)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0)

    asyncio.run(serve())


def _cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system, all threads) used so far by this process and ``pids`` (Linux /proc;
    NaN where there is none)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    total = r.ru_utime + r.ru_stime
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")
    return total


def _spawn(args: list[str], port_file: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server process and wait for the port it writes into ``port_file``."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=f)
    end = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > end:
            _stop(proc)
            raise RuntimeError(f"{args[3:5]} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _make_pki(work: Path) -> Path:
    """A network CA and certificates for the registry and nodes A and B (``A`` also serves the raw
    stream's TLS port)."""
    from memfed.registry import pki

    d = work / "pki"
    pki.init_ca(d)
    for name in ("registry", "node-a", "node-b"):
        pki.issue(d, name)
    return d


def _raw_grpc_seconds(
    work: Path, pki_dir: Path, payload: bytes, repeats: int, sizes: tuple[int, ...]
) -> tuple[dict[int, list[float]], list[float], list[float]]:
    """Per size (a prefix of ``payload``, whole MiBs): the raw stream's seconds, after one warm-up; and
    the full payload's seconds over the same stream with mutual TLS (node B's certificate against node
    A's): the transport the issue prescribes, with nothing else done, on a warm channel, with the CPU
    seconds both ends spent on each of those."""
    import grpc

    from memfed.registry.tls import TlsFiles

    payload_file = work / "raw.bin"
    payload_file.write_bytes(payload)
    port_file = work / "raw.port"
    proc, _ = _spawn(
        [sys.executable, "-m", "memfed.bench.sync", "raw-server", str(payload_file), str(port_file),
         str(pki_dir / "node-a")],
        port_file,
        work / "raw.log",
    )  # fmt: skip
    port, tls_port = port_file.read_text().split()
    times: dict[int, list[float]] = {}

    tls_cpu: list[float] = []

    def timed(get: Any, size: int, cpu: list[float] | None = None) -> list[float]:
        runs = []
        for i in range(repeats + 1):  # the first warms the connection
            c0 = _cpu_seconds([proc.pid])
            t0 = time.perf_counter()
            n = sum(len(c) for c in get(str(size).encode()))
            runs.append(time.perf_counter() - t0)
            if cpu is not None and i:
                cpu.append(_cpu_seconds([proc.pid]) - c0)
            assert n == size
        return runs[1:]

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=RAW_OPTS) as ch:
            for size in sizes:
                times[size] = timed(ch.unary_stream("/raw.Raw/Get"), size)
        creds = TlsFiles.from_dir(pki_dir / "node-b").channel_credentials()
        opts = [*RAW_OPTS, ("grpc.ssl_target_name_override", "node-a")]
        with grpc.secure_channel(f"127.0.0.1:{tls_port}", creds, options=opts) as ch:
            tls = timed(ch.unary_stream("/raw.Raw/Get"), len(payload), tls_cpu)
    finally:
        _stop(proc)
        payload_file.unlink(missing_ok=True)
    return times, tls, tls_cpu


# -- our transfer -------------------------------------------------------------------------------------


def _aes_gcm_seconds(payload: bytes, repeats: int, sizes: tuple[int, ...]) -> dict[int, list[float]]:
    """Per size: AES-256-GCM over the payload's prefix in 1 MiB chunks, in this process (the cipher's
    floor; the seal bench measures it against our sealing)."""
    import secrets

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, nonce, view = AESGCM(secrets.token_bytes(32)), secrets.token_bytes(12), memoryview(payload)
    out: dict[int, list[float]] = {}
    for size in sizes:
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for off in range(0, size, CHUNK):
                aead.encrypt(nonce, view[off : off + CHUNK], None)
            runs.append(time.perf_counter() - t0)
        out[size] = runs
    return out


def _floors(work: Path, payload: bytes, repeats: int) -> dict[str, float]:
    """Medians of the work the receiving side cannot avoid, each alone on this machine in this run."""
    import hashlib

    view = memoryview(payload)
    write, sha = [], []
    for i in range(repeats):
        path = work / f"floor-{i}.bin"
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for off in range(0, len(view), CHUNK):
                os.write(fd, view[off : off + CHUNK])
            os.fsync(fd)
        finally:
            os.close(fd)
        write.append(time.perf_counter() - t0)
        path.unlink()
        t0 = time.perf_counter()
        hashlib.sha256(view).digest()
        sha.append(time.perf_counter() - t0)
    return {
        "floor_fresh_write_fsync_s": statistics.median(write),
        "floor_sha256_s": statistics.median(sha),
    }


def _transfer_seconds(
    work: Path,
    pki_dir: Path,
    payload: bytes,
    repeats: int,
    sizes: tuple[int, ...],
    adopt: list[float] | None = None,
    cpu: list[float] | None = None,
) -> dict[int, list[float]]:
    """Node B (this process) pulls from node A (`memfed node serve`, its own process) with the catalog
    and token from the registry (`memfed registry serve`, its own process): the layout of a real
    network, so the holder's sealing and the receiver's checks do not share one interpreter lock.

    A holds one cube per size in ``sizes`` (prefixes of ``payload``); per size, the seconds of each pull
    after one warm-up. ``adopt`` collects the store adoption times of the full-size pulls, ``cpu`` their
    CPU seconds in all three processes."""
    import json

    from memfed.crypto.identity import init_identity, load_public_identity
    from memfed.crypto.signing import sign_manifest
    from memfed.cube.digest import payload_digest
    from memfed.cube.manifest import new_manifest
    from memfed.node.service.sync import Syncer
    from memfed.node.store import CubeStore
    from memfed.node.tiny_models import save_tiny_model_dir
    from memfed.registry.node_identity import identity_message
    from memfed.registry.tls import TlsFiles
    from memfed.registry_client import RegistryClient

    class _TimedStore(CubeStore):
        """B's store, timing the adoption (fsync, rename, commit) apart from the transfer."""

        adopt_seconds: list[float]

        def adopt_file(self, *args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return super().adopt_file(*args, **kw)
            finally:
                self.adopt_seconds = [*getattr(self, "adopt_seconds", []), time.perf_counter() - t0]

    ids = {n: init_identity(work / f"id-{n}", name=n) for n in ("node-a", "node-b")}
    view = memoryview(payload)
    cubes = {
        size: new_manifest(
            cube_id=f"bench_cube_{size >> 20}mb",
            version="1.0.0",
            kind="plaintext",
            digest=payload_digest(view[:size]),
            size_bytes=size,
            owner="node-a",
        )
        for size in sizes
    }
    with CubeStore(work / "store-a") as store_a:  # A holds the cubes before it starts
        for size, m in cubes.items():
            store_a.put(m, view[:size])
    model = save_tiny_model_dir("llama", work / "tiny", seed=1)
    memfed = [sys.executable, "-m", "memfed.cli.main"]
    procs: list[subprocess.Popen[bytes]] = []
    times: dict[int, list[float]] = {}
    rb = None
    try:
        reg, reg_addr = _spawn(
            [*memfed, "registry", "serve", "--dir", str(work / "reg"), "--tls", str(pki_dir / "registry"),
             "--port", "0", "--port-file", str(work / "reg.port")],
            work / "reg.port", work / "reg.log",
        )  # fmt: skip
        procs.append(reg)
        key_file = work / "reg" / "key" / "identity.pub.json"
        with open(work / "node-a.log", "wb") as log:
            node_a = subprocess.Popen(
                [*memfed, "node", "serve", "--model", str(model), "--store", str(work / "store-a"),
                 "--port", "0", "--json", "--tls", str(pki_dir / "node-a"), "--registry", reg_addr,
                 "--registry-key", str(key_file), "--identity", str(work / "id-node-a"),
                 "--kv-cache-mb", "0"],
                stdout=subprocess.PIPE, stderr=log,
                env={**os.environ, "MEMFED_HOME": str(work / "home"), "TOKENIZERS_PARALLELISM": "false"},
            )  # fmt: skip
        procs.append(node_a)
        assert node_a.stdout is not None
        lines: list[str] = []
        while not lines or lines[-1].rstrip() != "}":
            line = node_a.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"node A did not start: {(work / 'node-a.log').read_text()[-2000:]}")
            lines.append(line)
        json.loads("".join(lines))
        reg_key = load_public_identity(key_file).signing_key
        tls_a, tls_b = TlsFiles.from_dir(pki_dir / "node-a"), TlsFiles.from_dir(pki_dir / "node-b")
        with RegistryClient(reg_addr, tls=tls_a, registry_key=reg_key) as ra:
            for m in cubes.values():
                ra.publish(sign_manifest(m, ids["node-a"]), "node-a")
                ra.grant(m.cube_id, "node:node-b", ["export"])
        rb = RegistryClient(reg_addr, tls=tls_b, registry_key=reg_key)
        rb.register(identity_message(ids["node-b"].public, tls_b.cert.read_bytes(), "node-b"))
        for size, m in cubes.items():
            runs = []
            for i in range(repeats + 1):
                with _TimedStore(work / f"store-b-{i}") as store_b:
                    syncer = Syncer(
                        store=store_b,
                        identity=ids["node-b"],
                        registry=rb,
                        tls=tls_b,
                        node_id="node-b",
                        host_fingerprint=None,
                        partial_dir=work / "partial-b",
                    )
                    c0 = _cpu_seconds([node_a.pid, reg.pid])
                    t0 = time.perf_counter()
                    result = syncer.sync(m.cube_id)
                    runs.append(time.perf_counter() - t0)
                    if cpu is not None and i and size == len(payload):
                        cpu.append(_cpu_seconds([node_a.pid, reg.pid]) - c0)
                    assert result.status == "synced" and result.bytes == size
                    if adopt is not None and i and size == len(payload):
                        adopt.extend(store_b.adopt_seconds)
                shutil.rmtree(work / f"store-b-{i}", ignore_errors=True)
            times[size] = runs[1:]
    finally:
        if rb is not None:
            rb.close()
        for p in reversed(procs):
            _stop(p)
    return times


# -- authorization latency ----------------------------------------------------------------------------


def _authorize_ms(work: Path, cubes: int, grants: int, calls: int) -> list[float]:
    from sqlalchemy import insert

    from memfed.registry import db
    from memfed.registry.core import Registry

    reg = Registry.open(work / "auth-reg")
    rng = random.Random(7)
    now = db.now_us()
    with reg.engine.begin() as conn:  # bulk set-up: the measured path is is_allowed, not publishing
        conn.execute(
            insert(db.cube_versions),
            [
                {
                    "cube_id": f"cube{i:05d}",
                    "version": "1.0.0",
                    "digest": f"sha256:{i:064x}",
                    "chain": "[]",
                    "signed_manifest": b"",
                    "key_id": "bench",
                    "publisher": "node:owner",
                    "sequence": i + 1,
                    "published_at": now,
                }
                for i in range(cubes)
            ],
        )
        rows = {}
        while len(rows) < grants:
            c, p, a = rng.randrange(cubes), rng.randrange(200), rng.choice(("read", "use", "export"))
            principal = f"node:n{p}" if p < 180 else f"group:g{p - 180}"
            rows[(c, principal, a)] = {
                "cube_id": f"cube{c:05d}",
                "principal": principal,
                "action": a,
                "expires_at": None,
                "granted_by": "operator",
                "created_at": now,
            }
        conn.execute(insert(db.grants), list(rows.values()))
        conn.execute(
            insert(db.group_members),
            [{"group_name": f"group:g{g}", "member": f"node:n{g}"} for g in range(20)],
        )
    keys = list(rows)
    lat = []
    try:
        for i in range(calls):
            if i % 2:
                c, p, a = keys[rng.randrange(len(keys))]
                principal = p if p.startswith("node:") else f"node:n{int(p[7:])}"
            else:
                c, principal, a = rng.randrange(cubes), f"node:n{rng.randrange(200)}", "admin"
            t0 = time.perf_counter()
            reg.is_allowed(principal, f"cube{c:05d}", a)
            lat.append((time.perf_counter() - t0) * 1e3)
        assert reg.verify_audit().ok
    finally:
        reg.close()
    return lat


def _sqlite_floor_ms(work: Path, calls: int) -> list[float]:
    """The floor under one audited decision: a bare sqlite3 INSERT + COMMIT (WAL, synchronous=NORMAL)."""
    import sqlite3

    conn = sqlite3.connect(work / "floor.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    lat = []
    for i in range(calls):
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (?, ?)", (i, b"x" * 200))
        conn.execute("COMMIT")
        lat.append((time.perf_counter() - t0) * 1e3)
    conn.close()
    return lat


# -- the registry under load --------------------------------------------------------------------------


def _load(work: Path, clients: int, seconds: float) -> dict[str, float]:
    import grpc

    from memfed.crypto.identity import init_identity
    from memfed.crypto.signing import sign_manifest
    from memfed.cube.digest import payload_digest
    from memfed.cube.manifest import new_manifest
    from memfed.mip.v1 import registry_service_pb2 as rpb
    from memfed.mip.v1 import registry_service_pb2_grpc
    from memfed.registry import pki
    from memfed.registry.core import Registry
    from memfed.registry.node_identity import identity_message
    from memfed.registry.tls import TlsFiles

    d = work / "load-pki"
    pki.init_ca(d)
    pki.issue(d, "registry")
    pki.issue(d, "node-l")
    ident = init_identity(work / "id-l", name="node-l")
    reg = Registry.open(work / "load-reg", ca_pem=(d / "ca.pem").read_bytes())
    tls = TlsFiles.from_dir(d / "node-l")
    reg.register_node(identity_message(ident.public, tls.cert.read_bytes(), "node-l"))
    m = new_manifest(
        cube_id="hot", version="1.0.0", kind="plaintext", digest=payload_digest(b"x"), size_bytes=1
    )
    reg.publish(sign_manifest(m, ident), "node-l")
    reg.close()
    port_file = work / "load.port"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memfed.cli.main",
            "registry",
            "serve",
            "--dir",
            str(work / "load-reg"),
            "--tls",
            str(d / "registry"),
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 60
        while not port_file.exists() and time.monotonic() < end:
            time.sleep(0.1)
        addr = f"127.0.0.1:{port_file.read_text()}"
        lat: list[float] = []
        errors = 0

        async def one(creds: Any, stop_at: float) -> None:
            nonlocal errors
            async with grpc.aio.secure_channel(addr, creds) as ch:
                stub = registry_service_pb2_grpc.RegistryServiceStub(ch)
                i = 0
                while time.monotonic() < stop_at:
                    t0 = time.perf_counter()
                    try:
                        if i % 2:
                            await stub.IssueToken(rpb.TokenRequest(cube_id="hot", action="admin"), timeout=30)
                        else:
                            await stub.LookupVersions(rpb.LookupRequest(cube_id="hot"), timeout=30)
                        lat.append((time.perf_counter() - t0) * 1e3)
                    except grpc.aio.AioRpcError:
                        errors += 1
                    i += 1

        async def main() -> float:
            creds = tls.channel_credentials()
            t0 = time.monotonic()
            await asyncio.gather(*(one(creds, t0 + seconds) for _ in range(clients)))
            return time.monotonic() - t0

        wall = asyncio.run(main())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return {
        "load_requests_per_s": len(lat) / wall,
        "load_p50_ms": _pct(lat, 0.5) if lat else 0.0,
        "load_p99_ms": _pct(lat, 0.99) if lat else 0.0,
        "load_errors": float(errors),
        "load_requests": float(len(lat)),
    }


def run(*, quick: bool = False) -> BenchResult:
    """Measure; see the module docstring. ``quick``: 2 repetitions, 2,000 cubes, 10 s of load.
    ``MEMFED_BENCH_SYNC_ONLY=transfer`` runs the transfer part alone (for iterating on it)."""
    repeats = 2 if quick else 5
    only = os.environ.get("MEMFED_BENCH_SYNC_ONLY", "")
    parent = bench_dir()
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sync-", dir=parent))
    result = BenchResult()
    try:
        payload = os.urandom(SIZE)
        pki_dir = _make_pki(work)
        raw_by_size, tls, tls_cpu = _raw_grpc_seconds(work, pki_dir, payload, repeats, SWEEP)
        adopt: list[float] = []
        cpu: list[float] = []
        ours_by_size = _transfer_seconds(work, pki_dir, payload, repeats, SWEEP, adopt, cpu)
        result.metrics.update(_floors(work, payload, repeats))
        aes_by_size = _aes_gcm_seconds(payload, repeats, SWEEP)
        del payload
        raw, ours = raw_by_size[SIZE], ours_by_size[SIZE]
        gbps = {  # throughput against payload size, for the report's plot
            name: [round(n / statistics.median(t[n]) / 1e9, 4) for n in SWEEP]
            for name, t in (("memfed_gbps", ours_by_size), ("raw_grpc_gbps", raw_by_size),
                            ("aes_gcm_gbps", aes_by_size))
        }  # fmt: skip
        result.series["transfer"] = {"size_mb": [n >> 20 for n in SWEEP], **gbps}
        result.metrics["transfer_adopt_median_s"] = statistics.median(adopt)
        result.metrics["transfer_mb"] = SIZE / 1e6
        result.metrics["transfer_median_s"] = statistics.median(ours)
        result.metrics["raw_grpc_median_s"] = statistics.median(raw)
        result.metrics["transfer_gbps"] = SIZE / statistics.median(ours) / 1e9
        result.metrics["raw_grpc_gbps"] = SIZE / statistics.median(raw) / 1e9
        result.ratios["transfer_vs_raw_grpc"] = statistics.median(raw) / statistics.median(ours)
        # The floor the goal meets first: the mutual-TLS stream alone, against the same raw stream.
        result.metrics["floor_mtls_stream_s"] = statistics.median(tls)
        result.ratios["mtls_stream_vs_raw_grpc"] = statistics.median(raw) / statistics.median(tls)
        result.ratios["transfer_vs_mtls_stream"] = statistics.median(tls) / statistics.median(ours)
        # CPU seconds per 64 MiB, both ends together: with two cores, wall >= CPU / 2.
        result.metrics["mtls_stream_cpu_s"] = statistics.median(tls_cpu)
        result.metrics["transfer_cpu_s"] = statistics.median(cpu)
        result.metrics["load_average_1m"] = os.getloadavg()[0]
        result.baseline = {
            "transfer": "raw grpc.aio server stream (grpcio) in its own process, no TLS, identity "
            "serializers, 1 MiB messages, read by a sync client in the bench process that only counts "
            f"bytes; same 64 MiB, same run, median of {repeats} after one warm-up",
            "ours": "node B (the bench process) pulls from node A (`memfed node serve`, its own process) "
            "with the registry (`memfed registry serve`) as a third process, all mutual TLS; timed from "
            "the catalog lookup and capability token on: B asks the registry for A's identity, A seals "
            "the stored plaintext cube for B on the fly (HPKE X25519 header, made once per recipient "
            "and kept in A's memory so a resume continues the same stream; AES-256-GCM over every 1 MiB "
            "chunk on every pull, no sealed copy on disk), B checks the header (signature, catalog), "
            "authenticates each chunk before keeping it, appends its plaintext to a resumable partial "
            "file (O_DIRECT where the filesystem has it) while hashing it (SHA-256 + XXH3-128), checks "
            "the digest and adopts the file into "
            "its store (fsync, rename, index row: the payload is written once); a fresh store for B "
            f"every pull; median of {repeats} after one warm-up pull (which also builds A's header)",
            "floors": "fresh 64 MiB file written in 1 MiB writes + fsync; hashlib.sha256 over 64 MiB; "
            f"median of {repeats}, same run",
            "mtls_stream": "the baseline's server and client with mutual TLS (node A's certificate "
            "serving, node B's calling) on a warm channel: the transport the issue prescribes and "
            f"nothing else; same 64 MiB, same run, median of {repeats} after one warm-up",
        }
        if only == "transfer":
            return result
        cubes = 2_000 if quick else 10_000
        lat = _authorize_ms(work, cubes, 1_000, 2_000)
        result.metrics["authorize_cubes"] = float(cubes)
        result.metrics["authorize_grants"] = 1_000.0
        result.metrics["authorize_p50_ms"] = _pct(lat, 0.5)
        result.metrics["authorize_p99_ms"] = _pct(lat, 0.99)
        floor = _sqlite_floor_ms(work, 2_000)
        result.metrics["sqlite_commit_floor_p50_ms"] = _pct(floor, 0.5)
        result.metrics["sqlite_commit_floor_p99_ms"] = _pct(floor, 0.99)
        result.metrics.update(_load(work, 200, 10.0 if quick else 60.0))
        result.baseline["authorize"] = (
            "Registry.is_allowed on SQLite (WAL), one audit append + commit per call"
        )
        result.baseline["load"] = (
            "registry process with mutual TLS; 200 grpc.aio clients, one channel each, "
            "alternating LookupVersions and IssueToken"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":  # the baseline's server process (see _raw_server_main)
    if sys.argv[1:2] == ["raw-server"]:
        _raw_server_main(sys.argv[2], sys.argv[3], sys.argv[4])
