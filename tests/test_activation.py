"""Activation memory: KV cache reuse equals recompute, never crosses module keys, stays under budget."""

from __future__ import annotations

import copy

import pytest
import torch

from memfed.errors import InvalidArgumentError, UnsupportedError
from memfed.node.activation import (
    KVCacheStore,
    cache_kwarg_name,
    cache_nbytes,
    generate_with_reuse,
    prefill_with_reuse,
    ttft_reuse_vs_recompute,
)
from memfed.node.tiny_models import TINY_VOCAB, tiny_gpt2, tiny_llama

TOL = 1e-4
BIG = 1 << 30


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    torch.manual_seed(0)
    return tiny_llama() if request.param == "llama" else tiny_gpt2()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, TINY_VOCAB, (n,), generator=g).tolist()


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def prefix_cache(model, ids: list[int]):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=True)[cache_kwarg_name(model)]


def snapshot(store: KVCacheStore, key: tuple[str, str]) -> list[torch.Tensor]:
    return [t.clone() for kv in store._entries[key].layers for t in kv]


def test_second_turn_reuses_prefix_and_equals_recompute(model) -> None:
    store = KVCacheStore(BIG)
    turn1 = tokens(40, seed=1)
    logits1, cache1, reused1, secs1 = prefill_with_reuse(model, turn1, store, "conv", "base")
    assert reused1 == 0 and secs1 > 0
    assert cache1.get_seq_length() == 40
    assert (logits1 - full_logits(model, turn1)).abs().max().item() <= TOL

    turn2 = turn1 + tokens(20, seed=2)  # the dialogue goes on: history + new user message
    logits2, cache2, reused2, _ = prefill_with_reuse(model, turn2, store, "conv", "base")
    assert reused2 == 40
    assert (logits2 - full_logits(model, turn2)).abs().max().item() <= TOL
    # The grown cache is the full prompt's cache.
    reference = prefix_cache(model, turn2)
    for got, want in zip(cache2.layers, reference.layers, strict=True):
        assert torch.allclose(got.keys, want.keys, atol=TOL)
        assert torch.allclose(got.values, want.values, atol=TOL)
    assert store.stored_tokens("conv", "base") == turn2
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.tokens_reused) == (1, 1, 40)


def test_greedy_generation_from_reused_cache_matches_scratch(model) -> None:
    store = KVCacheStore(BIG)
    turn1 = tokens(30, seed=3)
    prefill_with_reuse(model, turn1, store, "conv", "base")
    turn2 = turn1 + tokens(12, seed=4)
    with torch.no_grad():
        scratch = model.generate(torch.tensor([turn2]), max_new_tokens=10, do_sample=False)
    reused = generate_with_reuse(model, turn2, store, "conv", "base", max_new_tokens=10, do_sample=False)
    assert reused.tolist() == scratch.tolist()
    assert store.stats().tokens_reused == 30
    # The reply's cache was stored: the next turn re-sends prompt + reply and reuses all but the last.
    stored = store.stored_tokens("conv", "base")
    assert stored == scratch[0].tolist()[: len(stored)]
    assert len(stored) == scratch.shape[1] - 1
    turn3 = scratch[0].tolist() + tokens(5, seed=5)
    logits3, _, reused3, _ = prefill_with_reuse(model, turn3, store, "conv", "base")
    assert reused3 == len(stored)
    assert (logits3 - full_logits(model, turn3)).abs().max().item() <= TOL


