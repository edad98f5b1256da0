"""The service edge: where typed ``memfed.errors`` become gRPC status codes, for every memfed server.

Library code raises MemfedError subclasses and knows nothing of gRPC; a handler wrapped by an edge ends
the call with the error's status code, its message and hint, and its type in trailing metadata (which
``memfed.client`` turns back into the same error type). Anything else is an internal error: logged with
its traceback, answered as INTERNAL. No torch and no node imports: the registry uses it too.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from memfed.client import ERROR_METADATA_KEY, error_payload
from memfed.errors import MemfedError

T = TypeVar("T")
Handler = Callable[..., Awaitable[Any]]
StreamHandler = Callable[..., AsyncIterator[Any]]


async def abort_with(context: grpc.aio.ServicerContext, exc: MemfedError) -> None:
    """End the call with the error's status code, its message and hint, and its type in metadata."""
    code = getattr(grpc.StatusCode, exc.grpc_status, grpc.StatusCode.UNKNOWN)
    await context.abort(code, str(exc), trailing_metadata=((ERROR_METADATA_KEY, error_payload(exc)),))


def make_edges(
    internal: Callable[[BaseException, str], str],
) -> tuple[Callable[[Handler], Handler], Callable[[StreamHandler], StreamHandler]]:
    """(edge, edge_stream) decorators for unary/client-streaming and server-streaming handlers.
    ``internal(exc, method)`` logs an unexpected error and returns the INTERNAL status message."""

    def edge(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await fn(self, request, context)
            except MemfedError as exc:
                await abort_with(context, exc)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await context.abort(grpc.StatusCode.INTERNAL, internal(exc, fn.__name__))
            raise AssertionError("unreachable: abort raises")  # pragma: no cover

        return handler

    def edge_stream(fn: StreamHandler) -> StreamHandler:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in fn(self, request, context):
                    yield item
            except MemfedError as exc:
                await abort_with(context, exc)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await context.abort(grpc.StatusCode.INTERNAL, internal(exc, fn.__name__))

        return handler

    return edge, edge_stream
