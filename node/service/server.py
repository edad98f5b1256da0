"""``NodeServer``: the grpc.aio server of one node, with health checking and server reflection.

    node = Node.open(model_dir, store_dir)
    server = NodeServer(node, port=7711, insecure=True)
    await server.start()              # binds, serves NodeService + grpc.health.v1 + reflection
    await server.wait_for_termination()

``BackgroundServer`` runs one on its own event loop in a thread (tests, the demo, notebooks).

A plaintext port must be asked for (``insecure=True``; the CLI's ``--insecure``) and is logged as a
warning; otherwise TLS credentials are required (``tls_credentials``: server certificate and key, plus a
CA to require client certificates, i.e. mutual TLS).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memfed.background import BackgroundServer as _Background
from memfed.client import CHANNEL_OPTIONS, CHUNK_SIZE, SERVICE_NAME
from memfed.errors import InvalidArgumentError, NotFoundError, UnavailableError
from memfed.mip.v1 import node_service_pb2
from memfed.node.service import serde
from memfed.node.service.batcher import GenerateBatcher
from memfed.node.service.feedback import FeedbackIntake
from memfed.node.service.node import Node
from memfed.node.service.servicer import DEFAULT_MAX_CUBE_BYTES, Authorizer, ManifestVerifier, NodeServicer
from memfed.observability import NodeCollector, ServerMetrics

log = logging.getLogger("memfed.node.service")
T = TypeVar("T")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def tls_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """Server TLS credentials from PEM files; with ``client_ca`` clients must present a certificate it
    signed (mutual TLS)."""
    try:
        chain = (Path(key).read_bytes(), Path(cert).read_bytes())
        ca = Path(client_ca).read_bytes() if client_ca else None
    except FileNotFoundError as exc:
        raise NotFoundError(
            f"TLS file {exc.filename} does not exist", hint="check --tls-cert/--tls-key/--tls-ca"
        ) from None
    return grpc.ssl_server_credentials([chain], root_certificates=ca, require_client_auth=ca is not None)


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_node_service(servicer: NodeServicer, server: grpc.aio.Server) -> None:
    """Register NodeService as the generated ``add_NodeServiceServicer_to_server`` does, except that
    FetchCube's responses go through ``serde.encode_stream_message``: its payload chunks arrive encoded
    already (see serde), which is what makes a sealed transfer cheap to send."""
    from google.protobuf import message_factory

    handlers = {}
    for method in node_service_pb2.DESCRIPTOR.services_by_name["NodeService"].methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=request.FromString,
            response_serializer=(
                serde.encode_stream_message if method.name == "FetchCube" else response.SerializeToString
            ),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class NodeServer:
    """Serves one ``Node`` over gRPC. ``start``/``stop`` on a running event loop."""

    def __init__(
        self,
        node: Node,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        insecure: bool = False,
        credentials: grpc.ServerCredentials | None = None,
        max_batch_rows: int = 64,
        batch_wait_ms: float = 5.0,
        max_queue_rows: int = 4096,
        chunk_size: int = CHUNK_SIZE,
        max_cube_bytes: int = DEFAULT_MAX_CUBE_BYTES,
        manifest_verifier: ManifestVerifier | None = None,
        authorizer: Authorizer | None = None,
        sealer: Any | None = None,
        metrics_port: int | None = None,
        feedback: FeedbackIntake | None = None,
    ) -> None:
        if credentials is None and not insecure:
            raise InvalidArgumentError(
                "the node has no TLS credentials and a plaintext port was not asked for",
                hint="pass --tls-cert and --tls-key (and --tls-ca for mutual TLS), or --insecure for a "
                "plaintext port on a trusted network",
            )
        if max_batch_rows < 1 or batch_wait_ms < 0:
            raise InvalidArgumentError("max_batch_rows must be >= 1 and batch_wait_ms >= 0")
        self.node = node
        self.host = host
        self.requested_port = port
        self.credentials = credentials
        self.port: int | None = None
        self._options = dict(
            max_batch_rows=max_batch_rows,
            batch_wait_ms=batch_wait_ms,
            max_queue_rows=max_queue_rows,
            chunk_size=chunk_size,
            max_cube_bytes=max_cube_bytes,
            manifest_verifier=manifest_verifier,
            authorizer=authorizer,
            sealer=sealer,
            feedback=feedback,
        )
        self.feedback = feedback
        self._server: grpc.aio.Server | None = None
        # Prometheus metrics (memfed.observability) only when a port is asked for: off by default.
        self.metrics: ServerMetrics | None = None
        if metrics_port is not None:
            self.metrics = ServerMetrics("node", collectors=[NodeCollector(node)])
        self.metrics_port = metrics_port
        self._health: Any = None
        self.batcher: GenerateBatcher | None = None
        self.servicer: NodeServicer | None = None
        self._model_executor: ThreadPoolExecutor | None = None

    @property
    def address(self) -> str:
        if self.port is None:
            raise UnavailableError("the node server is not started")
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    async def start(self) -> int:
        """Bind and serve; return the port (the one the OS picked when ``port`` was 0)."""
        o = self._options
        self._model_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memfed-model")
        self.batcher = GenerateBatcher(
            self.node.generator,
            self._model_executor,
            max_rows=o["max_batch_rows"],
            max_wait_s=o["batch_wait_ms"] / 1e3,
            max_queue_rows=o["max_queue_rows"],
        )
        self.servicer = NodeServicer(
            self.node,
            self.batcher,
            self._model_executor,
            chunk_size=o["chunk_size"],
            max_cube_bytes=o["max_cube_bytes"],
            manifest_verifier=o["manifest_verifier"],
            authorizer=o["authorizer"],
            sealer=o["sealer"],
            feedback=o["feedback"],
        )
        interceptors = [self.metrics.interceptor()] if self.metrics is not None else None
        server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=interceptors)
        add_node_service(self.servicer, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        bind = f"{self.address_host()}:{self.requested_port}"
        try:
            if self.credentials is None:
                port = server.add_insecure_port(bind)
                where = "loopback only" if self.host in LOOPBACK_HOSTS else "reachable from the network"
                log.warning("node %s serves PLAINTEXT gRPC on %s (%s): no TLS, no client authentication",
                            self.node.node_id, bind, where)  # fmt: skip
            else:
                port = server.add_secure_port(bind, self.credentials)
        except RuntimeError as exc:
            self._model_executor.shutdown(wait=False)
            self._model_executor = None
            raise UnavailableError(
                f"cannot listen on {bind}: {exc}", hint="is the port taken? pick another with --port"
            ) from exc
        self.port = port
        self.batcher.start()
        await server.start()
        self._server = server
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if self.metrics is not None and self.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.host.strip("[]"), self.metrics_port)
        log.info("node %s serving %s on %s", self.node.node_id, SERVICE_NAME, self.address)
        return port

    async def run_on_model(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread, after what is queued there (see memfed.node.service.auto)."""
        if self._model_executor is None:
            raise UnavailableError("the node server is not started")
        return await asyncio.get_running_loop().run_in_executor(self._model_executor, fn)

    def address_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host

    async def stop(self, grace: float | None = 2.0) -> None:
        """Report NOT_SERVING, refuse queued generation, let running calls finish for ``grace`` seconds."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.batcher is not None:
            await self.batcher.close()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.feedback is not None:
            await self.feedback.drain()  # an evolve step finishes (or fails) before the model thread goes
        if self._model_executor is not None:
            self._model_executor.shutdown(wait=True, cancel_futures=True)
            self._model_executor = None
        if self.metrics is not None:
            self.metrics.stop_http()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class BackgroundServer(_Background):
    """A ``NodeServer`` on its own event loop in a daemon thread (see memfed.background).

    with BackgroundServer(NodeServer(node, insecure=True)) as bg:
        client = NodeClient(bg.address)
    """

    def __init__(self, server: NodeServer) -> None:
        super().__init__(server, name="memfed-node-server")
