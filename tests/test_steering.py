"""Activation → parameter: steering vectors (CAA) as cubes, their hook, distillation into a LoRA module,
the usage trigger, the CLI, and bad input. Mechanics on a tiny random Llama; the behaviour itself on the
embedded default model (context faithfulness)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memfed.cli.main import main
from memfed.errors import InvalidArgumentError, NotFoundError, UnsupportedError
from memfed.node.conversion import steering as st
from memfed.node.conversion.train import LoraTrainConfig
from memfed.node.models import load_host_model, save_tiny_model_dir, tiny_gpt2
from memfed.node.store import CubeStore

PAIRS = [
    st.ContrastPair(f"Item {i}: is it kind? Answer:", "yes, kindly", "no, rudely")
    for i in ("one", "two", "three", "four", "five", "six")
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    model, tokenizer = load_host_model(tiny_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).logits


def test_vector_hook_cube_round_trip(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    vector, report = st.extract(model, tokenizer, PAIRS, layer=1, strength=2.0)
    assert vector.layer == 1 and vector.strength == 2.0 and vector.vector.shape == (model.config.hidden_size,)
    assert report.sweep == {"1/2": report.behaviour_steered["rate"]}
    before = _logits(model, tokenizer, PAIRS[0].prompt)
    with st.steered(model, vector):
        during = _logits(model, tokenizer, PAIRS[0].prompt)
    assert not torch.allclose(before, during)
    assert torch.equal(before, _logits(model, tokenizer, PAIRS[0].prompt)), "the hook is gone afterwards"

    cube = st.steering_cube(model, vector, cube_id="kind", sources=["pairs.jsonl"])
    assert cube.manifest.annotations[st.LAYER_KEY] == "1"
    back = st.read_steering(cube)
    assert back.block == vector.block and back.strength == 2.0 and torch.equal(back.vector, vector.vector)
    st.check_applies(model, back)
    with pytest.raises(InvalidArgumentError, match="this model's layer"):
        st.check_applies(tiny_gpt2(), back)
    with CubeStore(tmp_path / "store") as store:
        store.put(cube.manifest, cube.payload)
        assert store.get("kind").manifest.kind == cube.manifest.kind


def test_bad_steering_cubes_and_pairs(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    vector, _ = st.extract(model, tokenizer, PAIRS, layer=0, strength=1.0)
    nan = st.SteeringVector(vector.block, 0, torch.full_like(vector.vector, float("nan")), 1.0)
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        st.read_steering(st.steering_cube(model, nan, cube_id="bad"))
    from memfed.cube.build import lora_cube

    lora = lora_cube(
        model, {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 64), torch.zeros(64, 2))}, cube_id="l"
    )
    with pytest.raises(UnsupportedError, match="not a steering cube"):
        st.read_steering(lora)
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        st.extract(model, tokenizer, PAIRS[:1])
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        st.extract(model, tokenizer, PAIRS, layer=9)
    with pytest.raises(InvalidArgumentError, match="positive number"):
        st.extract(model, tokenizer, PAIRS, layer=0, strength=float("nan"))
    with pytest.raises(NotFoundError):
        st.load_pairs(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    for text, match in [
        ("{not json", "not JSON"),
        ('{"prompt": "p", "positive": "a"}', "'negative' must be"),
        ('{"prompt": "p", "positive": "a", "negative": " a"}', "the same"),
        ("[1, 2]", "expected an object"),
        ("\n\n", "no contrast pairs"),
    ]:
        bad.write_text(text)
        with pytest.raises(InvalidArgumentError, match=match):
            st.load_pairs(bad)


def test_distilled_module_reproduces_the_steered_model(tiny) -> None:
    model, tokenizer = tiny
    vector, _ = st.extract(model, tokenizer, PAIRS, layer=1, strength=4.0)
    config = LoraTrainConfig(rank=4, alpha=8.0, lr=1e-2, steps=40, batch_size=12, warmup_steps=5)
    trained = st.distill(model, tokenizer, vector, PAIRS[:4], config=config, extra_texts=["Hello there."])
    module = st.distilled_cube(model, trained, "kind@1.0.0", cube_id="kind.module")
    assert module.manifest.origin.method == st.DISTILL_METHOD and st.BEHAVIOR_TAG in module.manifest.tags
    assert list(module.manifest.origin.sources) == ["kind@1.0.0"]
    assert all(not isinstance(m, torch.nn.ModuleDict) for m in model.modules()), "PEFT is unwrapped"
    report = st.evaluate_distilled(model, tokenizer, vector, module, PAIRS[4:], trained=trained)
    assert report.kl_distilled < 0.5 * report.kl_unsteered, report.to_dict()


def test_usage_counts_propose_distillation(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    vector, _ = st.extract(model, tokenizer, PAIRS, layer=0, strength=1.0)
    cube = st.steering_cube(model, vector, cube_id="kind")
    with CubeStore(tmp_path / "store") as store:
        store.put(cube.manifest, cube.payload)
        assert st.distill_proposals(store, min_uses=2) == []
        st.record_use(store, cube.ref)
        assert st.record_use(store, cube.ref) == 2
        assert st.distill_proposals(store, min_uses=2) == [st.DistillProposal(cube.ref, 2)]
        trained = st.distill(
            model, tokenizer, vector, PAIRS, config=LoraTrainConfig(rank=2, alpha=4.0, steps=2, batch_size=4)
        )
        module = st.distilled_cube(model, trained, cube.ref, cube_id="kind.module")
        store.put(module.manifest, module.payload)
        assert st.distill_proposals(store, min_uses=2) == [], "a distilled behaviour is not proposed again"


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = main([*args, "--json"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if code == 0 else {})


def test_cli_extract_eval_ask_proposals(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(p.__dict__) for p in PAIRS))
    common = ["--model", str(tiny_dir), "--store", str(tmp_path / "store")]
    code, out = _run(
        capsys,
        "steer",
        "extract",
        "--pairs",
        str(pairs),
        "--cube-id",
        "kind",
        "--layer",
        "1",
        "--strength",
        "2",
        *common,
    )
    assert code == 0 and out["ref"] == "kind@1.0.0" and out["layer"] == 1
    code, out = _run(capsys, "steer", "eval", "kind", "--pairs", str(pairs), *common)
    assert code == 0 and set(out) >= {"with", "without"} and out["pairs"] == len(PAIRS)
    code, out = _run(
        capsys, "steer", "ask", "kind", "Item one: is it kind? Answer:", "--max-new-tokens", "4", *common
    )
    assert code == 0 and out["uses"] == 1
    code, out = _run(capsys, "steer", "proposals", "--min-uses", "1", "--apply", "--steps", "2", *common)
    assert code == 0 and [p["ref"] for p in out["proposals"]] == ["kind@1.0.0"]
    assert out["distilled"][0]["ref"] == "kind.module@1.0.0"
    code, out = _run(capsys, "steer", "proposals", "--min-uses", "1", *common)
    assert code == 0 and out["proposals"] == []
    # Bad input: a LoRA cube is not a steering cube; a missing pairs file.
    assert main(["steer", "eval", "kind.module", *common]) == UnsupportedError.exit_code
    assert main(["steer", "extract", "--pairs", str(tmp_path / "nope"), "--cube-id", "x", *common]) == 4
    assert main(["steer", "--help"]) == 0


def test_context_faithfulness_on_the_default_model(default_model_dir: Path) -> None:
    """The shipped behaviour on the embedded model: the vector's layer is picked on the train facts, where
    it raises the rate of following a contradicting passage, and a LoRA distilled from it reproduces the
    steered model on held-out facts at a small fraction of the bare model's KL to it.

    How far the behaviour carries over to held-out facts is a property of the embedded model's build,
    whose weights differ by CPU family (other GEMM kernels): +6 points steered on the AMD build the
    README's figures come from, +1 on an Intel build, where the distilled module does not gain. So it is
    reported by ``memfed bench internalize`` and not asserted here."""
    model, tokenizer = load_host_model(default_model_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    train, heldout = st.context_pairs("train"), st.context_pairs("heldout")
    assert len(train) >= 200 and len(heldout) >= 100
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    vector, report = st.extract(model, tokenizer, train, strength=2.0)
    config = LoraTrainConfig(rank=8, alpha=16.0, lr=5e-3, steps=60, batch_size=32)
    neutral = st.neutral_prompts(96)
    trained = st.distill(model, tokenizer, vector, train[:120], config=config, extra_texts=neutral[:48])
    module = st.distilled_cube(model, trained, "faithful@1.0.0", cube_id="faithful.module")
    r = st.evaluate_distilled(
        model, tokenizer, vector, module, heldout, extra_texts=neutral[48:], trained=trained
    )
    print(f"\n[steering] extract {report.to_dict()}\n[steering] distill {r.to_dict()}")
    assert report.behaviour_steered["rate"] > report.behaviour_before["rate"]
    assert len(report.sweep) == len(model.model.layers)  # every layer tried at that strength
    assert r.kl_distilled < 0.2 * r.kl_unsteered
