"""Pieces of one IDA iteration shared by the single-process loop and the Ray coordinator:
drawing the iteration's questions and summarising its trees into metrics."""
from __future__ import annotations

import random
from collections import Counter

from ida_ray.amplify import adversarial_question
from ida_ray.config import IDAConfig
from ida_ray.engine import Engine, gather_limited
from ida_ray.tasks.base import Task
from ida_ray.tree import Tree


async def draw_questions(task: Task, engine: Engine, cfg: IDAConfig, n: int, rng: random.Random,
                         adversarial: bool) -> list[tuple[str, str]]:
    """n (question, source) pairs: the training distribution plus, when `adversarial`,
    a share chosen by the adversary (k candidates, Gumbel-max on predicted weakness)."""
    sizes = cfg.sizes(task)
    n_adv = int(round(n * cfg.amplify.adversarial_fraction)) if adversarial else 0
    plain = [(task.generate(rng.choice(sizes), rng), "train") for _ in range(n - n_adv)]
    seeds = [rng.randrange(2**31) for _ in range(n_adv)]
    adv = await gather_limited([adversarial_question(task, engine, sizes, cfg.amplify, random.Random(s))
                                for s in seeds], cfg.trees_in_flight)
    return plain + [(q, "adversarial") for q in adv]


def tree_metrics(trees: list[Tree]) -> dict:
    """Expert calls per tree, who answered each node, errors by kind, for one batch of trees."""
    amp = [t for t in trees if t.mode == "amplify"]
    who: Counter = Counter()
    errors: Counter = Counter()
    for t in trees:
        if t.error:
            errors[t.error["kind"]] += 1
        for node in t.nodes():
            if node.answered_by:
                who[node.answered_by] += 1
    by_size: dict[int, list[int]] = {}
    for t in amp:
        by_size.setdefault(t.size, []).append(t.expert_calls)
    return {
        "trees": len(trees),
        "amplify_trees": len(amp),
        "trees_failed": sum(1 for t in trees if t.error),
        "expert_calls_per_tree": sum(t.expert_calls for t in amp) / max(1, len(amp)),
        "expert_calls_per_tree_by_size": {s: sum(v) / len(v) for s, v in sorted(by_size.items())},
        "model_calls_per_tree": sum(t.model_calls for t in trees) / max(1, len(trees)),
        "nodes": sum(len(t.nodes()) for t in trees),
        "answered_by": dict(who),
        "errors": dict(errors),
    }
