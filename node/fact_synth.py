"""Generator of the shipped fact file ``node/data/facts.jsonl``.

Run once by a maintainer (``python -m memfed.node.fact_synth``); the *output* is committed, and the
default model's recipe hash covers that file, not this code. Keeping the generator beside the data says
how the facts were made and lets the set be regrown on purpose, never by accident at build time.

The world: countries (capital, language), people (birthplace, profession, employer), companies (founder,
headquarters, product) and rivers (the sea they flow into). Entities are linked (an employer is one of the
companies, a founder one of the people, a birthplace one of the cities), so an edit of one fact has
natural neighbours: other facts about the same subject and other subjects with the same relation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from memfed.node import names
from memfed.node.facts import FACTS_PATH

SEED = 20250101
N_COUNTRIES = 45
N_PEOPLE = 55
N_COMPANIES = 35
N_RIVERS = 40
N_EXTRA_CITIES = 30
N_LANGUAGES = 15
N_SEAS = 8

# Closed-set answers are real words (the model can still only know *which* one from training).
# Professions all start with a consonant so every template can say "a <profession>".
PROFESSIONS = (
    "baker", "carpenter", "cartographer", "painter", "physician", "sculptor", "teacher", "lawyer",
    "potter", "novelist", "botanist", "chemist", "journalist", "tailor", "pilot", "geologist", "librarian",
    "mathematician",
)  # fmt: skip
PRODUCTS = (
    "copper kettles", "wind turbines", "bicycles", "glass lenses", "paper lanterns", "wool blankets",
    "clocks", "telescopes", "ceramic tiles", "sailcloth", "violins", "typewriters", "umbrellas",
    "fishing nets", "candles",
)  # fmt: skip


def generate_records(seed: int = SEED) -> list[dict[str, str]]:
    """All fact records, in a stable order, with ids ``F0001``... and a same-type ``alt_target``."""
    rng = random.Random(seed)
    pool = names.NamePool(rng)

    def fresh(kind: str, n: int) -> list[str]:
        return [pool.fresh(kind) for _ in range(n)]

    countries = fresh("country", N_COUNTRIES)
    capitals = fresh("city", N_COUNTRIES)
    cities = capitals + fresh("city", N_EXTRA_CITIES)
    languages = fresh("language", N_LANGUAGES)
    people = fresh("person", N_PEOPLE)
    companies = fresh("company", N_COMPANIES)
    rivers = fresh("river", N_RIVERS)
    seas = fresh("sea", N_SEAS)
    founders = rng.sample(people, N_COMPANIES)  # one distinct founder per company

    # Values each target type may take; alt_target is drawn from the same list.
    values = {
        "city": cities,
        "language": languages,
        "profession": list(PROFESSIONS),
        "company": companies,
        "person": people,
        "product": list(PRODUCTS),
        "sea": seas,
    }
    triples: list[tuple[str, str, str, str, str]] = []  # subject, relation, target, subject/target type
    for c, cap in zip(countries, capitals, strict=True):
        triples.append((c, "capital", cap, "country", "city"))
        triples.append((c, "language", rng.choice(languages), "country", "language"))
    for p in people:
        triples.append((p, "birthplace", rng.choice(cities), "person", "city"))
        triples.append((p, "profession", rng.choice(PROFESSIONS), "person", "profession"))
        triples.append((p, "employer", rng.choice(companies), "person", "company"))
    for co, founder in zip(companies, founders, strict=True):
        triples.append((co, "founder", founder, "company", "person"))
        triples.append((co, "headquarters", rng.choice(cities), "company", "city"))
        triples.append((co, "product", rng.choice(PRODUCTS), "company", "product"))
    for r in rivers:
        triples.append((r, "sea", rng.choice(seas), "river", "sea"))

    records = []
    for i, (subject, relation, target, s_type, t_type) in enumerate(triples, start=1):
        alt = rng.choice([v for v in values[t_type] if v != target and v != subject])
        records.append(
            {
                "id": f"F{i:04d}",
                "subject": subject,
                "relation": relation,
                "target": target,
                "alt_target": alt,
                "subject_type": s_type,
                "target_type": t_type,
            }
        )
    return records


def write_facts_file(path: Path = FACTS_PATH, seed: int = SEED) -> int:
    """Write the records as JSON lines; returns how many. Changing the file changes the model recipe."""
    records = generate_records(seed)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return len(records)


if __name__ == "__main__":
    print(f"wrote {write_facts_file()} facts to {FACTS_PATH}")
