"""The two labelling processes of seed 001, step 2, and the small and large datasets.

* simple  - a human-like expert who answers the whole question at a glance, with a
            systematic, plausible error on one class of inputs (the "human in the room").
* complex - the careful coded expert run as an HCH tree (`expert_tree_answer`): split, answer
            small pieces, combine. It is right wherever the task's expert is right, and it can
            be made to slip now and then (`slip_rate`) so that a judge built on it has to
            measure its own confidence (see `comparisons.py`).

Datasets (seed: "a small dataset where we believe the simple labeling process arrives at the
correct answer; a large dataset that includes the small one and at least a few cases, say 10%
of its size, where the simple process makes a mistake identified by the complex process"):
`small` holds questions where the two labels agree, `errors` those where they differ; the large
set is small + errors, labelled by the complex process. Ground truth (`task.solve`) is never
used to build them; it is used only to check the labellers and to evaluate.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ida_ray.errors import ConfigError, IDAError
from ida_ray.steps import Split, Step
from ida_ray.tasks.base import Task, expert_tree_answer


class SimpleLabeller(ABC):
    """A cheap labeller: answers directly, and is wrong exactly on `errs_on` inputs."""

    description: str

    def __init__(self, task: Task):
        self.task = task

    @abstractmethod
    def label(self, question: str) -> str: ...

    @abstractmethod
    def errs_on(self, question: str) -> bool:
        """The error class: the inputs on which `label` differs from the truth."""


class SumDropsCarryIntoTwenties(SimpleLabeller):
    """Adds the digits left to right in one go, and whenever an addition takes the running
    total from below 20 to 20 or more, forgets the carry into the tens (writes 1x for 2x), so
    that step comes out 10 short. Lists that never reach 20 are added correctly."""

    description = "adds left to right; an addition reaching 20 from below drops its carry (-10)"
    threshold = 20

    def label(self, question: str) -> str:
        total = 0
        for d in self.task.parse(question):
            new = total + d
            if total < self.threshold <= new:
                new -= 10
            total = new
        return str(total)

    def errs_on(self, question: str) -> bool:
        # The running total of non-negative digits starts below 20, so it crosses 20 iff the
        # true sum reaches 20; each crossing loses 10 and nothing gains it back.
        return sum(self.task.parse(question)) >= self.threshold


class PermLosesCountOnLongPowers(SimpleLabeller):
    """Applies the permutation by hand, and on long powers (k >= 5) loses count and stops one
    application short. That gives the right answer anyway when s^(k-1)(x) is a fixed point."""

    description = "applies s only k-1 times when k >= 5"
    long_power = 5

    def label(self, question: str) -> str:
        perm, k, x = self.task.parse(question)
        for _ in range(k - 1 if k >= self.long_power else k):
            x = int(perm[x])
        return str(x)

    def errs_on(self, question: str) -> bool:
        perm, k, x = self.task.parse(question)
        if k < self.long_power:
            return False
        for _ in range(k - 1):
            x = int(perm[x])
        return int(perm[x]) != x  # one more application would have moved it


SIMPLE_LABELLERS: dict[str, type[SimpleLabeller]] = {"sum": SumDropsCarryIntoTwenties,
                                                     "perm": PermLosesCountOnLongPowers}


def simple_labeller(task: Task) -> SimpleLabeller:
    try:
        return SIMPLE_LABELLERS[task.name](task)
    except KeyError:
        raise ConfigError(f"no simple labeller for task {task.name!r}; "
                          f"tasks with one: {sorted(SIMPLE_LABELLERS)}") from None


class _SlippingExpert(Task):
    """The task's coded expert, except that each direct answer is wrong with probability
    `rate` (last character replaced): a careful but fallible person in the HCH tree."""

    def __init__(self, task: Task, rate: float, rng: random.Random):
        self.inner, self.rate, self.rng = task, rate, rng
        self.name, self.base_size, self.default_sizes = task.name, task.base_size, task.default_sizes

    def generate(self, size, rng):
        return self.inner.generate(size, rng)

    def parse(self, question):
        return self.inner.parse(question)

    def size(self, question):
        return self.inner.size(question)

    def solve(self, question):
        return self.inner.solve(question)

    def is_valid_answer(self, question, answer):
        return self.inner.is_valid_answer(question, answer)

    def _direct_answer(self, question: str) -> str:
        answer = self.inner._direct_answer(question)
        if self.rate and self.rng.random() < self.rate:
            last = answer[-1]
            pool = "0123456789" if last.isdigit() else "abcdefghijklmnopqrstuvwxyz"
            answer = answer[:-1] + self.rng.choice([c for c in pool if c != last])
        return answer

    def _split(self, question: str) -> Split:
        return self.inner._split(question)

    def _combine(self, question, sub) -> Step:
        return self.inner._combine(question, sub)


class ComplexLabeller:
    """The amplified answer: the careful expert's HCH tree (both branches expanded)."""

    def __init__(self, task: Task, slip_rate: float = 0.0, seed: int = 0):
        if not 0 <= slip_rate < 1:
            raise ConfigError(f"slip_rate must be in [0, 1), got {slip_rate}")
        self.task = task
        self._expert = _SlippingExpert(task, slip_rate, random.Random(f"complex-{seed}")) if slip_rate else task

    def label(self, question: str) -> str:
        return expert_tree_answer(self._expert, question)


