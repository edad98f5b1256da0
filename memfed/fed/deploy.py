"""Flower's deployment engine, for real: SuperLink and SuperNodes as processes, with TLS.

Flower 1.42 has no Python call that starts a SuperLink or SuperNode, so these start its console scripts
(``flower-superlink``, ``flower-supernode``), wait on their gRPC health address, and stop them by pid.
The Flower app itself is a folder with a ``pyproject.toml`` naming ``memfed.fed.server_app:app`` and
``memfed.fed.client_app:app``, submitted with ``flwr run`` over the SuperLink's Control API; its run
config carries the server settings. Runtime dependency installation is disabled: memfed and its pinned
torch are already installed, and nodes may be offline.

A SuperNode runs in ``--isolation process`` mode with memfed's warm ClientApp executor
(``memfed.fed.worker``) beside it, so the model stays loaded from round to round instead of a fresh
``flwr-clientapp`` process (torch, transformers, PEFT, the model) per message. Flower's processes poll:
the SuperExec every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (0.1 s here, 1 s by default), the ServerApp's
Grid every 0.1 s (``memfed.fed.grid``; Flower's sleeps 3 s), and an idle SuperNode asks the SuperLink for
work every 3 s (fixed in flwr 1.42): that last wait is most of the time between two rounds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memfed.errors import DeadlineExceededError, NotFoundError, UnavailableError

APP_NAME = "memfed-fed"
CONNECTION = "memfed"


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment Flower's processes need: this venv's scripts on PATH, telemetry off, own home."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    # Flower's SuperExec polls for a ServerApp/ClientApp task to launch every 1 s by default; a round
    # launches one ClientApp process per message, so poll every 0.1 s (a cheap local call).
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _script(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise NotFoundError(
            f"Flower's {name} is not installed", hint="pip install 'flwr[simulation]>=1.42,<1.43'"
        )
    return found


@dataclass(frozen=True)
class Tls:
    """PEM files: the CA every party trusts, and the SuperLink's certificate and key."""

    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path, hosts: Sequence[str] = ()) -> Tls:
    """A network CA and a SuperLink certificate for 127.0.0.1/localhost and ``hosts`` (the names nodes
    reach it by), via ``memfed.registry.pki``."""
    from memfed.registry.pki import init_ca, issue

    ca_dir = Path(directory)
    if not (ca_dir / "ca.key").exists():
        init_ca(ca_dir)
    names = tuple(dict.fromkeys(("127.0.0.1", "localhost", *hosts)))
    issued = issue(ca_dir, "superlink", hosts=names, force=True)
    return Tls(issued.ca, issued.cert, issued.key)


def wait_healthy(address: str, proc: subprocess.Popen[Any], timeout_s: float, what: str) -> None:
    """Block until the gRPC health service at ``address`` answers SERVING, or raise."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise UnavailableError(f"{what} exited with code {proc.returncode} before it became healthy")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise DeadlineExceededError(f"{what} did not become healthy within {timeout_s:.0f} s")


@dataclass
class Launched:
    """A Flower process we started, and the health address it answers on once it is ready."""

    proc: subprocess.Popen[bytes]
    health: str
    what: str
    helpers: tuple[subprocess.Popen[bytes], ...] = ()  # e.g. a SuperNode's warm ClientApp executor

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        """Every process group to stop with this one."""
        return [self.proc, *self.helpers]

    def wait(self, timeout_s: float = 60.0) -> None:
        wait_healthy(self.health, self.proc, timeout_s, self.what)


def launch_superlink(
    workdir: Path, tls: Tls | None, *, port: int = 0, host: str = "127.0.0.1", log: Path | None = None
) -> tuple[Launched, str]:
    """Start a SuperLink (state in ``workdir/superlink.db``) listening on ``host``, without waiting;
    return it and the address this machine reaches it at.

    Not waiting lets a caller prepare other things (or start SuperNodes, which retry their connection)
    while the SuperLink starts; ``Launched.wait`` blocks until it is healthy.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    health = f"127.0.0.1:{free_port()}"
    cmd = [_script("flower-superlink"), "--port", str(port), "--host", host]
    cmd += ["--database", str(workdir / "superlink.db"), "--disable-runtime-dependency-installation"]
    cmd += ["--health-server-address", health]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-certfile",
            str(tls.cert),
            "--ssl-keyfile",
            str(tls.key),
            "--ssl-ca-certfile",
            str(tls.ca),
        ]
    out = open(log or workdir / "superlink.log", "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=flower_env(workdir / "flwr-home"),
        start_new_session=True,
    )
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host
    return Launched(proc, health, "the SuperLink"), f"{local}:{port}"


