"""Permutation powering: "30142*5(3)" -> s^5(3), where s = 30142 maps i to the i-th digit.

Size = the exponent k. The expert applies s at most `base_size` times itself. Above that it
splits k = a + b with a < b (a = (k-1)//2, so the two exponents always differ) and works in
two rounds, the second depending on the first answers:

    round 1   Split(s*a(x), s*b(x))                 -> ya = s^a(x), yb = s^b(x)
    fan-in 1  ya == x: answer yb;  yb == x: answer ya
              else Split(s*b(ya), s*a(yb))          (both equal s^k(x): a cross-check pair)
    fan-in 2  answer s^b(ya)

The fan-in is stateless (it sees only the current round), so it tells the rounds apart by the
start points: round 1 starts both subquestions at x, round 2 starts neither at x (it is only
issued when ya != x and yb != x).
"""
from __future__ import annotations

import random
import re

from ida_ray.errors import ConfigError, ExpertFailure, MalformedQuestion
from ida_ray.steps import Answer, Split, Step
from ida_ray.tasks.base import Task

_QUESTION = re.compile(r"^([0-9]+)\*([1-9][0-9]*)\(([0-9])\)$")
_DIGIT = re.compile(r"^[0-9]$")


def _format(perm: str, k: int, x: int) -> str:
    return f"{perm}*{k}({x})"


def _exponents(k: int) -> tuple[int, int]:
    """The round-1 split k = a + b, a < b."""
    a = (k - 1) // 2
    return a, k - a


class PermPower(Task):
    name = "perm"

    def __init__(self, base_size: int = 2, n: int = 5):
        if base_size < 2:  # so that k > base splits into two different exponents a, b >= 1
            raise ConfigError("perm: base_size must be >= 2")
        if not 2 <= n <= 10:
            raise ConfigError("perm: n must be in 2..10 (elements are single digits)")
        self.base_size = base_size
        self.n = n
        self.default_sizes = tuple(range(1, 4 * base_size + 1))

    def generate(self, size: int, rng: random.Random) -> str:
        if size < 1:
            raise ValueError("size must be >= 1")
        perm = list(range(self.n))
        rng.shuffle(perm)
        return _format("".join(map(str, perm)), size, rng.randrange(self.n))

    def parse(self, question: str) -> tuple[str, int, int]:
        """(permutation string, exponent k, point x)."""
        m = _QUESTION.match(question or "")
        if not m:
            raise MalformedQuestion(f"perm: expected <permutation>*<k>(<x>) like 30142*5(3), got {question!r}")
        perm, k, x = m.group(1), int(m.group(2)), int(m.group(3))
        if sorted(perm) != [str(i) for i in range(len(perm))]:
            raise MalformedQuestion(f"perm: {perm!r} is not a permutation of 0..{len(perm) - 1}")
        if x >= len(perm):
            raise MalformedQuestion(f"perm: point {x} is outside 0..{len(perm) - 1}")
        return perm, k, x

    def size(self, question: str) -> int:
        return self.parse(question)[1]

    def solve(self, question: str) -> str:
        perm, k, x = self.parse(question)
        # Along x's cycle: s^k(x) = orbit[k mod its length], so the exponent of a subquestion a
        # model made up (any number of digits) costs nothing (the supervised arm solves those).
        orbit = [x]
        while (y := int(perm[orbit[-1]])) != x:
            orbit.append(y)
        return str(orbit[k % len(orbit)])

    def is_valid_answer(self, question: str, answer: str) -> bool:
        if not _DIGIT.match(answer or ""):
            return False
        try:
            return int(answer) < len(self.parse(question)[0])
        except MalformedQuestion:
            return True  # no question to check the range against: the digit is well-formed

    # -- expert ----------------------------------------------------------------------
    def _direct_answer(self, question: str) -> str:
        perm, k, x = self.parse(question)
        for _ in range(k):
            x = int(perm[x])
        return str(x)

    def _split(self, question: str) -> Split:
        perm, k, x = self.parse(question)
        a, b = _exponents(k)
        return Split(_format(perm, a, x), _format(perm, b, x))

    def _combine(self, question, sub) -> Step:
        perm, k, x = self.parse(question)
        a, b = _exponents(k)
        parts = []
        for q_i, a_i in sub:
            try:
                p_i, k_i, x_i = self.parse(q_i)
            except MalformedQuestion as exc:
                raise ExpertFailure(f"perm: fan-in got a malformed subquestion: {exc}") from exc
            if not self.is_valid_answer(q_i, a_i):
                raise ExpertFailure(f"perm: fan-in got a malformed subanswer {a_i!r} for {q_i!r}")
            if p_i != perm:
                raise ExpertFailure(f"perm: subquestion {q_i!r} is about another permutation than {question!r}")
            parts.append((k_i, x_i, int(a_i)))
        by_exponent = {k_i: (start, end) for k_i, start, end in parts}
        if sorted(by_exponent) != [a, b]:
            raise ExpertFailure(f"perm: expected subquestions with exponents {a} and {b} for {question!r}, "
                                f"got {[q for q, _ in sub]}")
        (start_a, end_a), (start_b, end_b) = by_exponent[a], by_exponent[b]
        if start_a == x and start_b == x:  # round 1: end_a = s^a(x), end_b = s^b(x)
            if end_a == x:  # s^k(x) = s^b(s^a(x)) = s^b(x)
                return Answer(str(end_b))
            if end_b == x:
                return Answer(str(end_a))
            return Split(_format(perm, b, end_a), _format(perm, a, end_b))
        if start_a != x and start_b != x:  # round 2: s^b(s^a(x)) and s^a(s^b(x)), both s^k(x)
            return Answer(str(end_b))
        raise ExpertFailure(f"perm: subquestions {[q for q, _ in sub]} are neither round of {question!r}")
