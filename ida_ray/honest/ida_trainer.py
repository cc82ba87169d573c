"""The seed-001 objective inside the IDA loop (`IDAConfig.objective = "honest"`).

The two labelling processes of section 5 map onto what IDA already produces:
  complex  the labels of the trees (amplified answers, the expert's fan-outs and fan-ins,
           confident distilled answers): the large set, trained through the intended head
  simple   the task's simple labeller (`labels.SIMPLE_LABELLERS`), a cheap expert with a
           systematic error; an answer example whose label it agrees with is trusted, and the
           trusted answers are the small set on which C holds the two heads to agree

`HonestIDATrainer` has the interface of `ida_ray.training.Trainer` (prepare_round,
model_step, adversary_step, fit, optimizer_states), so the Ray Train learner drives either
one the same way; `model` is the two-headed model's plain LlamaForCausalLM (trunk + intended
head), which is what replicas serve.
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from ida_ray.config import HonestConfig, TrainConfig
from ida_ray.errors import IDAError
from ida_ray.examples import Example
from ida_ray.honest.decoding import head_answers
from ida_ray.honest.labels import SimpleLabeller
from ida_ray.honest.objective import HonestTrainer, intended_nll
from ida_ray.honest.two_headed import TwoHeadedLM
from ida_ray.losses import collate_lm
from ida_ray.prompts import question_of_answer_prompt
from ida_ray.tasks.base import Task
from ida_ray.training import Trainer


def is_trusted(example: Example, simple: SimpleLabeller) -> bool:
    """An answer example whose label the simple labeller gives too (both processes agree)."""
    if example.kind != "answer":
        return False
    try:
        return simple.label(question_of_answer_prompt(example.prompt)) == example.completion
    except IDAError:  # not a well-formed question of the task: not trusted
        return False


class HonestIDATrainer(Trainer):
    def __init__(self, model: TwoHeadedLM, adversary, tokenizer, train_cfg: TrainConfig, honest_cfg: HonestConfig,
                 simple: SimpleLabeller, seed: int = 0, device="cpu",
                 reduce_grads: Callable[[list[torch.Tensor]], None] | None = None):
        # Not Trainer.__init__: the model's optimisers are the objective's two (θ₁, θ₂).
        self.two_headed, self.model = model, model.lm
        self.adversary, self.tokenizer, self.cfg, self.honest_cfg = adversary, tokenizer, train_cfg, honest_cfg
        self.adversary_opt = torch.optim.AdamW(adversary.parameters(), lr=train_cfg.adversary_lr)
        self.objective = HonestTrainer(model, honest_cfg, reduce_grads=reduce_grads)
        self.simple, self.device = simple, device
        self.rng = random.Random(seed)
        self.trusted: list[Example] = []

    def _batch(self, examples: list[Example]) -> dict:
        return {k: v.to(self.device) for k, v in collate_lm(self.tokenizer, examples).items()}

    def prepare_round(self, examples: list[Example]) -> None:
        """The round's small trusted set: its answer examples that the simple labeller agrees with."""
        self.trusted = [e for e in examples if is_trusted(e, self.simple)]

    def model_step(self, examples: list[Example]) -> float:
        big = self._batch(examples)
        small = None
        if self.trusted:
            small = self._batch(self.rng.choices(self.trusted, k=self.honest_cfg.small_batch_size))
        return self.objective.step(lambda m: intended_nll(m, big), small).data_loss

    def round_stats(self, steps: int) -> dict:
        """The last `steps` updates: mean C before/after, and each group's distance from θ₀."""
        h = self.objective.history[-steps:] if steps else []
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        return {"trusted_examples": len(self.trusted),
                "disagreement_c": mean([s.c_before for s in h[-20:]]),
                "theta1_sq_distance": h[-1].dist1 if h else float("nan"),
                "theta2_sq_distance": h[-1].dist2 if h else float("nan")}

    def optimizer_states(self) -> dict:
        o = self.objective
        return {"theta1_opt": o.opt1.state_dict(), "theta2_opt": o.opt2.state_dict(),
                "adversary_opt": self.adversary_opt.state_dict(),
                # θ₀ of the L2 anchors: a resumed run must keep pulling toward the same point
                "init1": o.init1, "init2": o.init2}

    def load_optimizer_states(self, states: dict) -> None:
        o = self.objective
        o.opt1.load_state_dict(states["theta1_opt"])
        o.opt2.load_state_dict(states["theta2_opt"])
        self.adversary_opt.load_state_dict(states["adversary_opt"])
        for mine, saved in ((o.init1, states["init1"]), (o.init2, states["init2"])):
            for name in mine:
                mine[name] = saved[name].to(mine[name].device)


def questions_where_simple_errs(task: Task, simple: SimpleLabeller, sizes, n: int, seed: int,
                                max_draws: int = 5000) -> list[str]:
    """Up to n distinct held-out questions (drawn at `sizes`) on which the simple labeller errs;
    fewer, possibly none, if the task's question distribution rarely triggers its error."""
    rng, found = random.Random(seed), {}
    for _ in range(max_draws):
        q = task.generate(rng.choice(list(sizes)), rng)
        if simple.errs_on(q):
            found[q] = None
            if len(found) >= n:
                break
    return list(found)


def honest_probe(model: TwoHeadedLM, tokenizer, task: Task, simple: SimpleLabeller, questions: list[str]) -> dict:
    """Section 5's measurement on inputs where the simple process errs: does the intended head
    report the truth, and does the instrumental head predict the simple label?"""
    if not questions:
        return {"questions": 0, "intended_right_where_simple_errs": None,
                "instrumental_copies_simple_where_simple_errs": None}
    was_training = model.training
    model.eval()
    intended = head_answers(model, tokenizer, questions, "intended")
    instrumental = head_answers(model, tokenizer, questions, "instrumental")
    model.train(was_training)
    n = len(questions)
    return {"questions": n,
            "intended_right_where_simple_errs": sum(a == task.solve(q) for a, q in zip(intended, questions)) / n,
            "instrumental_copies_simple_where_simple_errs":
                sum(a == simple.label(q) for a, q in zip(instrumental, questions)) / n}
