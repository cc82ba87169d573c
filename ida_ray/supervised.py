"""The supervised baseline IDA is measured against: the same model spec, trained on the
answer head alone (`answer prompt of q -> task.solve(q)`, in the compact format) with ground-truth labels.

It gets the same optimiser settings (TrainConfig: AdamW, lr, weight decay, gradient clip,
batch size) and is given as many gradient steps x batch size as the IDA run it is compared
with. Each training question is drawn fresh from the same size distribution IDA trains on
(uniform over `sizes`), so the baseline never runs short of data: it is the upper bound a
learner with a perfect expert at every size would reach with that compute. Evaluation uses
the held-out questions of `ida_ray.evaluation`, the same set the IDA loop scores.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import torch

from ida_ray.config import TrainConfig
from ida_ray.engine import TorchEngine
from ida_ray.evaluation import evaluate
from ida_ray.examples import Example
from ida_ray.losses import collate_lm, model_loss
from ida_ray.models import ModelSpec, build_model
from ida_ray.prompts import COMPACT
from ida_ray.tasks.base import Task


def labelled_examples(task: Task, sizes: tuple[int, ...], n: int, rng: random.Random) -> list[Example]:
    """n answer-head examples with ground-truth labels, sizes uniform over `sizes`."""
    if not sizes:
        raise ValueError("sizes must not be empty")
    out = []
    for _ in range(n):
        q = task.generate(rng.choice(sizes), rng)
        out.append(Example("answer", COMPACT.answer_prompt(q), task.solve(q)))
    return out


@dataclass
class SupervisedResult:
    accuracy_by_size: dict[int, float]  # held-out, after the last step
    steps: int
    batch_size: int
    train_examples: int  # steps x batch size
    seconds: float
    loss_history: list[float] = field(default_factory=list)  # mean loss per logged window
    # (steps done, held-out accuracy by size) at each evaluation point, the last included
    checkpoints: list[tuple[int, dict[int, float]]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"accuracy_by_size": self.accuracy_by_size, "steps": self.steps, "batch_size": self.batch_size,
                "train_examples": self.train_examples, "seconds": round(self.seconds, 1),
                "loss_history": [round(x, 4) for x in self.loss_history],
                "checkpoints": [{"steps": s, "accuracy_by_size": a} for s, a in self.checkpoints]}


class SupervisedBaseline:
    """Trains a fresh model (built like the IDA run's, same seed) on ground-truth answers."""

    def __init__(self, task: Task, sizes: tuple[int, ...], spec: ModelSpec, train: TrainConfig, seed: int = 0,
                 max_new_tokens: int = 24):
        if train.batch_size < 1 or train.lr <= 0:
            raise ValueError("train.batch_size must be >= 1 and train.lr > 0")
        self.task, self.sizes, self.cfg = task, tuple(sizes), train
        self.model, self.tokenizer = build_model(spec, seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        # A stream apart from the held-out questions (seeded by name in ida_ray.evaluation).
        self.rng = random.Random(f"supervised-{task.name}-{seed}")
        self.max_new_tokens = max_new_tokens

    def step(self, examples: list[Example]) -> float:
        self.model.train()
        loss = model_loss(self.model, collate_lm(self.tokenizer, examples))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.model.eval()
        return float(loss.detach())

    def evaluate(self, heldout: dict[int, list[str]]) -> dict[int, float]:
        # The engine wraps the live module (no copy): evaluation sees the current weights.
        engine = TorchEngine(self.model, None, self.tokenizer, max_new_tokens=self.max_new_tokens, cache_size=0)
        return asyncio.run(evaluate(self.task, engine, heldout))

    def fit(self, steps: int, heldout: dict[int, list[str]], eval_every: int | None = None,
            log_every: int = 50, log=None) -> SupervisedResult:
        """`steps` gradient steps of batch_size fresh labelled examples; held-out accuracy
        every `eval_every` steps (None: only at the end)."""
        if steps < 0:
            raise ValueError("steps must be >= 0")
        t0, bs = time.time(), self.cfg.batch_size
        result = SupervisedResult({}, steps, bs, steps * bs, 0.0)
        window: list[float] = []
        for i in range(1, steps + 1):
            window.append(self.step(labelled_examples(self.task, self.sizes, bs, self.rng)))
            if i % log_every == 0 or i == steps:
                result.loss_history.append(sum(window) / len(window))
                window = []
            if eval_every and i % eval_every == 0 and i != steps:
                result.checkpoints.append((i, self.evaluate(heldout)))
                if log:
                    log(f"supervised step {i}: acc {_fmt(result.checkpoints[-1][1])}")
        result.accuracy_by_size = self.evaluate(heldout)
        result.checkpoints.append((steps, result.accuracy_by_size))
        result.seconds = time.time() - t0
        if log:
            log(f"supervised done: {steps} steps, acc {_fmt(result.accuracy_by_size)} ({result.seconds:.0f}s)")
        return result


def _fmt(acc: dict[int, float]) -> str:
    return " ".join(f"{s}:{a:.2f}" for s, a in acc.items())