def start_superlink(
    workdir: Path,
    tls: Tls | None,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    log: Path | None = None,
    timeout_s: float = 60.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a SuperLink and wait until it is healthy; return (process, its address)."""
    launched, address = launch_superlink(workdir, tls, port=port, host=host, log=log)
    try:
        launched.wait(timeout_s)
    except BaseException:
        stop(launched.proc)
        raise
    return launched.proc, address


def node_config(values: Mapping[str, str]) -> str:
    """``--node-config`` text: TOML-quoted string values, space separated."""
    return " ".join(f'{k}="{v}"' for k, v in values.items() if v)


def launch_supernode(
    superlink: str, ca: Path | None, config: Mapping[str, str], workdir: Path, *, warm: bool = True
) -> Launched:
    """Start a SuperNode connected to ``superlink`` (this node's memfed settings as node config),
    without waiting for it: several can start at once.

    ``warm`` (the default): the SuperNode runs in ``--isolation process`` mode and memfed's warm
    executor (``memfed.fed.worker``) runs its ClientApp tasks in one long-lived process, in the
    SuperNode's process group, so the model stays loaded between rounds. Otherwise Flower starts a
    fresh ``flwr-clientapp`` process per message.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    health = f"127.0.0.1:{free_port()}"
    runtime = f"127.0.0.1:{free_port()}"
    host, port = runtime.rsplit(":", 1)
    cmd = [_script("flower-supernode"), "--superlink", superlink, "--host", host, "--port", port]
    cmd += ["--node-config", node_config(config), "--health-server-address", health]
    cmd += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    if warm:
        cmd += ["--isolation", "process"]
    env = flower_env(workdir / "flwr-home")
    out = open(workdir / "supernode.log", "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    helpers: tuple[subprocess.Popen[bytes], ...] = ()
    if warm:
        worker = [sys.executable, "-m", "memfed.fed.worker", "--runtime-api-address", runtime]
        worker += ["--supernode-pid", str(proc.pid)]  # it exits when the SuperNode is gone
        wlog = open(workdir / "worker.log", "ab")  # noqa: SIM115 - handed to the child process
        try:
            helper = subprocess.Popen(
                worker, stdout=wlog, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        except BaseException:
            stop(proc)
            raise
        helpers = (helper,)
    return Launched(proc, health, f"the SuperNode in {workdir}", helpers)


def start_supernode(
    superlink: str,
    ca: Path | None,
    config: Mapping[str, str],
    workdir: Path,
    *,
    timeout_s: float = 60.0,
    warm: bool = True,
) -> Launched:
    """Start a SuperNode (and its warm executor) and wait until it is healthy."""
    launched = launch_supernode(superlink, ca, config, workdir, warm=warm)
    try:
        launched.wait(timeout_s)
    except BaseException:
        stop_all(launched.procs)
        raise
    return launched


def write_app(directory: Path, run_config: Mapping[str, Any]) -> Path:
    """The Flower app folder: memfed's two apps and the run config's keys with their defaults."""
    import tomli_w

    directory.mkdir(parents=True, exist_ok=True)
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": APP_NAME,
            "version": "1.0.0",
            "description": "memfed: federated training of a shared LoRA cube",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "memfed",
                    "components": {
                        "serverapp": "memfed.fed.server_app:app",
                        "clientapp": "memfed.fed.client_app:app",
                    },
                    "config": dict(run_config),
                }
            }
        },
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
    return directory


def submit_run(app_dir: Path, superlink: str, ca: Path | None, workdir: Path) -> str:
    """``flwr run`` the app on ``superlink``; return the run id."""
    import json

    import tomli_w

    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    conn: dict[str, Any] = {"address": superlink}
    if ca is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(ca)
    (home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}), encoding="utf-8"
    )
    res = subprocess.run(
        [_script("flwr"), "run", str(app_dir), CONNECTION, "--format", "json"],
        capture_output=True,
        text=True,
        env=flower_env(home),
        timeout=120,
        check=False,
    )
    try:
        out = json.loads(res.stdout[res.stdout.index("{") :])
    except ValueError:
        out = {}
    if not out.get("success"):
        raise UnavailableError(f"flwr run failed: {out.get('error-message') or res.stderr.strip()[-500:]}")
    return str(out["run-id"])


def stop(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM to the process group we started (the SuperLink's SuperExec and app processes with it),
    then SIGKILL after ``timeout_s``: our own children, by id, never by name."""
    stop_all([proc], timeout_s)


def stop_all(procs: list[subprocess.Popen[Any]], timeout_s: float = 10.0) -> None:
    """``stop`` for several process groups at once: each gets SIGTERM first, so they shut down in
    parallel (a SuperNode takes about a second to leave the SuperLink), then any left get SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.monotonic() + timeout_s
        alive = False
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                alive = True
        if not alive:
            time.sleep(0.2)  # let the groups' other members finish their own shutdown
            return
