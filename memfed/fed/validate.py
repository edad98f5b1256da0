"""Check one node's reply before it may count: who sent it, for what, and whether its numbers are sane.

Each check raises the memfed error that names what is wrong; the strategy catches it, records the node
as rejected with that error, and aggregates the rest. Order: identity (AuthenticationError), access
(PermissionDeniedError), replay (IntegrityError), base model (IncompatibleModelError), then the tensors
(InvalidArgumentError: shapes, rank, NaN/Inf, absurd size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import RecordDict

from memfed.cube.core import MemCube
from memfed.cube.fingerprint import describe, mismatch_reasons
from memfed.errors import (
    AuthenticationError,
    IncompatibleModelError,
    IntegrityError,
    InvalidArgumentError,
    PermissionDeniedError,
)
from memfed.fed.aggregate import Factors
from memfed.fed.authority import USE, Authorizer
from memfed.fed.wire import (
    METRICS_KEY,
    NUM_EXAMPLES,
    PROOF_KEY,
    UPDATE_KEY,
    RoundTicket,
    check_signature,
    read_proof,
    record_arrays,
    record_to_factors,
    tensors_digest,
)
from memfed.mip.v1 import cube_pb2


@dataclass(frozen=True)
class Limits:
    """What an acceptable update looks like, besides matching the shared cube's shapes."""

    rank: int  # every update must have exactly this rank (the round's training rank)
    max_update_norm: float = 1e3  # ‖B A‖_F of any module above this is absurd, not learning
    max_examples: int = 10_000_000


@dataclass
class Accepted:
    principal: str
    factors: Factors
    num_examples: int


def verify_key(authorizer: Authorizer, principal: str, key: ed25519.Ed25519PublicKey) -> None:
    """The key must be the one the registry holds for ``principal`` (AuthenticationError otherwise)."""
    registered = authorizer.signing_key(principal)
    if registered is None:
        raise AuthenticationError(f"principal {principal!r} is not registered", hint="register its identity")
    if registered != key.public_bytes_raw():
        raise AuthenticationError(f"principal {principal!r} signed with a key the registry does not hold")


def check_allowed(authorizer: Authorizer, principal: str, cube_id: str) -> None:
    if not authorizer.is_allowed(principal, cube_id, USE):
        raise PermissionDeniedError(
            f"node {principal!r} is not granted 'use' on shared cube {cube_id!r}",
            hint="grant it in the registry to let it take part",
        )


def validate_reply(
    content: RecordDict,
    *,
    expected_principal: str | None,
    ticket: RoundTicket,
    current: MemCube,
    authorizer: Authorizer,
    limits: Limits,
) -> Accepted:
    """The accepted update of one reply, or the typed error saying why it does not count."""
    proof = content.config_records.get(PROOF_KEY)
    if proof is None or UPDATE_KEY not in content.array_records:
        raise InvalidArgumentError("the reply lacks its update or proof record")
    principal, key, signature = read_proof(proof)
    if expected_principal is not None and principal != expected_principal:
        raise AuthenticationError(f"node admitted as {expected_principal!r} replied as {principal!r}")
    verify_key(authorizer, principal, key)
    check_allowed(authorizer, principal, ticket.cube_id)
    claimed_round, claimed_base = proof.get("round"), proof.get("base-digest")
    if claimed_round != ticket.server_round or proof.get("nonce") != ticket.nonce:
        raise IntegrityError(
            f"update of {principal!r} was made for round {claimed_round}, "
            f"this is round {ticket.server_round}",
            hint="a replayed or late update; it does not count",
        )
    if claimed_base != ticket.base_digest:
        raise IntegrityError(f"update of {principal!r} was trained on another version of {ticket.cube_id!r}")
    arrays = record_arrays(content.array_records[UPDATE_KEY])  # decoded once, for digest and factors
    check_signature(key, signature, ticket.statement(principal, tensors_digest(arrays)), principal)
    _check_base_model(proof.get("base-model"), current, principal)
    factors = record_to_factors(arrays)
    check_factors(factors, current, limits, principal)
    metrics = content.metric_records.get(METRICS_KEY)
    n = metrics.get(NUM_EXAMPLES) if metrics is not None else None
    if not isinstance(n, int) or not 1 <= n <= limits.max_examples:
        raise InvalidArgumentError(f"update of {principal!r} reports an invalid sample count {n!r}")
    return Accepted(principal, factors, n)


def _check_base_model(raw: object, current: MemCube, principal: str) -> None:
    if not isinstance(raw, bytes):
        raise InvalidArgumentError(f"update of {principal!r} does not name its base model")
    fp = cube_pb2.BaseModelFingerprint()
    try:
        fp.ParseFromString(raw)
    except Exception as exc:  # protobuf's DecodeError: bytes from the wire
        raise InvalidArgumentError(f"update of {principal!r}: unreadable base-model fingerprint") from exc
    reasons = mismatch_reasons(current.manifest.base_model, fp)
    if reasons:
        raise IncompatibleModelError(
            f"update of {principal!r} was trained on {describe(fp)}, but {current.ref} is for "
            f"{describe(current.manifest.base_model)} (differs in: {', '.join(reasons)})"
        )


def check_factors(factors: Factors, current: MemCube, limits: Limits, principal: str) -> None:
    """Same modules and shapes as the shared cube, the round's rank, finite and of sane size."""
    shapes = {}
    for info in current.manifest.payload.tensors:
        shapes[info.name] = tuple(info.shape)
    modules = {t.module for t in current.manifest.payload.lora.targets}
    if set(factors) != modules:
        extra, missing = sorted(set(factors) - modules), sorted(modules - set(factors))
        raise InvalidArgumentError(
            f"update of {principal!r} adapts other modules than the shared cube "
            f"(extra {extra[:3]}, missing {missing[:3]})"
        )
    for module, (a, b) in factors.items():
        out_dim = shapes[f"{module}.lora_B.weight"][0]
        in_dim = shapes[f"{module}.lora_A.weight"][1]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_dim or b.shape[0] != out_dim:
            raise InvalidArgumentError(
                f"update of {principal!r}, module {module!r}: A {tuple(a.shape)}, B {tuple(b.shape)} do not "
                f"fit a {out_dim}x{in_dim} layer (another base model?)"
            )
        if a.shape[0] != limits.rank or b.shape[1] != limits.rank:
            raise InvalidArgumentError(
                f"update of {principal!r}, module {module!r} has rank {a.shape[0]}, "
                f"the round asks {limits.rank}"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise InvalidArgumentError(f"update of {principal!r}, module {module!r} has non-float factors")
        if not (a.isfinite().all() and b.isfinite().all()):
            raise InvalidArgumentError(f"update of {principal!r}, module {module!r} holds NaN or Inf values")
        norm = float((b.double() @ a.double()).norm())
        if not math.isfinite(norm) or norm > limits.max_update_norm:
            raise InvalidArgumentError(
                f"update of {principal!r}, module {module!r} has ‖ΔW‖ = {norm:.3g}, above the limit "
                f"{limits.max_update_norm:g}",
                hint="an absurdly large update is rejected, not clipped",
            )
