"""Confident comparisons (seed 001, step 3): "get pairs of answers from the model and then only
add them to the dataset when we are confident that one of them is better than the other".

* Proposals: for each question, the intended head's greedy answer is compared with every other
  distinct well-formed answer the model gives: the instrumental head's greedy answer,
  `samples` answers sampled from the intended head, and (`amplified`) the answer of the model
  helped by the coded expert, Amp(H, M)(q) (seed: the complex process "may involve consulting
  ML systems for help (as in iterated amplification)"). Without it a model that has never
  produced an answer cannot be shown to be wrong about it: sampling rarely finds it.
* Judge: the complex labelling process, run `judge_runs` times (each run a careful-expert HCH
  tree that may slip, `slip_rate`). An answer's votes are the runs that reach it. A verdict is
  kept only when |votes_a - votes_b| / judge_runs >= `confidence`; with one exact run that means
  exactly one of the two answers is the complex process's answer. Two wrong answers, or a
  split vote, give no data: nothing says which wrong answer is "better".
* Training signal: the likelihood of the kept verdicts under a Bradley-Terry model on the
  intended head, P(better ≻ worse) = sigmoid(beta * (log p(better|q) - log p(worse|q))); its
  negative log is `comparison_nll`, which replaces -L. No answer label is imitated directly.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ida_ray.amplify import amplify_tree
from ida_ray.config import AmplifyConfig
from ida_ray.engine import TorchEngine, gather_limited
from ida_ray.examples import Example
from ida_ray.honest.decoding import decode
from ida_ray.honest.labels import ComplexLabeller
from ida_ray.honest.objective import ComparisonConfig
from ida_ray.honest.two_headed import TwoHeadedLM
from ida_ray.losses import collate_lm, sequence_nll
from ida_ray.prompts import COMPACT
from ida_ray.tasks.base import Task


@dataclass(frozen=True)
class Comparison:
    question: str
    better: str
    worse: str
    confidence: float  # |votes_better - votes_worse| / judge runs


class ConfidentJudge:
    def __init__(self, task: Task, runs: int = 1, slip_rate: float = 0.0, confidence: float = 1.0, seed: int = 0):
        self.task, self.runs, self.confidence = task, runs, confidence
        self.complex = ComplexLabeller(task, slip_rate, seed)
        self.judged = 0
        self.kept = 0

    def votes(self, question: str) -> list[str]:
        """The complex process's answers over `runs` independent runs."""
        return [self.complex.label(question) for _ in range(self.runs)]

    def judge(self, question: str, a: str, b: str, votes: list[str] | None = None) -> Comparison | None:
        """A confident verdict between two distinct answers, or None."""
        if a == b:
            return None
        votes = self.votes(question) if votes is None else votes
        self.judged += 1
        va, vb = votes.count(a), votes.count(b)
        margin = abs(va - vb) / len(votes)
        if va == vb or margin < self.confidence:
            return None
        self.kept += 1
        better, worse = (a, b) if va > vb else (b, a)
        return Comparison(question, better, worse, margin)


def amplified_answers(lm, tokenizer, task: Task, questions: list[str], seed: int = 0,
                      max_new_tokens: int = 6) -> list[str | None]:
    """Amp(H, M)(q) per question, with M = `lm` (None where the tree failed)."""
    engine = TorchEngine(lm, None, tokenizer, max_new_tokens=max_new_tokens)
    cfg = AmplifyConfig(use_hprime=False, branch_choice="uniform", max_new_tokens=max_new_tokens)
    rng = random.Random(seed)

    async def run():
        trees = [amplify_tree(task, engine, q, cfg, random.Random(rng.randrange(2**31))) for q in questions]
        return await gather_limited(trees, 256)

    return [t.answer if t.ok else None for t in asyncio.run(run())]


def candidate_answers(model: TwoHeadedLM, tokenizer, questions: list[str], task: Task, samples: int,
                      temperature: float, amplified: bool = False, seed: int = 0) -> list[list[str]]:
    """Distinct well-formed answers per question, the intended head's greedy answer first."""
    prompts = [COMPACT.answer_prompt(q) for q in questions]
    intended = model.as_causal_lm("intended")
    greedy = decode(intended, tokenizer, prompts)
    other = decode(model.as_causal_lm("instrumental"), tokenizer, prompts)
    sampled = decode(intended, tokenizer, prompts, samples, temperature) if samples else [[] for _ in prompts]
    amp = amplified_answers(intended, tokenizer, task, questions, seed) if amplified else [None] * len(prompts)
    out = []
    for q, g, o, s, a_amp in zip(questions, greedy, other, sampled, amp):
        seen: list[str] = []
        for a in g + o + s + [a_amp]:
            if a is not None and a not in seen and task.is_valid_answer(q, a):
                seen.append(a)
        out.append(seen)
    return out


def collect_comparisons(model: TwoHeadedLM, tokenizer, questions: list[str], task: Task, judge: ConfidentJudge,
                        cfg: ComparisonConfig, seed: int = 0) -> list[Comparison]:
    kept = []
    candidates = candidate_answers(model, tokenizer, questions, task, cfg.samples, cfg.temperature, cfg.amplified,
                                   seed)
    for q, cands in zip(questions, candidates):
        if len(cands) < 2:
            continue
        votes = judge.votes(q)
        for other in cands[1:]:
            verdict = judge.judge(q, cands[0], other, votes)
            if verdict is not None:
                kept.append(verdict)
    return kept


def collate_comparisons(tokenizer, comps: list[Comparison]) -> dict[str, torch.Tensor]:
    """One `collate_lm` batch: the better answers, then the worse ones, in the same order."""
    examples = [Example("answer", COMPACT.answer_prompt(c.question), c.better) for c in comps]
    examples += [Example("answer", COMPACT.answer_prompt(c.question), c.worse) for c in comps]
    return collate_lm(tokenizer, examples)


def comparison_nll(model: TwoHeadedLM, batch: dict[str, torch.Tensor], beta: float) -> torch.Tensor:
    """-log sigmoid(beta * (log p(better) - log p(worse))), intended head, batch mean."""
    logits = model(batch["input_ids"], batch["attention_mask"]).intended
    logp = -sequence_nll(logits, batch["labels"])
    n = logp.shape[0] // 2
    return F.softplus(-beta * (logp[:n] - logp[n:])).mean()
