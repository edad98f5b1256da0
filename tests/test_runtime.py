"""The module runtime against PEFT itself: same outputs, per-row batches, O(1) activation, bad cubes."""

from __future__ import annotations

import pytest
import torch

from helpers.lora_cubes import peft_lora_cube
from memfed.cube.build import adapter_cube, lora_cube
from memfed.cube.peft_io import attach_to_peft_model
from memfed.errors import IncompatibleModelError, InvalidArgumentError, NotFoundError, UnsupportedError
from memfed.node.runtime import ModuleRuntime
from memfed.node.tiny_models import tiny_gpt2, tiny_llama

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture()
def llama() -> torch.nn.Module:
    return tiny_llama(seed=1)


def _ids(batch: int = 3, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 200, (batch, length), generator=g)


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


@torch.no_grad()
def _peft_logits(model: torch.nn.Module, cube, ids: torch.Tensor) -> torch.Tensor:
    peft_model = attach_to_peft_model(model, cube)
    try:
        return peft_model(input_ids=ids).logits
    finally:
        peft_model.unload()


def test_outputs_equal_peft_on_all_linear_layers_with_mixed_ranks(llama: torch.nn.Module) -> None:
    cube = peft_lora_cube(
        llama, "mixed", seed=3, r=8, targets=ALL_LINEAR, rank_pattern={"v_proj": 2}, use_rslora=True
    )
    ids = _ids()
    expected = _peft_logits(llama, cube, ids)
    rt = ModuleRuntime(llama)
    rt.load(cube)
    bare = _logits(llama, ids)
    rt.activate(cube.ref)
    ours = _logits(llama, ids)
    assert (ours - expected).abs().max().item() <= 1e-5
    assert (ours - bare).abs().max().item() > 1e-2  # the module really changes the outputs
    rt.deactivate()
    assert torch.equal(_logits(llama, ids), bare)
    rt.close()


def test_outputs_equal_peft_on_gpt2_conv1d() -> None:
    gpt2 = tiny_gpt2(seed=2)
    cube = peft_lora_cube(gpt2, "g", seed=4, targets=("c_attn", "c_proj"), fan_in_fan_out=True)
    ids = _ids()
    expected = _peft_logits(gpt2, cube, ids)
    rt = ModuleRuntime(gpt2)
    rt.load(cube)
    rt.activate(cube.ref)
    assert (_logits(gpt2, ids) - expected).abs().max().item() <= 1e-5


def test_per_row_modules_equal_each_rows_solo_run(llama: torch.nn.Module) -> None:
    a = peft_lora_cube(llama, "a", seed=5, r=4)
    b = peft_lora_cube(llama, "b", seed=6, r=16, targets=("q_proj", "down_proj"))
    rt = ModuleRuntime(llama)
    rt.load(a)
    rt.load(b)
    rows = [[a.ref], [b.ref], [], [a.ref, b.ref], [b.ref]]
    ids = _ids(batch=len(rows), seed=2)
    with rt.routed(rows):
        mixed = _logits(llama, ids)
    for i, row in enumerate(rows):
        with rt.routed(modules=row):
            solo = _logits(llama, ids[i : i + 1])
        assert (mixed[i] - solo[0]).abs().max().item() <= 1e-5, f"row {i} ({row}) differs from its solo run"
    # and a row with one module equals PEFT running that module
    assert (mixed[0] - _peft_logits(llama, a, ids[:1])[0]).abs().max().item() <= 1e-5


def test_two_modules_on_one_row_add_their_deltas(llama: torch.nn.Module) -> None:
    a = peft_lora_cube(llama, "a", seed=7)
    b = peft_lora_cube(llama, "b", seed=8, targets=("v_proj", "o_proj"))
    rt = ModuleRuntime(llama)
    rt.load(a)
    rt.load(b)
    ids = _ids(batch=1)
    bare = _logits(llama, ids)
    with rt.routed(modules=[a.ref, b.ref]):
        both = _logits(llama, ids)
    # compare with the weights merged by hand: W + ΔA + ΔB, layer by layer
    deltas = {}
    for cube in (a, b):
        t = cube.tensors()
        for target in cube.manifest.payload.lora.targets:
            d = target.scaling * t[f"{target.module}.lora_B.weight"] @ t[f"{target.module}.lora_A.weight"]
            deltas[target.module] = deltas.get(target.module, 0) + d
    rt.close()
    with torch.no_grad():
        for name, d in deltas.items():
            llama.get_submodule(name).weight += d
        merged = _logits(llama, ids)
    assert (both - merged).abs().max().item() <= 1e-5
    assert (both - bare).abs().max().item() > 1e-2


