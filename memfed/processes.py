"""memfed servers as child processes: start one, read the JSON it prints once it listens, stop it.

The demo and the multi-process tests run the registry and nodes exactly as an operator would
(``memfed registry serve --json``, ``memfed node serve --json``); this is the one place that knows how to
wait for them and how to stop them (the whole process group, so nothing a server spawned outlives it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

MEMFED = [sys.executable, "-m", "memfed.cli.main"]  # the CLI of this interpreter, whatever PATH says


def wait_until(cond: Callable[[], bool], timeout: float, what: str, *, every: float = 0.2) -> None:
    """Poll ``cond`` until it holds; TimeoutError naming ``what`` after ``timeout`` seconds. For things
    that finish on their own schedule (a server coming up, a background sync), not on a call."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class ServerProcess:
    """One server in its own process group: stdout is read for its ``--json`` document, stderr is logged
    to ``log``."""

    def __init__(self, args: list[str], log: Path, env: Mapping[str, str] | None = None) -> None:
        self.log = log
        self._f: IO[bytes] = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.p = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._f, env=dict(env or os.environ), start_new_session=True
        )

    def read_json(self, timeout: float = 180) -> dict[str, Any]:
        """The JSON document the server prints once it listens (a multi-line object ending in ``}``)."""
        lines: list[str] = []
        end = time.monotonic() + timeout
        assert self.p.stdout is not None
        while time.monotonic() < end:
            line = self.p.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"{self.log.stem} ended: {self.log.read_text()[-3000:]}")
            lines.append(line)
            if line.rstrip() == "}":
                return json.loads("".join(lines))
        raise TimeoutError(f"{self.log.stem} printed no address within {timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM the group (servers shut down cleanly), SIGKILL it if that takes more than 20 s."""
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        if self.p.stdout is not None:
            self.p.stdout.close()
        self._f.close()
