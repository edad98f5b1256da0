"""``RegistryClient``: a small typed client for the registry's ``RegistryService``.

    from memfed.registry_client import RegistryClient
    from memfed.registry.tls import TlsFiles

    with RegistryClient("127.0.0.1:7700", tls=TlsFiles.from_dir("pki/node-b")) as reg:
        reg.register(identity_message)
        answer = reg.lookup("legal_expert")              # verified when registry_key is given
        token = reg.issue_token("legal_expert", "export")

Errors come back as the ``memfed.errors`` type the registry raised (PermissionDeniedError,
RollbackError, ...), with its message and hint. Never imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519

from memfed.client import error_from_rpc
from memfed.mip.v1 import cube_pb2, node_service_pb2, registry_service_pb2_grpc
from memfed.mip.v1 import registry_service_pb2 as rpb
from memfed.registry.catalog import verify_answer
from memfed.registry.service import PRINCIPAL_METADATA_KEY
from memfed.registry.tls import TlsFiles, channel

DEFAULT_REGISTRY_PORT = 7700
DEFAULT_REGISTRY_ADDRESS = f"127.0.0.1:{DEFAULT_REGISTRY_PORT}"


class RegistryClient:
    """One channel to the registry; mutual TLS with ``tls``, plaintext with ``principal`` (insecure)."""

    def __init__(
        self,
        address: str = DEFAULT_REGISTRY_ADDRESS,
        *,
        tls: TlsFiles | None = None,
        principal: str | None = None,
        registry_key: ed25519.Ed25519PublicKey | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.address = address
        self.tls = tls
        self.timeout = timeout
        self.registry_key = registry_key
        self._metadata = ((PRINCIPAL_METADATA_KEY, principal),) if principal and tls is None else ()
        self._channel = channel(address, tls, (("grpc.max_receive_message_length", 16 << 20),))
        self._stub = registry_service_pb2_grpc.RegistryServiceStub(self._channel)
        self._seen: dict[str, int] = {}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, name: str, request: Any) -> Any:
        try:
            return getattr(self._stub, name)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, address=self.address) from None

    def _stream(self, name: str, request: Any, timeout: float | None) -> Iterator[Any]:
        try:
            yield from getattr(self._stub, name)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
                return
            raise error_from_rpc(exc, address=self.address) from None

    def register(self, identity: rpb.NodeIdentity) -> bool:
        """Register a node (its certificate and public keys); False when it was registered already."""
        return bool(self._call("RegisterNode", identity).created)

    def rotate_certificate(self, identity: rpb.NodeIdentity) -> bool:
        """Replace the node's registered certificate with ``identity.certificate_pem`` (same id and keys);
        call over a channel made with the current certificate. False when it was that one already."""
        return bool(self._call("RotateCertificate", identity).created)

    def publish(self, manifest: cube_pb2.SignedManifest, holder_node_id: str = "") -> int:
        """Publish a version (manifest only); returns the catalog sequence."""
        req = rpb.PublishRequest(manifest=manifest, holder_node_id=holder_node_id)
        return int(self._call("PublishVersion", req).catalog_sequence)

    def lookup_signed(self, cube_id: str) -> rpb.SignedCatalogAnswer:
        return self._call("LookupVersions", rpb.LookupRequest(cube_id=cube_id))

    def lookup(self, cube_id: str) -> rpb.CatalogAnswer:
        """The cube's versions and holders; signature, expiry and sequence checked when the registry key
        is known (stale or rolled-back answers raise RollbackError)."""
        signed = self.lookup_signed(cube_id)
        if self.registry_key is None:
            return rpb.CatalogAnswer.FromString(signed.answer)
        answer = verify_answer(
            signed, self.registry_key, cube_id=cube_id, min_sequence=self._seen.get(cube_id, 0)
        )
        self._seen[cube_id] = answer.sequence
        return answer

    def who_holds(self, digest: str) -> list[rpb.NodeIdentity]:
        return list(self._call("WhoHolds", rpb.WhoHoldsRequest(digest=digest)).holders)

    def subscribe(
        self, cube_ids: Sequence[str], *, timeout: float | None = None
    ) -> Iterator[rpb.CatalogEvent]:
        """Catalog events for the cubes (the current state first, then each change) until ``timeout``."""
        return self._stream("Subscribe", rpb.SubscribeRequest(cube_ids=list(cube_ids)), timeout)

    def grant(
        self, cube_id: str, principal: str, actions: Sequence[str], *, expires_at: float | None = None
    ) -> int:
        g = cube_pb2.Grant(principal=principal, actions=list(actions))
        if expires_at is not None:
            g.expires_at.FromNanoseconds(int(expires_at * 1e9))
        return int(self._call("GrantAccess", rpb.GrantRequest(cube_id=cube_id, grant=g)).audit_sequence)

    def revoke(self, cube_id: str, principal: str, actions: Sequence[str] = ()) -> int:
        req = rpb.RevokeRequest(cube_id=cube_id, principal=principal, actions=list(actions))
        return int(self._call("RevokeAccess", req).audit_sequence)

    def issue_token(
        self, cube_id: str, action: str, *, principal: str = "", ttl_s: int = 60
    ) -> node_service_pb2.CapabilityToken:
        """A capability token for ``action`` on ``cube_id`` (for the caller unless ``principal``)."""
        req = rpb.TokenRequest(principal=principal, cube_id=cube_id, action=action, ttl_seconds=ttl_s)
        return self._call("IssueToken", req)

    def read_audit(self, from_sequence: int = 1, limit: int = 0) -> list[rpb.AuditEntry]:
        return list(
            self._stream("ReadAudit", rpb.AuditQuery(from_sequence=from_sequence, limit=limit), self.timeout)
        )

    def get_node(self, node_id: str) -> rpb.NodeIdentity:
        """A registered node's public identity (certificate, signing and HPKE keys, address)."""
        return self._call("GetNode", rpb.GetNodeRequest(node_id=node_id))

    def report_decision(self, principal: str, action: str, cube_id: str, reason: str) -> int:
        """Record a refusal this node decided offline in the registry's audit log."""
        req = rpb.DecisionReport(principal=principal, action=action, cube_id=cube_id, reason=reason)
        return int(self._call("ReportDecision", req).audit_sequence)

    def revocations(self) -> list[str]:
        return list(self._call("ListRevocations", rpb.RevocationQuery()).token_ids)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (a server just started)."""
        end = time.monotonic() + timeout
        try:
            grpc.channel_ready_future(self._channel).result(timeout=max(0.1, end - time.monotonic()))
        except grpc.FutureTimeoutError:
            from memfed.errors import UnavailableError

            raise UnavailableError(
                f"the registry at {self.address} did not answer within {timeout:g}s"
            ) from None
