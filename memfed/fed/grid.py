"""A Grid that waits for replies by polling often: Flower's deployment Grid sleeps 3 s between pulls.

Flower 1.42's ``GrpcGrid``/``HttpGrid.send_and_receive`` pushes the messages and then pulls the replies
every 3 seconds, so every message exchange of a round (the admission query, the training round) ends up
to 3 s after the last reply arrived. A pull is one cheap call to the SuperLink, so polling often costs
little and shortens each round by about 1.5 s on average.

How often: every 2% of the time waited so far, between 1 ms and ``poll_s`` (0.02 s by default). So the
wait overshoots the last reply by at most 2% of the round (or 20 ms), in about 50 pulls for the first
50 ms and 50 more each time the wait grows e-fold after that (about 120 for a 0.2 s round, 400 for a
minute). A fixed 0.02 s tick made short rounds end on its multiples: on the simulation engine rounds of
0.16-0.24 s came out in 20 ms steps, and a reply a millisecond later cost a whole step (``memfed bench
fed``); at 0.1 s the wait was a third of a short round. Every other call goes to the wrapped Grid
unchanged, so the strategy runs on either engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class PollingGrid(Grid):
    """Delegates to ``inner``; only ``send_and_receive`` differs (it polls every ``poll_s`` seconds)."""

    DEFAULT_POLL_S = 0.02
    MIN_POLL_S = 0.001
    POLL_FRACTION = 0.02  # of the time waited so far

    def __init__(self, inner: Grid, poll_s: float | None = None) -> None:
        self.inner, self.poll_s = inner, self.DEFAULT_POLL_S if poll_s is None else poll_s

    def set_run(self, run):  # type: ignore[no-untyped-def]  # flwr's Run
        self.inner.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.inner.run

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; pull replies until all came or ``timeout`` passed (None: wait for all)."""
        pending = set(self.push_messages(messages))
        start = time.monotonic()
        end = start + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            now = time.monotonic()
            if not pending or (timeout is not None and now >= end):
                break
            time.sleep(min(self.poll_s, max(self.MIN_POLL_S, (now - start) * self.POLL_FRACTION)))
        return replies
