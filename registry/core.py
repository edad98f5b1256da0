"""``Registry``: the registry's logic as a plain Python object (the gRPC service and Flower call it).

    reg = Registry.open("/var/lib/memfed/registry")            # SQLite + the registry key, created once
    reg = Registry.open(dir, db="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    reg.register_node(identity_message)                          # NodeIdentity (certificate + public keys)
    reg.publish(signed_manifest, "node-a")                       # manifest only; the payload stays on A
    reg.grant("legal_expert", "node:node-b", ["read", "export"])
    reg.is_allowed("node:node-b", "legal_expert", "export")      # -> True, and an audit entry
    token = reg.issue_token("node:node-b", "legal_expert", "export")
    reg.revoke("legal_expert", "node:node-b")

Deny by default: an action is allowed only by a current grant to the principal, to a group it is in, or
``admin`` on the cube (the first publisher of a cube gets ``admin``), or to an operator (configured
names with every right). Principals are ``node:<id>``, ``user:<id>``, ``group:<name>``; a bare name means
``node:<name>``. Every decision, allow and deny, is appended to the hash-chained audit log in the same
transaction as the change it allows, and a refused request changes nothing but the log.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import Connection, Engine, and_, bindparam, delete, func, insert, or_, select, update

from memfed.crypto.identity import Identity, init_identity, key_id_of, load_identity
from memfed.crypto.signing import TrustedKeys, verify_manifest
from memfed.cube.manifest import check_cube_id, manifest_from_bytes, parse_semver, ref_string, semver_key
from memfed.errors import (
    AlreadyExistsError,
    AuthenticationError,
    IntegrityError,
    InvalidArgumentError,
    MemfedError,
    NotFoundError,
    PermissionDeniedError,
    RollbackError,
)
from memfed.mip.v1 import cube_pb2, node_service_pb2
from memfed.mip.v1 import registry_service_pb2 as rpb
from memfed.registry import audit as audit_chain
from memfed.registry import db
from memfed.registry.catalog import DEFAULT_ANSWER_TTL_S, sign_answer
from memfed.registry.pki import cert_common_name, cert_fingerprint, verify_issued_by
from memfed.registry.tokens import ACTIONS, DEFAULT_TTL_S, MAX_TTL_S, TokenVerifier, new_claims, sign_claims

DB_FILE = "registry.db"
KEY_DIR = "key"
PRINCIPAL_KINDS = ("node", "user", "group")
MAX_NAME = 200


# The statements of the authorization hot path, built once (constructing them per call cost more than
# running them).
_g = db.grants.c
_Q_GROUPS = select(db.group_members.c.group_name).where(db.group_members.c.member == bindparam("p"))
_Q_GRANT = (
    select(_g.principal, _g.action)
    .where(
        and_(
            _g.cube_id == bindparam("cube"),
            _g.principal.in_(bindparam("who", expanding=True)),
            _g.action.in_(bindparam("acts", expanding=True)),
            or_(_g.expires_at.is_(None), _g.expires_at > bindparam("now")),
        )
    )
    .limit(1)
)
_Q_AUDIT_HEAD = (
    select(db.counters.c.value, db.counters.c.hash).where(db.counters.c.name == "audit").with_for_update()
)
_INSERT_AUDIT = insert(db.audit)
_UPDATE_AUDIT_HEAD = (
    update(db.counters).where(db.counters.c.name == "audit").values(value=bindparam("v"), hash=bindparam("h"))
)


def normalize_principal(principal: str) -> str:
    """``node:<id>`` / ``user:<id>`` / ``group:<name>``; a bare name is a node id."""
    p = (principal or "").strip()
    if not p or len(p) > MAX_NAME:
        raise InvalidArgumentError(
            f"principal {principal!r} is empty or longer than {MAX_NAME}",
            hint="name it node:<id>, user:<id> or group:<name>",
        )
    kind, sep, name = p.partition(":")
    if not sep:
        return f"node:{p}"
    if kind not in PRINCIPAL_KINDS or not name:
        raise InvalidArgumentError(
            f"principal {principal!r} is not node:<id>, user:<id> or group:<name>", hint="fix the prefix"
        )
    return p


def _check_actions(actions: Iterable[str]) -> list[str]:
    out = list(dict.fromkeys(actions))
    bad = [a for a in out if a not in ACTIONS]
    if bad:
        raise InvalidArgumentError(
            f"unknown action(s) {', '.join(map(repr, bad))}", hint=f"use {', '.join(ACTIONS)}"
        )
    return out


class Registry:
    """Identities, catalog with version chains, access control and audit over one database."""

    def __init__(
        self,
        engine: Engine,
        identity: Identity,
        *,
        operators: Iterable[str] = (),
        answer_ttl_s: int = DEFAULT_ANSWER_TTL_S,
        ca_pem: bytes | None = None,
    ) -> None:
        self.engine = engine
        self.identity = identity
        self.operators = frozenset(normalize_principal(o) for o in operators)
        self.answer_ttl_s = answer_ttl_s
        self.ca_pem = ca_pem
        # SQLite serializes writers anyway; the lock keeps this process's threads from racing into
        # SQLITE_BUSY on a read-then-write upgrade. PostgreSQL writers serialize on the counters row.
        self._write_lock = threading.Lock()
        self._checkpointer = db.WalCheckpointer(engine) if engine.dialect.name == "sqlite" else None

    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        db_url: str | None = None,
        operators: Iterable[str] = (),
        ca_pem: bytes | None = None,
        answer_ttl_s: int = DEFAULT_ANSWER_TTL_S,
    ) -> Registry:
        """Open (creating on first use) the registry in ``directory``: its signing key under ``key/`` and,
        unless ``db_url`` names another database, ``registry.db`` (SQLite, WAL)."""
        directory = Path(directory)
        key_dir = directory / KEY_DIR
        if (key_dir / "identity.pub.json").exists():
            ident = load_identity(key_dir)
        else:
            ident = init_identity(key_dir, name="memfed-registry")
        engine = db.open_engine(db_url or directory / DB_FILE)
        return cls(engine, ident, operators=operators, ca_pem=ca_pem, answer_ttl_s=answer_ttl_s)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self.engine.dispose()

    # -- keys ---------------------------------------------------------------------------------------------

    @property
    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self.identity.signing_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key)

    def token_verifier(self) -> TokenVerifier:
        """What a node needs to check this registry's tokens offline (with the current revocations)."""
        return TokenVerifier(self.public_key, set(self.revoked_token_ids()))

    # -- transactions and audit ---------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    def _append_audit(
        self, conn: Connection, principal: str, action: str, cube_id: str, allowed: bool, reason: str
    ) -> int:
        head = conn.execute(_Q_AUDIT_HEAD).one()
        e = audit_chain.Entry(
            head.value + 1, db.now_us(), principal, action, cube_id, allowed, reason[:2000], head.hash
        )
        h = audit_chain.entry_hash(e, head.hash)
        conn.execute(
            _INSERT_AUDIT,
            {"sequence": e.sequence, "at": e.at_us, "principal": e.principal, "action": e.action,
             "cube_id": e.cube_id, "allowed": e.allowed, "reason": e.reason, "prev_hash": e.prev_hash,
             "entry_hash": h},
        )  # fmt: skip
        conn.execute(_UPDATE_AUDIT_HEAD, {"v": e.sequence, "h": h})
        return e.sequence

    def audit_event(self, principal: str, action: str, cube_id: str, allowed: bool, reason: str) -> int:
        """Record a decision made elsewhere (e.g. a node's or the service edge's refusal)."""
        with self._write() as conn:
            return self._append_audit(conn, principal, action, cube_id, allowed, reason)

    def _guarded(self, fn: Any, principal: str, action: str, cube_id: str) -> Any:
        """Run ``fn(conn)`` in one write transaction; a MemfedError rolls it back and is audited as a deny
        in a transaction of its own, so a refused request changes nothing but the log."""
        try:
            with self._write() as conn:
                return fn(conn)
        except MemfedError as exc:
            raise self._deny(exc, principal, action, cube_id) from None

    def _deny(self, exc: MemfedError, principal: str, action: str, cube_id: str) -> MemfedError:
        """Audit a refusal in its own transaction (nothing else changes) and return the error to raise."""
        self.audit_event(principal, action, cube_id, False, f"{type(exc).__name__}: {exc.message}")
        return exc

    # -- principals ---------------------------------------------------------------------------------------

    def add_user(self, name: str) -> str:
        p = normalize_principal(name if ":" in name else f"user:{name}")
        with self._write() as conn:
            if conn.execute(select(db.principals).where(db.principals.c.name == p)).first() is None:
                conn.execute(insert(db.principals).values(name=p, kind=p.split(":")[0]))
        return p

    def add_to_group(self, group: str, member: str, *, by: str = "operator") -> None:
        g = normalize_principal(group if group.startswith("group:") else f"group:{group}")
        m = normalize_principal(member)
        with self._write() as conn:
            exists = conn.execute(
                select(db.group_members).where(
                    and_(db.group_members.c.group_name == g, db.group_members.c.member == m)
                )
            ).first()
            if exists is None:
                conn.execute(insert(db.group_members).values(group_name=g, member=m))
            self._append_audit(conn, by, "group-add", g, True, f"{m} joins {g}")

    def groups_of(self, principal: str, conn: Connection | None = None) -> list[str]:
        p = normalize_principal(principal)
        q = select(db.group_members.c.group_name).where(db.group_members.c.member == p)
        if conn is not None:
            return [r[0] for r in conn.execute(q)]
        with self.engine.connect() as c:
            return [r[0] for r in c.execute(q)]

    # -- nodes --------------------------------------------------------------------------------------------

    def register_node(self, ident: rpb.NodeIdentity, *, peer_fingerprint: str | None = None) -> bool:
        """Record a node's certificate and public keys. Re-registering the same identity is a no-op
        (False); another certificate or key under a registered id is refused. With ``peer_fingerprint``
        (the mutual-TLS caller's certificate) the caller must be registering itself."""
        who = f"node:{ident.node_id}" if ident.node_id else "node:?"
        try:
            row = self._check_identity(ident, peer_fingerprint)
        except MemfedError as exc:
            raise self._deny(exc, who, "register", "") from None

        def register(conn: Connection) -> bool:
            old = conn.execute(select(db.nodes).where(db.nodes.c.node_id == ident.node_id)).first()
            if old is not None:
                if old.cert_fingerprint != row["cert_fingerprint"] or old.signing_key != row["signing_key"]:
                    raise AlreadyExistsError(
                        f"node {ident.node_id!r} is registered already with another certificate or key",
                        hint="pick another node id, or have an operator remove the old registration",
                    )
                if old.address != row["address"]:
                    conn.execute(
                        update(db.nodes)
                        .where(db.nodes.c.node_id == ident.node_id)
                        .values(address=row["address"])
                    )
                self._append_audit(conn, who, "register", "", True, "already registered")
                return False
            conn.execute(insert(db.nodes).values(**row))
            self._append_audit(conn, who, "register", "", True, f"certificate {row['cert_fingerprint'][:16]}")
            return True

        return self._guarded(register, who, "register", "")

    def rotate_certificate(self, ident: rpb.NodeIdentity, *, peer_fingerprint: str | None = None) -> bool:
        """Replace a registered node's certificate, keeping its identity keys (False: it is that one already).

        A certificate expires long before a node's keys need to change, and peers know a node by its keys
        and id. So the new certificate must come from the network CA, name the node, and carry the
        *same* signing and agreement keys; and the caller proves it is the node by connecting with the
        certificate registered now (``peer_fingerprint``; None: an operator, or an --insecure registry).
        Once replaced, the old certificate is refused like any unregistered one."""
        who = f"node:{ident.node_id}" if ident.node_id else "node:?"
        try:
            row = self._check_identity(ident, None)
        except MemfedError as exc:
            raise self._deny(exc, who, "rotate", "") from None

        def rotate(conn: Connection) -> bool:
            old = conn.execute(select(db.nodes).where(db.nodes.c.node_id == ident.node_id)).first()
            if old is None:
                raise NotFoundError(
                    f"node {ident.node_id!r} is not registered: there is no certificate to rotate",
                    hint="register it (`memfed registry register`)",
                )
            if peer_fingerprint is not None and peer_fingerprint != old.cert_fingerprint:
                raise AuthenticationError(
                    f"a certificate rotation for {ident.node_id!r} must come over a channel made with its "
                    "currently registered certificate",
                    hint="connect with the node's current certificate (--tls), or ask an operator",
                )
            if old.signing_key != row["signing_key"] or old.kem_key != row["kem_key"]:
                raise PermissionDeniedError(
                    f"the new certificate for {ident.node_id!r} comes with other identity keys: a rotation "
                    "keeps the node's keys",
                    hint="send the keys of the node's own identity.pub.json; new keys are a new node id",
                )
            if old.cert_fingerprint == row["cert_fingerprint"]:
                self._append_audit(conn, who, "rotate", "", True, "certificate unchanged")
                return False
            conn.execute(
                update(db.nodes)
                .where(db.nodes.c.node_id == ident.node_id)
                .values(cert_pem=row["cert_pem"], cert_fingerprint=row["cert_fingerprint"])
            )
            reason = f"certificate {old.cert_fingerprint[:16]} -> {row['cert_fingerprint'][:16]}"
            self._append_audit(conn, who, "rotate", "", True, reason)
            return True

        return self._guarded(rotate, who, "rotate", "")

    def _check_identity(self, ident: rpb.NodeIdentity, peer_fingerprint: str | None) -> dict[str, Any]:
        if not ident.node_id or not ident.certificate_pem or len(ident.signing_public_key) != 32:
            raise InvalidArgumentError(
                "a node identity needs node_id, certificate_pem and a 32-byte Ed25519 signing_public_key",
                hint="send the node's certificate and the keys from its identity.pub.json",
            )
        if len(ident.certificate_pem) > 64 * 1024 or len(ident.kem_public_key) > 4096:
            raise InvalidArgumentError("node identity is oversized")
        if self.ca_pem is not None:
            verify_issued_by(ident.certificate_pem, self.ca_pem)
        fp = cert_fingerprint(ident.certificate_pem)
        cn = cert_common_name(ident.certificate_pem)
        if cn != ident.node_id:
            raise AuthenticationError(
                f"the certificate is issued to {cn!r}, not to node {ident.node_id!r}",
                hint=f"issue one with `memfed pki issue {ident.node_id}`",
            )
        if peer_fingerprint is not None and peer_fingerprint != fp:
            raise AuthenticationError(
                f"the caller's TLS certificate is not the certificate it registers for {ident.node_id!r}",
                hint="a node registers itself, over a channel made with its own certificate",
            )
        try:
            key = ed25519.Ed25519PublicKey.from_public_bytes(ident.signing_public_key)
        except ValueError as exc:
            raise InvalidArgumentError(f"signing_public_key is not an Ed25519 key: {exc}") from exc
        return {
            "node_id": ident.node_id,
            "cert_pem": bytes(ident.certificate_pem),
            "cert_fingerprint": fp,
            "key_id": key_id_of(key),
            "signing_key": bytes(ident.signing_public_key),
            "kem_key": bytes(ident.kem_public_key),
            "kem_suite": ident.kem_suite,
            "fingerprint": ident.fingerprint,
            "address": ident.address,
            "registered_at": db.now_us(),
        }

    def node(self, node_id: str) -> rpb.NodeIdentity | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(db.nodes).where(db.nodes.c.node_id == node_id)).first()
        return None if row is None else _identity_message(row)

    def principal_for_certificate(self, name: str, fingerprint: str) -> str:
        """The principal a mutual-TLS caller speaks for: a registered node whose pinned certificate this
        is, or an operator. Anyone else is refused (and audited)."""
        op = normalize_principal(f"user:{name}")
        if op in self.operators:
            return op
        with self.engine.connect() as conn:
            row = conn.execute(select(db.nodes.c.cert_fingerprint).where(db.nodes.c.node_id == name)).first()
        if row is None:
            raise self._deny(
                AuthenticationError(
                    f"node {name!r} is not registered", hint="register it first (`memfed registry register`)"
                ),
                f"node:{name}", "connect", "",
            )  # fmt: skip
        if row.cert_fingerprint != fingerprint:
            raise self._deny(
                AuthenticationError(
                    f"the caller presents a certificate for {name!r} that is not the one {name!r} registered",
                    hint="connect with the node's own registered certificate",
                ),
                f"node:{name}", "connect", "",
            )  # fmt: skip
        return f"node:{name}"

    # -- access control -----------------------------------------------------------------------------------

    def _allowed(self, conn: Connection, principal: str, cube_id: str, action: str) -> tuple[bool, str]:
        if principal in self.operators:
            return True, "operator"
        who = [principal, *(r[0] for r in conn.execute(_Q_GROUPS, {"p": principal}))]
        params = {"cube": cube_id, "who": who, "acts": [action, "admin"], "now": db.now_us()}
        row = conn.execute(_Q_GRANT, params).first()
        if row is None:
            return False, f"no current grant of {action!r} on {cube_id!r} to {principal} or its groups"
        return True, f"grant of {row.action!r} to {row.principal}"

    def is_allowed(self, principal: str, cube_id: str, action: str) -> bool:
        """Whether ``principal`` may do ``action`` on ``cube_id`` now. Audited, allow and deny alike."""
        p = normalize_principal(principal)
        _check_actions([action])
        with self._write() as conn:
            ok, reason = self._allowed(conn, p, cube_id, action)
            self._append_audit(conn, p, action, cube_id, ok, reason)
        return ok

    def authorize(self, principal: str, cube_id: str, action: str) -> None:
        """``is_allowed`` that raises PermissionDeniedError (with what to ask for) on a deny."""
        if not self.is_allowed(principal, cube_id, action):
            raise PermissionDeniedError(
                f"{normalize_principal(principal)} may not {action} {cube_id!r}",
                hint=f"ask an admin of {cube_id!r} for a grant (`memfed registry grant`)",
            )

    def grant(
        self,
        cube_id: str,
        principal: str,
        actions: Sequence[str],
        *,
        expires_at: float | None = None,
        by: str | None = None,
    ) -> int:
        """Grant ``actions`` on ``cube_id`` to ``principal`` (until ``expires_at``, epoch seconds).
        ``by`` (when given) must hold ``admin`` on the cube. Returns the audit sequence."""
        check_cube_id(cube_id)
        p = normalize_principal(principal)
        acts = _check_actions(actions)
        if not acts:
            raise InvalidArgumentError("a grant needs at least one action", hint=f"use {', '.join(ACTIONS)}")
        if expires_at is not None and expires_at <= time.time():
            raise InvalidArgumentError("the grant's expiry is in the past", hint="give a future time")
        granter = normalize_principal(by) if by else "operator"

        def do_grant(conn: Connection) -> int:
            if by is not None:
                ok, reason = self._allowed(conn, granter, cube_id, "admin")
                if not ok:
                    raise PermissionDeniedError(
                        f"{granter} may not grant on {cube_id!r} ({reason}); granting to {p} needs admin",
                        hint="ask the cube's owner or an operator",
                    )
            exp = int(expires_at * 1e6) if expires_at is not None else None
            g = db.grants.c
            for a in acts:
                conn.execute(
                    delete(db.grants).where(and_(g.cube_id == cube_id, g.principal == p, g.action == a))
                )
                conn.execute(
                    insert(db.grants).values(
                        cube_id=cube_id, principal=p, action=a, expires_at=exp, granted_by=granter,
                        created_at=db.now_us(),
                    )
                )  # fmt: skip
            until = f" until {expires_at:.0f}" if expires_at is not None else ""
            return self._append_audit(
                conn, granter, "grant", cube_id, True, f"{','.join(acts)} to {p}{until}"
            )

        return int(self._guarded(do_grant, granter, "grant", cube_id))

    def revoke(
        self, cube_id: str, principal: str, actions: Sequence[str] = (), *, by: str | None = None
    ) -> int:
        """Withdraw grants (all actions when ``actions`` is empty) and revoke the unexpired tokens issued
        under them, so nodes that fetch the revocation list refuse them before they expire."""
        p = normalize_principal(principal)
        acts = _check_actions(actions) or list(ACTIONS)
        granter = normalize_principal(by) if by else "operator"

        def do_revoke(conn: Connection) -> int:
            if by is not None:
                ok, reason = self._allowed(conn, granter, cube_id, "admin")
                if not ok:
                    raise PermissionDeniedError(
                        f"{granter} may not revoke on {cube_id!r} ({reason}); revoking needs admin"
                    )
            g = db.grants.c
            conn.execute(
                delete(db.grants).where(and_(g.cube_id == cube_id, g.principal == p, g.action.in_(acts)))
            )
            t = db.tokens.c
            scope = [p] if not p.startswith("group:") else [p, *self._members(conn, p)]
            live = and_(
                t.cube_id == cube_id, t.principal.in_(scope), t.action.in_(acts), t.expires_at > db.now_us()
            )
            conn.execute(update(db.tokens).where(live).values(revoked=True))
            return self._append_audit(conn, granter, "revoke", cube_id, True, f"{','.join(acts)} from {p}")

        return int(self._guarded(do_revoke, granter, "revoke", cube_id))

    def _members(self, conn: Connection, group: str) -> list[str]:
        q = select(db.group_members.c.member).where(db.group_members.c.group_name == group)
        return [r[0] for r in conn.execute(q)]

    def issue_token(
        self,
        principal: str,
        cube_id: str,
        action: str,
        ttl_s: int = DEFAULT_TTL_S,
        *,
        requested_by: str | None = None,
    ) -> node_service_pb2.CapabilityToken:
        """A signed capability token for one principal, cube and action, if a grant allows it now.
        ``requested_by`` (the authenticated caller) must be the principal itself, an admin of the cube or
        an operator: nobody obtains tokens for someone else."""
        p = normalize_principal(principal)
        _check_actions([action])
        if not 0 <= ttl_s <= MAX_TTL_S:
            raise InvalidArgumentError(f"ttl_seconds {ttl_s} is out of range", hint=f"use 1..{MAX_TTL_S}")
        ttl_s = ttl_s or DEFAULT_TTL_S
        caller = normalize_principal(requested_by) if requested_by else p

        def do_issue(conn: Connection) -> rpb.TokenClaims:
            if caller != p:
                ok, _ = self._allowed(conn, caller, cube_id, "admin")
                if not ok:
                    raise PermissionDeniedError(f"{caller} may not obtain tokens for {p} on {cube_id!r}")
            ok, reason = self._allowed(conn, p, cube_id, action)
            if not ok:
                raise PermissionDeniedError(
                    f"{p} may not {action} {cube_id!r}: {reason}",
                    hint=f"ask an admin of {cube_id!r} for a grant",
                )
            claims = new_claims(p, cube_id, action, ttl_s, self.key_id)
            conn.execute(
                insert(db.tokens).values(
                    token_id=claims.token_id, principal=p, cube_id=cube_id, action=action,
                    expires_at=claims.expires_at.ToMicroseconds(), revoked=False,
                )
            )  # fmt: skip
            self._append_audit(
                conn, p, action, cube_id, True, f"token {claims.token_id} ({ttl_s}s): {reason}"
            )
            return claims

        claims = self._guarded(do_issue, caller, action, cube_id)
        return sign_claims(claims, self.identity.signing_key)

    def revoked_token_ids(self) -> list[str]:
        t = db.tokens.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.token_id).where(and_(t.revoked.is_(True), t.expires_at > db.now_us()))
            )
            return sorted(r[0] for r in rows)

    # -- catalog ------------------------------------------------------------------------------------------

    def publish(
        self, signed: cube_pb2.SignedManifest, holder_node_id: str, *, publisher: str | None = None
    ) -> int:
        """Record a new version (manifest only) held by ``holder_node_id``; returns the catalog sequence.

        Refused, with an audit entry and nothing recorded: a manifest not signed by a registered node's
        key; a publisher without ``admin`` on an existing cube; a version not newer than the newest
        (rollback); a version chain that is not the newest version's chain plus its digest
        (mix-and-match); the same version with another digest. Re-publishing an identical version adds
        the holder (another node now holds it too).
        """
        holder = holder_node_id or ""
        who = normalize_principal(publisher or holder or "?")
        try:
            manifest, keyed_node = self._verify_signed(signed)
        except MemfedError as exc:
            raise self._deny(exc, who, "publish", "") from None
        ref = ref_string(manifest)
        return int(
            self._guarded(
                lambda conn: self._publish(conn, signed, manifest, keyed_node, holder, who),
                who,
                "publish",
                ref,
            )
        )

    def _verify_signed(self, signed: cube_pb2.SignedManifest) -> tuple[Any, str]:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(db.nodes.c.node_id, db.nodes.c.signing_key).where(db.nodes.c.key_id == signed.key_id)
            ).first()
        if row is None:
            raise AuthenticationError(
                f"the manifest is signed by key {signed.key_id!r}, which no registered node holds",
                hint="register the producing node first",
            )
        key = ed25519.Ed25519PublicKey.from_public_bytes(row.signing_key)
        manifest = verify_manifest(signed, TrustedKeys([key]))
        parse_semver(manifest.version)
        return manifest, row.node_id

    def _publish(self, conn: Connection, signed: Any, m: Any, keyed_node: str, holder: str, who: str) -> int:
        if conn.execute(select(db.nodes.c.node_id).where(db.nodes.c.node_id == holder)).first() is None:
            raise NotFoundError(f"holder node {holder!r} is not registered", hint="register it first")
        cv = db.cube_versions.c
        rows = conn.execute(select(cv.version, cv.digest, cv.chain).where(cv.cube_id == m.cube_id)).all()
        if rows:
            ok, reason = self._allowed(conn, who, m.cube_id, "admin")
            same = next((r for r in rows if r.version == m.version), None)
            if same is not None and same.digest == m.digest and (ok or who == f"node:{holder}"):
                # Another holder of an identical version: a node that synced it announces itself.
                if who == f"node:{holder}" and not ok:
                    ok, reason = self._allowed(conn, who, m.cube_id, "read")
                if not ok:
                    raise PermissionDeniedError(f"{who} may not announce {ref_string(m)}: {reason}")
                self._add_holder(conn, m, holder)
                self._append_audit(conn, who, "publish", ref_string(m), True, f"holder {holder} added")
                return self._catalog_sequence(conn, bump=True)
            if not ok:
                raise PermissionDeniedError(
                    f"{who} may not publish versions of {m.cube_id!r}: {reason}",
                    hint="ask the cube's owner for an admin grant",
                )
            if same is not None:
                raise IntegrityError(
                    f"{ref_string(m)} is published already with digest {same.digest}, not {m.digest}",
                    hint="publish the change as a new version",
                )
            newest = max(rows, key=lambda r: semver_key(r.version))
            if semver_key(m.version) <= semver_key(newest.version):
                raise RollbackError(
                    f"{ref_string(m)} is not newer than {m.cube_id}@{newest.version}: versions only go "
                    "forward (a replayed older manifest is refused)",
                    hint="publish a higher version",
                )
            expected = [*json.loads(newest.chain), newest.digest]
            if list(m.version_chain) != expected:
                raise IntegrityError(
                    f"{ref_string(m)}'s version chain does not extend {m.cube_id}@{newest.version}: it "
                    "must be the newest version's chain plus its digest (mix-and-match refused)",
                    hint=f"build the new version on {m.cube_id}@{newest.version}",
                )
        seq = self._catalog_sequence(conn, bump=True)
        conn.execute(
            insert(db.cube_versions).values(
                cube_id=m.cube_id, version=m.version, digest=m.digest,
                chain=json.dumps(list(m.version_chain)), signed_manifest=signed.SerializeToString(),
                key_id=signed.key_id, publisher=who, sequence=seq, published_at=db.now_us(),
            )
        )  # fmt: skip
        self._add_holder(conn, m, holder)
        if not rows:  # the first publisher owns the cube
            conn.execute(
                insert(db.grants).values(
                    cube_id=m.cube_id, principal=who, action="admin", expires_at=None, granted_by=who,
                    created_at=db.now_us(),
                )
            )  # fmt: skip
        self._append_audit(
            conn, who, "publish", ref_string(m), True, f"held by {holder}, signed by {keyed_node}"
        )
        return seq

    def _add_holder(self, conn: Connection, m: Any, holder: str) -> None:
        h = db.holders.c
        exists = conn.execute(
            select(h.node_id).where(and_(h.cube_id == m.cube_id, h.version == m.version, h.node_id == holder))
        ).first()
        if exists is None:
            conn.execute(
                insert(db.holders).values(
                    cube_id=m.cube_id, version=m.version, node_id=holder, digest=m.digest
                )
            )

    def _catalog_sequence(self, conn: Connection, *, bump: bool = False) -> int:
        c = db.counters.c
        q = select(c.value).where(c.name == "catalog")
        value = conn.execute(q.with_for_update() if bump else q).scalar_one()
        if bump:
            value += 1
            conn.execute(update(db.counters).where(c.name == "catalog").values(value=value))
        return int(value)

    def lookup_answer(self, cube_id: str) -> rpb.CatalogAnswer:
        """The catalog's versions (oldest first) and holders of one cube, unsigned."""
        cv, h = db.cube_versions.c, db.holders.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(cv.version, cv.signed_manifest).where(cv.cube_id == cube_id)).all()
            held = conn.execute(select(h.version, h.node_id).where(h.cube_id == cube_id)).all()
            seq = self._catalog_sequence(conn)
        if not rows:
            raise NotFoundError(f"the catalog has no cube {cube_id!r}", hint="check the name, or publish it")
        by_version: dict[str, list[str]] = {}
        for r in held:
            by_version.setdefault(r.version, []).append(r.node_id)
        answer = rpb.CatalogAnswer(cube_id=cube_id, sequence=seq)
        for r in sorted(rows, key=lambda r: semver_key(r.version)):
            entry = answer.versions.add(holders=sorted(by_version.get(r.version, [])))
            entry.manifest.ParseFromString(r.signed_manifest)
        now = time.time()
        answer.issued_at.FromNanoseconds(int(now * 1e9))
        answer.expires_at.FromNanoseconds(int((now + self.answer_ttl_s) * 1e9))
        return answer

    def lookup(self, cube_id: str) -> rpb.SignedCatalogAnswer:
        """``lookup_answer`` signed by the registry with an expiry (verify with ``catalog.verify_answer``)."""
        return sign_answer(self.lookup_answer(cube_id), self.identity.signing_key)

    def newest(self, cube_id: str) -> tuple[Any, list[str]]:
        """The newest version's manifest and its holders."""
        answer = self.lookup_answer(cube_id)
        entry = answer.versions[-1]
        return manifest_from_bytes(entry.manifest.manifest), list(entry.holders)

    def who_holds(self, digest: str) -> list[rpb.NodeIdentity]:
        with self.engine.connect() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    select(db.holders.c.node_id).where(db.holders.c.digest == digest).distinct()
                )
            ]
            rows = conn.execute(select(db.nodes).where(db.nodes.c.node_id.in_(ids))).all() if ids else []
        return [_identity_message(r) for r in sorted(rows, key=lambda r: r.node_id)]

    def subscribe(self, node_id: str, cube_ids: Sequence[str]) -> None:
        for c in cube_ids:
            check_cube_id(c)
        with self._write() as conn:
            for c in cube_ids:
                s = db.subscriptions.c
                if (
                    conn.execute(select(s.node_id).where(and_(s.node_id == node_id, s.cube_id == c))).first()
                    is None
                ):
                    conn.execute(insert(db.subscriptions).values(node_id=node_id, cube_id=c))

    def subscriptions(self, node_id: str) -> list[str]:
        s = db.subscriptions.c
        with self.engine.connect() as conn:
            return sorted(r[0] for r in conn.execute(select(s.cube_id).where(s.node_id == node_id)))

    def catalog_sequence(self) -> int:
        with self.engine.connect() as conn:
            return self._catalog_sequence(conn)

    # -- audit --------------------------------------------------------------------------------------------

    def audit_entries(self, from_sequence: int = 1, limit: int = 0) -> list[audit_chain.Entry]:
        a = db.audit.c
        q = select(db.audit).where(a.sequence >= max(1, from_sequence)).order_by(a.sequence)
        if limit:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [_entry(r) for r in conn.execute(q)]

    def verify_audit(self) -> audit_chain.VerifyResult:
        """Walk the whole chain against the recorded head: an edited, deleted or truncated entry shows."""
        with self.engine.connect() as conn:
            head = conn.execute(
                select(db.counters.c.value, db.counters.c.hash).where(db.counters.c.name == "audit")
            ).one()
            rows = conn.execution_options(yield_per=1000).execute(
                select(db.audit).order_by(db.audit.c.sequence)
            )
            return audit_chain.verify_chain(
                (_entry(r) for r in rows), expect_count=int(head.value), expect_head=bytes(head.hash)
            )

    def audit_count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(db.audit)).scalar_one())


def _entry(r: Any) -> audit_chain.Entry:
    return audit_chain.Entry(
        int(r.sequence), int(r.at), r.principal, r.action, r.cube_id, bool(r.allowed), r.reason,
        bytes(r.prev_hash), bytes(r.entry_hash),
    )  # fmt: skip


def _identity_message(row: Any) -> rpb.NodeIdentity:
    return rpb.NodeIdentity(
        node_id=row.node_id, certificate_pem=bytes(row.cert_pem), signing_public_key=bytes(row.signing_key),
        kem_public_key=bytes(row.kem_key), kem_suite=row.kem_suite, fingerprint=row.fingerprint,
        address=row.address,
    )  # fmt: skip


def entry_message(e: audit_chain.Entry) -> rpb.AuditEntry:
    msg = rpb.AuditEntry(
        sequence=e.sequence, principal=e.principal, action=e.action, cube_id=e.cube_id, allowed=e.allowed,
        reason=e.reason, prev_hash=e.prev_hash, entry_hash=e.entry_hash,
    )  # fmt: skip
    msg.at.FromMicroseconds(e.at_us)
    return msg
