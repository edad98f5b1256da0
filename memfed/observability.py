"""Metrics and structured logs for memfed's gRPC servers (the registry and the node), in one place.

    metrics = ServerMetrics("node", collectors=[NodeCollector(node)])
    server = grpc.aio.server(interceptors=[metrics.interceptor()])
    port = metrics.serve_http("0.0.0.0", 9711)        # Prometheus scrapes http://HOST:9711/metrics
    configure_logging("info", json_lines=True)       # one JSON object per log line on stderr

Why an interceptor: both servers get per-RPC counts, latencies, transfer bytes and denials from the same
code, without touching a single handler. Status codes come from the servicer context after the call (the
servicers map ``memfed.errors`` to codes with ``context.abort``), so a denial counts as a denial whichever
layer raised it. Each server owns its ``CollectorRegistry``: several servers in one process (tests, the
demo) do not share or collide on series.

This module imports no torch and no node code (the registry image has neither): node figures come in
through ``NodeCollector``, which reads a node object it is handed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import inspect
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("memfed.rpc")

# Codes that mean "you may not": counted as denied requests (and logged at INFO).
DENIED_CODES = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
# Generation and cube transfers take from milliseconds to minutes: buckets span both.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def _split_method(full: str) -> tuple[str, str]:
    """'/memfed.mip.v1.NodeService/Generate' -> ('memfed.mip.v1.NodeService', 'Generate')."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service or "unknown", method or full


def _size(message: Any) -> int:
    try:
        return int(message.ByteSize())
    except Exception:  # not a protobuf message (a raw-bytes handler): count what we can
        return len(message) if isinstance(message, bytes | bytearray) else 0


def _code_of(context: Any, error: BaseException | None) -> grpc.StatusCode:
    """The status the call ended with: what the handler set (abort or set_code), else OK/UNKNOWN."""
    code = None
    with contextlib.suppress(Exception):
        code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions hand back the raw integer
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED  # the client went away or its deadline passed
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


class ServerMetrics:
    """The Prometheus series one server exposes, its registry, and its /metrics HTTP endpoint."""

    def __init__(self, role: str, *, collectors: Iterable[Collector] = ()) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "memfed_rpc_requests", "RPCs handled, by method and status code.",
            ["service", "method", "code"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "memfed_rpc_duration_seconds", "Time from a call's arrival to its last message, by method.",
            ["service", "method"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.transfer = Counter(
            "memfed_rpc_transfer_bytes", "Serialized message bytes received and sent, by method.",
            ["service", "method", "direction"], registry=r,
        )  # fmt: skip
        self.denied = Counter(
            "memfed_rpc_denied", "RPCs refused as unauthenticated or not permitted.",
            ["service", "method", "code"], registry=r,
        )  # fmt: skip
        for c in collectors:
            r.register(c)
        self._http: Any = None
        self._http_thread: Any = None

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return MetricsInterceptor(self)

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics on ``host:port`` (0: a free port) in a daemon thread; return the bound port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        log.info("%s metrics on http://%s:%d/metrics", self.role, host, bound, extra={"metrics_port": bound})
        return bound

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def record(self, full_method: str, code: grpc.StatusCode, seconds: float, peer: str) -> None:
        service, method = _split_method(full_method)
        self.requests.labels(service, method, code.name).inc()
        self.latency.labels(service, method).observe(seconds)
        fields = {"rpc": method, "service": service, "code": code.name, "seconds": round(seconds, 6)}
        if code in DENIED_CODES:
            self.denied.labels(service, method, code.name).inc()
            log.info("denied %s (%s) for %s", method, code.name, peer, extra={**fields, "peer": peer})
        else:
            log.debug("%s %s in %.3f s", method, code.name, seconds, extra=fields)

    def count_bytes(self, full_method: str, direction: str, n: int) -> None:
        if n:
            service, method = _split_method(full_method)
            self.transfer.labels(service, method, direction).inc(n)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler of a grpc.aio server: counts, times and sizes each call into ``ServerMetrics``.

    Unary and streaming handlers, async functions and async generators alike; a handler of another shape
    (a sync function) is passed through unmeasured rather than risk changing how it runs.
    """

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind, None)
            if behavior is not None:
                wrapped = self._wrap(behavior, method, kind.startswith("stream"))
                return handler._replace(**{kind: wrapped}) if wrapped is not None else handler
        return handler

    def _wrap(self, behavior: Any, method: str, streaming_request: bool) -> Any:
        m = self.metrics

        def incoming(request: Any) -> Any:
            if not streaming_request:
                m.count_bytes(method, "received", _size(request))
                return request

            async def counted() -> AsyncIterator[Any]:
                async for item in request:
                    m.count_bytes(method, "received", _size(item))
                    yield item

            return counted()

        def finish(context: Any, start: float, error: BaseException | None) -> None:
            peer = ""
            with contextlib.suppress(Exception):
                peer = context.peer()
            m.record(method, _code_of(context, error), time.perf_counter() - start, peer)

        if inspect.isasyncgenfunction(behavior):

            async def stream_handler(request: Any, context: Any) -> AsyncIterator[Any]:
                start, error = time.perf_counter(), None
                try:
                    async for item in behavior(incoming(request), context):
                        m.count_bytes(method, "sent", _size(item))
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, start, error)

            return stream_handler
        if inspect.iscoroutinefunction(behavior):

            async def unary_handler(request: Any, context: Any) -> Any:
                start, error = time.perf_counter(), None
                try:
                    response = await behavior(incoming(request), context)
                    if response is not None:  # None: a streaming handler that wrote with context.write
                        m.count_bytes(method, "sent", _size(response))
                    return response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, start, error)

            return unary_handler
        return None


class NodeCollector(Collector):
    """Node figures read at scrape time: resident modules, memory tiers, KV-cache (activation memory)
    hits and misses. Reads a ``memfed.node.service.Node`` it is handed (duck-typed: no node import)."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[Any]:
        node = self.node
        scheduler = getattr(node, "scheduler", None)
        runtime = getattr(node, "runtime", None)
        if runtime is not None:
            yield GaugeMetricFamily(
                "memfed_node_resident_modules",
                "Modules resident on the model's device.",
                value=len(runtime.resident),
            )
        if scheduler is not None:
            yield GaugeMetricFamily(
                "memfed_node_device_bytes", "Bytes of resident modules.", value=scheduler.device_bytes()
            )
            yield GaugeMetricFamily(
                "memfed_node_host_cache_bytes",
                "Bytes of decoded module copies kept in host RAM.",
                value=scheduler.host_bytes(),
            )
            kv = getattr(scheduler, "kv_cache", None)
            if kv is not None:
                s = kv.stats()
                yield CounterMetricFamily(
                    "memfed_node_kv_cache_hits", "KV-cache lookups that hit.", value=s.hits
                )
                yield CounterMetricFamily(
                    "memfed_node_kv_cache_misses", "KV-cache lookups that missed.", value=s.misses
                )
                yield CounterMetricFamily(
                    "memfed_node_kv_cache_tokens_reused",
                    "Prompt tokens served from the KV cache instead of recomputed.",
                    value=s.tokens_reused,
                )


# -- logs -------------------------------------------------------------------------------------------------

_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, any ``extra=`` fields, and
    the exception text when there is one. Log shippers parse it without a grok pattern."""

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info", *, json_lines: bool = False) -> None:
    """Root logging on stderr: the usual text lines, or JSON lines with ``json_lines`` (``--log-json``).

    Like ``logging.basicConfig`` it leaves an already configured root logger alone (a host application
    or a test harness owns logging then)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
