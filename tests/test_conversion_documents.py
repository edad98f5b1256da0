"""Conversion without a model: documents, the fact reader, augmentation, source links and proposals."""

from __future__ import annotations

from pathlib import Path

import pytest

from memfed.cube.build import lora_cube
from memfed.mip.v1 import cube_pb2
from memfed.node.conversion.augment import augment, heldout_probes, trained_probes
from memfed.node.conversion.documents import parse_document, parse_fact, shipped_documents
from memfed.node.conversion.internalize import parse_source_ref, probe_keys, source_ref
from memfed.node.conversion.triggers import cube_id_for, next_version, proposals
from memfed.node.facts import fact_names, load_relations
from memfed.node.plaintext import PlaintextMemory
from memfed.node.store import CubeStore
from memfed.node.tiny_models import tiny_llama


def test_shipped_documents_state_new_facts_in_the_model_vocabulary() -> None:
    docs = shipped_documents()
    assert len(docs) == 8
    facts = [f for d in docs for f in d.facts()]
    assert len(facts) == 47
    known = {n.lower() for n in fact_names()}
    relations = load_relations()
    for f in facts:
        assert f.relation in relations
        assert f.subject.lower() not in known, f"{f.subject} is an entity the model was built with"
    assert all(d.title and d.digest.startswith("sha256:") for d in docs)


def test_reader_prefers_the_longest_template_and_joins_wrapped_lines() -> None:
    fact = parse_fact("Vepem Vifi was born in the city of Gobu.")
    assert fact is not None and (fact.relation, fact.target) == ("birthplace", "Gobu")
    assert parse_fact("Pakox Wocaekis's profession is that of a chemist.").target == "chemist"
    assert parse_fact("It rains a lot in spring.") is None
    doc = parse_document(
        "# T\n\nThe birthplace of Pakox\nWocaekis is Saheisko. Filler text here.", doc_id="d"
    )
    assert doc.title == "T"
    assert [f.triple for f in doc.facts()] == [("Pakox Wocaekis", "birthplace", "Saheisko")]


def test_augmentation_rewrites_clozes_and_questions_and_holds_out_other_phrasings() -> None:
    doc = parse_document("In Dreta, the capital is Fopestox. The weather is mild.", doc_id="d")
    items = augment([doc])
    kinds = {i.kind for i in items}
    assert {"sentence", "rewrite", "cloze", "qa"} <= kinds
    texts = {i.text for i in items}
    assert "The capital of Dreta is Fopestox." in texts  # a rewrite in a trained phrasing
    assert "Question: What is the capital of Dreta?\nAnswer: Fopestox" in texts
    probes = heldout_probes(doc.facts(), items)
    prompts = [p.prompt for p in probes]
    # The document itself used the held-out "In X, the capital is": that phrasing is trained now.
    assert "In Dreta, the capital is" not in prompts
    assert "The city that serves as the capital of Dreta is" in prompts
    assert not set(prompts) & {p.prompt for p in trained_probes(doc.facts())}
    assert all(p.answer == "Fopestox" for p in probes)


def test_source_references_round_trip() -> None:
    doc = parse_document("The capital of Dreta is Fopestox.", doc_id="guide/dreta@2025")
    ref = source_ref(doc, 3)
    assert ref == f"plaintext:guide/dreta@2025@v3#{doc.digest}"
    assert parse_source_ref(ref) == ("guide/dreta@2025", doc.digest)
    assert parse_source_ref(source_ref(doc)) == ("guide/dreta@2025", doc.digest)
    assert parse_source_ref("cube:x@1.0.0#sha256:00") is None
    assert probe_keys(cube_pb2.Origin(params={"probe_keys": '[["Dreta", "capital"]]'})) == [
        ("Dreta", "capital")
    ]
    assert probe_keys(cube_pb2.Origin(params={"probe_keys": "not json"})) == []


def _internalized_cube(doc_text: str, doc_id: str, version: str = "1.0.0"):
    """A stand-in for an internalized cube: the origin is what proposals read, the weights do not matter."""
    import torch

    model = tiny_llama()
    doc = parse_document(doc_text, doc_id=doc_id)
    factors = {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 64), torch.zeros(64, 2))}
    origin = cube_pb2.Origin(method="internalize", sources=[source_ref(doc, 1)])
    return lora_cube(model, factors, cube_id=cube_id_for(doc_id), version=version, origin=origin)


def test_proposals_are_hot_stable_and_not_yet_internalized(tmp_path: Path) -> None:
    now = [1_000_000.0]
    text = "The capital of Dreta is Fopestox. " * 20
    with CubeStore(tmp_path / "store") as store, PlaintextMemory(":memory:", clock=lambda: now[0]) as vault:
        vault.add("guide/dreta", text, title="Dreta")
        vault.add("guide/cold", "The capital of Brigis is Dridaekirn.", title="cold")
        for _ in range(12):
            vault.get("guide/dreta")
        vault.get("guide/cold")
        assert [p.doc_id for p in proposals(vault, store)] == ["guide/dreta"]
        assert proposals(vault, store, min_per_hour=20) == []

        cube = _internalized_cube(text, "guide/dreta")
        store.put(cube.manifest, cube.payload)
        assert proposals(vault, store) == []  # internalized in its current form
        assert next_version(store, cube.manifest.cube_id) == "1.1.0"

        vault.add("guide/dreta", text + "Brigis is near.", title="Dreta")  # a small edit: still stable
        assert [p.doc_id for p in proposals(vault, store)] == ["guide/dreta"]
        vault.add("guide/dreta", "Entirely new text about other things.", title="Dreta")
        assert proposals(vault, store) == []  # changed too much to count as stable
        now[0] += 7200
        assert proposals(vault, store) == []  # and no longer read


@pytest.mark.parametrize("doc_id", ["doc/a b", "x", "://"])
def test_cube_ids_for_documents_are_valid(doc_id: str) -> None:
    from memfed.cube.manifest import check_cube_id

    assert check_cube_id(cube_id_for(doc_id)).startswith("plain.")
