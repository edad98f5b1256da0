"""A gRPC aio server on its own event loop in a daemon thread: tests, benches, the demo and notebooks
drive node and registry servers from plain synchronous code this way.

    with BackgroundServer(NodeServer(node, insecure=True)) as bg:
        client = NodeClient(bg.address)

No torch and no node imports here: the registry uses it too.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Protocol

from memfed.errors import UnavailableError


class AioServer(Protocol):
    """What a background thread needs of a server: start, stop, and where it listens."""

    @property
    def address(self) -> str: ...

    async def start(self) -> int: ...

    async def stop(self, grace: float | None = ...) -> None: ...


class BackgroundServer:
    """Runs ``server`` on a new event loop in a daemon thread until ``stop`` (or the ``with`` block ends)."""

    def __init__(self, server: Any, *, name: str = "memfed-server", stop_grace_s: float = 1.0) -> None:
        self.server = server
        self.stop_grace_s = stop_grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def address(self) -> str:
        return self.server.address

    def start(self, timeout: float = 60.0) -> str:
        """Start the thread and wait until the server listens; its start error is raised here."""
        self._thread.start()
        if not self._started.wait(timeout):
            raise UnavailableError(f"the server did not start within {timeout:g}s")
        if self._error is not None:
            raise self._error
        return self.address

    def run(self, fn: Any) -> Any:
        """Run coroutine function ``fn()`` on the server's loop and return its result."""
        if self._loop is None:
            raise UnavailableError("the server is not started")
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result()

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._started.set()
                return
            self._started.set()
            await self._stop.wait()
            await self.server.stop(grace=self.stop_grace_s)

        asyncio.run(main())

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