def test_module_keys_are_isolated(llama) -> None:
    # A "LoRA-active" model: same architecture, one projection changed. Its KV cache differs, so a cache
    # computed under one module set must never be served to another.
    with_lora = copy.deepcopy(llama)
    with torch.no_grad():
        proj = with_lora.model.layers[0].self_attn.k_proj
        proj.weight.add_(0.5 * torch.randn(proj.weight.shape, generator=torch.Generator().manual_seed(0)))

    store = KVCacheStore(BIG)
    turn1 = tokens(32, seed=6)
    prefill_with_reuse(llama, turn1, store, "conv", "base")
    turn2 = turn1 + tokens(8, seed=7)

    assert store.lookup("conv", "base+lora:legal@1", turn2) == (0, None)
    logits, _, reused, _ = prefill_with_reuse(with_lora, turn2, store, "conv", "base+lora:legal@1")
    assert reused == 0
    assert (logits - full_logits(with_lora, turn2)).abs().max().item() <= TOL

    # What reuse across keys would have done: the base cache under the LoRA model gives wrong logits.
    n, cross = store.lookup("conv", "base", turn2)
    assert n == 32
    with torch.no_grad():
        wrong = with_lora(
            input_ids=torch.tensor([turn2[32:]]),
            position_ids=torch.arange(32, 40)[None],
            use_cache=True,
            **{cache_kwarg_name(with_lora): cross},
        ).logits[0, -1]
    assert (wrong - full_logits(with_lora, turn2)).abs().max().item() > 1e-3

    # Both entries live side by side; dropping the conversation drops both.
    assert len(store) == 2
    assert store.drop("conv") == 2
    assert len(store) == 0 and store.bytes_used == 0


def test_lru_eviction_under_budget(llama) -> None:
    ids = {c: tokens(16, seed=10 + i) for i, c in enumerate("abc")}
    caches = {c: prefix_cache(llama, ids[c]) for c in "abc"}
    one = cache_nbytes(caches["a"])
    assert one > 0
    store = KVCacheStore(int(2.5 * one))
    assert store.put("a", "base", ids["a"], caches["a"])
    assert store.put("b", "base", ids["b"], caches["b"])
    assert store.bytes_used == 2 * one
    assert store.lookup("a", "base", ids["a"] + [5])[0] == 16  # touch a: b is now least recently used
    assert store.put("c", "base", ids["c"], caches["c"])
    assert ("b", "base") not in store
    assert ("a", "base") in store and ("c", "base") in store
    assert store.bytes_used == 2 * one <= store.budget_bytes
    assert store.stats().evictions == 1
    # Replacing an entry does not double count it.
    assert store.put("c", "base", ids["c"], caches["c"])
    assert store.bytes_used == 2 * one


def test_entry_larger_than_budget_is_not_stored(llama) -> None:
    ids = tokens(16, seed=20)
    cache = prefix_cache(llama, ids)
    store = KVCacheStore(cache_nbytes(cache) - 1)
    assert store.put("a", "base", ids, cache) is False
    assert len(store) == 0 and store.bytes_used == 0
    assert store.stats().rejected == 1
    logits, _, reused, _ = prefill_with_reuse(llama, [*ids, 7], store, "a", "base")
    assert reused == 0
    assert store.stats().rejected == 2
    assert (logits - full_logits(llama, [*ids, 7])).abs().max().item() <= TOL
    assert KVCacheStore(0).put("a", "base", ids, cache) is False


def test_diverging_prompt_reuses_only_the_common_part(model) -> None:
    store = KVCacheStore(BIG)
    stored = tokens(40, seed=30)
    prefill_with_reuse(model, stored, store, "conv", "base")
    edited = stored[:25] + [t % 200 + 5 for t in tokens(20, seed=31)]  # the user edited message 2
    assert edited[25] != stored[25]
    logits, _, reused, _ = prefill_with_reuse(model, edited, store, "conv", "base")
    assert reused == 25
    assert (logits - full_logits(model, edited)).abs().max().item() <= TOL

    # A prompt that is a prefix of the stored tokens leaves its last token to compute.
    store.put("conv", "base", stored, prefix_cache(model, stored))
    shorter = stored[:30]
    logits, _, reused, _ = prefill_with_reuse(model, shorter, store, "conv", "base")
    assert reused == 29
    assert (logits - full_logits(model, shorter)).abs().max().item() <= TOL
    n, cache = store.lookup("conv", "base", shorter)
    assert n == 29 and cache.get_seq_length() == 29

    # Nothing in common, or one token of prompt: a miss.
    assert store.lookup("conv", "base", [stored[0] + 1, *stored[1:]]) == (0, None)
    assert store.lookup("conv", "base", stored[:1]) == (0, None)


