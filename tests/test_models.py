"""Host models: the embedded default model's build (deterministic, cached, locked), loading, tiny models."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memfed.errors import NotFoundError
from memfed.node import facts as facts_mod
from memfed.node.default_model import BUILD_INFO_FILE, build_default_model, build_tokenizer, greedy_match
from memfed.node.model_cache import ensure_built, models_cache_dir
from memfed.node.models import load_host_model, resolve_model_dir, save_tiny_model_dir, tiny_gpt2, tiny_llama
from memfed.node.reading import ReadingGenerator

# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def short_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5-step build: the full pipeline (tokenizer, config, training loop, save) in seconds."""
    out = tmp_path_factory.mktemp("short") / "model"
    build_default_model(out, seed=0, steps=5, evaluate_model=False)
    return out


# -------------------------------------------------------------------------------------- fact data


def test_fact_file_is_a_usable_editing_dataset() -> None:
    facts = facts_mod.load_facts()
    relations = facts_mod.load_relations()
    assert 300 <= len(facts) <= 500
    assert len({f.id for f in facts}) == len(facts)
    assert len({(f.subject, f.relation) for f in facts}) == len(facts)  # one answer per question
    for f in facts:
        rel = relations[f.relation]
        assert (f.subject_type, f.target_type) == (rel.subject_type, rel.target_type)
        assert f.alt_target and f.alt_target != f.target
        assert f.prompts("train") and f.prompts("heldout")
        assert not set(f.prompts("train")) & set(f.prompts("heldout"))
    # alt_target is a value of the same type: it occurs as a target of that type somewhere.
    by_type: dict[str, set[str]] = {}
    for f in facts:
        by_type.setdefault(f.target_type, set()).add(f.target)
    assert sum(f.alt_target in by_type[f.target_type] for f in facts) / len(facts) > 0.8


def test_reading_passages_never_use_fact_names() -> None:
    names = facts_mod.fact_names()
    gen = ReadingGenerator(random.Random(5), excluded=names)
    for ex in gen.examples(200, max_questions=3):
        assert not set(ex.entities) & names
        assert ex.answer in ex.passage
        assert ex.prompt.endswith("Answer:")
        assert all(a in ex.passage for _, a in ex.followups)


# --------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_unseen_text(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    for text in ("Zyxquor Blemmington-Ölund founded Qwaxa Ltd. 🙂", "Passage: a\nQuestion: b?\nAnswer: c"):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id  # <s> is prepended, as for Llama tokenizers
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok(" Zyxquor", add_special_tokens=False)["input_ids"]) > 1  # unseen name: several pieces
    assert {tok.pad_token, tok.bos_token, tok.eos_token} == {"<pad>", "<s>", "</s>"}

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again("Veltria Quorn")["input_ids"] == tok("Veltria Quorn")["input_ids"]


def test_tokenizer_build_is_deterministic() -> None:
    assert build_tokenizer().backend_tokenizer.to_str() == build_tokenizer().backend_tokenizer.to_str()


# ------------------------------------------------------------------------------------------- build


