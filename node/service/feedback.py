"""The node's feedback intake: what the ``Feedback`` RPC records, and when the module evolves from it.

Recording is cheap and happens on a worker thread (the feedback log is its own SQLite file). Evolving
trains a candidate version, so it runs on the node's *model thread* (``NodeServer.run_on_model``), the one
thread every model call goes through, and never overlaps a generation batch. It runs in the background:
a Feedback call returns as soon as its item is recorded, saying whether an evolve step was started, and
one step at a time per cube (items that arrive meanwhile count towards the next).

Who gave the feedback matters (the rate limit and the count of distinct principals are per principal),
so the principal is the caller's authenticated identity. An application front end that relays its
users' ratings may name them (``on_behalf_of``), but only if it is one of the node's operators.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memfed.errors import MemfedError, PermissionDeniedError
from memfed.node.evolve.feedback import FEEDBACK_DB, FeedbackItem, FeedbackLog
from memfed.node.evolve.settings import EvolveDecision, EvolveSettings

if TYPE_CHECKING:
    from memfed.node.service.node import Node

log = logging.getLogger("memfed.node.feedback")

RunOnModel = Callable[[Callable[[], Any]], Awaitable[Any]]


@dataclass(frozen=True)
class FeedbackReceipt:
    """What one Feedback call did: the item's id and version, items pending, and the evolve state."""

    feedback_id: int
    cube_id: str
    version: str
    pending: int
    decision: str  # "waiting", "started" (an evolve step runs in the background) or "recorded"
    reason: str


class FeedbackIntake:
    """Feedback for one node: the log (``<store>/feedback.db``) and, with ``evolve``, the evolver.

    Without ``evolve`` the node only records; ``memfed feedback evolve`` (or a node restarted with
    ``--evolve``) acts on what accumulated.
    """

    def __init__(
        self,
        node: Node,
        *,
        settings: EvolveSettings | None = None,
        evolve: bool = False,
        path: Path | None = None,
    ) -> None:
        from memfed.node.evolve.evolver import Evolver

        self.node = node
        self.settings = settings or EvolveSettings()
        path = path or node.store.root / FEEDBACK_DB
        self.log = FeedbackLog(path, settings=self.settings, store=node.store)
        self.evolver: Evolver | None = None
        if evolve:
            self.evolver = Evolver(
                node.model, node.tokenizer, node.store, self.log, self.settings,
                runtime=node.runtime, vault=node.scheduler.plaintext,
            )  # fmt: skip
        self._running: dict[str, asyncio.Task[EvolveDecision | None]] = {}
        self.decisions: list[EvolveDecision] = []  # what background steps decided, in order

    @staticmethod
    def principal(caller: str | None, operator: bool, on_behalf_of: str, peer: str) -> str:
        """Who the feedback is recorded under. ``caller``: the certificate name (None on plaintext);
        ``operator``: the caller is one of the node's operators (its authorizer says so)."""
        relayed = on_behalf_of.strip()
        if caller is None:
            # No client certificate: a node without mutual TLS trusts its network (started --insecure, or
            # behind a front end): a relayed name is taken as given, else the caller's address stands for it.
            return relayed or f"peer:{peer}"
        if relayed:
            if not operator:
                raise PermissionDeniedError(
                    f"node:{caller} may not give feedback on behalf of {relayed!r}",
                    hint="only the node's operators (--operator) relay their users' feedback",
                )
            return relayed
        return f"node:{caller}"

    async def record(self, item: FeedbackItem, run_on_model: RunOnModel) -> FeedbackReceipt:
        """Record ``item`` (typed errors leave the log unchanged); start an evolve step when one is due."""
        feedback_id = await asyncio.to_thread(self.log.add, item)
        version, pending, due = await asyncio.to_thread(self._state, item.cube_id)
        if self.evolver is None:
            return FeedbackReceipt(
                feedback_id, item.cube_id, version, pending, "recorded", "this node records feedback only"
            )
        if item.cube_id in self._running:
            return FeedbackReceipt(
                feedback_id, item.cube_id, version, pending, "waiting", "an evolve step is running"
            )
        if not due:
            reason = f"{pending} pending item(s); a candidate needs {self.settings.threshold} new ones"
            return FeedbackReceipt(feedback_id, item.cube_id, version, pending, "waiting", reason)
        task = asyncio.create_task(self._step(item.cube_id, run_on_model))
        self._running[item.cube_id] = task
        task.add_done_callback(lambda _t, c=item.cube_id: self._running.pop(c, None))
        started = "an evolve step started"
        return FeedbackReceipt(feedback_id, item.cube_id, version, pending, "started", started)

    def _state(self, cube_id: str) -> tuple[str, int, bool]:
        """(current version, pending items, is a step due): a training attempt needs ``threshold`` items
        newer than the last attempt; a promoted version under watch is checked once it has enough live
        feedback of its own."""
        s = self.settings
        current = self.node.store.current_version(cube_id) or ""
        pending = self.log.pending(cube_id)
        last = self.log.last_attempt_item(cube_id)
        if sum(1 for it in pending if it.id > last) >= s.threshold:
            return current, len(pending), True
        promoted = self.log.decisions(cube_id, "promoted")
        watched = bool(promoted) and promoted[-1].to_version == current
        due = watched and len(self.log.on_version(cube_id, current)) >= s.regression_min_samples
        return current, len(pending), due

    async def _step(self, cube_id: str, run_on_model: RunOnModel) -> EvolveDecision | None:
        assert self.evolver is not None
        try:
            decision: EvolveDecision = await run_on_model(lambda: self.evolver.step(cube_id))  # type: ignore[union-attr]
        except MemfedError as exc:
            log.warning("evolving %s failed: %s", cube_id, exc)
            return None
        except Exception:  # a background task: logged here, or nobody would see it
            log.exception("evolving %s failed", cube_id)
            return None
        self.decisions.append(decision)
        log.info("evolve %s: %s (%s)", cube_id, decision.action, decision.reason)
        return decision

    async def drain(self) -> None:
        """Wait for running evolve steps (a server stopping, or a test)."""
        if self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    def close(self) -> None:
        self.log.close()
