"""Invented proper names for the embedded model's synthetic world.

Every fact the default model learns is about entities that do not exist (Veltria, Quorn, Dravik Works),
so nothing it is taught clashes with knowledge a real model might carry, and an edit cube made against it
can never be "confirmed" by accident. The same generator makes the *reading* entities of the open-book
training data, always excluding the names used by the shipped facts.

Names are built from syllables with a seeded ``random.Random``: the same seed gives the same names on
every machine and Python version (``random.Random`` with an int seed is stable across versions).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

# Syllable inventory. Chosen to give pronounceable, clearly non-English names that byte-level BPE splits
# into a handful of pieces, so unseen names still tokenize into pieces the model has seen.
_ONSETS = (
    "b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "sk",
    "st", "t", "th", "tr", "v", "w", "z",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "i", "ae", "ei", "ou")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "th", "nd", "rn", "m", "x")

PLACE_SUFFIXES = ("ia", "a", "land", "ora", "eth", "mar", "is", "und")
CITY_SUFFIXES = ("", "", "", "", "burg", "holm", "port", "ford", "mere", "wick", "ton", "vale")
LANGUAGE_SUFFIXES = ("ish", "ic", "ese", "an", "i")
COMPANY_SUFFIXES = ("Works", "Industries", "Group", "Labs", "Foundry", "Holdings", "Mills", "Systems")


def _syllable(rng: random.Random, *, coda: bool) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if coda else "")


def root(rng: random.Random, *, long_odds: float = 0.25) -> str:
    """A capitalised nonsense word of 2 syllables, 3 with probability ``long_odds``.

    Only the last syllable may carry a coda. Short names keep facts a few tokens long: cheaper to train,
    and closer to the one- or two-token names real editing benchmarks mostly use.
    """
    n = 3 if rng.random() < long_odds else 2
    parts = [_syllable(rng, coda=False) for _ in range(n - 1)]
    parts.append(_syllable(rng, coda=True))
    return "".join(parts).capitalize()


def _join(stem: str, suffix: str) -> str:
    """Glue a suffix on, dropping the stem's final vowels before a vowel ("Paetri" + "ia" -> "Paetria")."""
    if suffix and suffix[0] in _VOWEL_LETTERS:
        stem = stem.rstrip(_VOWEL_LETTERS) or stem
    return stem + suffix


_VOWEL_LETTERS = "aeiou"


def country(rng: random.Random) -> str:
    return _join(root(rng, long_odds=0.0), rng.choice(PLACE_SUFFIXES))


def city(rng: random.Random) -> str:
    suffix = rng.choice(CITY_SUFFIXES)
    return _join(root(rng, long_odds=0.0 if suffix else 0.4), suffix)


def language(rng: random.Random) -> str:
    return _join(root(rng, long_odds=0.0), rng.choice(LANGUAGE_SUFFIXES))


def person(rng: random.Random) -> str:
    return f"{root(rng, long_odds=0.0)} {root(rng)}"


def company(rng: random.Random) -> str:
    return f"{root(rng)} {rng.choice(COMPANY_SUFFIXES)}"


def river(rng: random.Random) -> str:
    return f"{root(rng)} River"


def sea(rng: random.Random) -> str:
    return f"{root(rng)} Sea"


# Name makers per entity type, so callers can ask for "a fresh city" without knowing the recipe.
MAKERS: dict[str, Callable[[random.Random], str]] = {
    "country": country,
    "city": city,
    "language": language,
    "person": person,
    "company": company,
    "river": river,
    "sea": sea,
}


def _words(name: str) -> set[str]:
    return {w.lower() for w in name.split()}


class NamePool:
    """Draws fresh, mutually distinct names, never one already taken.

    Distinctness is checked on the *distinguishing word* of each name as well (the "Dravik" of "Dravik
    Works"), so a passage never holds two entities a reader could only tell apart by their suffix.
    """

    def __init__(self, rng: random.Random, taken: Iterable[str] = ()) -> None:
        self._rng = rng
        self._taken: set[str] = set()
        self._taken_words: set[str] = set()
        for name in taken:
            self.reserve(name)

    def reserve(self, name: str) -> None:
        self._taken.add(name.lower())
        self._taken_words |= _words(name) - _GENERIC_WORDS

    def fresh(self, kind: str) -> str:
        make = MAKERS[kind]
        for _ in range(10_000):
            name = make(self._rng)
            words = _words(name) - _GENERIC_WORDS
            if name.lower() not in self._taken and not (words & self._taken_words):
                self.reserve(name)
                return name
        raise RuntimeError(f"name space for {kind!r} exhausted")  # pragma: no cover - needs ~10^5 names


# Suffix words shared by many names; they do not make two names distinct.
_GENERIC_WORDS = {w.lower() for w in (*COMPANY_SUFFIXES, "River", "Sea")}
