"""The built-in synthetic task: 3-digit addition as chat instructions.

Why this task: SmolLM2-135M-Instruct answers "What is 347 + 589?" with prose and rarely the right
number zero-shot, yet the skill is learnable from a few hundred short examples on a CPU, and greedy
exact match is an unambiguous metric. Train and held-out problems come from disjoint seeds and the
held-out pairs are removed from the training set, so accuracy measures generalisation.
"""
from __future__ import annotations

import random

SYSTEM = "You are a calculator. Reply with the number only."


def problem(a: int, b: int) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": str(a + b)}]}


def _pairs(n: int, seed: int, exclude: set = frozenset()) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        pair = (rng.randint(100, 999), rng.randint(100, 999))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def addition_splits(num_train: int, num_val: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train/held-out addition problems as chat ``messages`` records."""
    val = _pairs(num_val, seed + 1_000_003)
    train = _pairs(num_train, seed, exclude=set(val))
    return [problem(a, b) for a, b in train], [problem(a, b) for a, b in val]