def test_stored_cache_is_not_mutated_by_later_generation(llama) -> None:
    store = KVCacheStore(BIG)
    ids = tokens(24, seed=40)
    cache = prefix_cache(llama, ids)
    assert store.put("conv", "base", ids, cache)
    before = snapshot(store, ("conv", "base"))

    # The caller keeps using (and mutating) the cache it stored.
    with torch.no_grad():
        llama(input_ids=torch.tensor([[9, 10]]), use_cache=True, **{cache_kwarg_name(llama): cache})
        for layer in cache.layers:
            layer.keys.zero_()
    prompt = ids + tokens(6, seed=41)
    outs = []
    for _ in range(2):
        n, reused = store.lookup("conv", "base", prompt)
        assert n == 24
        with torch.no_grad():
            outs.append(
                llama.generate(
                    torch.tensor([prompt]),
                    max_new_tokens=8,
                    do_sample=False,
                    **{cache_kwarg_name(llama): reused},
                ).tolist()
            )
        assert reused.get_seq_length() > 24  # generation grew the copy it was handed
        # Crop and scribble on the handed-out copy too.
        reused.crop(-5)
        for layer in reused.layers:
            layer.values.fill_(3.0)
    assert outs[0] == outs[1]
    with torch.no_grad():
        assert outs[0] == llama.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False).tolist()
    after = snapshot(store, ("conv", "base"))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_put_after_generate_records_only_covered_tokens(llama) -> None:
    from transformers import DynamicCache

    ids = tokens(10, seed=50)
    cache = DynamicCache()
    with torch.no_grad():
        seq = llama.generate(
            torch.tensor([ids]), max_new_tokens=4, do_sample=False, **{cache_kwarg_name(llama): cache}
        )
    assert cache.get_seq_length() == seq.shape[1] - 1
    store = KVCacheStore(BIG)
    assert store.put("c", "base", seq, cache)
    assert store.stored_tokens("c", "base") == seq[0, :-1].tolist()
    with pytest.raises(InvalidArgumentError):
        store.put("c", "base", ids, cache)  # fewer tokens than the cache covers


def test_ttl_expires_entries(llama) -> None:
    now = [0.0]
    store = KVCacheStore(BIG, ttl_s=60, clock=lambda: now[0])
    ids = tokens(12, seed=60)
    store.put("c", "base", ids, prefix_cache(llama, ids))
    now[0] = 59
    assert store.lookup("c", "base", [*ids, 1])[0] == 12  # a hit renews the entry
    now[0] = 118
    assert store.lookup("c", "base", [*ids, 1])[0] == 12
    now[0] = 179
    assert store.lookup("c", "base", [*ids, 1]) == (0, None)
    assert store.stats().expired == 1 and store.bytes_used == 0


def test_invalid_and_unsupported_inputs(llama) -> None:
    store = KVCacheStore(BIG)
    ids = tokens(8, seed=70)
    cache = prefix_cache(llama, ids)
    with pytest.raises(UnsupportedError):
        store.put("c", "base", ids, ((torch.zeros(1), torch.zeros(1)),))
    with pytest.raises(InvalidArgumentError):
        store.put("c", "", ids, cache)
    with pytest.raises(InvalidArgumentError):
        store.lookup("c", "base", torch.tensor([ids, ids]))
    with pytest.raises(InvalidArgumentError):
        store.lookup("c", "base", "some text")
    with torch.no_grad():
        batch2 = llama(input_ids=torch.tensor([ids, ids]), use_cache=True)[cache_kwarg_name(llama)]
    with pytest.raises(InvalidArgumentError):
        store.put("c", "base", ids, batch2)
    with pytest.raises(InvalidArgumentError):
        prefill_with_reuse(llama, [], store, "c", "base")
    with pytest.raises(InvalidArgumentError):
        KVCacheStore(-1)
    assert KVCacheStore.supports(cache)
    assert not KVCacheStore.supports(object())


def test_ttft_measurement_runs(llama) -> None:
    result = ttft_reuse_vs_recompute(llama, prefix_len=48, suffix_len=8, repeats=1)
    assert result.recompute_ms > 0 and result.reuse_ms > 0
    assert result.speedup > 0
    assert result.max_abs_logit_diff <= TOL
    with pytest.raises(InvalidArgumentError):
        ttft_reuse_vs_recompute(llama, prefix_len=1024)  # past the tiny model's 128 positions
