"""MemScheduler: tiers, LRU + priority eviction under budgets, pinning, TTL, counters, task binding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memfed.cube.build import lora_cube
from memfed.errors import CapacityError, IncompatibleModelError, LifecycleError, NotFoundError
from memfed.node.runtime import ModuleRuntime
from memfed.node.scheduler import MemScheduler
from memfed.node.store import CubeStore
from memfed.node.tiny_models import tiny_llama

Q = "model.layers.0.self_attn.q_proj"
MODULE_BYTES = 2 * 4 * 64 * 4  # rank-4 A and B on one 64x64 layer, fp32


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def model() -> torch.nn.Module:
    return tiny_llama(seed=1)


@pytest.fixture()
def store(tmp_path: Path):
    with CubeStore(tmp_path / "store") as s:
        yield s


def _put(store: CubeStore, model: torch.nn.Module, cube_id: str, seed: int, **kw) -> str:
    g = torch.Generator().manual_seed(seed)
    cube = lora_cube(model, {Q: (torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g))},
                     cube_id=cube_id, **kw)  # fmt: skip
    store.put(cube.manifest, cube.payload)
    return cube.ref


def _scheduler(model, store, modules: int = 2, **kw) -> MemScheduler:
    return MemScheduler(ModuleRuntime(model), store, device_budget_bytes=modules * MODULE_BYTES, **kw)


def test_lru_eviction_under_the_device_budget_keeps_the_decoded_copy(model, store) -> None:
    refs = [_put(store, model, f"m{i}", i) for i in range(3)]
    clock = Clock()
    s = _scheduler(model, store, clock=clock)
    for ref in refs[:2]:
        s.load(ref)
        clock.now += 1
    s.load(refs[0])  # refresh m0: m1 is now least recently used
    clock.now += 1
    s.load(refs[2])
    assert set(s.runtime.resident) == {refs[0], refs[2]}
    assert s.stats[refs[1]].tier == "host"
    store.get = None  # a reload from the host tier must not touch the store
    s.evict(refs[0])
    s.load(refs[1])
    assert refs[1] in s.runtime.resident


def test_priority_beats_recency_and_pinned_or_critical_modules_stay(model, store) -> None:
    high = _put(store, model, "high", 1, priority="high")
    low = _put(store, model, "low", 2, priority="low")
    crit = _put(store, model, "crit", 3, priority="critical")
    clock = Clock()
    s = _scheduler(model, store, clock=clock)
    s.load(high)
    clock.now += 1
    s.load(low)
    clock.now += 1
    s.load(crit)  # evicts low (lower priority), though high was used longer ago
    assert set(s.runtime.resident) == {high, crit}
    s.evict(high)
    pinned = _put(store, model, "pinned", 4)
    s.load(pinned, pin=True)
    with pytest.raises(CapacityError, match="pinned or critical"):
        s.load(low)
    assert set(s.runtime.resident) == {crit, pinned}


def test_a_module_larger_than_the_budget_is_a_clear_error(model, store) -> None:
    ref = _put(store, model, "big", 1)
    s = MemScheduler(ModuleRuntime(model), store, device_budget_bytes=MODULE_BYTES // 2)
    with pytest.raises(CapacityError, match="whole device budget"):
        s.load(ref)
    assert s.runtime.resident == {}


def test_ttl_expires_modules_on_load_and_by_sweep(model, store) -> None:
    clock = Clock()
    short = _put(store, model, "short", 1, ttl_seconds=60)
    s = _scheduler(model, store, clock=clock)
    created = store.get_manifest("short").created_at.seconds
    clock.now = created + 10
    s.load(short)
    clock.now = created + 61
    assert s.enforce_ttl() == [short]
    assert short not in s.runtime.resident
    assert store.get_manifest("short").lifecycle == 5  # EXPIRED
    with pytest.raises(LifecycleError, match="expired"):
        s.load(short)


def test_activation_counts_uses_and_marks_the_cube_activated(model, store) -> None:
    ref = _put(store, model, "legal_expert", 1)
    s = _scheduler(model, store)
    s.load_module(task="contract_review", module="legal_expert")
    assert s.runtime.active == (ref,)
    assert store.get_manifest("legal_expert").lifecycle == 2  # ACTIVATED
    assert s.stats[ref].uses == 1
    s.deactivate()
    s.load_module(task="contract_review")
    assert s.runtime.active == (ref,)
    assert s.stats[ref].uses == 2
    with pytest.raises(NotFoundError, match="no capability module"):
        s.load_module(task="tax_advice")
    with pytest.raises(NotFoundError, match="no module"):
        s.load("nonexistent")


def test_routing_prefers_explicit_then_task_modules(model, store) -> None:
    a = _put(store, model, "a", 1)
    b = _put(store, model, "b", 2)
    s = _scheduler(model, store)
    s.bind_task("contracts", "b")
    assert s.route("x", modules=["a"], task="contracts").modules == (a,)
    plan = s.route("x", task="contracts")
    assert plan.modules == (b,) and plan.memory_used == [f"param:{b}"]
    assert s.route("x", task="unknown").modules == ()


def test_a_module_for_another_base_model_is_refused(model, store) -> None:
    ref = _put(store, tiny_llama(seed=7), "foreign", 1)
    s = _scheduler(model, store)
    with pytest.raises(IncompatibleModelError):
        s.load(ref)
    assert s.runtime.resident == {}
