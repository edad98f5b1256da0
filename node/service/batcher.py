"""Dynamic batching of Generate calls: concurrent requests run together as one mixed-module batch.

Each Generate call puts its rows in a queue and awaits a future. One loop task takes the queue in FIFO
order: it waits up to ``max_wait_s`` for more rows to arrive (or until ``max_rows`` are queued), then
runs everything it took as one batch through ``Generator.generate`` on the model's worker thread. The
runtime's per-row module index lets every row carry its own modules, so callers asking for different
cubes still share one forward pass per step. Results go back to each caller's future in order. While a
batch runs, new calls queue up and form the next one, so the batch size follows the load.

Cancellation and deadlines free work at three points:

* a call cancelled (or past its deadline) while queued is dropped before it runs;
* a running batch whose callers have *all* gone is stopped at the next forward pass (a pre-hook on the
  model raises ``BatchAbandoned``; the runtime restores its routing on the way out);
* a call whose deadline is shorter than the time its rows need (from a running estimate of the seconds
  per generated token) is refused up front by the servicer (``estimate_s``).

One caller's bad request must not fail its batch mates: each call's modules are loaded before the batch
runs (an unknown, foreign or broken module fails that call alone), and if the batch still fails with a
``MemfedError`` (e.g. a tight memory budget evicted one row's module to load another's), every call of
the batch is run on its own so each gets its own answer or its own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from memfed.errors import CapacityError, DeadlineExceededError, MemfedError, UnavailableError
from memfed.node.generation import Generator, RowRequest, RowResult

log = logging.getLogger(__name__)
Outcome = tuple[list[RowResult], int] | BaseException


class BatchAbandoned(Exception):
    """Raised inside the model's forward pass when nobody waits for the running batch any more."""


@dataclass(eq=False)
class _Pending:
    rows: Sequence[RowRequest]
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future[tuple[list[RowResult], int]]
    abandoned: bool = False  # set on the event loop when the caller goes away; read by the model thread

    def gone(self, now: float) -> bool:
        return self.abandoned or (self.deadline is not None and now >= self.deadline)


@dataclass
class BatchStats:
    """Counters for tests, health and operators."""

    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    dropped_rows: int = 0  # cancelled or past their deadline before they ran
    aborted_batches: int = 0  # stopped mid-generation: every caller had gone
    solo_retries: int = 0  # batches re-run call by call after a failure
    batch_sizes: list[int] = field(default_factory=list)


def _deadline_error(rows: int) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"the deadline passed before the node could generate {rows} row(s); the work was dropped",
        hint="give the call more time, or ask for fewer rows or fewer new tokens",
    )


