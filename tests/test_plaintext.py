"""Plaintext memory: versioned FTS5/BM25 index, safe queries, access counting, hot-doc proposals."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfed.errors import InvalidArgumentError, NotFoundError
from memfed.node.facts import open_book_prompt, question_prompt
from memfed.node.plaintext import (
    Hit,
    PlaintextMemory,
    augment_prompt,
    change_fraction,
    fts_query,
)

DOCS = {
    "veltria": ("Veltria", "The capital of Veltria is Quorn. Veltria exports blue glass and salt."),
    "dosage": ("Dosage guide", "Adults take two tablets of Zentrax every morning with water."),
    "orbit": ("Orbit notes", "The moon Pell orbits the planet Ysra once every nine days."),
}


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mem(clock: FakeClock) -> PlaintextMemory:
    m = PlaintextMemory(":memory:", clock=clock)
    for doc_id, (title, text) in DOCS.items():
        m.add(doc_id, text, title=title, tags=("test",), source="unit")
    yield m
    m.close()


def test_add_get_and_metadata(mem: PlaintextMemory) -> None:
    doc = mem.get("dosage")
    assert doc.title == "Dosage guide"
    assert doc.text == DOCS["dosage"][1]
    assert doc.tags == ("test",)
    assert doc.source == "unit"
    assert doc.status == "active"
    assert doc.version == 1
    assert doc.change_fraction == 0.0
    assert len(mem) == 3
    assert [d.doc_id for d in mem.list()] == sorted(DOCS)


def test_versions_record_change_fraction(mem: PlaintextMemory, clock: FakeClock) -> None:
    same = mem.add("veltria", DOCS["veltria"][1], title="Veltria (renamed)")
    assert same.version == 1, "same text: no new version"
    assert same.title == "Veltria (renamed)", "metadata is replaced"

    clock.t += 10
    small = DOCS["veltria"][1].replace("blue glass", "green glass")
    v2 = mem.add("veltria", small, title="Veltria")
    assert v2.version == 2
    assert 0 < v2.change_fraction < 0.1
    v3 = mem.add("veltria", "Completely different words now.", title="Veltria")
    assert v3.version == 3
    assert v3.change_fraction > 0.9

    versions = mem.versions("veltria")
    assert [v.version for v in versions] == [1, 2, 3]
    assert versions[0].text == DOCS["veltria"][1]
    assert versions[0].change_fraction == 0.0
    assert versions[1].change_fraction == pytest.approx(v2.change_fraction)
    assert versions[1].created_at == clock.t


def test_change_fraction() -> None:
    assert change_fraction("a b c", "a b c") == 0.0
    assert change_fraction("a b c", "a  b\nc") == 0.0  # whitespace only
    assert change_fraction("a b c d", "w x y z") == 1.0
    assert change_fraction("a b c d", "a b c e") == pytest.approx(0.25)
    assert change_fraction("", "a") == 1.0


def test_change_fraction_of_a_long_document_with_small_edits() -> None:
    sentences = [f"Sentence {i} says that item {i} weighs {i * 7 % 13} units of salt." for i in range(2000)]
    edited = list(sentences)
    for i in range(0, 2000, 100):
        edited[i] = edited[i].replace("salt", "glass")
    del edited[501]
    fraction = change_fraction(" ".join(sentences), "\n".join(edited))
    words = 11 * 2000
    assert fraction == pytest.approx((2 * 20 + 11) / (2 * words - 11), rel=1e-6)
    assert fraction < 0.05


def test_search_ranks_relevant_document_first(mem: PlaintextMemory) -> None:
    hits = mem.search("What is the capital of Veltria?")
    assert hits[0].doc_id == "veltria"
    assert hits[0].title == "Veltria"
    assert hits[0].text == DOCS["veltria"][1]
    assert "Quorn" in hits[0].snippet
    assert all(isinstance(h, Hit) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    assert mem.search("Zentrax tablets", k=1)[0].doc_id == "dosage"
    assert len(mem.search("the", k=1)) == 1
    assert mem.search("nothing matches xyzzy") == []


def test_search_sees_updates_and_deletes(mem: PlaintextMemory) -> None:
    mem.add("orbit", "The comet Tarn returns every seventy years.", title="Orbit notes")
    assert mem.search("Pell Ysra") == []
    assert mem.search("comet Tarn")[0].doc_id == "orbit"
    mem.delete("orbit")
    assert mem.search("comet Tarn") == []
    with pytest.raises(NotFoundError):
        mem.get("orbit")
    with pytest.raises(NotFoundError):
        mem.versions("orbit")
    with pytest.raises(NotFoundError):
        mem.delete("orbit")


def test_only_active_documents_are_searched_by_default(mem: PlaintextMemory) -> None:
    mem.add("dump", "Zentrax interacts with grapefruit.", title="from weights", status="pending_review")
    mem.set_status("dosage", "archived")
    assert mem.search("Zentrax") == []
    assert {h.doc_id for h in mem.search("Zentrax", status=None)} == {"dump", "dosage"}
    assert [h.doc_id for h in mem.search("Zentrax", status="pending_review")] == ["dump"]
    assert [d.doc_id for d in mem.list(status="archived")] == ["dosage"]
    assert mem.set_status("dosage", "active").status == "active"
    assert [h.doc_id for h in mem.search("Zentrax")] == ["dosage"]


HOSTILE_QUERIES = [
    "AND (",
    '"',
    '""""',
    "(",
    ")",
    "NEAR(a b",
    "*",
    "capital*",
    "^capital",
    "title:Veltria",
    "-Quorn",
    "a OR",
    "NOT",
    "'; DROP TABLE docs; --",
    "{title text}: Quorn",
    "\x00",
    "",
    "   ",
    "Vëltria Ünïcode 東京",
]


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_hostile_queries_do_not_raise(mem: PlaintextMemory, query: str) -> None:
    hits = mem.search(query, k=3)
    assert isinstance(hits, list)
    assert len(mem) == 3


