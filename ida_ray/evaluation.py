"""Held-out evaluation: the model alone answers questions of each size (greedy), scored
against the task's ground-truth solver. Evaluation only: no label reaches training."""
from __future__ import annotations

import random

from ida_ray.engine import Engine
from ida_ray.errors import ParseError
from ida_ray.prompts import COMPACT, PromptFormat
from ida_ray.tasks.base import Task


def heldout_questions(task: Task, sizes, per_size: int, seed: int) -> dict[int, list[str]]:
    # A seed stream disjoint from training draws (training uses seed, seed+1, ...).
    rng = random.Random(f"heldout-{task.name}-{seed}")
    return {s: [task.generate(s, rng) for _ in range(per_size)] for s in sizes}


def said_answer(fmt: PromptFormat, text: str) -> str | None:
    """The answer an answer-prompt completion says, or None where it says none."""
    try:
        return fmt.read_answer(text)
    except ParseError:
        return None


async def evaluate(task: Task, engine: Engine, questions: dict[int, list[str]],
                   fmt: PromptFormat = COMPACT) -> dict[int, float]:
    flat = [(s, q) for s, qs in questions.items() for q in qs]
    gens = await engine.generate([fmt.answer_prompt(q) for _, q in flat])
    right: dict[int, list[int]] = {s: [] for s in questions}
    for (s, q), g in zip(flat, gens):
        right[s].append(int(g.finished and task.is_correct(q, said_answer(fmt, g.text))))
    return {s: sum(v) / len(v) for s, v in right.items()}
