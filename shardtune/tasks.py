"""Builtin tasks: small data sets generated deterministically by code, each with an exact-match scorer.

A task turns a seeded ``random.Random`` into ``(prompt, completion)`` pairs. Nothing is downloaded and
no data file is committed: ``data.task: reverse`` in a recipe generates ``data.num_samples`` training
pairs and ``data.eval_samples`` held-out pairs from disjoint seeds.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]

    def generate(self, n: int, seed: int) -> list[tuple[str, str]]:
        rng = random.Random(f"{self.name}:{seed}")
        return [self.make(rng) for _ in range(n)]


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


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("reverse", "reverse a short string of letters a-f (tiny models learn it)", _reverse),
        Task("repeat", "write a short string of letters x-z twice (the easiest smoke task)", _repeat),
        Task(
            "date_format",
            "rewrite an ISO date as DD/MM/YYYY (SmolLM2-135M: ~0% before tuning; the quickstart)",
            _date_format,
        ),
        Task("addition", "add two 3-digit numbers, answer with the number only", _addition),
    )
}
