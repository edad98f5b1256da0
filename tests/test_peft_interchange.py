"""PEFT interchange: import a LoRA folder as a cube and export it back, with identical outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model

from memfed.cube.peft_io import attach_to_peft_model, export_peft, import_peft
from memfed.errors import AlreadyExistsError, IncompatibleModelError, InvalidArgumentError, UnsupportedError
from memfed.node.models import tiny_gpt2, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _save_adapter(base: torch.nn.Module, config, out: Path) -> Path:
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(out)
    return out


def _logits(base: torch.nn.Module, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False),
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
            rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 32}, use_rslora=True,
        ),
    ],
    ids=["all-linear", "patterns-rslora"],
)  # fmt: skip
def test_llama_round_trip_outputs_equal(tmp_path: Path, config: LoraConfig) -> None:
    base = tiny_llama(seed=0).eval()
    original = _save_adapter(base, config, tmp_path / "original")
    cube = import_peft(original, base, cube_id="roundtrip")
    exported = export_peft(cube, tmp_path / "exported")

    ids = torch.randint(0, base.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    before, after = _logits(base, original, ids), _logits(base, exported, ids)
    with torch.no_grad():
        bare = base(input_ids=ids).logits
    assert (before - bare).abs().max() > 1e-3, "the adapter must change outputs for the check to mean much"
    assert (before - after).abs().max() <= 1e-6

    spec = cube.manifest.payload.lora
    assert {t.module.rsplit(".", 1)[-1] for t in spec.targets} == set(config.target_modules)
    if config.rank_pattern:
        down = next(t for t in spec.targets if t.module.endswith("down_proj"))
        v = next(t for t in spec.targets if t.module.endswith("v_proj"))
        assert down.rank == 2 and v.alpha == 32 and v.scaling == pytest.approx(32 / 8**0.5)


def test_gpt2_conv1d_round_trip(tmp_path: Path) -> None:
    base = tiny_gpt2(seed=0).eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                        init_lora_weights=False)  # fmt: skip
    original = _save_adapter(base, config, tmp_path / "original")
    cube = import_peft(original, base, cube_id="gpt2_lora")
    exported = export_peft(cube, tmp_path / "exported")
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    assert (_logits(base, original, ids) - _logits(base, exported, ids)).abs().max() <= 1e-6
    assert cube.manifest.payload.lora.fan_in_fan_out


def test_cube_tensors_are_named_by_base_model_module(tmp_path: Path) -> None:
    base = tiny_llama(seed=0)
    adapter = _save_adapter(base, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "a")
    cube = import_peft(adapter, base)
    names = [t.name for t in cube.manifest.payload.tensors]
    assert names and all(n.startswith("model.layers.") for n in names)
    assert cube.manifest.cube_id == "a"
    assert cube.manifest.origin.method == "import-peft"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), "IA3"),
        (LoHaConfig(r=2, target_modules=["q_proj"]), "LOHA"),
        (LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "DoRA"),
        (LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"), "bias"),
    ],
    ids=["ia3", "loha", "dora", "bias"],
)
def test_non_lora_adapters_are_unsupported(tmp_path: Path, config, message: str) -> None:
    base = tiny_llama(seed=0)
    adapter = _save_adapter(base, config, tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match=message):
        import_peft(adapter, base)


def test_pickled_weights_are_refused_unread(tmp_path: Path) -> None:
    base = tiny_llama(seed=0)
    adapter = _save_adapter(base, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04 this would be a pickle")
    with pytest.raises(UnsupportedError, match="pickle"):
        import_peft(adapter, base)


def test_malformed_folders_get_clear_errors(tmp_path: Path) -> None:
    base = tiny_llama(seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgumentError, match=r"adapter_config\.json"):
        import_peft(tmp_path / "empty", base)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        import_peft(bad, base)


def test_adapter_for_another_model_is_refused_at_import(tmp_path: Path) -> None:
    small = tiny_llama(seed=0)
    wider = tiny_llama(seed=0, hidden_size=96)
    adapter = _save_adapter(wider, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "adapter")
    with pytest.raises(IncompatibleModelError, match="features"):
        import_peft(adapter, small)


def test_attach_refuses_a_foreign_base_model_naming_both(tmp_path: Path) -> None:
    base = tiny_llama(seed=0)
    adapter = _save_adapter(base, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "adapter")
    cube = import_peft(adapter, base, model_name="tiny-a")
    other = tiny_llama(seed=7)  # same architecture and shapes, other weights
    with pytest.raises(IncompatibleModelError) as info:
        attach_to_peft_model(other, cube)
    text = str(info.value)
    assert "tiny-a" in text and "host model is LlamaForCausalLM" in text and "weight values" in text
    assert isinstance(attach_to_peft_model(copy.deepcopy(base), cube), PeftModel)


def test_export_refuses_to_overwrite(tmp_path: Path) -> None:
    base = tiny_llama(seed=0)
    adapter = _save_adapter(base, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "adapter")
    cube = import_peft(adapter, base)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AlreadyExistsError):
        export_peft(cube, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_peft(cube, out, force=True)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_lora_that_rewrote_the_base_weights_is_refused(tmp_path: Path) -> None:
    base = tiny_llama(seed=0)
    adapter = _save_adapter(base, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="changes the base weights"):
        import_peft(adapter, base)


def test_export_onto_a_file_is_refused_and_exports_are_readable(tmp_path: Path) -> None:
    base = tiny_llama(seed=0)
    adapter = _save_adapter(base, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "adapter")
    cube = import_peft(adapter, base)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InvalidArgumentError, match="is a file"):
        export_peft(cube, tmp_path / "a_file")
    out = export_peft(cube, tmp_path / "out")
    assert out.stat().st_mode & 0o755 == 0o755
