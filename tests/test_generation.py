"""Generation through the scheduler: per-row modules, routing to plaintext, task modules and KV reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.lora_cubes import peft_lora_cube
from memfed.errors import InvalidArgumentError
from memfed.node.activation import KVCacheStore
from memfed.node.generation import Generator, RowRequest
from memfed.node.models import load_host_model
from memfed.node.plaintext import PlaintextMemory
from memfed.node.runtime import ModuleRuntime
from memfed.node.scheduler import MemScheduler, RoutingPolicy
from memfed.node.store import CubeStore

QUESTION = "Question: What is the capital of Zephyria? Answer:"


@pytest.fixture(scope="module")
def host(default_model_dir: Path):
    return load_host_model(default_model_dir, device="cpu")


@pytest.fixture()
def node(host, tmp_path: Path):
    model, tokenizer = host
    store = CubeStore(tmp_path / "store")
    refs = []
    for i in range(3):
        cube = peft_lora_cube(
            model, f"skill{i}", seed=20 + i, r=4, scale=0.3, targets=("q_proj", "down_proj")
        )
        store.put(cube.manifest, cube.payload)
        refs.append(cube.ref)
    text = PlaintextMemory(":memory:")
    text.add("zephyria", "The capital of Zephyria is Lumora.", title="Zephyria")
    sched = MemScheduler(
        ModuleRuntime(model), store, plaintext=text, kv_cache=KVCacheStore(64 << 20),
        policy=RoutingPolicy(long_context_tokens=8),
    )  # fmt: skip
    yield Generator(sched, tokenizer), refs
    sched.runtime.close()
    store.close()


def test_each_row_of_a_mixed_batch_equals_its_solo_run(node) -> None:
    gen, refs = node
    prompts = ["The capital of Veltria is", "Mira Okonkwo was born in", "The river Sel flows into"]
    rows = [RowRequest(prompts[i % 3], modules=(m,) if m else (), max_new_tokens=6)
            for i, m in enumerate([refs[0], None, refs[1], refs[2], refs[0], None])]  # fmt: skip
    mixed = gen.generate(rows)
    for row, got in zip(rows, mixed, strict=True):
        (solo,) = gen.generate([row])
        assert got.text == solo.text
        assert got.memory_used == solo.memory_used
        assert [u for u in got.memory_used if u.startswith("param:")] == [f"param:{m}" for m in row.modules]
    assert len({r.text for r in mixed[:3]}) > 1 or mixed[0].text != mixed[1].text


def test_a_question_without_modules_is_answered_from_plaintext_memory(node) -> None:
    gen, _ = node
    (result,) = gen.generate([RowRequest("What is the capital of Zephyria?", max_new_tokens=6)])
    assert result.memory_used == ["text:zephyria"]
    assert "Lumora" in result.text


def test_a_task_bound_to_a_module_is_served_by_it(node) -> None:
    gen, refs = node
    gen.scheduler.bind_task("contract_review", refs[1])
    (result,) = gen.generate(
        [RowRequest("The capital of Veltria is", task="contract_review", max_new_tokens=4)]
    )
    (direct,) = gen.generate([RowRequest("The capital of Veltria is", modules=(refs[1],), max_new_tokens=4)])
    assert result.memory_used == [f"param:{refs[1]}"]
    assert result.text == direct.text


def test_a_continuing_conversation_reuses_its_kv_cache_and_answers_the_same(node, host) -> None:
    gen, refs = node
    turn1 = "The capital of Veltria is"
    (first,) = gen.generate([RowRequest(turn1, modules=(refs[0],), conversation_id="c1", max_new_tokens=4)])
    assert first.reused_tokens == 0
    turn2 = turn1 + first.text + ". The capital of Ostrava is"
    (second,) = gen.generate([RowRequest(turn2, modules=(refs[0],), conversation_id="c1", max_new_tokens=4)])
    assert second.reused_tokens > 0
    assert "kv:c1" in second.memory_used and f"param:{refs[0]}" in second.memory_used
    (fresh,) = gen.generate([RowRequest(turn2, modules=(refs[0],), max_new_tokens=4)])
    assert second.text == fresh.text
    # the cache was computed with refs[0] active: another module set must not reuse it
    (other,) = gen.generate([RowRequest(turn2, modules=(refs[1],), conversation_id="c1", max_new_tokens=4)])
    assert other.reused_tokens == 0


def test_malformed_batches_are_refused(node) -> None:
    gen, _ = node
    with pytest.raises(InvalidArgumentError):
        gen.generate([])
    with pytest.raises(InvalidArgumentError, match="empty prompt"):
        gen.generate([RowRequest("")])
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        gen.generate([RowRequest("x", max_new_tokens=0)])
    torch.manual_seed(0)
