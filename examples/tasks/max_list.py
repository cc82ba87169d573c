"""A task that is not built in: the largest of a list of numbers. "12,7,88,3" -> "88".

Run IDA on it by import path, from the repository root:

    .venv/bin/ida-ray train --config examples/max_list.yaml
    .venv/bin/ida-ray train --task examples.tasks.max_list:MaxOfList --backend local

The coded expert H reads at most `base_size` numbers itself; a longer list it splits into
halves, and its fan-in compares the two halves' maxima (one comparison, an easy step for a
weak expert). Answers are graded as numbers, so "088" counts as "88" (`is_correct`). Every
method below is part of the Task API (docs/TASKS.md).
"""
from __future__ import annotations

import random
import re

from ida_ray.errors import ConfigError, ExpertFailure, MalformedQuestion
from ida_ray.steps import Answer, Split, Step
from ida_ray.tasks import Task

_QUESTION = re.compile(r"^[0-9]{1,2}(,[0-9]{1,2})*$")
_NUMBER = re.compile(r"^[0-9]{1,3}$")


class MaxOfList(Task):
    name = "max"

    def __init__(self, base_size: int = 1, max_value: int = 99):
        if base_size < 1 or not 1 <= max_value <= 99:
            raise ConfigError(f"max: need base_size >= 1 and 1 <= max_value <= 99, got {base_size}, {max_value}")
        self.base_size = base_size
        self.max_value = max_value
        self.default_sizes = tuple(range(1, 4 * base_size + 1))  # up to 4x what the expert reads

    # -- the question distribution ----------------------------------------------------
    def generate(self, size: int, rng: random.Random) -> str:
        if size < 1:
            raise ValueError("size must be >= 1")
        return ",".join(str(rng.randint(0, self.max_value)) for _ in range(size))

    def parse(self, question: str) -> list[int]:
        if not _QUESTION.match(question or ""):
            raise MalformedQuestion(f"max: expected comma-separated numbers 0..99, got {question!r}")
        return [int(x) for x in question.split(",")]

    def size(self, question: str) -> int:
        return len(self.parse(question))

    def solve(self, question: str) -> str:
        return str(max(self.parse(question)))

    # -- answers ------------------------------------------------------------------------
    def is_valid_answer(self, question: str, answer: str) -> bool:
        return bool(_NUMBER.match(answer or ""))

    def is_correct(self, question: str, answer: str | None) -> bool:
        """Graded as a number: leading zeros do not make an answer wrong."""
        return answer is not None and self.is_valid_answer(question, answer) and \
            int(answer) == int(self.solve(question))

    # -- the coded expert H -------------------------------------------------------------
    def _direct_answer(self, question: str) -> str:
        return str(max(self.parse(question)))

    def _split(self, question: str) -> Split:
        numbers = question.split(",")
        half = (len(numbers) + 1) // 2
        return Split(",".join(numbers[:half]), ",".join(numbers[half:]))

    def _combine(self, question: str, sub) -> Step:
        (_, a1), (_, a2) = sub
        for a in (a1, a2):
            if not self.is_valid_answer(question, a):
                raise ExpertFailure(f"max: fan-in got a malformed maximum {a!r}")
        return Answer(str(max(int(a1), int(a2))))
