"""Sum of a list of digits: "3,5,7,1" -> "16". Size = list length.

The expert adds at most `base_size` digits itself; longer lists are split in two and the two
partial sums added (the fan-in adds two numbers, an easy step for a weak expert). `split`:
"halves" (the two subquestions about as hard), or "uneven" (the first `base_size` digits and
the rest: one subquestion the model soon answers, one as hard as the question less a digit),
the case where the adversary's choice of the branch to expand should matter.
"""
from __future__ import annotations

import itertools
import random
import re

from ida_ray.errors import ExpertFailure, MalformedQuestion
from ida_ray.steps import Answer, Split, Step
from ida_ray.tasks.base import Task

_QUESTION = re.compile(r"^[0-9](,[0-9])*$")
_NUMBER = re.compile(r"^(0|[1-9][0-9]*)$")
EVERY_QUESTION_LIMIT = 100_000  # the most questions of one size `every_question` lists


class SumList(Task):
    name = "sum"

    def __init__(self, base_size: int = 2, max_digit: int = 9, split: str = "halves"):
        from ida_ray.errors import ConfigError

        if base_size < 1 or not 1 <= max_digit <= 9:
            raise ConfigError(f"sum: need base_size >= 1 and 1 <= max_digit <= 9, got {base_size}, {max_digit}")
        if split not in ("halves", "uneven"):
            raise ConfigError(f"sum: split must be 'halves' or 'uneven', got {split!r}")
        self.base_size = base_size
        self.split = split
        self.max_digit = max_digit  # max_digit=1 makes it counting ones, an easier function to learn
        self.default_sizes = tuple(range(1, 4 * base_size + 1))

    def generate(self, size: int, rng: random.Random) -> str:
        if size < 1:
            raise ValueError("size must be >= 1")
        return ",".join(str(rng.randint(0, self.max_digit)) for _ in range(size))

    def every_question(self, size: int) -> list[str] | None:
        if size < 1 or (self.max_digit + 1) ** size > EVERY_QUESTION_LIMIT:
            return None
        return [",".join(map(str, digits)) for digits in itertools.product(range(self.max_digit + 1), repeat=size)]

    def parse(self, question: str) -> list[int]:
        if not _QUESTION.match(question or ""):
            raise MalformedQuestion(f"sum: expected comma-separated digits, got {question!r}")
        return [int(c) for c in question.split(",")]

    def size(self, question: str) -> int:
        return len(self.parse(question))

    def solve(self, question: str) -> str:
        return str(sum(self.parse(question)))

    def is_valid_answer(self, question: str, answer: str) -> bool:
        return bool(_NUMBER.match(answer or ""))

    def _direct_answer(self, question: str) -> str:
        return str(sum(self.parse(question)))

    def _split(self, question: str) -> Split:
        digits = question.split(",")
        cut = self.base_size if self.split == "uneven" else (len(digits) + 1) // 2
        return Split(",".join(digits[:cut]), ",".join(digits[cut:]))

    def _combine(self, question, sub) -> Step:
        (_, a1), (_, a2) = sub
        for a in (a1, a2):
            if not self.is_valid_answer(question, a):
                raise ExpertFailure(f"sum: fan-in got a malformed partial sum {a!r}")
        return Answer(str(int(a1) + int(a2)))
