"""The result of one HCH step: an answer, or two subquestions.

Subquestion pairs are kept in canonical (sorted) order, so every fan-out and fan-in is
symmetric under swapping the two subquestions: the model never sees the same split in two
orders, which is the canonicalisation the algorithm allows in place of training on both.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    text: str


@dataclass(frozen=True)
class Split:
    q1: str
    q2: str

    def __post_init__(self):
        if self.q2 < self.q1:  # canonical order; frozen dataclass, so set via object
            q1, q2 = self.q2, self.q1
            object.__setattr__(self, "q1", q1)
            object.__setattr__(self, "q2", q2)

    @property
    def questions(self) -> tuple[str, str]:
        return (self.q1, self.q2)


Step = Answer | Split