class GenerateBatcher:
    """Queues Generate rows from concurrent calls and runs them as mixed-module batches."""

    def __init__(
        self,
        generator: Generator,
        executor: Executor,
        *,
        max_rows: int = 64,
        max_wait_s: float = 0.005,
        max_queue_rows: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.generator = generator
        self.scheduler = generator.scheduler
        self.executor = executor
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.max_queue_rows = max_queue_rows
        self.clock = clock
        self.stats = BatchStats()
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: list[_Pending] | None = None
        self._running_thread: int | None = None  # only that thread's forward passes may be stopped
        self._step_s: float | None = None  # running estimate: seconds per generated token of a batch
        self._hook = generator.model.register_forward_pre_hook(self._check_abandoned)

    # -- life cycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="memfed-generate-batcher")

    async def close(self) -> None:
        """Stop taking work; queued calls fail with UnavailableError, a running batch finishes."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(
                    UnavailableError("the node is shutting down", hint="retry on another node or later")
                )
        self._hook.remove()

    @property
    def queued_rows(self) -> int:
        return sum(len(p.rows) for p in self._queue)

    def estimate_s(self, rows: Sequence[RowRequest]) -> float | None:
        """Seconds these rows are expected to take once they run; None before any batch has run."""
        if self._step_s is None or not rows:
            return None
        return self._step_s * max(r.max_new_tokens for r in rows)

    # -- calls -------------------------------------------------------------------------------------------

    async def submit(self, rows: Sequence[RowRequest], deadline: float | None) -> tuple[list[RowResult], int]:
        """Queue ``rows``; return their results and the size of the batch they ran in."""
        if self._task is None or self._wakeup is None:
            raise UnavailableError("the node is not accepting generation requests (not started or stopping)")
        queued = self.queued_rows
        if queued + len(rows) > self.max_queue_rows:
            raise CapacityError(
                f"the node is busy: {queued} rows are waiting and the queue holds {self.max_queue_rows}",
                hint="retry shortly, or spread the load over more nodes",
            )
        item = _Pending(rows, deadline, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._wakeup.set()
        try:
            return await item.future
        except asyncio.CancelledError:
            item.abandoned = True  # dropped if still queued; stops the batch if it was the last caller
            raise

    # -- the loop ------------------------------------------------------------------------------------------

    def _live_rows(self) -> int:
        now = self.clock()
        return sum(len(p.rows) for p in self._queue if not p.gone(now))

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            until = loop.time() + self.max_wait_s
            while self._live_rows() < self.max_rows and (left := until - loop.time()) > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), left)
            batch = self._take()
            if not batch:
                continue
            try:
                outcomes = await loop.run_in_executor(self.executor, self._run, batch)
            except Exception as exc:  # the worker itself failed: every caller of the batch hears of it
                log.exception("generation batch failed")
                outcomes = [(item, exc) for item in batch]
            for item, outcome in outcomes:
                if item.future.done() or item.abandoned:
                    continue
                if isinstance(outcome, BaseException):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)

    def _take(self) -> list[_Pending]:
        """The next batch: queued calls in order while their rows fit ``max_rows`` (a call larger than
        that runs alone). Calls already gone are dropped here, before any work."""
        batch: list[_Pending] = []
        rows = 0
        now = self.clock()
        while self._queue:
            item = self._queue[0]
            if item.gone(now):
                self._queue.popleft()
                self.stats.dropped_rows += len(item.rows)
                if not item.future.done() and not item.abandoned:
                    item.future.set_exception(_deadline_error(len(item.rows)))
                continue
            if batch and rows + len(item.rows) > self.max_rows:
                break
            batch.append(self._queue.popleft())
            rows += len(item.rows)
        return batch

    # -- on the model thread ---------------------------------------------------------------------------------

    def _check_abandoned(self, module: Any, args: Any) -> None:
        running = self._running
        if running and threading.get_ident() == self._running_thread:
            now = self.clock()
            if all(p.gone(now) for p in running):
                raise BatchAbandoned

    def _run(self, batch: list[_Pending]) -> list[tuple[_Pending, Outcome]]:
        outcomes: list[tuple[_Pending, Outcome]] = []
        live: list[_Pending] = []
        for item in batch:
            try:
                self._prepare(item)
                live.append(item)
            except MemfedError as exc:
                outcomes.append((item, exc))
        if not live:
            return outcomes
        try:
            outcomes += self._generate(live)
        except MemfedError as exc:
            if len(live) == 1:
                outcomes.append((live[0], exc))
            else:
                log.info("batch of %d calls failed (%s); running each call alone", len(live), exc)
                self.stats.solo_retries += 1
                for item in live:
                    try:
                        outcomes += self._generate([item])
                    except MemfedError as solo_exc:
                        outcomes.append((item, solo_exc))
        return outcomes

    def _prepare(self, item: _Pending) -> None:
        """Load every module the call names, so a module that cannot load fails this call alone."""
        names = dict.fromkeys(m for row in item.rows for m in row.modules)
        for name in names:
            self.scheduler.load(name)

    def _generate(self, items: list[_Pending]) -> list[tuple[_Pending, Outcome]]:
        now = self.clock()
        gone = [i for i in items if i.gone(now)]
        items = [i for i in items if not i.gone(now)]
        self.stats.dropped_rows += sum(len(i.rows) for i in gone)
        out: list[tuple[_Pending, Outcome]] = [(i, _deadline_error(len(i.rows))) for i in gone]
        if not items:
            return out
        rows = [r for item in items for r in item.rows]
        self._running, self._running_thread = items, threading.get_ident()
        started = time.perf_counter()
        try:
            results = self.generator.generate(rows)
        except BatchAbandoned:
            self.stats.aborted_batches += 1
            self.stats.dropped_rows += len(rows)
            return out + [(i, _deadline_error(len(i.rows))) for i in items]
        finally:
            self._running = self._running_thread = None
        elapsed = time.perf_counter() - started
        step = elapsed / max(r.max_new_tokens for r in rows)
        self._step_s = step if self._step_s is None else 0.7 * self._step_s + 0.3 * step
        self.stats.batches += 1
        self.stats.rows += len(rows)
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        self.stats.batch_sizes.append(len(rows))
        del self.stats.batch_sizes[:-256]
        pos = 0
        for item in items:
            n = len(item.rows)
            out.append((item, (results[pos : pos + n], len(rows))))
            pos += n
        return out