def test_same_seed_builds_identical_weights(short_build: Path, tmp_path: Path) -> None:
    again = build_default_model(tmp_path / "again", seed=0, steps=5, evaluate_model=False)
    other = build_default_model(tmp_path / "other", seed=1, steps=5, evaluate_model=False)
    a = load_file(short_build / "model.safetensors")
    b = load_file(again.path / "model.safetensors")
    c = load_file(other.path / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_does_not_disturb_callers_torch_settings(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_default_model(tmp_path / "m", steps=1, evaluate_model=False)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_saved_build_loads_as_a_plain_hf_model(short_build: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(short_build, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(short_build, local_files_only=True)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 20_000_000  # "tens of millions at most"; the recipe is ~1M
    info = json.loads((short_build / BUILD_INFO_FILE).read_text())
    assert info["steps"] == 5 and info["params"] == n_params and info["recipe_hash"]
    batch = tok(["The capital of", "Question: Who founded X?\nAnswer:"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


# ------------------------------------------------------------------------------------------- cache


def test_models_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEMFED_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MEMFED_CACHE_DIR")
    assert models_cache_dir() == tmp_path / "xdg" / "memfed" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models_cache_dir() == Path.home() / ".cache" / "memfed" / "models"


def _fake_builder(calls: list[str], delay: float = 0.0):
    def build(tmp: Path) -> None:
        calls.append(tmp.name)
        time.sleep(delay)
        (tmp / "config.json").write_text("{}")
        (tmp / "done").write_text(str(len(calls)))

    return build


def test_ensure_built_builds_once_and_reuses(tmp_path: Path) -> None:
    calls: list[str] = []
    target = tmp_path / "cache" / "m"
    assert ensure_built(target, _fake_builder(calls), marker="done") == target
    assert ensure_built(target, _fake_builder(calls), marker="done") == target
    assert len(calls) == 1
    ensure_built(target, _fake_builder(calls), marker="done", rebuild=True)
    assert len(calls) == 2 and (target / "done").read_text() == "2"
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]  # no temp dirs left


def test_concurrent_callers_build_once(tmp_path: Path) -> None:
    # flock locks belong to open file descriptions, so two threads with their own open() contend
    # exactly as two processes would.
    calls: list[str] = []
    target = tmp_path / "m"
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(ensure_built(target, _fake_builder(calls, 0.3), marker="done"))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [target] * 3


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError):
        ensure_built(tmp_path / "m", broken, marker="done")
    assert [p.name for p in tmp_path.iterdir()] == [".m.lock"]


# ----------------------------------------------------------------------------- resolve and load


def test_resolve_model_dir_refuses_what_is_not_a_local_model(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        resolve_model_dir(tmp_path / "missing")
    with pytest.raises(NotFoundError, match="never downloads"):
        resolve_model_dir("meta-llama/Llama-3.2-1B")  # a hub id is not fetched
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match=r"no config\.json"):
        resolve_model_dir(tmp_path / "empty")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_load_host_model_from_a_tiny_model_dir(kind: str, tmp_path: Path) -> None:
    path = save_tiny_model_dir(kind, tmp_path / kind)  # type: ignore[arg-type]
    assert resolve_model_dir(str(path)) == path.resolve()
    model, tok = load_host_model(path, device="cpu")
    assert not model.training and model.device.type == "cpu"
    batch = tok(["hello", "a longer prompt"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 2


def test_tiny_models_are_small_seeded_and_leave_global_rng_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert torch.equal(torch.rand(2), expected)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    for model in (a, tiny_gpt2(seed=0)):
        assert 50_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    assert tiny_llama(num_hidden_layers=3).config.num_hidden_layers == 3


# -------------------------------------------------------------------- the real default model


def _greedy_answers(model, tok, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    batch = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def _is_answer(generated: str, answer: str) -> bool:
    """The continuation is `` answer`` followed by a word boundary (what ``greedy_match`` counts)."""
    rest = generated.removeprefix(" " + answer)
    return rest != generated and (rest == "" or not rest[0].isalnum())


def test_default_model_knows_its_facts(default_model_dir: Path) -> None:
    model, tok = load_host_model(default_model_dir, device="cpu")
    facts = facts_mod.load_facts()[::10]  # 40 facts over every relation
    prompts = [f.prompts("train", "statement")[0] for f in facts] + [
        f.prompts("train", "question")[0] for f in facts
    ]
    targets = [f.target for f in facts] * 2
    got = _greedy_answers(model, tok, prompts)
    hits = [_is_answer(g, t) for g, t in zip(got, targets, strict=True)]
    assert sum(hits) / len(hits) >= 0.8, list(zip(prompts, got, strict=True))[:10]
    # The build's metric (one teacher-forced pass) agrees with real greedy generation.
    exact, _ = greedy_match(model, tok, list(zip(prompts, targets, strict=True)))
    assert exact == hits


def test_default_model_reads_unseen_passages(default_model_dir: Path) -> None:
    model, tok = load_host_model(default_model_dir, device="cpu")
    gen = ReadingGenerator(random.Random(2024), excluded=facts_mod.fact_names())
    examples = gen.examples(60)
    got = _greedy_answers(model, tok, [ex.prompt for ex in examples])
    hits = [_is_answer(g, ex.answer) for g, ex in zip(got, examples, strict=True)]
    assert sum(hits) / len(hits) >= 0.5
    info = json.loads((default_model_dir / BUILD_INFO_FILE).read_text())
    assert info["metrics"]["closed_book_train"] >= 0.9
