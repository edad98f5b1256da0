"""MemScheduler: which modules are where (disk → host memory → device), and which memory serves a request.

Tiers, as in the MemOS design: the cube store on disk; decoded payload tensors in host memory (a cache
that makes a reload skip the disk read, the digest check and decoding); and resident modules on the
model's device, ready for O(1) activation. On a CPU-only node the device tier is host memory too, but it
is still counted separately, because it is what the model's forward passes read.

Eviction is LRU within priority: under a tier's byte budget the scheduler evicts the lowest priority,
least recently used, unpinned module first; ``critical`` cubes and pinned modules are never evicted. A
module bigger than the whole budget is refused with a CapacityError instead of thrashing. Each cube's
TTL (from its creation time) is enforced on every load and by ``enforce_ttl``: an expired cube is
evicted and moves to EXPIRED in the store.

Routing (``route``) follows an explicit, configurable policy; see RoutingPolicy.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memfed.cube.manifest import CubeManifest, parse_ref, ref_string
from memfed.errors import CapacityError, InvalidArgumentError, LifecycleError, NotFoundError
from memfed.mip.v1 import cube_pb2
from memfed.node.lifecycle import Lifecycle

if TYPE_CHECKING:
    import torch

    from memfed.node.runtime import ModuleRuntime, ResidentModule
    from memfed.node.store import CubeStore

MiB = 1 << 20
_STATE_ACTIVATED = cube_pb2.LIFECYCLE_STATE_ACTIVATED
_STATE_GENERATED = cube_pb2.LIFECYCLE_STATE_GENERATED


@dataclass
class ModuleStats:
    """Per-cube access counters, kept for eviction and for conversion proposals."""

    ref: str
    uses: int = 0
    loads: int = 0
    last_used: float = 0.0
    pinned: bool = False
    tier: str = "disk"  # "disk" | "host" | "device"
    # Copied from the manifest at load, so activating a resident module reads plain attributes only.
    expires_at: float = 0.0  # TTL deadline (epoch seconds); 0 = none
    activated: bool = False  # its store lifecycle is past GENERATED


@dataclass(frozen=True)
class RoutingPolicy:
    """How the scheduler picks the memory that serves a request.

    1. Explicit modules on the request always serve it (parameter memory).
    2. A continuing dialogue (``conversation_id``) whose stored prefix covers at least
       ``long_context_tokens`` tokens reuses that KV cache (activation memory).
    3. A ``task`` bound to a capability module (``bind_task``) loads and uses that module.
    4. Otherwise, or in addition when ``text_with_modules``, the plaintext index is searched and up to
       ``text_k`` hits are put into the prompt.
    """

    use_activation_memory: bool = True
    use_parameter_memory: bool = True
    use_plaintext_memory: bool = True
    long_context_tokens: int = 64
    text_k: int = 2
    text_with_modules: bool = False


@dataclass
class RoutePlan:
    """What serves one request: modules, retrieved passages, a reusable conversation cache."""

    modules: tuple[str, ...] = ()
    passages: list[Any] = field(default_factory=list)
    conversation_id: str = ""
    reuse_kv: bool = False
    memory_used: list[str] = field(default_factory=list)


class MemScheduler:
    """Loads, activates, evicts and routes modules for one ModuleRuntime backed by one CubeStore."""

    def __init__(
        self,
        runtime: ModuleRuntime,
        store: CubeStore,
        *,
        device_budget_bytes: int = 512 * MiB,
        host_budget_bytes: int = 1024 * MiB,
        policy: RoutingPolicy | None = None,
        plaintext: Any | None = None,
        kv_cache: Any | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if device_budget_bytes <= 0 or host_budget_bytes < 0:
            raise InvalidArgumentError("memory budgets must be positive")
        self.runtime = runtime
        self.store = store
        self.device_budget = device_budget_bytes
        self.host_budget = host_budget_bytes
        self.policy = policy or RoutingPolicy()
        self.plaintext = plaintext
        self.kv_cache = kv_cache
        self.clock = clock
        self.lifecycle = Lifecycle(store)
        self.tasks: dict[str, str] = {}
        self.stats: dict[str, ModuleStats] = {}
        self._host: OrderedDict[str, tuple[CubeManifest, dict[str, torch.Tensor], int]] = OrderedDict()
        self._lock = threading.RLock()

    # -- naming ----------------------------------------------------------------------------------------

    def resolve(self, name: str) -> CubeManifest:
        """The manifest a module name means: ``id@version`` exactly, ``id`` = its newest version."""
        cube_id, version = parse_ref(name)
        try:
            return self.store.get_manifest(cube_id, version)
        except NotFoundError as exc:
            raise NotFoundError(
                f"no module {name!r} on this node", hint="list modules with `memfed cube list`"
            ) from exc

    def _stats(self, ref: str) -> ModuleStats:
        s = self.stats.get(ref)
        if s is None:
            s = self.stats[ref] = ModuleStats(ref)
        return s

    # -- TTL -------------------------------------------------------------------------------------------

    def expired(self, m: CubeManifest, now: float | None = None) -> bool:
        if not m.ttl_seconds:
            return False
        return (now if now is not None else self.clock()) >= m.created_at.seconds + m.ttl_seconds

    def enforce_ttl(self, now: float | None = None) -> list[str]:
        """Evict every resident or cached module whose TTL has run out and mark it EXPIRED in the store."""
        with self._lock:
            out = []
            candidates = {r.ref: r.manifest for r in self.runtime.resident.values()}
            candidates.update({ref: entry[0] for ref, entry in self._host.items()})
            for ref, m in candidates.items():
                if self.expired(m, now):
                    self._expire(ref, m)
                    out.append(ref)
            return out

    def _expire(self, ref: str, m: CubeManifest) -> None:
        self._drop(ref)
        self.lifecycle.expire(m.cube_id, m.version, reason=f"TTL of {m.ttl_seconds}s ran out")

    # -- tiers -----------------------------------------------------------------------------------------

    def load(self, name: str, *, pin: bool = False) -> ResidentModule:
        """Make a module resident on the device (from the host cache or the store), evicting as needed."""
        with self._lock:
            resident = self.runtime.resident.get(name)
            if resident is not None:  # hot path: plain attributes only, no store query
                stats = self._stats(name)
                if not stats.expires_at or self.clock() < stats.expires_at:
                    self._used(name, pin)
                    return resident
            cube_id, version = parse_ref(name)
            if version is None:  # "id" means its newest version: ask the index which that is
                m = self.resolve(name)
                cube_id, version = m.cube_id, m.version
            ref = f"{cube_id}@{version}"
            resident = self.runtime.resident.get(ref)
            if resident is not None and not self.expired(resident.manifest):
                self._used(ref, pin)
                return resident
            entry = self._host.get(ref)
            if entry is not None:
                m, tensors, nbytes = entry
                cube: Any = _ManifestOnly(m)
                self._check_usable(m)
            else:
                try:
                    cube = self.store.get(cube_id, version)  # verified read; refuses archived cubes
                except NotFoundError as exc:
                    raise NotFoundError(
                        f"no module {name!r} on this node", hint="list modules with `memfed cube list`"
                    ) from exc
                m = cube.manifest
                self._check_usable(m)
                tensors = self.runtime.decode(cube)  # views of the verified bytes: no second copy
                nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            self._make_room("device", nbytes, ref)
            module = self.runtime.load(cube, tensors=tensors, checked=True)
            if entry is None and self.host_budget >= nbytes:  # keep the decoded copy: reloads skip the disk
                self._make_room("host", nbytes, ref)
                self._host[ref] = (m, tensors, nbytes)
            stats = self._used(ref, pin)
            stats.loads += 1
            stats.tier = "device"
            stats.expires_at = float(m.created_at.seconds + m.ttl_seconds) if m.ttl_seconds else 0.0
            stats.activated = m.lifecycle != _STATE_GENERATED
            return module

    def _used(self, ref: str, pin: bool) -> ModuleStats:
        stats = self._stats(ref)
        stats.pinned = stats.pinned or pin
        stats.last_used = self.clock()
        if ref in self._host:
            self._host.move_to_end(ref)
        return stats

    def _check_usable(self, m: CubeManifest) -> None:
        ref = ref_string(m)
        if m.lifecycle == cube_pb2.LIFECYCLE_STATE_EXPIRED:
            raise LifecycleError(
                f"module {ref} has expired", hint=f"restore it first: memfed module restore {ref}"
            )
        if self.expired(m):
            self._expire(ref, m)
            raise LifecycleError(
                f"module {ref} expired: its TTL of {m.ttl_seconds}s ran out",
                hint=f"restore it (memfed module restore {ref}) or publish a new version",
            )

    def evict(self, name: str, *, tier: str = "device") -> None:
        """Move a module down: ``device`` → host cache; ``host`` → disk only (drops both copies)."""
        if tier not in ("device", "host"):
            raise InvalidArgumentError(f"unknown tier {tier!r}", hint="use 'device' or 'host'")
        with self._lock:
            ref = ref_string(self.resolve(name))
            stats = self._stats(ref)
            if ref not in self.runtime.resident and ref not in self._host:
                raise NotFoundError(f"module {ref} is not loaded on this node")
            if ref in self.runtime.resident:
                self.runtime.unload(ref)
                stats.tier = "host" if ref in self._host else "disk"
            if tier == "host":
                self._host.pop(ref, None)
                stats.tier = "disk"
            stats.pinned = False

    def _drop(self, ref: str) -> None:
        if ref in self.runtime.resident:
            self.runtime.unload(ref)
        self._host.pop(ref, None)
        self._stats(ref).tier = "disk"

    def device_bytes(self) -> int:
        return sum(m.nbytes for m in self.runtime.resident.values())

    def host_bytes(self) -> int:
        return sum(entry[2] for entry in self._host.values())

    def _make_room(self, tier: str, nbytes: int, for_ref: str) -> None:
        budget = self.device_budget if tier == "device" else self.host_budget
        if nbytes > budget:
            raise CapacityError(
                f"module {for_ref} needs {nbytes / MiB:.1f} MiB but the whole {tier} budget is "
                f"{budget / MiB:.1f} MiB",
                hint=f"raise the node's {tier} memory budget or use a smaller-rank module",
            )
        used = self.device_bytes() if tier == "device" else self.host_bytes()
        if used + nbytes <= budget:
            return
        for ref in self._victims(tier):
            if tier == "device":
                self.runtime.unload(ref)
                self._stats(ref).tier = "host" if ref in self._host else "disk"
            else:
                self._host.pop(ref)
                if self._stats(ref).tier == "host":
                    self._stats(ref).tier = "disk"
            used = self.device_bytes() if tier == "device" else self.host_bytes()
            if used + nbytes <= budget:
                return
        raise CapacityError(
            f"no room for module {for_ref} ({nbytes / MiB:.1f} MiB) in the {tier} budget of "
            f"{budget / MiB:.1f} MiB: the rest is pinned or critical",
            hint="unpin or evict a module (memfed module evict), or raise the budget",
        )

    def _victims(self, tier: str) -> list[str]:
        """Eviction order: lowest priority first, then least recently used. Pinned/critical never."""
        if tier == "device":
            manifests = {ref: r.manifest for ref, r in self.runtime.resident.items()}
            active = set(self.runtime.active)
        else:
            manifests = {ref: entry[0] for ref, entry in self._host.items()}
            active = set()
        order = []
        for ref, m in manifests.items():
            s = self._stats(ref)
            if tier == "device" and (s.pinned or ref in active):
                continue
            if m.priority == cube_pb2.PRIORITY_CRITICAL:
                continue
            order.append((m.priority or cube_pb2.PRIORITY_NORMAL, s.last_used, ref))
        return [ref for _, _, ref in sorted(order)]

    # -- activation ------------------------------------------------------------------------------------

    def activate(self, *names: str, pin: bool = False) -> tuple[str, ...]:
        """Load (if needed) and activate modules for every following forward pass; marks them ACTIVATED."""
        with self._lock:
            refs = tuple(self.load(n, pin=pin).ref for n in names)
            self.runtime.activate(*refs)
            for ref in refs:
                self.touch(ref)
            return refs

    def deactivate(self) -> None:
        with self._lock:
            self.runtime.deactivate()

    def touch(self, ref: str) -> None:
        """Count one use of a resident module; its first use moves it GENERATED → ACTIVATED."""
        s = self._stats(ref)
        s.uses += 1
        s.last_used = self.clock()
        if s.activated:
            return
        module = self.runtime.resident.get(ref)
        if module is not None:
            m = module.manifest
            if m.lifecycle == _STATE_GENERATED:
                self.lifecycle.transition(m.cube_id, m.version, "activated", reason="first use on this node")
                m.lifecycle = _STATE_ACTIVATED
            s.activated = True

    def bind_task(self, task: str, module: str) -> None:
        """Declare ``module`` the capability module for ``task`` (e.g. contract_review → legal_expert)."""
        if not task:
            raise InvalidArgumentError("a task name is required")
        self.resolve(module)  # fail now, not at the first request
        self.tasks[task] = module

    def load_module(
        self, task: str | None = None, module: str | None = None, *, pin: bool = False
    ) -> ResidentModule:
        """The MemOS call: ``load_module(task="contract_review", module="legal_expert")``.

        With both, binds the task to the module and activates it; with only a task, activates the module
        bound to it; with only a module, activates that module.
        """
        if module is None:
            if task is None or task not in self.tasks:
                raise NotFoundError(
                    f"no capability module is bound to task {task!r}",
                    hint="name one: load_module(task=..., module=...)",
                )
            module = self.tasks[task]
        elif task:
            self.bind_task(task, module)
        (ref,) = self.activate(module, pin=pin)
        return self.runtime.resident[ref]

    # -- routing ---------------------------------------------------------------------------------------

    def route(
        self,
        prompt: str,
        *,
        modules: Sequence[str] = (),
        task: str = "",
        conversation_id: str = "",
        prompt_tokens: Sequence[int] | None = None,
    ) -> RoutePlan:
        """Decide which memories serve one request (see RoutingPolicy); loads the modules it names."""
        policy = self.policy
        plan = RoutePlan(conversation_id=conversation_id)
        names = list(modules)
        if not names and task and policy.use_parameter_memory and task in self.tasks:
            names.append(self.tasks[task])
        if names:
            with self._lock:
                plan.modules = tuple(ref_string(self.load(n).manifest) for n in names)
            plan.memory_used += [f"param:{ref}" for ref in plan.modules]
        if conversation_id and policy.use_activation_memory and self.kv_cache is not None:
            plan.reuse_kv = True  # the prefill stores the cache even on the first turn
            stored = self.kv_cache.stored_tokens(conversation_id, _module_key(plan.modules)) or []
            if prompt_tokens is not None and len(stored) >= policy.long_context_tokens:
                plan.memory_used.append(f"kv:{conversation_id}")
        kv_used = any(used.startswith("kv:") for used in plan.memory_used)
        wants_text = policy.text_with_modules or not (plan.modules or kv_used)
        if wants_text and policy.use_plaintext_memory and self.plaintext is not None:
            plan.passages = self.plaintext.search(prompt, k=policy.text_k)
            plan.memory_used += [f"text:{hit.doc_id}" for hit in plan.passages]
        return plan


def _module_key(refs: Sequence[str]) -> str:
    """The identity of a module set for KV caching: a cache computed under other modules is not reused."""
    return "+".join(sorted(refs)) or "base"


class _ManifestOnly:
    """A cube stand-in for the runtime when the payload tensors come from the host cache."""

    def __init__(self, manifest: CubeManifest) -> None:
        self.manifest = manifest
