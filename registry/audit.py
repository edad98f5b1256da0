"""The audit log's hash chain: every allow and deny is an entry whose hash covers the previous hash.

entry_hash = SHA-256(context ‖ prev_hash ‖ canonical bytes of fields 1-7), where the canonical bytes are
fixed-width integers and length-prefixed UTF-8 (not protobuf, whose encoding is not promised canonical).
Editing an entry changes its hash, so the next entry's prev_hash no longer matches; deleting one leaves a
gap in the sequence and a broken link; truncating the tail is caught against the head the registry keeps
in its counters row (and a verifier that remembers an earlier head sees the log shrink).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

GENESIS = b"\0" * 32
_CONTEXT = b"memfed audit entry v1\0"


@dataclass(frozen=True)
class Entry:
    sequence: int
    at_us: int
    principal: str
    action: str
    cube_id: str
    allowed: bool
    reason: str
    prev_hash: bytes = GENESIS
    entry_hash: bytes = b""


def _text(s: str) -> bytes:
    data = s.encode("utf-8")
    return struct.pack(">I", len(data)) + data


def canonical(e: Entry) -> bytes:
    return (
        struct.pack(">Qq", e.sequence, e.at_us)
        + _text(e.principal)
        + _text(e.action)
        + _text(e.cube_id)
        + (b"\1" if e.allowed else b"\0")
        + _text(e.reason)
    )


def entry_hash(e: Entry, prev_hash: bytes) -> bytes:
    return hashlib.sha256(_CONTEXT + prev_hash + canonical(e)).digest()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    head: bytes
    problem: str = ""
    bad_sequence: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "head": self.head.hex(),
            "problem": self.problem,
            "bad_sequence": self.bad_sequence,
        }


def verify_chain(
    entries: Iterable[Entry], *, expect_count: int | None = None, expect_head: bytes | None = None
) -> VerifyResult:
    """Walk the chain from genesis; report the first entry that does not link (edited, deleted, reordered)."""
    prev = GENESIS
    n = 0
    for e in entries:
        n += 1
        if e.sequence != n:
            return VerifyResult(
                False, n - 1, prev, f"entry {n} is missing (next is {e.sequence}): deleted", n
            )
        if e.prev_hash != prev:
            return VerifyResult(False, n - 1, prev, f"entry {n} does not link to entry {n - 1}", n)
        if entry_hash(e, prev) != e.entry_hash:
            return VerifyResult(False, n - 1, prev, f"entry {n} was altered after it was written", n)
        prev = e.entry_hash
    if expect_count is not None and n != expect_count:
        return VerifyResult(
            False,
            n,
            prev,
            f"the log has {n} entries but the registry's head says {expect_count}: truncated",
            n + 1,
        )
    if expect_head is not None and n and prev != expect_head:
        return VerifyResult(False, n, prev, "the last entry's hash is not the registry's recorded head", n)
    return VerifyResult(True, n, prev)