@dataclass(frozen=True)
class Labelled:
    question: str
    simple: str
    complex: str

    @property
    def agree(self) -> bool:
        return self.simple == self.complex


@dataclass
class HonestData:
    small: list[Labelled]  # simple == complex: the trusted set that defines C
    errors: list[Labelled]  # simple != complex: added to the large set
    heldout_agree: list[Labelled] = field(default_factory=list)
    heldout_errors: list[Labelled] = field(default_factory=list)  # where simple errs

    @property
    def large(self) -> list[Labelled]:
        """The large set: defines the likelihood L, labelled by the complex process."""
        return self.small + self.errors


def _draw(task, simple, complex_, sizes, rng, want_agree: int, want_err: int, max_draws: int, seen: set):
    agree, err = [], []
    for _ in range(max_draws):
        if len(agree) >= want_agree and len(err) >= want_err:
            return agree, err
        q = task.generate(rng.choice(sizes), rng)
        if q in seen:
            continue
        item = Labelled(q, simple.label(q), complex_.label(q))
        bucket, want = (agree, want_agree) if item.agree else (err, want_err)
        if len(bucket) < want:
            bucket.append(item)
            seen.add(q)
    raise IDAError(f"found {len(agree)}/{want_agree} agreeing and {len(err)}/{want_err} disagreeing "
                   f"questions in {max_draws} draws: the sizes {sizes} rarely (or never) hit the error class")


def build_datasets(task: Task, simple: SimpleLabeller, complex_: ComplexLabeller, n_small: int,
                   error_fraction: float = 0.1, sizes: tuple[int, ...] = (2, 3, 4), n_heldout: int = 300,
                   seed: int = 0) -> HonestData:
    """Distinct questions throughout: no held-out question appears in training."""
    if n_small < 1 or error_fraction < 0 or n_heldout < 0:
        raise ConfigError("n_small must be >= 1, error_fraction >= 0, n_heldout >= 0")
    rng, seen = random.Random(f"honest-data-{seed}"), set()
    n_err = round(error_fraction * n_small)
    budget = 200 * (n_small + n_err + 2 * n_heldout) + 1000
    small, errors = _draw(task, simple, complex_, sizes, rng, n_small, n_err, budget, seen)
    h_agree, h_err = _draw(task, simple, complex_, sizes, rng, n_heldout, n_heldout, budget, seen)
    return HonestData(small, errors, h_agree, h_err)
