"""PushCube's bridge: chunks arriving on the event loop feed ``CubeStore.put_stream`` on a worker thread.

The store hashes the payload while writing it to a temp file and installs it only when size and SHA-256
match the manifest, so a stream cut anywhere (client cancel, dropped connection, deadline, a malformed
message) stores nothing: the sink tells the writer to stop, the writer raises inside ``put_stream`` and
the store discards its temp file.

For LoRA and adapter cubes the sink also keeps the bytes and, once they are complete and hash to the
manifest's digest, runs ``validate`` on them *before* the store installs them (the check raises inside
``put_stream``'s chunk iterator, which aborts the put). So a payload whose tensors do not fit the model
(unknown target layer, wrong rank) or hold NaN/Inf never reaches the store. Such payloads are module
sized (megabytes), so holding one in memory for the check is cheap; other kinds are not kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable, Iterator

from memfed.cube.digest import digest_hex
from memfed.cube.manifest import CubeManifest
from memfed.errors import UnavailableError

_END = object()
_ABORT = object()
QUEUE_CHUNKS = 8  # chunks buffered between the network and the disk (8 MiB at the default size)


class StreamCut(UnavailableError):
    """The upload stopped before its end; nothing was stored."""


class PushSink:
    """One upload: ``feed`` chunks (event loop), ``finish`` or ``abort``; ``chunks`` runs in the writer."""

    def __init__(
        self, manifest: CubeManifest, validate: Callable[[CubeManifest, bytes], None] | None
    ) -> None:
        self.manifest = manifest
        self.validate = validate
        self._q: queue.Queue[object] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._aborted = threading.Event()
        self.writer: asyncio.Future[CubeManifest] | None = None

    async def feed(self, data: bytes) -> None:
        while True:
            try:
                self._q.put_nowait(data)
                return
            except queue.Full:
                if self.writer is not None and self.writer.done():
                    return  # the writer stopped (it failed): its result says why
                await asyncio.sleep(0.001)  # the disk is slower than the network: wait, off the loop

    async def finish(self) -> None:
        await self.feed(_END)  # type: ignore[arg-type]

    def abort(self) -> None:
        """Stop the writer (it raises StreamCut; the store discards the temp file). Never blocks."""
        self._aborted.set()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        with contextlib.suppress(queue.Full):  # the writer sees _aborted anyway
            self._q.put_nowait(_ABORT)

    def chunks(self) -> Iterator[bytes]:
        """The payload for ``put_stream`` (on the writer thread)."""
        kept = bytearray() if self.validate is not None else None
        while True:
            item = self._q.get()
            if item is _ABORT or self._aborted.is_set():
                raise StreamCut(
                    f"the upload of {self.manifest.cube_id}@{self.manifest.version} stopped before its end; "
                    "nothing was stored",
                    hint="send it again",
                )
            if item is _END:
                break
            assert isinstance(item, bytes)
            if kept is not None:
                kept += item
            yield item
        if kept is not None and self.validate is not None and self._complete(kept):
            self.validate(self.manifest, bytes(kept))  # raises: the store keeps nothing

    def _complete(self, data: bytearray) -> bool:
        """Whether the bytes are the manifest's payload; if not, the store's own check reports it."""
        m = self.manifest
        return len(data) == m.payload.size_bytes and hashlib.sha256(data).hexdigest() == digest_hex(m.digest)
