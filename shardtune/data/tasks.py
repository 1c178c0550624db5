"""Builtin tasks: small data sets generated deterministically by code, each with an exact-match scorer.

A task turns a seeded ``random.Random`` into ``(prompt, completion)`` pairs. Nothing is downloaded and
no data file is committed: ``data.task: reverse`` in a recipe generates ``data.num_samples`` training
pairs and ``data.eval_samples`` held-out pairs from disjoint seeds.

What "held-out" means depends on the task (``Task.heldout``):

* ``seed`` — held-out items come from another seed; on a small input space some may also be trained on
  (the first tasks: reverse, repeat, date_format, addition).
* ``new`` — held-out inputs are never in the training set (checked, not hoped for): the score measures
  whether the adapter learned a rule (``sort``, ``translate``).
* ``recall`` — a memorisation task: every item is trained on, and the "held-out" items are a seeded
  sample of the *training* items asked again word for word; the score is exact recall, i.e. how many
  facts the adapter stored (``facts``). There is nothing unseen to generalise to, so the held-out loss
  of such a run is the loss on trained items.

:meth:`Task.split` also gives a third, validation set (for choosing a learning rate without looking at
the scored items): new inputs disjoint from both for ``new`` tasks, another sample of the training
items for ``recall`` tasks.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from shardtune.core.catalog import TASKS as DESCRIPTIONS
from shardtune.core.errors import BadInput

Pair = tuple[str, str]
HELDOUT_SEED_OFFSET = 1_000_003  # held-out items: this much past data.seed
VALIDATION_SEED_OFFSET = 2_000_003


@dataclass(frozen=True)
class Split:
    train: list[Pair]
    held: list[Pair]
    validation: list[Pair]


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[random.Random], Pair]
    heldout: Literal["seed", "new", "recall"] = "seed"
    unique: bool = False  # no prompt twice within one generated list

    def generate(self, n: int, seed: int, exclude: frozenset[str] | set[str] = frozenset()) -> list[Pair]:
        """``n`` items from ``seed``; with ``unique`` (or ``exclude``) prompts repeat nowhere (nor
        appear in ``exclude``)."""
        rng = random.Random(f"{self.name}:{seed}")
        if not self.unique and not exclude:
            return [self.make(rng) for _ in range(n)]
        seen, out = set(exclude), []
        # A small input space runs out: once twice as many draws as items seen so far (and at least
        # 10,000) brought nothing new, it has (the last items of a space of N take about N draws):
        # say so instead of drawing for ever.
        misses = 0
        while len(out) < n and misses <= max(10_000, 2 * len(seen)):
            prompt, completion = self.make(rng)
            if prompt in seen:
                misses += 1
                continue
            seen.add(prompt)
            out.append((prompt, completion))
            misses = 0
        if len(out) < n:
            raise BadInput(
                f"data.task: {self.name} has fewer than {n:,} distinct items to generate (it ran out "
                f"after {len(out):,}{' beside the ones excluded' if exclude else ''}); ask for fewer"
            )
        return out

    def split(self, n_train: int, n_eval: int, seed: int, n_validation: int = 0) -> Split:
        """Training, held-out and validation items (see the module docstring for what held-out means)."""
        train = self.generate(n_train, seed)
        if self.heldout == "recall":
            if max(n_eval, n_validation) > n_train:
                raise BadInput(
                    f"data.eval_samples: {self.name} asks trained facts again; {max(n_eval, n_validation)} "
                    f"is more than the {n_train} facts (data.num_samples)"
                )
            held = random.Random(f"{self.name}:recall:{seed}").sample(train, n_eval)
            asked = set(held)
            rest = [item for item in train if item not in asked]  # disjoint from held when there are enough
            pool = rest if len(rest) >= n_validation else train
            val = random.Random(f"{self.name}:validation:{seed}").sample(pool, n_validation)
            return Split(train, held, val)
        if self.heldout == "seed":
            held = self.generate(n_eval, seed + HELDOUT_SEED_OFFSET)
            val = self.generate(n_validation, seed + VALIDATION_SEED_OFFSET)
            return Split(train, held, val)
        seen = {p for p, _ in train}
        held = self.generate(n_eval, seed + HELDOUT_SEED_OFFSET, exclude=seen)
        seen |= {p for p, _ in held}
        return Split(train, held, self.generate(n_validation, seed + VALIDATION_SEED_OFFSET, exclude=seen))


def exact_match(prediction: str, completion: str) -> bool:
    """The scorer of every builtin task: the first line of the answer equals the expected completion."""
    first = prediction.strip().splitlines()[0].strip() if prediction.strip() else ""
    return first == completion.strip()


def contains(prediction: str, completion: str) -> bool:
    """The answer holds the expected completion anywhere (case and surrounding spaces kept)."""
    return completion.strip() in prediction


METRICS = {"exact": exact_match, "contains": contains}


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 6)))
    return f"reverse {word} =", f" {word[::-1]}"


def _repeat(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("xyz") for _ in range(rng.randint(2, 4)))
    return f"twice {word} =", f" {word}{word}"


def _date_format(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return (
        f"Convert the date {year}-{month:02d}-{day:02d} to DD/MM/YYYY format.",
        f"{day:02d}/{month:02d}/{year}",
    )


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "qu", "r", "s", "st"]
_ONSETS += ["t", "th", "v", "vr", "z", "zh"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "x", "k", "m"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


# The attributes of the facts task: 64 invented city names, the same for every seed (a model that
# has learnt the format but not a fact guesses right 1 time in 64).
_CITY_RNG = random.Random("facts:cities")
FACT_CITIES = sorted({_word(_CITY_RNG, 2).capitalize() for _ in range(200)})[:64]


def _fact(rng: random.Random) -> Pair:
    person = f"{_word(rng, 2).capitalize()} {_word(rng, rng.randint(2, 3)).capitalize()}"
    return f"Where was {person} born?", rng.choice(FACT_CITIES)


def _sort(rng: random.Random) -> Pair:
    numbers = [rng.randint(10, 99) for _ in range(rng.randint(5, 7))]
    return (
        f"Sort these numbers from smallest to largest: {' '.join(map(str, numbers))}",
        " ".join(map(str, sorted(numbers))),
    )


# The lexicon of the translate task: 80 invented one-syllable words, each with its own invented
# translation (no two words share one, no word is its own), the same for every seed.
_LEXICON_RNG = random.Random("translate:lexicon")
_SYLLABLES = sorted({_word(_LEXICON_RNG, 1) for _ in range(5000)})
_LEXICON_RNG.shuffle(_SYLLABLES)
LEXICON = dict(zip(_SYLLABLES[:80], _SYLLABLES[80:160], strict=True))
_LEXICON_WORDS = sorted(LEXICON)


def _translate(rng: random.Random) -> Pair:
    words = [rng.choice(_LEXICON_WORDS) for _ in range(rng.randint(3, 4))]
    return f"translate {' '.join(words)} =", " " + " ".join(LEXICON[w] for w in words)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("reverse", DESCRIPTIONS["reverse"], _reverse),
        Task("repeat", DESCRIPTIONS["repeat"], _repeat),
        Task(
            "date_format",
            DESCRIPTIONS["date_format"],
            _date_format,
        ),
        Task("addition", DESCRIPTIONS["addition"], _addition),
        Task(
            "facts",
            DESCRIPTIONS["facts"],
            _fact,
            heldout="recall",
            unique=True,
        ),
        Task(
            "sort",
            DESCRIPTIONS["sort"],
            _sort,
            heldout="new",
            unique=True,
        ),
        Task(
            "translate",
            DESCRIPTIONS["translate"],
            _translate,
            heldout="new",
            unique=True,
        ),
    )
}
