"""Capability tokens: ``TokenClaims`` signed by the registry, verified offline by the node serving a cube.

A token names one principal, one cube and one action, and expires soon (default 60 s): a node needs
only the registry's public key and its revocation list to decide, so the registry is not on the data
path and a revoked grant stops working within one TTL even on a node that never hears of it. The
signature covers the exact serialized claims with a context prefix (domain separation from manifests
and catalog answers, which the same key signs).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from memfed.crypto.identity import key_id_of
from memfed.cube.manifest import ACCESS_ACTIONS
from memfed.errors import AuthenticationError, InvalidArgumentError, PermissionDeniedError
from memfed.mip.v1 import node_service_pb2, registry_service_pb2

CONTEXT = b"memfed capability token v1\0"
ACTIONS = ACCESS_ACTIONS
DEFAULT_TTL_S = 60
MAX_TTL_S = 3600
MAX_TOKEN_BYTES = 4096
# An action a token for ``admin`` covers too: an admin may do everything to its cube.
_IMPLIED_BY_ADMIN = frozenset(ACTIONS)


def check_action(action: str) -> str:
    if action not in ACTIONS:
        raise InvalidArgumentError(f"unknown action {action!r}", hint=f"use one of {', '.join(ACTIONS)}")
    return action


def sign_claims(
    claims: registry_service_pb2.TokenClaims, key: ed25519.Ed25519PrivateKey
) -> node_service_pb2.CapabilityToken:
    data = claims.SerializeToString(deterministic=True)
    return node_service_pb2.CapabilityToken(token=data, signature=key.sign(CONTEXT + data))


def new_claims(
    principal: str, cube_id: str, action: str, ttl_s: int, key_id: str, *, now: float | None = None
) -> registry_service_pb2.TokenClaims:
    now = time.time() if now is None else now
    claims = registry_service_pb2.TokenClaims(
        token_id=secrets.token_hex(16),
        principal=principal,
        cube_id=cube_id,
        action=action,
        issuer_key_id=key_id,
    )
    claims.issued_at.FromNanoseconds(int(now * 1e9))
    claims.expires_at.FromNanoseconds(int((now + ttl_s) * 1e9))
    return claims


@dataclass
class TokenVerifier:
    """What a node holds to check tokens offline: the registry's public key and revoked token ids."""

    registry_key: ed25519.Ed25519PublicKey
    revoked: set[str] = field(default_factory=set)
    clock_skew_s: float = 5.0

    @property
    def key_id(self) -> str:
        return key_id_of(self.registry_key)

    def revoke(self, token_ids: Iterable[str]) -> None:
        self.revoked.update(token_ids)

    def verify(
        self,
        token: node_service_pb2.CapabilityToken | None,
        *,
        principal: str | None,
        cube_id: str,
        action: str,
        now: float | None = None,
    ) -> registry_service_pb2.TokenClaims:
        """The claims, if the token is genuine, current, unrevoked and scoped to exactly this request.

        Raises AuthenticationError for a missing, malformed or forged token (the caller is not
        identified by it) and PermissionDeniedError for a genuine token that does not cover the request.
        """
        if token is None or not token.token:
            raise AuthenticationError(
                f"{action} on {cube_id!r} needs a capability token from the registry",
                hint="ask the registry for one (`memfed registry token`, or RegistryClient.issue_token)",
            )
        if len(token.token) > MAX_TOKEN_BYTES:
            raise InvalidArgumentError(f"capability token of {len(token.token):,} bytes is oversized")
        try:
            self.registry_key.verify(token.signature, CONTEXT + token.token)
        except InvalidSignature:
            raise AuthenticationError(
                "capability token signature does not verify: it was forged or altered, or issued by another "
                "registry",
                hint="ask this network's registry for a new token",
            ) from None
        claims = registry_service_pb2.TokenClaims()
        try:
            claims.ParseFromString(token.token)
        except Exception as exc:  # signed but unparsable: refuse all the same
            raise AuthenticationError(f"capability token does not parse: {exc}") from exc
        now = time.time() if now is None else now
        expires = claims.expires_at.ToNanoseconds() / 1e9
        if expires + self.clock_skew_s < now:
            raise PermissionDeniedError(
                f"capability token {claims.token_id} expired {now - expires:.0f}s ago",
                hint="ask the registry for a fresh token",
            )
        if claims.token_id in self.revoked:
            raise PermissionDeniedError(f"capability token {claims.token_id} was revoked")
        if principal is not None and claims.principal != principal:
            raise PermissionDeniedError(
                f"capability token was issued to {claims.principal!r}, not to the caller {principal!r}"
            )
        if claims.cube_id != cube_id:
            raise PermissionDeniedError(
                f"capability token is for cube {claims.cube_id!r}, not {cube_id!r}",
                hint="ask the registry for a token for this cube",
            )
        if claims.action != action and not (claims.action == "admin" and action in _IMPLIED_BY_ADMIN):
            raise PermissionDeniedError(
                f"capability token allows {claims.action!r}, not {action!r} on {cube_id!r}",
                hint=f"ask the registry for a token for {action!r}",
            )
        return claims
