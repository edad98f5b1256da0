"""Signed catalog answers: rollback and freeze protection as TUF defines them.

The registry signs each ``CatalogAnswer`` (its versions and holders for one cube) with its Ed25519 key
and a short validity. A node that acts on an answer checks, offline: the signature (an answer altered or
made by someone else is refused), the expiry (a *stale* answer replayed by an attacker who wants the
node to miss new versions — freeze — is refused) and the sequence against the last one it saw for that
cube (an *older* answer — rollback — is refused).
"""

from __future__ import annotations

import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from memfed.crypto.identity import key_id_of
from memfed.errors import AuthenticationError, IntegrityError, InvalidArgumentError, RollbackError
from memfed.mip.v1 import registry_service_pb2 as rpb

CONTEXT = b"memfed catalog answer v1\0"
DEFAULT_ANSWER_TTL_S = 300
MAX_ANSWER_BYTES = 8 << 20


def sign_answer(answer: rpb.CatalogAnswer, key: ed25519.Ed25519PrivateKey) -> rpb.SignedCatalogAnswer:
    data = answer.SerializeToString(deterministic=True)
    return rpb.SignedCatalogAnswer(
        answer=data, key_id=key_id_of(key.public_key()), signature=key.sign(CONTEXT + data)
    )


def verify_answer(
    signed: rpb.SignedCatalogAnswer,
    registry_key: ed25519.Ed25519PublicKey,
    *,
    cube_id: str | None = None,
    min_sequence: int = 0,
    now: float | None = None,
) -> rpb.CatalogAnswer:
    """The answer, if the registry signed it, it has not expired and it is not older than one seen."""
    if len(signed.answer) > MAX_ANSWER_BYTES:
        raise InvalidArgumentError(f"catalog answer of {len(signed.answer):,} bytes is oversized")
    try:
        registry_key.verify(signed.signature, CONTEXT + signed.answer)
    except InvalidSignature:
        raise AuthenticationError(
            "catalog answer signature does not verify: altered, or not from this network's registry"
        ) from None
    answer = rpb.CatalogAnswer()
    try:
        answer.ParseFromString(signed.answer)
    except Exception as exc:
        raise IntegrityError(f"signed catalog answer does not parse: {exc}") from exc
    now = time.time() if now is None else now
    if answer.expires_at.ToNanoseconds() / 1e9 < now:
        raise RollbackError(
            f"catalog answer for {answer.cube_id!r} expired at {answer.expires_at.ToJsonString()}: stale "
            "(a replayed old answer would hide newer versions)",
            hint="ask the registry again",
        )
    if cube_id is not None and answer.cube_id != cube_id:
        raise IntegrityError(f"catalog answer is for {answer.cube_id!r}, not {cube_id!r}")
    if answer.sequence < min_sequence:
        raise RollbackError(
            f"catalog answer for {answer.cube_id!r} has sequence {answer.sequence}, older than "
            f"{min_sequence} seen before: a rolled-back catalog",
        )
    return answer
