"""The demo task: two-digit addition, "23+58=" -> "81".

Small enough for a ~2 M-parameter model to learn on a CPU in a minute, yet not a lookup
table: the model has to carry. Every problem is a pair of operands in [0, 100), so prompts
are at most 6 characters and answers at most 3, which keeps rollouts a handful of decode
steps long.

Train and eval problems are disjoint by construction: a fixed hash of the operand pair puts
one pair in ten into the eval split, whatever the seed. The seed only picks which problems
(and in which order) a file holds, so the same seed always writes the same file.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "eval"]

NUM_OPERAND_VALUES = 100  # operands are 0..99
EVAL_EVERY = 10  # one operand pair in ten belongs to the eval split

# Every character a prompt or an answer of the task can contain (the tokenizer's alphabet).
ALPHABET = "0123456789+-*=() "
DIGITS = "0123456789"


@dataclass(frozen=True)
class Problem:
    prompt: str  # e.g. "23+58="
    label: str  # e.g. "81"


def _split_of(a: int, b: int) -> Split:
    # A real hash of the pair: stable across processes (unlike hash()) and unrelated to the sum
    # (a linear mix would send whole answer classes, e.g. every sum ending in 0, to eval).
    digest = hashlib.blake2b(f"{a}+{b}".encode(), digest_size=4).digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_EVERY == 0 else "train"


def problem(a: int, b: int) -> Problem:
    return Problem(prompt=f"{a}+{b}=", label=str(a + b))


def all_problems(split: Split) -> list[Problem]:
    """Every problem of a split, in operand order."""
    return [
        problem(a, b)
        for a in range(NUM_OPERAND_VALUES)
        for b in range(NUM_OPERAND_VALUES)
        if _split_of(a, b) == split
    ]


def sample_problems(n: int, seed: int, split: Split = "train") -> list[Problem]:
    """`n` problems of a split drawn with replacement, deterministic in `seed`."""
    pool = all_problems(split)
    rng = random.Random(f"{seed}:{split}")
    return [pool[rng.randrange(len(pool))] for _ in range(n)]


def write_prompts(path: str | Path, n: int, seed: int, split: Split = "train") -> Path:
    """Write `n` problems as JSONL records {"prompt": ..., "label": ...} (the default data keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in sample_problems(n, seed, split):
            f.write(json.dumps({"prompt": p.prompt, "label": p.label}) + "\n")
    return path
