"""What a task is: questions in a compact text format, a ground-truth solver, and a coded expert.

The coded expert H plays the human of Christiano et al. 2018: it answers directly only at or
below `base_size`, and otherwise knows how to split a question into two subquestions
(`fan_out`) and how to combine the two subanswers (`fan_in`). A fan-in may itself return a
Split when the next subquestions depend on the first answers. The expert never calls `solve`.

Question and answer strings use only the characters of `QUESTION_CHARS`; the characters the
prompt format reserves (see `ida_ray.prompts`) never appear in them.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod

from ida_ray.errors import ExpertCannotAnswer, MalformedQuestion
from ida_ray.steps import Answer, Split, Step

# Shared by every task, so one tokenizer serves them all.
QUESTION_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz,;+-*<>|()#."


class Task(ABC):
    name: str
    base_size: int  # the expert answers directly at or below this size
    default_sizes: tuple[int, ...]  # sizes trained and evaluated by default
    natural_language: bool = False  # questions in English: shown to M in the chat prompt format only

    # -- the question distribution -------------------------------------------------
    @abstractmethod
    def generate(self, size: int, rng: random.Random) -> str:
        """A random question of the given size, in the task's text format."""

    @abstractmethod
    def parse(self, question: str):
        """Structured form of a question; raises MalformedQuestion on anything else."""

    @abstractmethod
    def size(self, question: str) -> int:
        """The size of a (well-formed) question."""

    @abstractmethod
    def solve(self, question: str) -> str:
        """Ground truth. Used for evaluation and tests, and for training labels only in the
        supervised baseline (amplify.answer_labels: ground_truth), never in IDA."""

    def every_question(self, size: int) -> list[str] | None:
        """Every question of `size` the task can ask, where there are few enough to grade them
        all (`ida-ray eval --every-question`); None (the default) where the space is too large
        to list, or the task does not say."""
        return None

    def is_correct(self, question: str, answer: str | None) -> bool:
        """How an answer is graded (evaluation and the viewer, never training): exact equality
        with `solve` by default. Override for a normalised comparison (case, whitespace), a
        numeric tolerance, or any check of the task's own."""
        return answer is not None and answer == self.solve(question)

    def is_valid_answer(self, question: str, answer: str) -> bool:
        """Whether `answer` is well-formed (not necessarily right) for `question`."""
        return bool(answer) and all(c in QUESTION_CHARS for c in answer)

    # -- the coded expert H ----------------------------------------------------------
    @abstractmethod
    def _direct_answer(self, question: str) -> str:
        """H(q) for a question at or below base size."""

    @abstractmethod
    def _split(self, question: str) -> Split:
        """H_fan_out(q) for a question above base size."""

    @abstractmethod
    def _combine(self, question: str, sub: tuple[tuple[str, str], tuple[str, str]]) -> Step:
        """H_fan_in(q, (q1, a1), (q2, a2)); sub is in canonical order."""

    def expert_answer(self, question: str) -> str:
        if self.size(question) > self.base_size:
            raise ExpertCannotAnswer(
                f"{self.name}: size {self.size(question)} > base size {self.base_size}: {question!r}")
        return self._direct_answer(question)

    def expert_fan_out(self, question: str) -> Step:
        self.parse(question)
        if self.size(question) <= self.base_size:
            return Answer(self._direct_answer(question))
        return self._split(question)

    def expert_fan_in(self, question: str, sub: tuple[tuple[str, str], tuple[str, str]]) -> Step:
        self.parse(question)
        (q1, a1), (q2, a2) = sorted(sub)
        return self._combine(question, ((q1, a1), (q2, a2)))

    def expert_examples(self, n: int, rng: random.Random) -> list[tuple]:
        """Worked examples of H's steps, shown to a language model playing H (ida_ray/lm_expert.py):
        (kind, question, sub, step) tuples, kind "fan_out" (sub None) or "fan_in". By default
        the coded expert's own steps: n direct answers at the base size, and n questions just
        above it with their split and every fan-in round to the answer. Override to write them
        by hand (a task whose H is a person or a model has no coded expert to make them)."""
        out = []
        for _ in range(n):
            q = self.generate(self.base_size, rng)
            out.append(("fan_out", q, None, self.expert_fan_out(q)))
            q = self.generate(self.base_size + 1, rng)
            step = self.expert_fan_out(q)
            out.append(("fan_out", q, None, step))
            while isinstance(step, Split):
                sub = tuple((s, expert_tree_answer(self, s)) for s in step.questions)
                step = self.expert_fan_in(q, sub)
                out.append(("fan_in", q, sub, step))
        return out

    # -- helpers ---------------------------------------------------------------------
    def check_chars(self, question: str) -> None:
        if not question or any(c not in QUESTION_CHARS for c in question):
            raise MalformedQuestion(f"{self.name}: illegal characters in {question!r}")


def expert_tree_answer(task: Task, question: str, max_depth: int = 64, max_rounds: int = 8) -> str:
    """Run the expert-only HCH tree (H in every role, both branches expanded).

    The reference semantics of the expert: property tests check it equals `task.solve`.
    """
    if max_depth < 0:
        raise RecursionError("expert tree deeper than max_depth")
    step = task.expert_fan_out(question)
    for _ in range(max_rounds):
        if isinstance(step, Answer):
            return step.text
        a1 = expert_tree_answer(task, step.q1, max_depth - 1, max_rounds)
        a2 = expert_tree_answer(task, step.q2, max_depth - 1, max_rounds)
        step = task.expert_fan_in(question, ((step.q1, a1), (step.q2, a2)))
    if isinstance(step, Answer):
        return step.text
    raise RecursionError("expert fan-in did not finish within max_rounds")