def test_adapter_cube_applies_bottleneck_on_the_layer_output(llama: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    hidden, d = 64, 8
    weights = {
        f"model.layers.{i}.mlp.down_proj": (
            torch.randn(d, hidden, generator=g) * 0.3,
            torch.randn(d, generator=g) * 0.1,
            torch.randn(hidden, d, generator=g) * 0.3,
            torch.randn(hidden, generator=g) * 0.1,
        )
        for i in range(2)
    }
    cube = adapter_cube(llama, weights, cube_id="style", activation="gelu")
    ids = _ids(batch=2)
    rt = ModuleRuntime(llama)
    rt.load(cube)
    with rt.routed([[cube.ref], []]):
        mixed = _logits(llama, ids)
    rt.close()
    handles = []
    for name, (dw, db, uw, ub) in weights.items():

        def hook(_m, _a, out, dw=dw, db=db, uw=uw, ub=ub):
            return out + torch.nn.functional.linear(
                torch.nn.functional.gelu(torch.nn.functional.linear(out, dw, db)), uw, ub
            )

        handles.append(llama.get_submodule(name).register_forward_hook(hook))
    reference = _logits(llama, ids[:1])
    for h in handles:
        h.remove()
    assert (mixed[0] - reference[0]).abs().max().item() <= 1e-5
    assert (mixed[1] - _logits(llama, ids[1:])[0]).abs().max().item() <= 1e-5


def test_activation_never_walks_the_model(llama: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    cubes = [peft_lora_cube(llama, f"m{i}", seed=10 + i) for i in range(3)]
    rt = ModuleRuntime(llama)

    def refuse(*_a, **_k):
        raise AssertionError("the model's module tree was walked")

    monkeypatch.setattr(torch.nn.Module, "named_modules", refuse)
    monkeypatch.setattr(torch.nn.Module, "modules", refuse)
    for cube in cubes:
        rt.load(cube)
    for cube in cubes:
        rt.activate(cube.ref)
        _logits(llama, _ids(batch=1))
    assert rt.active == (cubes[-1].ref,)


def test_unload_removes_module_and_close_restores_the_bare_model(llama: torch.nn.Module) -> None:
    ids = _ids(batch=1)
    bare = _logits(llama, ids)
    cube = peft_lora_cube(llama, "a", seed=3)
    rt = ModuleRuntime(llama)
    rt.load(cube)
    rt.activate(cube.ref)
    rt.unload(cube.ref)
    assert rt.active == ()
    assert torch.equal(_logits(llama, ids), bare)
    with pytest.raises(NotFoundError):
        rt.activate(cube.ref)
    rt.close()
    assert not llama.get_submodule("model.layers.0.self_attn.q_proj")._forward_hooks


def test_cube_for_another_base_model_is_refused(llama: torch.nn.Module) -> None:
    cube = peft_lora_cube(tiny_llama(seed=99), "foreign", seed=1)
    with pytest.raises(IncompatibleModelError, match="made for"):
        ModuleRuntime(llama).load(cube)


def test_missing_target_layer_wrong_rank_and_nan_are_refused(llama: torch.nn.Module) -> None:
    rt = ModuleRuntime(llama)
    a, b = torch.randn(4, 64), torch.randn(64, 4)
    with pytest.raises(IncompatibleModelError, match="not a linear layer"):
        rt.load(lora_cube(llama, {"model.layers.7.self_attn.q_proj": (a, b)}, cube_id="far"))
    wrong = lora_cube(llama, {"model.layers.0.self_attn.q_proj": (a, b)}, cube_id="wrong")
    wrong.manifest.payload.lora.targets[0].rank = 8  # manifest and payload disagree
    with pytest.raises(IncompatibleModelError, match="rank 8"):
        rt.load(wrong)
    with pytest.raises(IncompatibleModelError, match="maps 64->64"):
        rt.load(lora_cube(llama, {"model.layers.0.self_attn.q_proj": (torch.randn(4, 32), b)}, cube_id="s"))
    nan = a.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        rt.load(lora_cube(llama, {"model.layers.0.self_attn.q_proj": (nan, b)}, cube_id="nan"))
    assert rt.resident == {}


def test_non_module_cube_kinds_are_refused(llama: torch.nn.Module) -> None:
    cube = lora_cube(llama, {"model.layers.0.self_attn.q_proj": (torch.randn(2, 64), torch.randn(64, 2))},
                     cube_id="e")  # fmt: skip
    cube.manifest.kind = 3  # edit
    with pytest.raises(UnsupportedError, match="edit cube"):
        ModuleRuntime(llama).load(cube)
