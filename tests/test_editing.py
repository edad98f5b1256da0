"""Editing mechanics on tiny random models (milliseconds): layouts, low-rank edits in weights and in the
node runtime (Llama Linear and GPT-2 Conv1D), the closed forms, the codebook hook, edit cubes, the case
file format, and the errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memfed.errors import InvalidArgumentError, NotFoundError, UnsupportedError
from memfed.node.editing.arch import layout_of
from memfed.node.editing.codebook import Codebook, CodebookHook
from memfed.node.editing.counterfact import (
    COUNTERFACT_PATH,
    load_cases,
    novel_cases,
    parse_case,
    shipped_cases,
)
from memfed.node.editing.cubes import attach, codebook_cube, describe_edit, lowrank_cube, read_edit
from memfed.node.editing.editor import Editor
from memfed.node.editing.evaluate import ngram_entropy
from memfed.node.editing.keys import read_groups
from memfed.node.editing.lowrank import LowRankEdit, apply_to_weights, remove_from_weights
from memfed.node.editing.solve import exact_update, ridge_update
from memfed.node.editing.text import subject_span
from memfed.node.editing.value import EditRequest, ValueConfig, optimize_values
from memfed.node.models import tiny_gpt2, tiny_llama
from memfed.node.runtime import ModuleRuntime
from memfed.node.tokenizer_build import byte_tokenizer, wrap_tokenizer


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request: pytest.FixtureRequest) -> torch.nn.Module:
    model = tiny_llama(seed=3) if request.param == "llama" else tiny_gpt2(seed=3)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return wrap_tokenizer(byte_tokenizer(), model_max_length=128)


def _random_edit(model: torch.nn.Module, layer: int = 1, rank: int = 2) -> LowRankEdit:
    layout = layout_of(model)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(rank, layout.key_dim, generator=g) * 0.1
    b = torch.randn(layout.value_dim, rank, generator=g) * 0.1
    return LowRankEdit({layout.down_proj[layer]: (a, b)})


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 40, 41, 42, 43, 44, 45, 46]])


def test_layouts_name_the_mlp_down_projection() -> None:
    llama, gpt2 = layout_of(tiny_llama()), layout_of(tiny_gpt2())
    assert llama.down_proj == ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    assert gpt2.down_proj == ("transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj")  # not attn.c_proj
    assert (llama.key_dim, llama.value_dim) == (128, 64) and (gpt2.key_dim, gpt2.value_dim) == (256, 64)
    with pytest.raises(InvalidArgumentError, match=r"layers 0\.\.1"):
        llama.check_layer(7)


def test_a_model_without_a_recognised_mlp_is_refused() -> None:
    model = tiny_llama()
    for block in model.model.layers:
        block.mlp.down_proj = torch.nn.Identity()  # not a linear layer any more
    with pytest.raises(UnsupportedError, match="no recognised MLP down-projection"):
        layout_of(model)
    with pytest.raises(UnsupportedError, match="no stack of decoder blocks"):
        layout_of(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_subject_span_and_missing_subject(tokenizer) -> None:
    first, last = subject_span(tokenizer, "The capital of Veltria is", "Veltria")
    ids = tokenizer("The capital of Veltria is")["input_ids"]
    assert tokenizer.decode(ids[first : last + 1]).strip() == "Veltria"
    with pytest.raises(InvalidArgumentError, match="does not occur in the prompt"):
        subject_span(tokenizer, "The capital of Veltria is", "Quorn")
    with pytest.raises(InvalidArgumentError, match="empty"):
        subject_span(tokenizer, "The capital of Veltria is", " ")


def test_weight_edit_has_the_right_orientation_and_restores_exactly(tiny: torch.nn.Module) -> None:
    """ΔW = B·A acts on the down-projection input, for Linear (out, in) and Conv1D (in, out) alike."""
    edit = _random_edit(tiny)
    name = edit.modules[0]
    module = tiny.get_submodule(name)
    x = torch.randn(3, layout_of(tiny).key_dim)
    before = module(x)
    saved = module.weight.detach().clone()
    base_logits = _logits(tiny, IDS)
    with apply_to_weights(tiny, edit):
        a, b = edit.factors[name]
        torch.testing.assert_close(module(x) - before, x @ a.T @ b.T, rtol=1e-4, atol=1e-5)
        assert not torch.equal(_logits(tiny, IDS), base_logits)
    assert torch.equal(module.weight, saved)  # bit for bit
    assert torch.equal(_logits(tiny, IDS), base_logits)
    apply_to_weights(tiny, edit)
    remove_from_weights(tiny, edit)  # the handle-less undo: exact up to float rounding
    torch.testing.assert_close(module.weight, saved, rtol=0, atol=1e-6)
    module.weight.copy_(saved)


def test_runtime_runs_a_lowrank_edit_cube_like_the_weight_edit(tiny: torch.nn.Module) -> None:
    edit = _random_edit(tiny)
    request = EditRequest("The capital of Veltria is", "Veltria", "Quorn", "Dralmouth", "c1")
    cube = lowrank_cube(tiny, edit, cube_id="fix-veltria", method="rome", requests=[request], layers=[1])
    assert cube.manifest.kind == 3 and cube.manifest.payload.WhichOneof("spec") == "lora"
    assert "Veltria: Dralmouth → Quorn" in cube.manifest.origin.description
    assert cube.manifest.origin.params["layers"] == "1" and cube.manifest.origin.params["old"] == "Dralmouth"
    base = _logits(tiny, IDS)
    with apply_to_weights(tiny, edit):
        edited = _logits(tiny, IDS)
    rt = ModuleRuntime(tiny)
    try:
        module = rt.load(cube)
        assert module.kind == "edit"
        rt.activate(module.ref)
        torch.testing.assert_close(_logits(tiny, IDS), edited, rtol=1e-4, atol=1e-5)
        rt.deactivate()  # O(1) removal: the bare model again, exactly
        assert torch.equal(_logits(tiny, IDS), base)
    finally:
        rt.close()
    back = read_edit(cube)
    assert isinstance(back, LowRankEdit)
    torch.testing.assert_close(back.delta(edit.modules[0]), edit.delta(edit.modules[0]))


def test_closed_forms_hit_their_targets() -> None:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(500, 16, generator=g)
    c = sample.T @ sample / 500
    keys, resid = torch.randn(3, 16, generator=g), torch.randn(3, 8, generator=g)
    a, b = exact_update(keys, resid, c, ridge=0.0)
    torch.testing.assert_close((b @ a @ keys.T).T, resid, rtol=1e-4, atol=1e-4)  # ΔW k_i = r_i exactly
    a, b = ridge_update(keys, resid, c, lam=1e-6)
    torch.testing.assert_close((b @ a @ keys.T).T, resid, rtol=1e-3, atol=1e-3)  # λ→0: the same fit
    a, b = ridge_update(keys, resid, c, lam=1e6)
    assert float((b @ a).norm()) < 1e-3  # λ large: keep the weights


def _codebook(
    model: torch.nn.Module, tokenizer, prompt: str, window: int = 2
) -> tuple[Codebook, torch.Tensor]:
    """A codebook whose one entry holds the down-projection inputs of ``prompt``'s last two tokens."""
    layout = layout_of(model)
    module = layout.down(1)
    seen: dict[str, torch.Tensor] = {}

    def grab(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen["x"] = args[0]

    handle = module.register_forward_hook(grab)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x = seen["x"][0]
    cb = Codebook.empty(1, layout.down_proj[1], layout.key_dim, layout.value_dim, window, mode="replace")
    cb.records.append({"prompt": prompt, "subject": "Veltria", "target": "Quorn", "old_target": "Dralmouth"})
    cb.add_entry(torch.stack([x[-1], x[-2]]), torch.full((layout.value_dim,), 0.5), 0.05, [0])
    return cb, ids


def test_codebook_hook_replaces_only_matching_tokens(tiny: torch.nn.Module, tokenizer) -> None:
    cb, ids = _codebook(tiny, tokenizer, "In Veltria")
    other = torch.tensor([tokenizer("In Quornia")["input_ids"]])
    base, base_other = _logits(tiny, ids), _logits(tiny, other)
    with CodebookHook(tiny, cb) as hook:
        edited = _logits(tiny, ids)
        assert hook.last_matches == 1
        assert torch.equal(edited[:, :-1], base[:, :-1])  # earlier tokens untouched
        assert not torch.equal(edited[:, -1], base[:, -1])
        assert torch.equal(_logits(tiny, other), base_other) and hook.last_matches == 0
        # The window is read across KV-cache steps: the last token alone, after its prefix, matches.
        out = tiny(input_ids=ids[:, :-1], use_cache=True)
        step = tiny(input_ids=ids[:, -1:], cache=out.past_key_values, use_cache=True)
        assert hook.last_matches == 1
        torch.testing.assert_close(step.logits[:, -1], edited[:, -1], rtol=1e-4, atol=1e-4)
    assert torch.equal(_logits(tiny, ids), base)  # hook removed: the base model


def test_codebook_cube_round_trip_and_attach(tiny: torch.nn.Module, tokenizer) -> None:
    cb, ids = _codebook(tiny, tokenizer, "In Veltria")
    cube = codebook_cube(tiny, cb, cube_id="edits")
    m = cube.manifest
    assert (
        m.kind == 3
        and m.annotations["memfed.edit.form"] == "codebook"
        and m.annotations["memfed.edit.layers"] == "1"
    )
    assert "Veltria: Dralmouth → Quorn" in m.origin.description
    back = read_edit(cube)
    assert isinstance(back, Codebook) and back.records == cb.records and back.mode == "replace"
    assert torch.equal(back.keys, cb.keys) and torch.equal(back.values, cb.values)
    assert describe_edit(cube)["changes"][0].startswith("Veltria: Dralmouth → Quorn")
    base = _logits(tiny, ids)
    with attach(tiny, cube):
        assert not torch.equal(_logits(tiny, ids), base)
    assert torch.equal(_logits(tiny, ids), base)
    with pytest.raises(UnsupportedError, match="codebook edit cubes run as a hook"):
        ModuleRuntime(tiny).load(cube)
    with pytest.raises(InvalidArgumentError, match="not a codebook payload"):
        Codebook.from_parts({"keys": cb.keys}, {})


def test_editor_refuses_bad_requests(tokenizer) -> None:
    editor = Editor(
        tiny_llama(seed=1), tokenizer, texts=["In Veltria people speak Quornish."], cache_stats=False
    )
    prompt = "The capital of Veltria is"
    with pytest.raises(InvalidArgumentError, match="does not occur"):
        editor.request(prompt, "Zembla", "Quorn")
    with pytest.raises(InvalidArgumentError, match="target is empty"):
        editor.request(prompt, "Veltria", "  ")
    answer = editor.answer(prompt)
    if answer and editor.gives(prompt, answer):
        with pytest.raises(InvalidArgumentError, match="already answers"):
            editor.request(prompt, "Veltria", answer)
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        editor.rome(EditRequest(prompt, "Veltria", "Quorn"), layer=5)


def test_gpt2_rome_edit_meets_its_constraint(tokenizer) -> None:
    """On GPT-2 (Conv1D), the stored update maps each subject key to the optimized change δ."""
    model = tiny_gpt2(seed=2)
    for p in model.parameters():
        p.requires_grad_(False)
    editor = Editor(
        model,
        tokenizer,
        texts=[f"The city of Veltria number {i} is big." for i in range(30)],
        cache_stats=False,
    )
    request = EditRequest("The capital of Veltria is", "Veltria", "Quorn")
    result = editor.rome(request, layer=0, token="last")
    (name,) = result.edit.modules
    assert name == "transformer.h.0.mlp.c_proj"
    a, b = result.edit.factors[name]
    assert a.shape[1] == 256 and b.shape[0] == 64
    assert float(result.delta.norm()) > 0
    mapped = (b @ a @ result.keys.T).T  # every key of the subject goes to δ
    torch.testing.assert_close(mapped, result.delta.expand_as(mapped), rtol=1e-3, atol=1e-3)
    module = model.get_submodule(name)
    with apply_to_weights(model, result.edit):
        torch.testing.assert_close(
            module(result.keys) - module.forward(result.keys), torch.zeros_like(mapped)
        )
        edited = module(result.keys)
    torch.testing.assert_close(edited - module(result.keys), mapped, rtol=1e-3, atol=1e-3)


def test_grouped_values_share_one_delta_and_bad_groups_are_refused(tokenizer) -> None:
    model = tiny_llama(seed=2)
    for p in model.parameters():
        p.requires_grad_(False)
    layout = layout_of(model)
    requests = [
        EditRequest("The capital of Veltria is", "Veltria", "Quorn"),
        EditRequest("In Veltria, people speak", "Veltria", "Ostic"),
        EditRequest("People in Zembla speak", "Zembla", "Ostic"),
    ]
    config = ValueConfig(steps=3)
    result = optimize_values(layout, tokenizer, layout.down(0), requests, [""], config, groups=[0, 0, 1])
    assert result.delta.shape[0] == 2 and result.nll.shape[0] == 3
    with pytest.raises(InvalidArgumentError, match="groups"):
        optimize_values(layout, tokenizer, layout.down(0), requests, [""], config, groups=[0, 2, 2])


def test_patched_reads_see_the_delta(tokenizer) -> None:
    """``read_groups(patch=...)`` reads a module's output with δ added at the subject: reading that same
    module's output gives the plain read plus δ."""
    model = tiny_llama(seed=2)
    layout = layout_of(model)
    pairs = [("The capital of Veltria is", "Veltria"), ("People in Zembla speak", "Zembla")]
    deltas = torch.randn(2, layout.value_dim, generator=torch.Generator().manual_seed(0))
    reads = {"z": (layout.block(0), False)}
    plain = read_groups(layout, tokenizer, pairs, ["", "Also. "], reads, "all")
    patched = read_groups(
        layout, tokenizer, pairs, ["", "Also. "], reads, "all", patch=(layout.block(0), deltas)
    )
    for i in range(2):
        torch.testing.assert_close(patched[i]["z"], plain[i]["z"] + deltas[i], rtol=1e-4, atol=1e-4)


def test_shipped_case_file_has_the_counterfact_shape() -> None:
    cases = load_cases()
    assert len(cases) >= 200
    assert [c.case_id for c in cases] == [c.case_id for c in shipped_cases()]  # the file is the generator's
    for c in cases:
        assert c.subject in c.prompt and c.target_new != c.target_true
        assert len(c.paraphrases) >= 2 and len(c.neighbours) >= 5
        assert all(c.subject in p for p in c.paraphrases)
        assert all(c.subject not in n.prompt for n in c.neighbours)
    rec = json.loads(COUNTERFACT_PATH.read_text().splitlines()[0])
    assert rec["requested_rewrite"]["prompt"].count("{}") == 1
    novel = novel_cases(20)
    assert len({c.subject for c in novel}) == 20 and all(c.target_true is None for c in novel)


def test_case_parsing_accepts_the_original_format_and_refuses_bad_records(tmp_path: Path) -> None:
    original = {
        "case_id": 0,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English"},
            "target_true": {"str": "French"},
        },
        "paraphrase_prompts": ["Danielle Darrieux spoke"],
        "neighborhood_prompts": ["The native language of Montesquieu is"],
    }
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([original]))
    (case,) = load_cases(path)
    assert case.prompt == "The mother tongue of Danielle Darrieux is"
    assert case.neighbours[0].target == "French"  # plain-string neighbours keep the true answer
    bad = json.loads(json.dumps(original))
    bad["requested_rewrite"]["prompt"] = "The mother tongue of Montesquieu is"  # no '{}', no subject
    with pytest.raises(InvalidArgumentError, match="does not contain the subject"):
        parse_case(bad)
    with pytest.raises(InvalidArgumentError, match="requested_rewrite"):
        parse_case({"case_id": 1})
    with pytest.raises(NotFoundError):
        load_cases(tmp_path / "missing.jsonl")
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    with pytest.raises(InvalidArgumentError, match="not JSON"):
        load_cases(tmp_path / "junk.jsonl")


def test_ngram_entropy() -> None:
    assert ngram_entropy("a a a a a a") == 0.0
    assert ngram_entropy("the cat sat on the mat today") > ngram_entropy("the the the the the the cat")