def test_query_operators_are_plain_words(mem: PlaintextMemory) -> None:
    assert fts_query("capital AND (Veltria") == '"capital" OR "and" OR "veltria"'
    assert fts_query('" ( *') is None
    assert mem.search("Veltria AND (")[0].doc_id == "veltria"
    assert mem.search("title:Quorn")[0].doc_id == "veltria"


@settings(max_examples=60, deadline=None)
@given(query=st.text(max_size=60))
def test_any_text_is_a_safe_query(query: str) -> None:
    with PlaintextMemory(":memory:") as m:
        m.add("d", "Quorn is the capital of Veltria.")
        assert isinstance(m.search(query), list)


def test_invalid_arguments(mem: PlaintextMemory) -> None:
    with pytest.raises(InvalidArgumentError):
        mem.add("", "text")
    with pytest.raises(InvalidArgumentError):
        mem.add(" padded ", "text")
    with pytest.raises(InvalidArgumentError):
        mem.add("x", "   ")
    with pytest.raises(InvalidArgumentError):
        mem.add("x", "text", status="live")
    with pytest.raises(InvalidArgumentError):
        mem.add("x", "text", tags="one-string")
    with pytest.raises(InvalidArgumentError):
        mem.set_status("dosage", "gone")
    with pytest.raises(NotFoundError):
        mem.set_status("missing", "archived")
    with pytest.raises(InvalidArgumentError):
        mem.search("x", k=0)
    with pytest.raises(InvalidArgumentError):
        mem.search("x", status="live")
    with pytest.raises(InvalidArgumentError) as info:
        mem.list(status="nope")
    assert info.value.hint


def test_accesses_are_counted_per_hour(mem: PlaintextMemory, clock: FakeClock) -> None:
    t0 = clock.t
    for _ in range(5):
        mem.search("capital of Veltria", k=1)
    mem.get("veltria")
    mem.get("veltria", count_access=False)
    assert mem.access_rate("veltria") == 6.0
    assert mem.access_rate("dosage") == 0.0
    assert mem.access_rate("veltria", window_s=1800) == 12.0  # per hour
    clock.t = t0 + 3601
    assert mem.access_rate("veltria") == 0.0
    assert mem.access_rate("veltria", now=t0) == 6.0
    assert mem.access_rate("veltria", window_s=7200) == 3.0
    with pytest.raises(NotFoundError):
        mem.access_rate("missing")


