"""Training loops for the two-headed model: on labels (likelihood mode) or on confident
comparisons (comparison mode). Both draw minibatches with replacement and call
`HonestTrainer.step` once per minibatch."""
from __future__ import annotations

import random
from collections.abc import Callable

import torch

from ida_ray.examples import Example
from ida_ray.honest.comparisons import (
    Comparison,
    ConfidentJudge,
    collate_comparisons,
    collect_comparisons,
    comparison_nll,
)
from ida_ray.honest.labels import Labelled
from ida_ray.honest.objective import HonestTrainer, intended_nll
from ida_ray.losses import collate_lm
from ida_ray.prompts import COMPACT
from ida_ray.tasks.base import Task


def label_examples(items: list[Labelled], label: str = "complex") -> list[Example]:
    """Answer-prompt examples carrying the `label` ("simple" | "complex") of each question."""
    return [Example("answer", COMPACT.answer_prompt(x.question), getattr(x, label)) for x in items]


def fit_likelihood(trainer: HonestTrainer, tokenizer, large: list[Labelled], small: list[Labelled], steps: int,
                   rng: random.Random, log: Callable[[str], None] | None = None, log_every: int = 250) -> None:
    """-L on the large set's complex labels, C on the small set."""
    cfg = trainer.cfg
    large_ex, small_ex = label_examples(large), label_examples(small)
    for t in range(steps):
        big = collate_lm(tokenizer, rng.choices(large_ex, k=cfg.batch_size))
        sm = collate_lm(tokenizer, rng.choices(small_ex, k=cfg.small_batch_size))
        s = trainer.step(lambda m: intended_nll(m, big), sm)
        if log and (t + 1) % log_every == 0:
            log(f"step {t + 1}: -L {s.data_loss:.3f} C {s.c_before:.4f} dC {s.delta_c:+.4f} "
                f"|θ1-θ10|² {s.dist1:.2f} |θ2-θ20|² {s.dist2:.2f}")


def fit_comparisons(trainer: HonestTrainer, tokenizer, task: Task, questions: list[str], small: list[Labelled],
                    judge: ConfidentJudge, rng: random.Random,
                    log: Callable[[str], None] | None = None) -> list[Comparison]:
    """Pretrain on the small trusted set (the seed allows likelihood for pre-training), then
    train on confident verdicts about the model's own answers to `questions` (their labels are
    never used), with fresh answers every `refresh_every` steps, plus `joint_likelihood` times
    the small set's likelihood. Returns every comparison kept."""
    cfg, ccfg = trainer.cfg, trainer.cfg.comparison
    fit_likelihood(trainer, tokenizer, small, small, ccfg.pretrain_steps, rng, log)
    small_ex = label_examples(small)
    kept: dict[tuple[str, str, str], Comparison] = {}
    for t in range(cfg.steps):
        if t % ccfg.refresh_every == 0:
            round_qs = rng.sample(questions, min(ccfg.questions_per_round, len(questions)))
            new = collect_comparisons(trainer.model, tokenizer, round_qs, task, judge, ccfg, seed=rng.randrange(2**31))
            kept.update({(c.question, c.better, c.worse): c for c in new})
            pool = list(kept.values())
            if log:
                log(f"step {t}: {len(new)} confident comparisons this round "
                    f"(judged {judge.judged}, kept {judge.kept} so far); {len(pool)} in the dataset")
        sm = collate_lm(tokenizer, rng.choices(small_ex, k=cfg.small_batch_size))
        batch = collate_comparisons(tokenizer, rng.choices(pool, k=cfg.batch_size)) if pool else None

        def data_loss(m, batch=batch, sm=sm):
            loss = comparison_nll(m, batch, ccfg.beta) if batch is not None else torch.zeros(())
            if ccfg.joint_likelihood:
                loss = loss + ccfg.joint_likelihood * intended_nll(m, sm)
            return loss

        trainer.step(data_loss, sm)
    return list(kept.values())
