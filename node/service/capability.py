"""The node's side of access control: capability tokens checked offline, callers known by certificate.

When a node is configured with its registry's public key, every call that touches a cube needs a
capability token the registry signed for *this caller* (the common name of its mutual-TLS certificate),
this cube and this action, unexpired and not on the node's revocation list (refreshed from the
registry by the sync loop). The node's own certificate and configured local operators act without
tokens: they run the node. A refusal raises the typed error the service edge maps to a status code, and
is logged as an audit line on the node (the registry's log holds the decisions the registry made).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from memfed.errors import AuthenticationError, MemfedError, PermissionDeniedError
from memfed.mip.v1 import node_service_pb2
from memfed.registry.tls import peer_of
from memfed.registry.tokens import TokenVerifier

log = logging.getLogger("memfed.node.audit")


class CapabilityAuthorizer:
    """``Authorizer`` hook of ``NodeServicer``: ``(action, what, capability, context)``; raises to deny."""

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        node_id: str,
        local_operators: Iterable[str] = (),
        allow_plaintext_local: bool = False,
        report: Callable[[str, str, str, str], None] | None = None,
    ) -> None:
        self.report = report  # (principal, action, cube_id, reason) -> the registry's audit log
        self.verifier = verifier
        self.node_id = node_id
        self.local = frozenset((node_id, *local_operators))
        self.allow_plaintext_local = allow_plaintext_local

    def caller(self, context: Any) -> str | None:
        """The certificate name of the caller; None on plaintext."""
        peer = peer_of(context)
        return peer.name if peer is not None else None

    def __call__(
        self, action: str, what: str, capability: node_service_pb2.CapabilityToken | None, context: Any
    ) -> None:
        name = self.caller(context)
        try:
            self._check(name, action, what, capability)
        except MemfedError as exc:
            log.warning("deny %s %s %s: %s", name or "plaintext-caller", action, what, exc.message)
            if self.report is not None:
                principal = f"node:{name}" if name else "node:plaintext-caller"
                self.report(principal, action, what.partition("@")[0], f"{type(exc).__name__}: {exc.message}")
            raise
        log.info("allow %s %s %s", name, action, what)

    def _check(
        self, name: str | None, action: str, what: str, capability: node_service_pb2.CapabilityToken | None
    ) -> None:
        if name is None:
            if self.allow_plaintext_local:
                return
            raise AuthenticationError(
                "this node checks capability tokens and needs to know who calls: connect with mutual TLS",
                hint="pass the certificate `memfed pki issue NAME` made for you",
            )
        if name in self.local:
            return
        cube_id = what.partition("@")[0]
        if cube_id in ("*", "generate") or cube_id.startswith("task:"):
            # Not scoped to one cube, so no token can cover it: the node's operators only.
            raise PermissionDeniedError(
                f"node:{name} may not {action} {what!r} on node {self.node_id}",
                hint="only the node's operators list, generate without modules or bind tasks",
            )
        self.verifier.verify(capability, principal=f"node:{name}", cube_id=cube_id, action=action)
