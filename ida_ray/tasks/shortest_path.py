"""All-pairs shortest paths across a layered graph, by min-plus products.

    "3172,0581"  ->  "3;2;7;3"

A graph has L+1 layers of `width` nodes; each comma-separated group gives the edge weights
(digits) from one layer to the next, row-major: with width 2, "3172" is 0->0: 3, 0->1: 1,
1->0: 7, 1->1: 2. The answer is the width x width matrix of shortest distances from the first
layer to the last, row-major, ';'-separated. Size = L, the number of edge layers.

The expert multiplies at most `base_size` weight matrices itself (min-plus). Above that it splits
the graph at its middle layer into two independent halves and combines their distance matrices
with one min-plus product.
"""
from __future__ import annotations

import random
import re

from ida_ray.errors import ConfigError, ExpertFailure, MalformedQuestion
from ida_ray.steps import Answer, Split, Step
from ida_ray.tasks.base import Task

_NUMBER = re.compile(r"^(0|[1-9][0-9]*)$")

Matrix = list[list[int]]


def min_plus(x: Matrix, y: Matrix) -> Matrix:
    """(x (min,+) y)[i][j] = min_t x[i][t] + y[t][j]."""
    return [[min(x[i][t] + y[t][j] for t in range(len(y))) for j in range(len(y[0]))] for i in range(len(x))]


class ShortestPath(Task):
    name = "path"

    def __init__(self, base_size: int = 2, width: int = 2):
        if base_size < 1:
            raise ConfigError("path: base_size must be >= 1")
        if not 2 <= width <= 3:
            raise ConfigError("path: width must be 2 or 3 (questions must stay short)")
        self.base_size = base_size
        self.width = width
        self.default_sizes = tuple(range(1, 4 * base_size + 1))
        self._layer = re.compile(rf"^[0-9]{{{width * width}}}$")

    def generate(self, size: int, rng: random.Random) -> str:
        if size < 1:
            raise ValueError("size must be >= 1")
        return ",".join("".join(str(rng.randrange(10)) for _ in range(self.width ** 2)) for _ in range(size))

    def parse(self, question: str) -> list[Matrix]:
        """The weight matrices, one per edge layer."""
        layers = (question or "").split(",")
        if not question or not all(self._layer.match(layer) for layer in layers):
            raise MalformedQuestion(f"path: expected comma-separated groups of {self.width ** 2} digit weights "
                                    f"like {'3172,0581' if self.width == 2 else '317205819,923401877'}, "
                                    f"got {question!r}")
        w = self.width
        return [[[int(layer[i * w + j]) for j in range(w)] for i in range(w)] for layer in layers]

    def size(self, question: str) -> int:
        return len(self.parse(question))

    def _format_answer(self, m: Matrix) -> str:
        return ";".join(str(v) for row in m for v in row)

    def _parse_answer(self, answer: str) -> Matrix | None:
        """The distance matrix an answer encodes, or None if it is not well-formed."""
        parts = (answer or "").split(";")
        if len(parts) != self.width ** 2 or not all(_NUMBER.match(p) for p in parts):
            return None
        w = self.width
        return [[int(parts[i * w + j]) for j in range(w)] for i in range(w)]

    def _distances(self, question: str) -> str:
        layers = self.parse(question)
        dist = layers[0]
        for layer in layers[1:]:
            dist = min_plus(dist, layer)
        return self._format_answer(dist)

    def solve(self, question: str) -> str:
        return self._distances(question)

    def is_valid_answer(self, question: str, answer: str) -> bool:
        m = self._parse_answer(answer)
        if m is None:
            return False
        try:
            longest = 9 * self.size(question)
        except MalformedQuestion:
            return True  # no question to bound the distances by: the matrix is well-formed
        return all(v <= longest for row in m for v in row)

    # -- expert ----------------------------------------------------------------------
    def _direct_answer(self, question: str) -> str:
        return self._distances(question)

    @staticmethod
    def _halves(question: str) -> tuple[str, str]:
        layers = question.split(",")
        half = (len(layers) + 1) // 2
        return ",".join(layers[:half]), ",".join(layers[half:])

    def _split(self, question: str) -> Split:
        return Split(*self._halves(question))

    def _combine(self, question, sub) -> Step:
        self.parse(question)
        first, second = self._halves(question)
        (q1, a1), (q2, a2) = sub
        if (q1, q2) == (second, first):
            (q1, a1), (q2, a2) = (q2, a2), (q1, a1)
        if (q1, q2) != (first, second):
            raise ExpertFailure(f"path: expected the halves {first!r} and {second!r} of {question!r}, "
                                f"got {q1!r} and {q2!r}")
        m1, m2 = self._parse_answer(a1), self._parse_answer(a2)
        if m1 is None or m2 is None:
            raise ExpertFailure(f"path: fan-in got a malformed distance matrix in {a1!r}, {a2!r}")
        return Answer(self._format_answer(min_plus(m1, m2)))
