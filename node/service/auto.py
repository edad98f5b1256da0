"""The node setting that internalizes hot, stable plaintext on its own while the node serves.

``AutoInternalizer`` (memfed.node.conversion.triggers) decides what to internalize and does it; this
runs its ``tick`` every ``interval_s`` seconds on the node's *model thread*: the one thread every model
call of the service goes through (generation batches, loads, merges). Training wraps the model's layers
with PEFT for its duration, so it must never overlap a generation batch; queued on the same single
worker, it cannot. Rows that arrive meanwhile wait in the batcher and run when the tick is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from memfed.errors import InvalidArgumentError, MemfedError
from memfed.node.conversion.triggers import AutoInternalizer, AutoInternalizeSettings, TickOutcome

if TYPE_CHECKING:
    from memfed.node.service.server import NodeServer

log = logging.getLogger("memfed.node.auto")


class AutoInternalizeLoop:
    """Ticks an AutoInternalizer for a running NodeServer; ``outcomes`` keeps what each tick did."""

    def __init__(
        self, server: NodeServer, settings: AutoInternalizeSettings, interval_s: float = 60.0
    ) -> None:
        node = server.node
        vault = node.scheduler.plaintext
        if vault is None:
            raise InvalidArgumentError(
                "automatic internalization needs the node's plaintext memory", hint="pass --plaintext DB"
            )
        if not interval_s > 0:
            raise InvalidArgumentError(f"the internalization interval must be positive, not {interval_s}")
        self.server = server
        self.interval_s = interval_s
        self.internalizer = AutoInternalizer(
            node.model, node.tokenizer, node.store, vault, settings, runtime=node.runtime
        )
        self.outcomes: list[TickOutcome] = []

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set. A failing tick is logged and the loop goes on."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
            if stop.is_set():
                return
            try:
                done = await self.server.run_on_model(self.internalizer.tick)
            except MemfedError as exc:
                log.warning("automatic internalization failed: %s", exc)
                continue
            for outcome in done:
                if outcome.registered:
                    log.info("internalized %s into %s", outcome.doc_id, outcome.cube_ref)
                else:
                    log.info("did not internalize %s: %s", outcome.doc_id, outcome.reason)
            self.outcomes.extend(done)
