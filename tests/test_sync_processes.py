"""The issue's "done when": a registry and three nodes as separate processes on loopback, all mutual TLS.

A publishes a cube and grants B; B's background sync pulls it (sealed) and B generates with it; C is
denied and the audit log shows it; A revokes B, and B's next pull (of a newer version) is denied. Then
a `memfed sync` process is killed mid-transfer and a second run resumes from its last verified chunk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from memfed.client import NodeClient, Row
from memfed.crypto.identity import init_identity, load_identity
from memfed.crypto.signing import sign_manifest
from memfed.processes import MEMFED, ServerProcess, wait_until
from memfed.registry import pki
from memfed.registry.tls import TlsFiles
from memfed.registry_client import RegistryClient


def Proc(args: list[str], log: Path) -> ServerProcess:
    """A server process whose MEMFED_HOME is beside its log (one home per process, as on separate hosts)."""
    env = {**os.environ, "MEMFED_HOME": str(log.parent / "home"), "TOKENIZERS_PARALLELISM": "false"}
    return ServerProcess(args, log, env)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from memfed.node.tiny_models import save_tiny_model_dir

    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("model") / "tiny", seed=3)


@pytest.fixture
def network(tmp_path: Path, tiny_model: Path) -> Iterator[dict]:
    d = tmp_path / "pki"
    pki.init_ca(d)
    for name in ("registry", "admin", "node-a", "node-b", "node-c"):
        pki.issue(d, name)
    procs: list[Proc] = []
    try:
        port_file = tmp_path / "reg.port"
        reg = Proc(
            [*MEMFED, "registry", "serve", "--dir", str(tmp_path / "reg"), "--tls", str(d / "registry"),
             "--port", "0", "--port-file", str(port_file), "--operator", "admin"],
            tmp_path / "registry.log",
        )  # fmt: skip
        procs.append(reg)
        wait_until(port_file.exists, 60, "the registry")
        reg_addr = f"127.0.0.1:{port_file.read_text()}"
        key = tmp_path / "reg" / "key" / "identity.pub.json"
        nodes: dict[str, Proc] = {}
        for name in ("node-a", "node-b", "node-c"):
            init_identity(tmp_path / f"id-{name}", name=name)
            sync = ["--sync", "legal_expert"] if name != "node-a" else []
            nodes[name] = Proc(
                [*MEMFED, "node", "serve", "--model", str(tiny_model), "--store",
                 str(tmp_path / f"store-{name}"), "--port", "0", "--json", "--tls", str(d / name),
                 "--registry", reg_addr, "--registry-key", str(key),
                 "--identity", str(tmp_path / f"id-{name}"), "--sync-interval", "0.5", "--kv-cache-mb", "0",
                 *sync],
                tmp_path / f"{name}.log",
            )  # fmt: skip
            procs.append(nodes[name])
        addrs = {name: p.read_json()["address"] for name, p in nodes.items()}
        yield {"pki": d, "reg": reg_addr, "key": key, "addrs": addrs, "tmp": tmp_path, "model": tiny_model}
    finally:
        for p in reversed(procs):
            p.stop()


def _node(net: dict, target: str, as_name: str) -> NodeClient:
    creds = TlsFiles.from_dir(net["pki"] / as_name).channel_credentials()
    return NodeClient(net["addrs"][target], credentials=creds, timeout=60)


def _reg(net: dict, name: str) -> RegistryClient:
    return RegistryClient(net["reg"], tls=TlsFiles.from_dir(net["pki"] / name))


def _lora(model_dir: Path, version: str, chain: tuple[str, ...] = ()):
    import torch

    from memfed.cube.build import lora_cube
    from memfed.cube.fingerprint import fingerprint_model
    from memfed.node.models import load_host_model

    model, _ = load_host_model(model_dir)
    g = torch.Generator().manual_seed(len(chain) + 1)
    factors = {
        n: (torch.randn(4, m.in_features, generator=g), torch.randn(m.out_features, 4, generator=g))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(("q_proj", "v_proj"))
    }
    return lora_cube(
        fingerprint_model(model), factors, cube_id="legal_expert", version=version, version_chain=chain
    )


def _denied(net: dict, principal: str, since: int) -> list:
    with _reg(net, "admin") as adm:
        return [
            e for e in adm.read_audit(since)
            if e.principal == principal and e.cube_id == "legal_expert" and not e.allowed
        ]  # fmt: skip


def test_registry_and_three_nodes_over_mtls(network: dict) -> None:
    net = network
    a_ident = load_identity(net["tmp"] / "id-node-a")
    v1 = _lora(net["model"], "1.0.0")
    with _node(net, "node-a", "node-a") as na, _reg(net, "node-a") as ra:
        na.put_cube(v1)
        ra.publish(sign_manifest(v1.manifest, a_ident), "node-a")
        ra.grant("legal_expert", "node:node-b", ["export"])
    # B's background sync pulls it, sealed, over mutual TLS; then B generates with it.
    with _node(net, "node-b", "node-b") as nb:
        wait_until(
            lambda: any(m.cube_id == "legal_expert" for m in nb.list_cubes()), 60, "B to sync the cube"
        )
        [out] = nb.generate([Row("The contract", modules=("legal_expert",), max_new_tokens=4)])
        assert "param:legal_expert" in " ".join(out.memory_used)
    # C has no grant: its sync is denied at the registry, and the audit log shows it.
    wait_until(lambda: bool(_denied(net, "node:node-c", 1)), 30, "C's denial in the audit log")
    with _node(net, "node-c", "node-c") as nc:
        assert not any(m.cube_id == "legal_expert" for m in nc.list_cubes())
    # A revokes B; a newer version appears, and B's next pull is denied.
    with _reg(net, "admin") as adm:
        mark = adm.read_audit()[-1].sequence + 1
    v2 = _lora(net["model"], "1.1.0", chain=(v1.manifest.digest,))
    with _node(net, "node-a", "node-a") as na, _reg(net, "node-a") as ra:
        ra.revoke("legal_expert", "node:node-b")
        na.put_cube(v2)
        ra.publish(sign_manifest(v2.manifest, a_ident), "node-a")
    wait_until(lambda: bool(_denied(net, "node:node-b", mark)), 30, "B's denied pull after the revocation")
    with _node(net, "node-b", "node-b") as nb:
        assert [m.version for m in nb.list_cubes() if m.cube_id == "legal_expert"] == ["1.0.0"]
    # The holder refuses a token-less fetch from C outright (offline check on node A).
    with _node(net, "node-a", "node-c") as ac:
        from memfed.errors import AuthenticationError

        with pytest.raises(AuthenticationError):
            ac.get_cube("legal_expert")
    # ... and reports that refusal to the registry's audit log.
    wait_until(
        lambda: any("refused by node:node-a" in e.reason for e in _denied(net, "node:node-c", mark)),
        30,
        "node A's offline refusal in the registry's audit log",
    )

    # Resumable: kill a `memfed sync` process mid-transfer; the next run resumes.
    payload = os.urandom(1 << 20)
    import hashlib

    from memfed.cube.manifest import new_manifest

    m = new_manifest(cube_id="big_notes", version="1.0.0", kind="plaintext", size_bytes=len(payload),
                     digest="sha256:" + hashlib.sha256(payload).hexdigest(), owner="node-a")  # fmt: skip
    from memfed.cube.core import MemCube

    with _node(net, "node-a", "node-a") as na, _reg(net, "node-a") as ra:
        na.put_cube(MemCube(m, payload))
        ra.publish(sign_manifest(m, a_ident), "node-a")
        ra.grant("big_notes", "node:node-c", ["export"])
    store = net["tmp"] / "store-c-cli"
    args = [*MEMFED, "sync", "big_notes", "--registry", net["reg"], "--tls", str(net["pki"] / "node-c"),
            "--registry-key", str(net["key"]), "--identity", str(net["tmp"] / "id-node-c"), "--model",
            str(net["model"]), "--store", str(store), "--chunk-kb", "16", "--json"]  # fmt: skip
    part = store.parent / f"{store.name}-sync" / "big_notes@1.0.0.payload.part"
    killed = subprocess.Popen([*args, "--throttle-ms", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(lambda: part.exists() and part.stat().st_size > 200_000, 90, "the partial transfer")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = subprocess.run(args, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    [result] = json.loads(done.stdout)["results"]
    assert result["status"] == "synced" and result["resumed_from_chunk"] >= 10
    assert result["chunks"] == 64 - result["resumed_from_chunk"] and not part.exists()