def test_hot_docs_are_frequent_and_stable(mem: PlaintextMemory, clock: FakeClock) -> None:
    # guide: hot, edited by < 5% -> proposal. orbit: hot but rewritten -> not stable. dosage: hot but
    # archived. A document read rarely is never proposed.
    long_text = " ".join(f"word{i}" for i in range(100))
    mem.add("guide", long_text, title="Guide")
    mem.add("guide", long_text.replace("word7 ", "word7b "), title="Guide")  # 1% change
    mem.add("orbit", "The comet Tarn returns every seventy years.", title="Orbit notes")
    mem.add("rare", "Seldom read.")
    for _ in range(12):
        for doc_id in ("guide", "orbit", "dosage"):
            mem.get(doc_id)
        clock.t += 60
    mem.get("rare")
    mem.set_status("dosage", "archived")

    hot = mem.hot_docs(min_per_hour=10, max_change=0.05)
    assert [h.doc_id for h in hot] == ["guide"]
    assert hot[0].accesses_per_hour == 12.0
    assert hot[0].versions == 2
    assert 0 < hot[0].max_change_fraction < 0.05

    assert {h.doc_id for h in mem.hot_docs(min_per_hour=10, max_change=1.01)} == {"guide", "orbit"}
    assert mem.hot_docs(min_per_hour=13) == []
    assert {h.doc_id for h in mem.hot_docs(min_per_hour=1)} == {"guide", "rare"}
    assert mem.hot_docs(now=clock.t + 2 * 3600) == []


def test_prune_accesses(mem: PlaintextMemory, clock: FakeClock) -> None:
    mem.get("orbit")
    clock.t += 100
    mem.get("orbit")
    assert mem.prune_accesses(older_than_s=50) == 1
    assert mem.access_rate("orbit") == 1.0


def test_augment_prompt_uses_the_open_book_format() -> None:
    hits = [
        Hit("a", "A", "Quorn is the capital\nof Veltria.", "", 2.0),
        Hit("b", "B", "Veltria exports salt.", "", 1.0),
    ]
    prompt = augment_prompt("What is the capital of Veltria?", hits)
    assert prompt == open_book_prompt(
        "Quorn is the capital of Veltria. Veltria exports salt.", "What is the capital of Veltria?"
    )
    short = augment_prompt("Q?", hits, max_chars=25)
    assert short == open_book_prompt("Quorn is the capital of", "Q?")
    assert augment_prompt("Q?", []) == question_prompt("Q?")
    with pytest.raises(InvalidArgumentError):
        augment_prompt(" ", hits)


def test_open_book_searches_and_builds_the_prompt(mem: PlaintextMemory) -> None:
    prompt, hits = mem.open_book("Which moon orbits Ysra?", k=1)
    assert [h.doc_id for h in hits] == ["orbit"]
    assert prompt == open_book_prompt(DOCS["orbit"][1], "Which moon orbits Ysra?")
    assert mem.prompt_with(hits, "Which moon orbits Ysra?") == prompt


def test_file_database_is_wal_and_persists(tmp_path) -> None:
    path = tmp_path / "sub" / "plaintext.db"
    with PlaintextMemory(path) as m:
        m.add("a", "Quorn is the capital of Veltria.", title="t")
        m.add("a", "Quorn is the old capital of Veltria.", title="t")
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    with PlaintextMemory(path) as m:
        assert m.get("a").version == 2
        assert m.search("old capital")[0].doc_id == "a"
        assert len(m.versions("a")) == 2


def test_concurrent_use_from_threads() -> None:
    m = PlaintextMemory(":memory:")
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                m.add(f"t{n}-{i}", f"thread {n} document {i} about Veltria")
                m.search("Veltria document", k=2)
                m.get(f"t{n}-{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(m) == 80
    m.close()
