"""Memory conversion on the embedded model: internalize (gated), externalize (round trip), triggers,
governance, cross-model migration to a GPT-2 host, and the ``memfed memory`` CLI.

One document is internalized once for the module (about 25 s on two busy CPU cores); the other tests
probe, contradict, migrate and externalize that cube. Training runs on one thread: on a shared 2-core
machine two threads were 3-5x slower per step (oversubscription), not faster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from memfed.cli.main import main
from memfed.cube.core import MemCube
from memfed.errors import IncompatibleModelError, QualityGateError
from memfed.node.conversion.augment import all_facts
from memfed.node.conversion.documents import Document, parse_document, shipped_documents
from memfed.node.conversion.externalize import externalize, recovery
from memfed.node.conversion.governance import find_conflicts, list_conflicts, record_conflicts
from memfed.node.conversion.internalize import (
    InternalizeReport,
    InternalizeSettings,
    RecallGateError,
    internalize,
)
from memfed.node.conversion.train import LoraTrainConfig
from memfed.node.conversion.triggers import AutoInternalizer, AutoInternalizeSettings
from memfed.node.models import load_host_model
from memfed.node.plaintext import PlaintextMemory
from memfed.node.runtime import ModuleRuntime
from memfed.node.store import CubeStore

DOC_ID = "doc/dreta-and-brigis"


@dataclass
class Internalized:
    model: Any
    tokenizer: Any
    doc: Document
    report: InternalizeReport
    cube: MemCube
    store_dir: Path
    vault_path: Path


@pytest.fixture(scope="module")
def done(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Internalized:
    model, tokenizer = load_host_model(default_model_dir)
    doc = next(d for d in shipped_documents() if d.doc_id == DOC_ID)
    root = tmp_path_factory.mktemp("conversion")
    with CubeStore(root / "store") as store, PlaintextMemory(root / "vault.db") as vault:
        report, cube = internalize(model, tokenizer, [doc], cube_id="dreta", store=store, vault=vault)
    print(f"\ninternalize {DOC_ID}: {report.to_dict()}")
    return Internalized(model, tokenizer, doc, report, cube, root / "store", root / "vault.db")


def test_internalize_registers_a_validated_cube_and_archives_the_source(done: Internalized) -> None:
    r = done.report
    assert r.registered and r.facts == 5 and r.heldout_probes == 15
    assert r.recall_heldout >= 0.8, r  # measured 1.0; the gate is 0.5
    assert r.recall_heldout_before <= 0.1  # the bare model did not know these facts
    assert r.recall_trained >= 0.9
    assert r.retention >= 0.8  # measured 0.94: replay keeps the model's other answers
    with CubeStore(done.store_dir) as store, PlaintextMemory(done.vault_path) as vault:
        m = store.get_manifest("dreta", "1.0.0")
        assert m.origin.method == "internalize"
        assert list(m.origin.sources) == [f"plaintext:{DOC_ID}@v1#{done.doc.digest}"]
        assert json.loads(m.origin.params["probe_keys"])[0] == ["Dreta", "capital"]
        assert float(m.origin.params["recall_heldout"]) == r.recall_heldout
        assert m.payload.lora.rank == 8 and "internalized" in m.tags
        source = vault.get(DOC_ID, count_access=False)
        assert source.status == "archived" and source.text == done.doc.text


def test_the_module_answers_held_out_questions_through_the_node(done: Internalized) -> None:
    from memfed.node.generation import Generator, RowRequest
    from memfed.node.scheduler import MemScheduler

    question = "Question: Which city is the capital of Dreta?\nAnswer:"
    with CubeStore(done.store_dir) as store:
        runtime = ModuleRuntime(done.model)
        try:
            gen = Generator(MemScheduler(runtime, store), done.tokenizer)
            with_module, bare = gen.generate(
                [
                    RowRequest(question, modules=("dreta",), max_new_tokens=6),
                    RowRequest(question, max_new_tokens=6),
                ]
            )
        finally:
            runtime.close()
    assert with_module.text.strip() == "Fopestox"
    assert bare.text.strip() != "Fopestox"


def test_round_trip_internalize_externalize_recovers_the_facts(done: Internalized) -> None:
    expected = [f.triple for f in done.doc.facts()]
    with PlaintextMemory(done.vault_path) as vault:
        out = externalize(done.model, done.tokenizer, done.cube, vault=vault)
        assert out.probe_source == "origin" and out.keys_probed == 5
        assert recovery(expected, out.claims) >= 0.9  # measured 1.0
        written = vault.get(out.doc_id, count_access=False)
        assert written.status == "pending_review" and "externalized" in written.tags
        assert {f.triple for f in parse_document(written.text, doc_id="x").facts()} == set(expected)
        # Generic probes (no origin list): open phrasings plus the subjects the vault knows.
        generic = externalize(done.model, done.tokenizer, done.cube, generic=True, vault=vault)
    print(f"\nround trip: origin probes {recovery(expected, out.claims):.2f} in {out.seconds:.1f} s; "
          f"generic {recovery(expected, generic.claims):.2f} in {generic.seconds:.1f} s")  # fmt: skip
    assert generic.probe_source == "generic" and recovery(expected, generic.claims) >= 0.9


def test_a_weak_module_is_not_registered(done: Internalized, tmp_path: Path) -> None:
    doc = next(d for d in shipped_documents() if d.doc_id == "doc/weizilis-briefing")
    weak = InternalizeSettings(train=LoraTrainConfig(steps=1), replay_prompts=8, control_prompts=8)
    with CubeStore(tmp_path / "store") as store, PlaintextMemory(tmp_path / "vault.db") as vault:
        with pytest.raises(RecallGateError) as info:
            internalize(
                done.model, done.tokenizer, [doc], cube_id="weak", store=store, vault=vault, settings=weak
            )
        assert isinstance(info.value, QualityGateError) and info.value.exit_code == 15
        report = info.value.report
        assert not report.registered and report.recall_heldout < 0.5 and "not registered" in report.reason
        assert store.list() == []
        assert vault.get(doc.doc_id, count_access=False).status == "active"  # the text still serves


def test_new_text_contradicting_the_module_is_flagged_for_review(done: Internalized, tmp_path: Path) -> None:
    with PlaintextMemory(tmp_path / "vault.db") as vault:
        vault.add("news/dreta", "Dreta moved its government. Dreta's capital is Zuvaholm.", title="news")
        vault.add("news/brigis", "The official language of Brigis is Theikendi.", title="agrees")
        conflicts = find_conflicts(done.model, done.tokenizer, [done.cube], vault)
        assert [(c.doc_id, c.subject, c.text_says, c.module_says) for c in conflicts] == [
            ("news/dreta", "Dreta", "Zuvaholm", "Fopestox")
        ]
        (review,) = record_conflicts(vault, conflicts)
        note = vault.get(review, count_access=False)
        assert note.status == "pending_review"
        assert "answers: The capital of Dreta is Fopestox." in note.text and "Zuvaholm" in note.text
        assert vault.get("news/dreta", count_access=False).status == "pending_review"
        assert vault.get("news/brigis", count_access=False).status == "active"
        assert [c["doc_id"] for c in list_conflicts(vault)] == ["news/dreta"]


def test_the_auto_internalize_setting_acts_on_proposals(done: Internalized, tmp_path: Path) -> None:
    now = [1_000_000.0]
    quick = InternalizeSettings(
        train=LoraTrainConfig(steps=2), min_recall=0.0, replay_prompts=8, control_prompts=8
    )
    text = "The official language of Fezeira is Trovouman."
    with CubeStore(tmp_path / "store") as store, PlaintextMemory(":memory:", clock=lambda: now[0]) as vault:
        vault.add("guide/fezeira", text, title="Fezeira")
        for _ in range(11):
            vault.search("Fezeira language")
        off = AutoInternalizer(done.model, done.tokenizer, store, vault, clock=lambda: now[0])
        assert off.tick() == []  # the setting is off by default
        auto = AutoInternalizer(
            done.model, done.tokenizer, store, vault,
            AutoInternalizeSettings(enabled=True, internalize=quick), clock=lambda: now[0],
        )  # fmt: skip
        (outcome,) = auto.tick()
        assert outcome.registered and outcome.cube_ref == "plain.guide_fezeira@1.0.0"
        assert vault.get("guide/fezeira", count_access=False).status == "archived"
        assert auto.tick() == []  # archived text is no longer proposed


def test_migration_through_text_to_a_gpt2_host(done: Internalized, tmp_path: Path) -> None:
    from memfed.node.conversion.gpt2_host import gpt2_host_dir
    from memfed.node.conversion.migrate import migrate

    b_model, b_tok = load_host_model(gpt2_host_dir())  # built once per machine (~40 s), then cached
    settings = InternalizeSettings(
        train=LoraTrainConfig(steps=150, lr=1e-2, rank=16, alpha=32), min_recall=0.0
    )
    with CubeStore(tmp_path / "store") as store:
        report, cube_b = migrate(
            done.model, done.tokenizer, done.cube, b_model, b_tok, store=store, settings=settings
        )
        assert store.get_manifest("dreta.gpt2", "1.0.0").base_model.architecture == "GPT2LMHeadModel"
    data = report.to_dict()
    print(
        f"\nmigration Llama -> GPT-2: {data['facts_carried']} facts carried; recall on B: held-out "
        f"{data['recall_on_target_heldout']:.2f}, trained phrasings {data['recall_on_target_trained']:.2f}, "
        f"bare B {report.internalized.recall_heldout_before:.2f}; {report.internalized.seconds}"
    )
    assert data["facts_carried"] == 5
    assert report.internalized.recall_trained >= 0.4  # measured 0.76 (held-out 0.73); bare B: 0
    assert f"cube:dreta@1.0.0#{done.cube.manifest.digest}" in cube_b.manifest.origin.sources
    with pytest.raises(IncompatibleModelError):
        ModuleRuntime(done.model).load(cube_b)  # weights never cross architectures; the text did


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    code = main(list(args))
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def test_cli_externalize_proposals_and_conflicts(
    done: Internalized, default_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = [
        "--model",
        str(default_model_dir),
        "--store",
        str(done.store_dir),
        "--vault",
        str(done.vault_path),
    ]
    code, out = _run(capsys, "memory", "externalize", "dreta", *where, "--json")
    assert code == 0 and {c["sentence"] for c in out["claims"]} >= {"The capital of Dreta is Fopestox."}
    code, out = _run(capsys, "memory", "proposals", *where, "--json")
    assert code == 0 and out == {"proposals": [], "applied": []}
    with PlaintextMemory(done.vault_path) as vault:
        vault.add("news/grese", "The Grese River flows into the Stedo Sea.", title="news")
    code, out = _run(capsys, "memory", "conflicts", "--check", *where, "--json")
    assert code == 0
    assert [(c["subject"], c["module_says"]) for c in out["found"]] == [("Grese River", "Quaestoul Sea")]
    assert "conflict/dreta@1.0.0/news/grese" in {c["review_doc_id"] for c in out["conflicts"]}


def test_cli_internalize_gate_failure_exits_15(
    default_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n\nThe capital of Vothmar is Kelsiburg. Vothmar's official language is Moqese.\n")
    code, out = _run(
        capsys, "memory", "internalize", str(doc), "--steps", "1", "--model", str(default_model_dir),
        "--store", str(tmp_path / "store"), "--vault", str(tmp_path / "v.db"), "--json",
    )  # fmt: skip
    assert code == 15
    assert out["registered"] is False and out["error"]["type"] == "RecallGateError"
    assert out["cube_id"] == "plain.doc_notes" and out["facts"] == 2
    with CubeStore(tmp_path / "store") as store:
        assert store.list() == []
    assert all_facts([parse_document(doc.read_text(), doc_id="n")])[0].target == "Kelsiburg"
