"""Node-to-node sync over mutual TLS, in one process: a registry and two nodes on loopback ports with
real certificates. The holder enforces capability tokens offline; the receiver pulls the sealed stream,
verifies every chunk, resumes a cut transfer from its last verified chunk, and its store never shows a
partial cube."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from registry_support import make_party

from memfed.client import NodeClient, Row
from memfed.crypto.signing import sign_manifest
from memfed.cube.core import MemCube
from memfed.errors import AuthenticationError, PermissionDeniedError
from memfed.mip.v1 import cube_pb2
from memfed.mip.v1 import node_service_pb2 as pb
from memfed.node.service import BackgroundServer, Node, NodeServer
from memfed.node.service.capability import CapabilityAuthorizer
from memfed.node.service.feedback import FeedbackIntake
from memfed.node.service.sealed import SealedSource
from memfed.node.service.sync import Syncer
from memfed.node.tiny_models import save_tiny_model_dir
from memfed.registry import pki
from memfed.registry.core import Registry
from memfed.registry.service import BackgroundRegistry, RegistryServer
from memfed.registry.tls import TlsFiles
from memfed.registry_client import RegistryClient


def _lora(node: Node, cube_id: str, seed: int, rank: int = 4):
    import torch

    from memfed.cube.build import lora_cube

    g = torch.Generator().manual_seed(seed)
    factors = {
        n: (
            torch.randn(rank, m.in_features, generator=g) * 0.5,
            torch.randn(m.out_features, rank, generator=g) * 0.5,
        )
        for n, m in node.model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(("q_proj", "v_proj"))
    }
    return lora_cube(node.fingerprint, factors, cube_id=cube_id)


class World:
    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.tmp = tmp
        self.pki = tmp / "pki"
        pki.init_ca(self.pki)
        self.parties = {n: make_party(self.pki, n) for n in ("node-a", "node-b", "node-c")}
        pki.issue(self.pki, "registry")
        self.registry = Registry.open(tmp / "reg", ca_pem=(self.pki / "ca.pem").read_bytes())
        self.reg_bg = BackgroundRegistry(
            RegistryServer(self.registry, tls=TlsFiles.from_dir(self.pki / "registry"))
        )
        self.reg_addr = self.reg_bg.start()
        self.nodes: dict[str, Node] = {}
        self.servers: dict[str, BackgroundServer] = {}
        self.verifiers = {}
        for name in ("node-a", "node-b"):
            node = Node.open(model_dir, tmp / f"store-{name}", node_id=name)
            tls = TlsFiles.from_dir(self.pki / name)
            verifier = self.registry.token_verifier()
            rc = self.client(name)
            sealer = SealedSource(node, self.parties[name].identity, rc.get_node, tmp / f"sealed-{name}")
            server = NodeServer(
                node,
                credentials=tls.server_credentials(),
                authorizer=CapabilityAuthorizer(verifier, node_id=name),
                sealer=sealer,
                feedback=FeedbackIntake(node),
            )
            bg = BackgroundServer(server)
            addr = bg.start()
            rc.register(self.parties[name].message(addr))
            self.nodes[name], self.servers[name], self.verifiers[name] = node, bg, verifier
        with self.client("node-c") as c:
            c.register(self.parties["node-c"].message("127.0.0.1:1"))

    def client(self, name: str) -> RegistryClient:
        return RegistryClient(
            self.reg_addr, tls=TlsFiles.from_dir(self.pki / name), registry_key=self.registry.public_key
        )

    def node_client(self, target: str, as_name: str) -> NodeClient:
        creds = TlsFiles.from_dir(self.pki / as_name).channel_credentials()
        return NodeClient(self.servers[target].address, credentials=creds, timeout=60)

    def hold(
        self, signed: cube_pb2.SignedManifest, payload: bytes, grants: dict[str, list[str]] | None = None
    ) -> None:
        """A stores the cube of ``signed`` and publishes it, then grants B each cube's
        actions in ``grants``."""
        from memfed.cube.manifest import manifest_from_bytes

        self.nodes["node-a"].store.put(manifest_from_bytes(signed.manifest), payload)
        with self.client("node-a") as ra:
            ra.publish(signed, "node-a")
            for cube_id, actions in (grants or {}).items():
                ra.grant(cube_id, "node:node-b", actions)

    def hold_lora(self, cube: MemCube, grants: dict[str, list[str]] | None = None) -> None:
        self.hold(sign_manifest(cube.manifest, self.parties["node-a"].identity), cube.payload, grants)

    def offer(self, cube_id: str, payload: bytes) -> None:
        """A holds ``cube_id`` 1.0.0 (plaintext), publishes it, and grants B ``export``."""
        m = self.parties["node-a"].manifest(cube_id, "1.0.0", payload=payload)
        self.hold(m, payload, {cube_id: ["export"]})

    def syncer(self, name: str, **kw) -> Syncer:
        node = self.nodes[name]
        kw.setdefault("partial_dir", self.tmp / f"partial-{name}")
        return Syncer(
            store=node.store, identity=self.parties[name].identity, registry=self.client(name),
            tls=TlsFiles.from_dir(self.pki / name), node_id=name, host_fingerprint=lambda: node.fingerprint,
            **kw,
        )  # fmt: skip

    def close(self) -> None:
        for bg in self.servers.values():
            bg.stop()
            bg.server.feedback.close()
        for n in self.nodes.values():
            n.close()
        self.reg_bg.stop()
        self.registry.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    model = save_tiny_model_dir("llama", tmp_path_factory.mktemp("model") / "tiny", seed=3)
    w = World(tmp_path_factory.mktemp("sync"), model)
    yield w
    w.close()


def test_publish_grant_sync_generate_revoke(world: World) -> None:
    a, b = world.nodes["node-a"], world.nodes["node-b"]
    cube = _lora(a, "legal_expert", 1)
    world.hold_lora(cube)
    syncer = world.syncer("node-b")
    with pytest.raises(PermissionDeniedError):
        syncer.sync("legal_expert")
    assert not b.store.has("legal_expert", cube.manifest.version)
    with world.client("node-a") as ra:
        ra.grant("legal_expert", "node:node-b", ["export"])
    result = syncer.sync("legal_expert")
    assert result.status == "synced" and result.holder == "node-a"
    assert syncer.sync("legal_expert").status == "up-to-date"
    with world.node_client("node-b", "node-b") as nb:
        [out] = nb.generate([Row("hello", modules=("legal_expert",), max_new_tokens=4)])
        assert "param:legal_expert" in " ".join(out.memory_used)
    assert not list((world.tmp / "partial-node-b").iterdir())
    with world.client("node-a") as ra:
        ra.revoke("legal_expert", "node:node-b")
    with pytest.raises(PermissionDeniedError):
        world.client("node-b").issue_token("legal_expert", "export")


def test_holder_enforces_tokens_offline(world: World) -> None:
    cube = _lora(world.nodes["node-a"], "secret_cube", 2)
    world.hold_lora(cube, {"secret_cube": ["read"], "legal_expert": ["export"]})
    with world.client("node-b") as rb:
        read_tok = rb.issue_token("secret_cube", "read")
        other_tok = rb.issue_token("legal_expert", "export")
    ref = pb.CubeRef(cube_id="secret_cube")
    with world.node_client("node-a", "node-b") as nb:
        stub = nb.stub
        for tok, err in (
            (None, "UNAUTHENTICATED"),
            (read_tok, "PERMISSION_DENIED"),
            (other_tok, "PERMISSION_DENIED"),
        ):
            req = pb.FetchCubeRequest(ref=ref, capability=tok)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.FetchCube(req, timeout=10))
            assert info.value.code().name == err
        forged = pb.CapabilityToken(
            token=read_tok.token.replace(b"read", b"admn"), signature=read_tok.signature
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stub.FetchCube(pb.FetchCubeRequest(ref=ref, capability=forged), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(PermissionDeniedError):
            nb.list_cubes()
    # B's genuine token presented by C (C's own certificate): refused, the token names B.
    with world.client("node-b") as rb:
        b_tok = rb.issue_token("secret_cube", "read")
    with world.node_client("node-a", "node-c") as nc, pytest.raises(PermissionDeniedError, match="issued to"):
        nc._call(nc.stub.GetManifest, pb.GetManifestRequest(ref=ref, capability=b_tok))
    with world.node_client("node-a", "node-a") as na:  # the node's own certificate runs it: no token
        assert "secret_cube" in [m.cube_id for m in na.list_cubes()]


def test_resume_after_cut_and_nothing_partial_in_store(world: World) -> None:
    from memfed.errors import UnavailableError

    b = world.nodes["node-b"]
    payload = os.urandom(300_000)
    world.offer("big_notes", payload)
    # A slow receiver whose call deadline cuts the transfer part way (a dropped link, a killed process).
    slow = world.syncer("node-b", chunk_size=16 << 10, chunk_delay_s=0.05, timeout_s=0.6)
    with pytest.raises(UnavailableError):
        slow.sync("big_notes")
    part = world.tmp / "partial-node-b" / "big_notes@1.0.0.payload.part"
    assert part.exists() and not b.store.has("big_notes", "1.0.0")
    kept = part.read_bytes()  # the verified plaintext so far, in whole chunks: written once, adopted later
    assert 0 < len(kept) < len(payload) and kept == payload[: len(kept)]
    assert part.with_name("big_notes@1.0.0.header").exists()
    assert [x.cube_id for x in b.store.list()].count("big_notes") == 0
    result = world.syncer("node-b", chunk_size=16 << 10).sync("big_notes")
    total = -(-len(payload) // (16 << 10))
    assert 0 < result.resumed_from_chunk < total and result.chunks == total - result.resumed_from_chunk
    assert b.store.get("big_notes", "1.0.0").payload == payload and not part.exists()


def test_damaged_partial_file_fails_the_digest_and_starts_over(world: World) -> None:
    from memfed.errors import IntegrityError, UnavailableError

    b = world.nodes["node-b"]
    payload = os.urandom(200_000)
    world.offer("more_notes", payload)
    slow = world.syncer("node-b", chunk_size=16 << 10, chunk_delay_s=0.05, timeout_s=0.5)
    with pytest.raises(UnavailableError):
        slow.sync("more_notes")
    part = world.tmp / "partial-node-b" / "more_notes@1.0.0.payload.part"
    kept = bytearray(part.read_bytes())
    assert len(kept) >= 16 << 10
    kept[100] ^= 0xFF  # the kept plaintext is not re-authenticated; the digest over it all catches this
    part.write_bytes(bytes(kept) + b"half a chunk")  # and a torn tail is trimmed to whole chunks
    with pytest.raises(IntegrityError, match="not the signed digest"):
        world.syncer("node-b", chunk_size=16 << 10).sync("more_notes")
    assert not part.exists() and not part.with_name("more_notes@1.0.0.header").exists()
    assert not b.store.has("more_notes", "1.0.0")
    result = world.syncer("node-b", chunk_size=16 << 10).sync("more_notes")
    assert result.resumed_from_chunk == 0 and b.store.get("more_notes", "1.0.0").payload == payload


def test_full_disk_mid_transfer_is_a_storage_error_and_the_store_unchanged(
    world: World, tmp_path: Path
) -> None:
    """The receiver's disk fills up part way: StorageError (not a crash, not the holder's fault), nothing
    in the store, and the transfer goes through once there is room."""
    import subprocess

    from memfed.errors import StorageError

    small = tmp_path / "small-disk"
    small.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a 256 KiB tmpfs (a disk that fills up)")
    b = world.nodes["node-b"]
    payload = os.urandom(600_000)
    world.offer("full_disk_notes", payload)
    try:
        with pytest.raises(StorageError, match="partial transfer file"):
            world.syncer("node-b", chunk_size=16 << 10, partial_dir=small).sync("full_disk_notes")
        assert not b.store.has("full_disk_notes", "1.0.0")
    finally:
        subprocess.run(["umount", str(small)], check=True)
    result = world.syncer("node-b", chunk_size=16 << 10).sync("full_disk_notes")
    assert result.status == "synced" and b.store.get("full_disk_notes", "1.0.0").payload == payload


def test_feedback_needs_its_own_grant(world: World) -> None:
    """Rating a module's answers is a grant of its own (`feedback`): a `use` token does not cover it, a
    relayed principal is only taken from the node's operators, and a refusal records nothing."""
    a = world.nodes["node-a"]
    cube = _lora(a, "rated_module", 5)
    world.hold_lora(cube, {"rated_module": ["use"]})
    log = world.servers["node-a"].server.feedback.log
    rating = {"prompt": "The capital of Veltria is", "answer": "Quorn", "good": False}
    rating["correction"] = "Dralmouth"
    with world.node_client("node-a", "node-b") as nb:
        with pytest.raises(AuthenticationError, match="needs a capability token"):
            nb.feedback("rated_module", **rating)
        use = world.client("node-b").issue_token("rated_module", "use")
        with pytest.raises(PermissionDeniedError):
            nb.feedback("rated_module", capability=use, **rating)
        assert log.pending("rated_module") == []
        with world.client("node-a") as ra:
            ra.grant("rated_module", "node:node-b", ["feedback"])
        token = world.client("node-b").issue_token("rated_module", "feedback")
        with pytest.raises(PermissionDeniedError, match="on behalf of"):
            nb.feedback("rated_module", capability=token, on_behalf_of="user:mallory", **rating)
        got = nb.feedback("rated_module", capability=token, **rating)
    assert got.module == f"rated_module@{cube.manifest.version}" and got.pending == 1
    assert got.decision == "recorded"  # this node records only (no --evolve)
    [item] = log.pending("rated_module")
    assert (item.principal, item.correction, item.good) == ("node:node-b", "Dralmouth", False)
    # The node's own certificate is an operator: it may relay a user's rating.
    with world.node_client("node-a", "node-a") as na:
        na.feedback("rated_module", on_behalf_of="user:alice", **rating)
    assert [i.principal for i in log.pending("rated_module")] == ["node:node-b", "user:alice"]
