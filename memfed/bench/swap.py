"""``memfed bench swap``: module activation, cold loads, mixed batches and KV reuse against PEFT.

One model for both sides: a Llama config of ~134M parameters (12 layers, 768 wide, vocabulary 32,000),
random weights built locally, fp32 on CPU; rank-16 LoRA on q_proj and v_proj (2.4 MB per module). PEFT
runs on its own copy of the same weights (so neither side's hooks or wrappers touch the other's
forward passes), in the same process and run.

* activate: ``MemScheduler.activate(ref)`` of a resident module (8, then 256 resident) vs PEFT
  ``set_adapter(name)`` with 8 adapters loaded. Median over many switches, cycling through modules.
* cold load, store → resident: ``MemScheduler.load`` with empty caches (index lookup, verified read,
  zero-copy decode, NaN/Inf check, slot install) vs PEFT ``load_adapter`` of the same LoRA exported as a
  PEFT folder, and vs a raw ``safetensors.torch.load_file`` of the cube's payload file. Both read from
  the page cache.
* mixed batch: one forward pass of 8 rows x 64 tokens where each row uses a different module, vs the
  same batch all on one module; throughput ratio single-time / mixed-time (1.0 = free). PEFT's figure
  for the same (``adapter_names=``) is reported next to ours. A decode step (8 rows, one token each, on
  a 64-token KV cache) is reported too, since there the LoRA work is a larger share.
* KV reuse: time to first token for a 1,024-token conversation prefix plus a 16-token new turn, reusing
  the stored cache vs recomputing the whole prompt.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from memfed.bench.harness import BenchResult
from memfed.cube.build import lora_cube
from memfed.cube.fingerprint import fingerprint_model
from memfed.cube.peft_io import export_peft

TARGETS = ("q_proj", "v_proj")
RANK = 16


def _model(quick: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    size = (
        {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4}
        if quick
        else {
            "hidden_size": 768,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        }
    )
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, **size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()


def _factors(model: torch.nn.Module, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    out = {}
    for layer in range(cfg.num_hidden_layers):
        for t in TARGETS:
            lin = model.get_submodule(f"model.layers.{layer}.self_attn.{t}")
            a = torch.randn(RANK, lin.in_features, generator=g) * 0.02
            b = torch.randn(lin.out_features, RANK, generator=g) * 0.02
            out[f"model.layers.{layer}.self_attn.{t}"] = (a, b)
    return out


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(*, quick: bool = False) -> BenchResult:
    from peft import PeftModel
    from safetensors.torch import load_file

    from memfed.node.runtime import ModuleRuntime
    from memfed.node.scheduler import MemScheduler
    from memfed.node.store import CubeStore

    torch.set_grad_enabled(False)
    many = 32 if quick else 256
    model = _model(quick)
    peft_base = copy.deepcopy(model)
    fp = fingerprint_model(model)
    result = BenchResult()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(prefix="memfed-bench-swap-") as tmp:
        work = Path(tmp)
        store = CubeStore(work / "store", synchronous="NORMAL")
        refs, digests = [], []
        for i in range(many):
            cube = lora_cube(fp, _factors(model, i), cube_id=f"m{i:03d}", alpha=2 * RANK)
            store.put(cube.manifest, cube.payload)
            refs.append(cube.ref)
            digests.append(cube.manifest.digest)
            if i < 8:
                export_peft(cube, work / f"peft{i}")
        size_bytes = store.payload_path(digests[0]).stat().st_size
        sched = MemScheduler(
            ModuleRuntime(model), store, device_budget_bytes=4 << 30, host_budget_bytes=4 << 30
        )

        # -- cold load: store → resident, caches emptied before each ---------------------------------
        cold_ms, raw_ms = [], []
        for _ in range(3 if quick else 7):  # interleaved, so load on the machine falls on both sides
            for ref, digest in zip(refs[:8], digests[:8], strict=True):
                if ref in sched.runtime.resident or ref in sched._host:
                    sched.evict(ref, tier="host")
                path = store.payload_path(digest)
                t0 = time.perf_counter()
                load_file(path)
                raw_ms.append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()
                sched.load(ref)
                cold_ms.append((time.perf_counter() - t0) * 1e3)
        peft = PeftModel.from_pretrained(peft_base, work / "peft0", adapter_name="a0").eval()
        peft_load_ms = []
        for i in range(1, 8):
            t0 = time.perf_counter()
            peft.load_adapter(work / f"peft{i}", adapter_name=f"a{i}")
            peft_load_ms.append((time.perf_counter() - t0) * 1e3)

        # -- activation ------------------------------------------------------------------------------
        switches = 200 if quick else 1000
        cycle = iter(range(10**9))

        def ours_activate() -> None:
            sched.activate(refs[next(cycle) % 8])

        for ref in refs[:8]:
            sched.activate(ref)
        act8 = _median_ms(ours_activate, switches)
        peft_names = [f"a{i}" for i in range(8)]

        def peft_activate() -> None:
            peft.set_adapter(peft_names[next(cycle) % 8])

        peft_act = _median_ms(peft_activate, 50 if quick else 200)
        # Activation latency as modules become resident, 8 → many (the report's plot); the last step is
        # ``activate_ms_p50_256``.
        resident_steps = [8, *(k for k in (16, 32, 64, 128, 256) if k < many), many]
        activation_ms = [act8]
        for prev, count in itertools.pairwise(resident_steps):
            for ref in refs[prev:count]:
                sched.activate(ref)  # first use records GENERATED → ACTIVATED in the store: not timed below

            def ours_activate_many(count: int = count) -> None:
                sched.activate(refs[next(cycle) % count])

            activation_ms.append(_median_ms(ours_activate_many, switches))
        act_many = activation_ms[-1]

        # -- mixed batch -----------------------------------------------------------------------------
        ids = torch.randint(0, 32000, (8, 64), generator=torch.Generator().manual_seed(1))
        reps = 3 if quick else 5
        rt = sched.runtime
        sched.deactivate()

        def ours_single() -> None:
            with rt.routed(modules=[refs[0]]):
                model(input_ids=ids)

        def ours_mixed() -> None:
            with rt.routed([[r] for r in refs[:8]]):
                model(input_ids=ids)

        def peft_single() -> None:
            peft.set_adapter("a0")
            peft(input_ids=ids)

        def peft_mixed() -> None:
            peft(input_ids=ids, adapter_names=peft_names)

        for fn in (ours_single, ours_mixed, peft_single, peft_mixed):  # warm-up
            fn()
        t_single, t_mixed, p_single, p_mixed = [], [], [], []
        for _ in range(reps):
            t_single.append(_median_ms(ours_single, 1))
            t_mixed.append(_median_ms(ours_mixed, 1))
            p_single.append(_median_ms(peft_single, 1))
            p_mixed.append(_median_ms(peft_mixed, 1))
        decode_single, decode_mixed = _decode_step_ms(model, rt, refs, ids, reps)

        # -- KV reuse --------------------------------------------------------------------------------
        from memfed.node.activation import ttft_reuse_vs_recompute

        prefix = 128 if quick else 1024
        with rt.routed(modules=[refs[0]]):
            ttft = ttft_reuse_vs_recompute(model, prefix_len=prefix, suffix_len=16, repeats=reps)
        store.close()

    med = statistics.median
    result.series["activation"] = {
        "resident": resident_steps,
        "activate_ms": [round(v, 4) for v in activation_ms],
    }
    result.metrics = {
        "activate_ms_p50": round(act8, 4),
        "activate_ms_p50_256": round(act_many, 4),
        "resident_many": many,
        "peft_set_adapter_ms_p50": round(peft_act, 3),
        "cold_load_ms_p50": round(med(cold_ms), 3),
        "raw_safetensors_read_ms_p50": round(med(raw_ms), 3),
        "peft_load_adapter_ms_p50": round(med(peft_load_ms), 2),
        "forward_single_ms": round(med(t_single), 1),
        "forward_mixed_ms": round(med(t_mixed), 1),
        "peft_forward_single_ms": round(med(p_single), 1),
        "peft_forward_mixed_ms": round(med(p_mixed), 1),
        "decode_step_single_ms": round(decode_single, 2),
        "decode_step_mixed_ms": round(decode_mixed, 2),
        "ttft_reuse_ms": round(ttft.reuse_ms, 2),
        "ttft_recompute_ms": round(ttft.recompute_ms, 2),
        "kv_prefix_tokens": prefix,
        "module_bytes": size_bytes,
        "model_parameters": params,
    }
    result.ratios = {
        "peft_set_adapter_vs_activate": round(peft_act / act8, 1),
        "activate_256_vs_8": round(act_many / act8, 2),
        "peft_load_vs_load": round(med(peft_load_ms) / med(cold_ms), 2),
        "load_vs_raw_read": round(med(cold_ms) / med(raw_ms), 2),
        "mixed_vs_single_throughput": round(med(t_single) / med(t_mixed), 3),
        "peft_mixed_vs_single_throughput": round(med(p_single) / med(p_mixed), 3),
        "decode_mixed_vs_single_throughput": round(decode_single / decode_mixed, 3),
        "ttft_recompute_vs_reuse": round(ttft.recompute_ms / ttft.reuse_ms, 1),
    }
    result.baseline = {
        "peft": "peft 0.21 PeftModel on its own copy of the same weights, fp32 CPU, eval, no_grad",
        "set_adapter": "PeftModel.set_adapter with 8 LoRA adapters loaded",
        "load_adapter": "PeftModel.load_adapter of the same LoRA exported as a PEFT folder",
        "raw_read": "safetensors.torch.load_file of the cube's payload file (page cache)",
        "mixed": "PeftModel forward with adapter_names= (8 rows, 8 adapters) vs set_adapter + forward",
        "batch": "8 rows x 64 tokens, one forward pass",
        "kv": f"{prefix}-token prefix + 16-token turn; recompute = prefill of all {prefix + 16} tokens",
        "torch_threads": torch.get_num_threads(),
    }
    return result


def _decode_step_ms(
    model: torch.nn.Module, rt: Any, refs: list[str], ids: torch.Tensor, reps: int
) -> tuple[float, float]:
    """One decode step for 8 rows on a 64-token cache: single module vs a module per row. The routing is
    set once per batch (as a generate loop does), so the steps measure the per-token cost only."""
    from memfed.node.activation import cache_kwarg_name

    kwarg = cache_kwarg_name(model)  # transformers 5.2x renamed past_key_values to cache
    out = model(input_ids=ids, use_cache=True)
    cache = out.get("cache")
    if cache is None:
        cache = out.past_key_values
    step = ids[:, -1:]

    def steps(rows: list[list[str]]) -> float:
        times = []
        with rt.routed(rows):
            for _ in range(reps * 4 + 1):
                fresh = copy.deepcopy(cache)
                t0 = time.perf_counter()
                model(input_ids=step, use_cache=True, **{kwarg: fresh})
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times[1:])

    return steps([[refs[0]]] * 8), steps([[r] for r in refs[:8]])
