"""RegistryService over real mutual TLS on a loopback port: who calls is the certificate, denials get
the right status code and an audit entry, and abusive requests (oversized, malformed, hundreds of
unread streams) are refused without changing state or starving other callers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from registry_support import Party, make_party

from memfed.cli.main import cli
from memfed.errors import (
    AuthenticationError,
    CapacityError,
    InvalidArgumentError,
    PermissionDeniedError,
    RollbackError,
    UnavailableError,
)
from memfed.mip.v1 import registry_service_pb2 as rpb
from memfed.mip.v1 import registry_service_pb2_grpc
from memfed.registry import pki
from memfed.registry.core import Registry
from memfed.registry.service import BackgroundRegistry, RegistryServer
from memfed.registry.tls import TlsFiles
from memfed.registry.tokens import TokenVerifier
from memfed.registry_client import RegistryClient


class Net:
    def __init__(self, tmp: Path) -> None:
        self.pki = tmp / "pki"
        pki.init_ca(self.pki)
        self.parties = {n: make_party(self.pki, n) for n in ("node-a", "node-b", "node-c")}
        pki.issue(self.pki, "admin")
        pki.issue(self.pki, "registry")
        self.registry = Registry.open(
            tmp / "reg", operators=["user:admin"], ca_pem=(self.pki / "ca.pem").read_bytes()
        )
        self.bg = BackgroundRegistry(
            RegistryServer(self.registry, tls=TlsFiles.from_dir(self.pki / "registry"))
        )
        self.address = self.bg.start()

    def client(self, name: str) -> RegistryClient:
        return RegistryClient(
            self.address, tls=TlsFiles.from_dir(self.pki / name), registry_key=self.registry.public_key
        )

    def close(self) -> None:
        self.bg.stop()
        self.registry.close()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    n = Net(tmp_path_factory.mktemp("regsvc"))
    for name, p in n.parties.items():
        if name != "node-c":
            with n.client(name) as c:
                assert c.register(p.message(f"127.0.0.1:{7800 + int(name[-1], 36)}")) is True
    yield n
    n.close()


def test_publish_grant_token_revoke_over_mtls(net: Net) -> None:
    a: Party = net.parties["node-a"]
    with net.client("node-a") as ca, net.client("node-b") as cb:
        ca.publish(a.manifest("svc_cube", "1.0.0"), "node-a")
        with pytest.raises(PermissionDeniedError):
            cb.issue_token("svc_cube", "export")
        ca.grant("svc_cube", "node:node-b", ["export"])
        tok = cb.issue_token("svc_cube", "export", ttl_s=30)
        TokenVerifier(net.registry.public_key).verify(
            tok, principal="node:node-b", cube_id="svc_cube", action="export"
        )
        answer = cb.lookup("svc_cube")
        assert answer.versions[0].holders == ["node-a"]
        assert [
            h.node_id for h in cb.who_holds(answer.versions[0].manifest.manifest and _digest(answer))
        ] == ["node-a"]
        with pytest.raises(PermissionDeniedError):
            cb.grant("svc_cube", "node:node-b", ["admin"])  # B is no admin: it cannot raise itself
        ca.revoke("svc_cube", "node:node-b")
        assert cb.revocations() and tok.token  # the revoked token is listed for nodes to refuse
        with pytest.raises(PermissionDeniedError):
            cb.issue_token("svc_cube", "export")
        with pytest.raises(RollbackError):
            ca.publish(a.manifest("svc_cube", "0.9.0"), "node-a")


def _digest(answer: rpb.CatalogAnswer) -> str:
    from memfed.cube.manifest import manifest_from_bytes

    return manifest_from_bytes(answer.versions[0].manifest.manifest).digest


def test_unregistered_and_impostor_certificates_are_refused_and_audited(net: Net, tmp_path: Path) -> None:
    seq = net.registry.audit_count()
    with net.client("node-c") as cc, pytest.raises(AuthenticationError, match="not registered"):
        cc.lookup("svc_cube")
    # A second certificate for node-b (say, issued to a thief by a careless CA operator) is not the one
    # node-b registered: refused.
    impostor_dir = tmp_path / "impostor"
    pki.issue(net.pki, "node-b", out_dir=impostor_dir, force=True)
    with RegistryClient(net.address, tls=TlsFiles.from_dir(impostor_dir)) as imp:
        with pytest.raises(AuthenticationError, match="not the one"):
            imp.issue_token("svc_cube", "read")
        # node-c's identity registered over node-b's channel: the caller must register itself
        with pytest.raises(AuthenticationError):
            imp.register(net.parties["node-c"].message())
    assert net.registry.node("node-c") is None
    denies = [e for e in net.registry.audit_entries(seq + 1) if not e.allowed]
    assert {e.principal for e in denies} >= {"node:node-c", "node:node-b"}
    # No client certificate at all: the TLS handshake fails.
    ca_only = grpc.ssl_channel_credentials(root_certificates=(net.pki / "ca.pem").read_bytes())
    with grpc.secure_channel(net.address, ca_only) as ch:
        stub = registry_service_pb2_grpc.RegistryServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.LookupVersions(rpb.LookupRequest(cube_id="svc_cube"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_rotate_certificate_over_the_current_one(net: Net, tmp_path: Path) -> None:
    """`memfed registry rotate-cert`: connect with the current certificate, pin the new one; afterwards the
    new certificate is the node's and the old one is refused."""
    d = make_party(net.pki, "node-d")
    with net.client("node-d") as cd:
        assert cd.register(d.message()) is True
    new_dir = tmp_path / "node-d-new"
    pki.issue(net.pki, "node-d", out_dir=new_dir)
    # From another node's channel: refused.
    with net.client("node-b") as cb, pytest.raises(AuthenticationError, match="currently registered"):
        msg = d.message()
        msg.certificate_pem = (new_dir / "cert.pem").read_bytes()
        cb.rotate_certificate(msg)
    result = CliRunner().invoke(
        cli,
        ["registry", "rotate-cert", "--registry", net.address, "--tls", str(net.pki / "node-d"),
         "--identity", str(net.pki / "node-d" / "identity"), "--new-cert", str(new_dir / "cert.pem"),
         "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"node_id": "node-d", "rotated": True}
    with RegistryClient(net.address, tls=TlsFiles.from_dir(new_dir)) as fresh:
        assert fresh.lookup("svc_cube") is not None
    with net.client("node-d") as old, pytest.raises(AuthenticationError, match="not the one"):
        old.lookup("svc_cube")


def test_audit_is_for_operators(net: Net) -> None:
    with net.client("node-b") as cb, pytest.raises(PermissionDeniedError):
        cb.read_audit()
    with net.client("node-b") as cb:  # a node reports a refusal it decided offline
        seq = cb.report_decision("node:node-c", "export", "svc_cube", "forged token")
    last = net.registry.audit_entries(seq)[0]
    assert (last.principal, last.allowed, last.reason) == (
        "node:node-c",
        False,
        "refused by node:node-b: forged token",
    )
    with net.client("admin") as adm, pytest.raises(PermissionDeniedError):
        adm.report_decision("node:x", "read", "c", "operators do not report")
    with net.client("admin") as adm:
        entries = adm.read_audit()
    assert entries and entries[0].sequence == 1 and net.registry.verify_audit().ok


def test_malformed_and_oversized_requests(net: Net) -> None:
    before = net.registry.catalog_sequence()
    with net.client("node-a") as ca:
        with pytest.raises(InvalidArgumentError):
            ca._call("PublishVersion", rpb.PublishRequest(holder_node_id="node-a"))
        with pytest.raises(CapacityError):
            ca._call("LookupVersions", rpb.LookupRequest(cube_id="x" * (2 << 20)))
        with pytest.raises(InvalidArgumentError):
            ca.grant("svc_cube", "robot:x", ["read"])
    creds = TlsFiles.from_dir(net.pki / "node-a").channel_credentials()
    with grpc.secure_channel(net.address, creds) as ch:
        garbage = ch.unary_unary("/memfed.mip.v1.RegistryService/PublishVersion")
        with pytest.raises(grpc.RpcError) as info:
            garbage(b"\xff\xff\xff\xff", timeout=5)
        # grpc answers bytes it cannot decode itself (UNKNOWN), before any handler runs
        assert info.value.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT)
    assert net.registry.catalog_sequence() == before


def test_500_unread_streams_do_not_starve_the_registry(net: Net) -> None:
    creds = TlsFiles.from_dir(net.pki / "node-b").channel_credentials()
    with grpc.secure_channel(net.address, creds) as ch:
        stub = registry_service_pb2_grpc.RegistryServiceStub(ch)
        calls = [stub.Subscribe(rpb.SubscribeRequest(cube_ids=["svc_cube"]), timeout=30) for _ in range(500)]
        time.sleep(1.0)
        t0 = time.perf_counter()
        with net.client("node-a") as ca:
            ca.lookup("svc_cube")
        assert time.perf_counter() - t0 < 5
        refused = 0
        for c in calls[-50:]:
            try:
                next(c)
            except grpc.RpcError as exc:
                refused += exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused >= 40
        for c in calls:
            c.cancel()


def test_insecure_needs_explicit_flag(tmp_path: Path) -> None:
    reg = Registry.open(tmp_path / "r")
    with pytest.raises(InvalidArgumentError, match="--insecure"):
        RegistryServer(reg)
    with (
        BackgroundRegistry(RegistryServer(reg, insecure=True)) as bg,
        RegistryClient(bg.address) as anon,
        pytest.raises(AuthenticationError, match="header"),
    ):
        anon.lookup("x")
    with pytest.raises(UnavailableError):
        RegistryClient("127.0.0.1:1", timeout=2).lookup("x")
    reg.close()
