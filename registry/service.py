"""``RegistryService`` over grpc.aio: the ``Registry`` facade behind mutual TLS.

Who calls is decided by the TLS layer, never by a request field: the caller's verified certificate must
be the one its node registered (``Registry.principal_for_certificate``), or an operator's. Errors are
``memfed.errors`` types up to this edge, which alone maps them to status codes (with the type, message
and hint in trailing metadata, as the node service does, so ``RegistryClient`` raises the same type).
Database work runs on worker threads; the loop only routes.

Limits against abusive clients: bounded message sizes, a cap on concurrent RPCs, and a cap on open
Subscribe streams per principal (a client that opens hundreds and never reads them gets
RESOURCE_EXHAUSTED, and the others keep being served).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from memfed.background import BackgroundServer
from memfed.errors import (
    AuthenticationError,
    CapacityError,
    InvalidArgumentError,
    MemfedError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from memfed.grpc_edge import make_edges
from memfed.mip.v1 import registry_service_pb2 as rpb
from memfed.mip.v1 import registry_service_pb2_grpc
from memfed.observability import ServerMetrics
from memfed.registry.core import Registry, entry_message, normalize_principal
from memfed.registry.tls import TlsFiles, peer_of

log = logging.getLogger("memfed.registry")
T = TypeVar("T")
SERVICE_NAME = "memfed.mip.v1.RegistryService"
MAX_REQUEST_BYTES = 1 << 20  # a manifest is at most 256 KiB; anything near this is an attack or a bug
MAX_SUBSCRIPTIONS_PER_PRINCIPAL = 16
MAX_CONCURRENT_RPCS = 1000
SUBSCRIBE_POLL_S = 0.5
# Insecure (plaintext) mode only: which principal the caller claims. Unauthenticated by nature, which
# is why plaintext needs an explicit --insecure and is logged as a warning.
PRINCIPAL_METADATA_KEY = "memfed-principal"
REGISTRY_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
)


def _internal(exc: BaseException, method: str) -> str:
    log.error("%s failed", method, exc_info=exc)
    return f"internal error in {method}: {exc}"


_edge, _edge_stream = make_edges(_internal)


class RegistryServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: Registry, *, insecure: bool = False) -> None:
        self.registry = registry
        self.insecure = insecure
        self._subscriptions: collections.Counter[str] = collections.Counter()

    async def _principal(self, context: grpc.aio.ServicerContext) -> str:
        peer = peer_of(context)
        if peer is None:
            if not self.insecure:
                raise AuthenticationError("this registry requires a client certificate (mutual TLS)")
            claimed = dict(context.invocation_metadata() or ()).get(PRINCIPAL_METADATA_KEY, "")
            if not claimed:
                raise AuthenticationError(
                    f"plaintext call without a {PRINCIPAL_METADATA_KEY} header",
                    hint="use mutual TLS, or name yourself in the header on an --insecure registry",
                )
            return normalize_principal(str(claimed))
        return await asyncio.to_thread(self.registry.principal_for_certificate, peer.name, peer.fingerprint)

    @_edge
    async def RegisterNode(self, request: rpb.NodeIdentity, context: grpc.aio.ServicerContext) -> Any:
        fp = await self._node_or_operator(context)
        created = await asyncio.to_thread(self.registry.register_node, request, peer_fingerprint=fp)
        return rpb.RegisterNodeResponse(created=created)

    @_edge
    async def RotateCertificate(self, request: rpb.NodeIdentity, context: grpc.aio.ServicerContext) -> Any:
        fp = await self._node_or_operator(context)
        rotated = await asyncio.to_thread(self.registry.rotate_certificate, request, peer_fingerprint=fp)
        return rpb.RegisterNodeResponse(created=rotated)

    async def _node_or_operator(self, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's certificate fingerprint, which the registry checks against the node's record; None
        for an operator (who may act on a node's behalf) or a plaintext caller of an --insecure registry."""
        peer = peer_of(context)
        if peer is None and not self.insecure:
            raise AuthenticationError("this call requires the node's certificate (mutual TLS)")
        if peer is None or normalize_principal(f"user:{peer.name}") in self.registry.operators:
            return None
        return peer.fingerprint

    @_edge
    async def PublishVersion(self, request: rpb.PublishRequest, context: grpc.aio.ServicerContext) -> Any:
        who = await self._principal(context)
        if not request.HasField("manifest"):
            raise InvalidArgumentError("PublishRequest.manifest is missing", hint="send the signed manifest")
        holder = request.holder_node_id or who.partition(":")[2]
        seq = await asyncio.to_thread(self.registry.publish, request.manifest, holder, publisher=who)
        return rpb.PublishResponse(catalog_sequence=seq)

    @_edge
    async def LookupVersions(self, request: rpb.LookupRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._principal(context)
        return await asyncio.to_thread(self.registry.lookup, request.cube_id)

    @_edge
    async def WhoHolds(self, request: rpb.WhoHoldsRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._principal(context)
        holders = await asyncio.to_thread(self.registry.who_holds, request.digest)
        return rpb.WhoHoldsResponse(holders=holders)

    @_edge_stream
    async def Subscribe(
        self, request: rpb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        who = await self._principal(context)
        if not request.cube_ids:
            raise InvalidArgumentError("subscribe to at least one cube id")
        if self._subscriptions[who] >= MAX_SUBSCRIPTIONS_PER_PRINCIPAL:
            raise CapacityError(
                f"{who} has {MAX_SUBSCRIPTIONS_PER_PRINCIPAL} open subscriptions already",
                hint="subscribe to several cubes in one stream, and read (or close) the streams you open",
            )
        self._subscriptions[who] += 1
        try:
            node_id = who.partition(":")[2]
            await asyncio.to_thread(self.registry.subscribe, node_id, list(request.cube_ids))
            seen: dict[str, int] = {}
            while not context.done():
                for cube_id in request.cube_ids:
                    try:
                        signed = await asyncio.to_thread(self.registry.lookup, cube_id)
                    except MemfedError:
                        continue  # not published yet: the stream tells when it is
                    answer = rpb.CatalogAnswer.FromString(signed.answer)
                    newest = answer.versions[-1].manifest.signature if answer.versions else b""
                    key = hash((newest, tuple(tuple(e.holders) for e in answer.versions)))
                    if seen.get(cube_id) != key:
                        seen[cube_id] = key
                        yield rpb.CatalogEvent(answer=signed)
                await asyncio.sleep(SUBSCRIBE_POLL_S)
        finally:
            self._subscriptions[who] -= 1

    @_edge
    async def GrantAccess(self, request: rpb.GrantRequest, context: grpc.aio.ServicerContext) -> Any:
        who = await self._principal(context)
        g = request.grant
        expires = g.expires_at.ToNanoseconds() / 1e9 if g.HasField("expires_at") else None
        seq = await asyncio.to_thread(
            functools.partial(
                self.registry.grant, request.cube_id, g.principal, list(g.actions), expires_at=expires, by=who
            )
        )
        return rpb.GrantResponse(audit_sequence=seq)

    @_edge
    async def RevokeAccess(self, request: rpb.RevokeRequest, context: grpc.aio.ServicerContext) -> Any:
        who = await self._principal(context)
        seq = await asyncio.to_thread(
            functools.partial(
                self.registry.revoke, request.cube_id, request.principal, list(request.actions), by=who
            )
        )
        return rpb.GrantResponse(audit_sequence=seq)

    @_edge
    async def IssueToken(self, request: rpb.TokenRequest, context: grpc.aio.ServicerContext) -> Any:
        who = await self._principal(context)
        return await asyncio.to_thread(
            functools.partial(
                self.registry.issue_token,
                request.principal or who,
                request.cube_id,
                request.action,
                request.ttl_seconds,
                requested_by=who,
            )
        )

    @_edge_stream
    async def ReadAudit(
        self, request: rpb.AuditQuery, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        who = await self._principal(context)
        if who not in self.registry.operators:
            raise PermissionDeniedError(
                f"{who} may not read the audit log", hint="connect with an operator's certificate"
            )
        limit = min(request.limit or 10_000, 100_000)
        entries = await asyncio.to_thread(self.registry.audit_entries, request.from_sequence, limit)
        for e in entries:
            yield entry_message(e)

    @_edge
    async def GetNode(self, request: rpb.GetNodeRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._principal(context)
        ident = await asyncio.to_thread(self.registry.node, request.node_id)
        if ident is None:
            raise NotFoundError(f"node {request.node_id!r} is not registered")
        return ident

    @_edge
    async def ReportDecision(self, request: rpb.DecisionReport, context: grpc.aio.ServicerContext) -> Any:
        who = await self._principal(context)
        if not who.startswith("node:"):
            raise PermissionDeniedError("only nodes report their decisions")
        principal = normalize_principal(request.principal or "node:?")
        reason = f"refused by {who}: {request.reason}"[:2000]
        seq = await asyncio.to_thread(
            self.registry.audit_event, principal, request.action[:64], request.cube_id[:200], False, reason
        )
        return rpb.GrantResponse(audit_sequence=seq)

    @_edge
    async def ListRevocations(self, request: rpb.RevocationQuery, context: grpc.aio.ServicerContext) -> Any:
        await self._principal(context)
        ids = await asyncio.to_thread(self.registry.revoked_token_ids)
        out = rpb.RevocationList(token_ids=ids)
        out.issued_at.FromNanoseconds(time.time_ns())
        return out


class RegistryServer:
    """Serves one ``Registry`` over gRPC: mutual TLS from ``tls``, or plaintext only with ``insecure``."""

    def __init__(
        self,
        registry: Registry,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TlsFiles | None = None,
        insecure: bool = False,
        metrics_port: int | None = None,
    ) -> None:
        if tls is None and not insecure:
            raise InvalidArgumentError(
                "the registry has no TLS certificate and a plaintext port was not asked for",
                hint="pass --tls DIR (from `memfed pki issue registry`), or --insecure on a trusted network",
            )
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.tls = tls
        self.insecure = tls is None
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        # Prometheus metrics (memfed.observability) only when a port is asked for: off by default.
        self.metrics = ServerMetrics("registry") if metrics_port is not None else None
        self.metrics_port = metrics_port

    @property
    def address(self) -> str:
        if self.port is None:
            raise UnavailableError("the registry server is not started")
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        server = grpc.aio.server(
            options=REGISTRY_CHANNEL_OPTIONS,
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
            interceptors=[self.metrics.interceptor()] if self.metrics is not None else None,
        )
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(
            RegistryServicer(self.registry, insecure=self.insecure), server
        )
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        bind = f"{self.host}:{self.requested_port}"
        try:
            if self.tls is None:
                port = server.add_insecure_port(bind)
                log.warning("registry serves PLAINTEXT gRPC on %s: no TLS, callers name themselves", bind)
            else:
                port = server.add_secure_port(bind, self.tls.server_credentials())
        except RuntimeError as exc:
            raise UnavailableError(f"cannot listen on {bind}: {exc}", hint="is the port taken?") from exc
        await server.start()
        await hs.set("", health_pb2.HealthCheckResponse.SERVING)
        await hs.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if self.metrics is not None and self.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.host.strip("[]"), self.metrics_port)
        self._server = server
        self.port = port
        log.info("registry serving on %s (%s)", self.address, "insecure" if self.insecure else "mutual TLS")
        return port

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.metrics is not None:
            self.metrics.stop_http()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class BackgroundRegistry(BackgroundServer):
    """A ``RegistryServer`` on its own event loop in a daemon thread (tests, benches, the demo)."""

    def __init__(self, server: RegistryServer) -> None:
        super().__init__(server, name="memfed-registry", stop_grace_s=0.5)
