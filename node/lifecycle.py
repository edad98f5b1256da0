"""Cube lifecycle: which transitions are legal, what each does to the payload, and the time machine.

States (``memfed.mip.v1.LifecycleState``) and what they mean on a node::

    GENERATED  stored, not in use (a fresh put, or deactivated)
    ACTIVATED  in use: loadable and served
    MERGED     a merge product (memfed.node.merge): made from parents its version chain names, served
               like an activated module; the parents keep their own states
    ARCHIVED   payload moved to cold storage (compressed, cold/ under the store's root): not loadable
               until restored
    EXPIRED    hidden (from ``CubeStore.list`` and from ``get`` without a version, refused by ``get``) and
               deleted, payload and all, by ``purge_expired`` once its retention period has passed

Legal transitions, defined once in ``TRANSITIONS`` (anything else raises LifecycleError and changes
nothing; setting the state a cube is already in is a no-op and records nothing)::

    GENERATED -> ACTIVATED   activate
    GENERATED -> MERGED      declared a merge product
    GENERATED -> ARCHIVED    archive (payload to cold storage)
    GENERATED -> EXPIRED     expire
    ACTIVATED -> GENERATED   deactivate
    ACTIVATED -> MERGED      declared a merge product
    ACTIVATED -> ARCHIVED    archive
    ACTIVATED -> EXPIRED     expire
    MERGED    -> ACTIVATED   served as an ordinary module
    MERGED    -> ARCHIVED    archive
    MERGED    -> EXPIRED     expire
    ARCHIVED  -> ACTIVATED   restore: payload back from cold storage, verified against its digest
    ARCHIVED  -> EXPIRED     expire (the payload stays cold until purged)
    EXPIRED   -> ACTIVATED   restore, possible until the cube is purged

A merge product is stored directly in MERGED (its version chain names the parents, its origin the
method and weights); merging never changes the parents, which stay usable alone. Only ACTIVATED leads out
of ARCHIVED and EXPIRED, so nothing is ever un-archived without its payload being restored and checked.

Every transition goes through the store, which records it (from, to, time, reason) in the same
transaction as the state change, with a compare-and-set on the state checked here, so two processes
cannot both make a transition that was legal only for the first. Payload moves are crash-safe: see
memfed.node.store ("Cold storage").

Time machine: ``restore`` brings an archived or not-yet-purged expired cube back to ACTIVATED;
``rollback`` makes any other stored version of a cube (an earlier one on its version chain, or a later
one again) the current one: that version is restored or activated, and the versions newer than it are
archived, so that rolling forward again is a restore. ``current`` is the version in use: the newest by
semver that is neither archived nor expired.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from memfed.cube.manifest import LIFECYCLE_NAMES, lifecycle_name, parse_semver, semver_key
from memfed.errors import InvalidArgumentError, LifecycleError, MemfedError, NotFoundError
from memfed.node.store import CubeStore, LifecycleEvent

__all__ = [
    "ACTIVATED",
    "ARCHIVED",
    "EXPIRED",
    "GENERATED",
    "MERGED",
    "TRANSITIONS",
    "Lifecycle",
    "PurgedCube",
    "RollbackResult",
    "is_legal",
    "legal_targets",
]

GENERATED = LIFECYCLE_NAMES["generated"]
ACTIVATED = LIFECYCLE_NAMES["activated"]
MERGED = LIFECYCLE_NAMES["merged"]
ARCHIVED = LIFECYCLE_NAMES["archived"]
EXPIRED = LIFECYCLE_NAMES["expired"]

TRANSITIONS: Mapping[int, frozenset[int]] = {
    GENERATED: frozenset({ACTIVATED, MERGED, ARCHIVED, EXPIRED}),
    ACTIVATED: frozenset({GENERATED, MERGED, ARCHIVED, EXPIRED}),
    MERGED: frozenset({ACTIVATED, ARCHIVED, EXPIRED}),
    ARCHIVED: frozenset({ACTIVATED, EXPIRED}),
    EXPIRED: frozenset({ACTIVATED}),
}

_ORDER = (GENERATED, ACTIVATED, MERGED, ARCHIVED, EXPIRED)


def _state(state: str | int) -> int:
    if isinstance(state, str) and state.lower() in LIFECYCLE_NAMES:
        return LIFECYCLE_NAMES[state.lower()]
    if isinstance(state, int) and state in TRANSITIONS:
        return state
    raise InvalidArgumentError(
        f"unknown lifecycle state {state!r}", hint=f"use one of: {', '.join(LIFECYCLE_NAMES)}"
    )


def legal_targets(state: str | int) -> list[str]:
    """Names of the states a cube in ``state`` may move to, in lifecycle order."""
    allowed = TRANSITIONS[_state(state)]
    return [lifecycle_name(s) for s in _ORDER if s in allowed]


def is_legal(from_state: str | int, to_state: str | int) -> bool:
    """Whether ``from_state -> to_state`` is a transition (a state to itself is not: it is a no-op)."""
    return _state(to_state) in TRANSITIONS[_state(from_state)]


@dataclass(frozen=True)
class PurgedCube:
    """One cube removed by ``purge_expired``."""

    cube_id: str
    version: str
    expired_at: datetime
    payload_removed: bool  # False when another version still uses the payload file


@dataclass(frozen=True)
class RollbackResult:
    """What ``rollback`` did: ``version`` is now current; ``archived`` are the newer versions it moved
    to cold storage, newest first."""

    cube_id: str
    version: str
    previous: str | None  # the current version before the rollback
    archived: list[str] = field(default_factory=list)


class Lifecycle:
    """Lifecycle transitions of the cubes in one store. Thread- and process-safe as the store is."""

    def __init__(self, store: CubeStore) -> None:
        self.store = store

    # -- queries --------------------------------------------------------------------------------------

    def state(self, cube_id: str, version: str) -> str:
        """The lifecycle state name of ``cube_id@version``."""
        return lifecycle_name(self.store.get_manifest(cube_id, version).lifecycle)

    def current(self, cube_id: str) -> str | None:
        """The version in use: the newest by semver that is neither archived nor expired; None when
        every stored version is. NotFoundError when the store holds no version of the cube."""
        return self.store.current_version(cube_id)

    def history(self, cube_id: str, version: str | None = None) -> list[LifecycleEvent]:
        """Recorded transitions (time, from, to, reason), oldest first: of one version, or of every
        stored version of the cube (its whole timeline) when ``version`` is None."""
        if version is not None:
            return self.store.lifecycle_history(cube_id, version)
        versions = self.store.versions(cube_id)
        if not versions:
            raise NotFoundError(f"no cube {cube_id!r} in store {self.store.root}")
        events = [e for v in versions for e in self.store.lifecycle_history(cube_id, v)]
        return sorted(events, key=lambda e: e.at)  # stable: equal times keep version order

    # -- transitions ----------------------------------------------------------------------------------

    def transition(self, cube_id: str, version: str, target: str | int, reason: str) -> LifecycleEvent | None:
        """Move ``cube_id@version`` to ``target`` if ``TRANSITIONS`` allows it, doing what the target
        needs to the payload (to ARCHIVED: into cold storage; from ARCHIVED or EXPIRED to ACTIVATED:
        restored and verified); return the recorded event, or None when the cube was in ``target``
        already (nothing is recorded then).

        An illegal transition raises LifecycleError, naming both states and the legal ones, and changes
        nothing; so does a change made meanwhile by another process.
        """
        new = _state(target)
        _check_reason(reason)
        old = self.store.get_manifest(cube_id, version).lifecycle
        if old == new:
            if new == ARCHIVED and not self.store.is_cold(cube_id, version):
                # Archived by a bare set_lifecycle that left the payload hot: finish the job.
                self.store.archive_payload(cube_id, version, ARCHIVED, reason, expect=old)
                return self._last_event(cube_id, version)
            return None
        if new not in TRANSITIONS[old]:
            raise _illegal(cube_id, version, old, new)
        if new == ARCHIVED:
            self.store.archive_payload(cube_id, version, new, reason, expect=old)
        elif new == ACTIVATED and old in (ARCHIVED, EXPIRED):
            self.store.restore_payload(cube_id, version, new, reason, expect=old)
        else:
            self.store.set_lifecycle(cube_id, version, new, reason, expect=old)
        return self._last_event(cube_id, version)

    def archive(self, cube_id: str, version: str, reason: str) -> LifecycleEvent | None:
        """Move the cube to ARCHIVED: its payload is compressed into cold storage and the hot file
        removed (unless another version shares it); ``get`` refuses it until it is restored."""
        return self.transition(cube_id, version, ARCHIVED, reason)

    def restore(self, cube_id: str, version: str, reason: str) -> LifecycleEvent | None:
        """Time machine: bring an archived or expired (not yet purged) cube back to ACTIVATED, its
        payload decompressed and verified against the manifest's digest before anything changes.

        Already ACTIVATED: a no-op (None). GENERATED or MERGED: LifecycleError (nothing to restore).
        Purged: NotFoundError.
        """
        old = self.store.get_manifest(cube_id, version).lifecycle
        if old not in (ARCHIVED, EXPIRED, ACTIVATED):
            raise LifecycleError(
                f"cube {cube_id}@{version} is {lifecycle_name(old)}, not archived or expired: there is "
                "nothing to restore",
                hint=f"activate it instead (legal from {lifecycle_name(old)}: "
                f"{', '.join(legal_targets(old))})",
            )
        return self.transition(cube_id, version, ACTIVATED, reason)

    def expire(self, cube_id: str, version: str, reason: str) -> LifecycleEvent | None:
        """Move the cube to EXPIRED: hidden, refused by ``get``, purged by ``purge_expired`` after the
        retention period, restorable until then. The payload stays where it is (hot, or cold)."""
        return self.transition(cube_id, version, EXPIRED, reason)

    def purge_expired(self, retention_s: float, now: datetime | None = None) -> list[PurgedCube]:
        """Delete every cube that has been EXPIRED for at least ``retention_s`` seconds at ``now``
        (default: the current time), with its history and its payload file (hot or cold, unless another
        version shares it); return what was purged. A cube restored meanwhile is left alone."""
        if retention_s < 0:
            raise InvalidArgumentError(f"retention must not be negative, got {retention_s} s")
        now = datetime.now(UTC) if now is None else now
        if now.tzinfo is None:
            raise InvalidArgumentError("now must be a timezone-aware datetime", hint="e.g. datetime.now(UTC)")
        cutoff = now - timedelta(seconds=retention_s)
        purged: list[PurgedCube] = []
        for cube_id, version, expired_at in self.store.state_entered(EXPIRED):
            if expired_at > cutoff:
                continue
            try:
                removed = self.store.delete(cube_id, version, expect=EXPIRED)
            except (LifecycleError, NotFoundError):
                continue  # restored, or purged by another process, since the listing
            purged.append(PurgedCube(cube_id, version, expired_at, removed))
        return purged

    # -- time machine ---------------------------------------------------------------------------------

    def rollback(self, cube_id: str, to: str, reason: str) -> RollbackResult:
        """Make version ``to`` of the cube the current one.

        ``to`` is a version, or a payload digest from the current version's ``version_chain``; either
        way it must be a version of this cube that the store holds (NotFoundError otherwise, saying
        whether the chain names it). That version is restored from cold storage (verified) or
        activated; then every newer version that is not archived or expired already is archived, newest
        first. The target is made usable first, so a damaged cold copy stops the rollback before
        anything changed; an interrupted rollback can be run again. Rolling forward again is a
        ``restore`` of the newer version (or a rollback to it).
        """
        _check_reason(reason)
        versions = self.store.versions(cube_id)
        if not versions:
            raise NotFoundError(f"no cube {cube_id!r} in store {self.store.root}")
        previous = self.current(cube_id)
        target = self._resolve_target(cube_id, to, versions, previous)
        self.transition(cube_id, target, ACTIVATED, f"rollback to {target}: {reason}")
        archived: list[str] = []
        key = semver_key(target)
        for version in reversed(versions):
            if semver_key(version) <= key:
                break
            if self.store.get_manifest(cube_id, version).lifecycle in (ARCHIVED, EXPIRED):
                continue
            self.transition(cube_id, version, ARCHIVED, f"rolled back to {target}: {reason}")
            archived.append(version)
        return RollbackResult(cube_id, target, previous, archived)

    def _resolve_target(self, cube_id: str, to: str, versions: list[str], current: str | None) -> str:
        if to.startswith("sha256:"):
            for version in versions:
                if self.store.get_manifest(cube_id, version).digest == to:
                    return version
            chain: list[str] = []
            if current is not None:
                chain = list(self.store.get_manifest(cube_id, current).version_chain)
            if to in chain:
                raise NotFoundError(
                    f"the version chain of {cube_id}@{current} names {to}, but store {self.store.root} "
                    f"holds no version of {cube_id} with that payload",
                    hint="fetch that version into the store first, then roll back to it",
                )
            raise NotFoundError(
                f"{to} is not on the version chain of cube {cube_id} and is no stored version of it",
                hint=f"stored versions: {', '.join(versions)}",
            )
        try:
            parse_semver(to)
        except MemfedError as exc:
            raise InvalidArgumentError(exc.message, hint=exc.hint) from exc
        if to not in versions:
            raise NotFoundError(
                f"store {self.store.root} holds no version {to} of cube {cube_id}",
                hint=f"stored versions: {', '.join(versions)}",
            )
        return to

    def _last_event(self, cube_id: str, version: str) -> LifecycleEvent:
        return self.store.lifecycle_history(cube_id, version)[-1]


def _check_reason(reason: str) -> None:
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidArgumentError(
            "a lifecycle transition needs a reason", hint="say why, e.g. 'unused for 30 days'"
        )


def _illegal(cube_id: str, version: str, old: int, new: int) -> LifecycleError:
    ref = f"{cube_id}@{version}"
    hint = f"from {lifecycle_name(old)} it can become: {', '.join(legal_targets(old))}"
    if old in (ARCHIVED, EXPIRED):
        hint = f"restore it first (memfed module restore {ref}); {hint}"
    return LifecycleError(
        f"cube {ref} cannot go from {lifecycle_name(old)} to {lifecycle_name(new)}", hint=hint
    )
