"""The seed-001 objective inside the IDA loop (`IDAConfig.objective = "honest"`).

The two labelling processes of section 5 map onto what IDA already produces:
  complex  the labels of the trees (amplified answers, the expert's fan-outs and fan-ins,
           confident distilled answers): the large set, trained through the intended head
  simple   the task's simple labeller (`labels.SIMPLE_LABELLERS`), a cheap expert with a
           systematic error; an answer example whose label it agrees with is trusted, and the
           trusted answers are the small set on which C holds the two heads to agree

`HonestObjective` is an `ida_ray.training.Objective`, so both backends' learners drive it as
they drive imitation; its `served_model` is the two-headed model's plain LlamaForCausalLM
(trunk + intended head), which is what replicas serve.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Callable
from pathlib import Path

import torch

from ida_ray.config import HonestConfig, IDAConfig, TrainConfig
from ida_ray.errors import IDAError
from ida_ray.examples import Example
from ida_ray.honest.decoding import head_answers
from ida_ray.honest.labels import SimpleLabeller
from ida_ray.honest.objective import HonestTrainer, intended_nll
from ida_ray.honest.two_headed import TwoHeadedLM
from ida_ray.losses import collate_lm
from ida_ray.prompts import COMPACT
from ida_ray.tasks.base import Task
from ida_ray.training import Objective, Wrap, no_wrap


def is_trusted(example: Example, simple: SimpleLabeller) -> bool:
    """An answer example whose label the simple labeller gives too (both processes agree)."""
    if example.kind != "answer":
        return False
    try:
        return simple.label(COMPACT.question_of_answer_prompt(example.prompt)) == example.completion
    except IDAError:  # not a well-formed question of the task: not trusted
        return False


class HonestObjective(Objective):
    """Section 5 on the trees' examples: θ₁/θ₂ alternating updates of the two-headed model
    through the intended head, C on the round's trusted answers; the adversary as in imitation.
    The updates take their gradients with autograd.grad, which DDP's hooks do not see, so
    `reduce_grads` averages them across ranks."""

    name = "honest"

    def __init__(self, model: TwoHeadedLM, adversary, tokenizer, train_cfg: TrainConfig, honest_cfg: HonestConfig,
                 simple: SimpleLabeller, seed: int = 0, device="cpu", wrap: Wrap = no_wrap,
                 reduce_grads: Callable[[list[torch.Tensor]], None] | None = None,
                 probe: tuple[Task, list[str]] | None = None):
        """probe: (task, held-out questions where the simple labeller errs), measured after
        each round (rank 0 only; the others pass None)."""
        super().__init__(adversary, tokenizer, train_cfg, seed, device, wrap)
        self.model = model.to(device)
        self.honest_cfg, self.simple, self.probe = honest_cfg, simple, probe
        self.trainer = HonestTrainer(self.model, honest_cfg, reduce_grads=reduce_grads)
        self.trusted: list[Example] = []

    @classmethod
    def build(cls, cfg: IDAConfig, *, rank: int = 0, world_size: int = 1, device="cpu",
              wrap: Wrap = no_wrap) -> HonestObjective:
        from ida_ray.honest.labels import simple_labeller
        from ida_ray.honest.two_headed import build_two_headed
        from ida_ray.models import build_adversary
        from ida_ray.tasks import get_task

        model, tokenizer = build_two_headed(cfg.model, cfg.seed)
        adversary, _ = build_adversary(cfg.model, cfg.seed + 1)
        task = get_task(cfg.task, **cfg.task_kwargs)
        simple = simple_labeller(task)
        probe = None
        if rank == 0:  # held out: a seed the run's own question draws never use
            probe = (task, questions_where_simple_errs(task, simple, cfg.sizes(task), 64, seed=cfg.seed + 7_919_993))
        return cls(model, adversary, tokenizer, cfg.train, cfg.honest, simple, cfg.seed + rank, device, wrap,
                   reduce_grads=functools.partial(all_reduce_mean, world_size=world_size), probe=probe)

    @property
    def served_model(self) -> torch.nn.Module:
        """The trunk and the intended head: a plain LlamaForCausalLM."""
        return self.model.lm

    def prepare_round(self, examples: list[Example]) -> None:
        """The round's small trusted set: its answer examples that the simple labeller agrees with."""
        self.trusted = [e for e in examples if is_trusted(e, self.simple)]

    def model_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.trainer.opt1, self.trainer.opt2]

    def model_batch(self, examples: list[Example]):
        """(the examples' batch, a batch drawn from the trusted set or None)."""
        big = self._batch(collate_lm, examples)
        small = None
        if self.trusted:
            small = self._batch(collate_lm, self.rng.choices(self.trusted, k=self.honest_cfg.small_batch_size))
        return big, small

    def model_step_on(self, batch) -> float:
        big, small = batch
        return self.trainer.step(lambda m: intended_nll(m, big), small).data_loss

    def round_stats(self, model_steps: int) -> dict:
        """The last `model_steps` updates: mean C, each group's distance from θ₀; and the probe."""
        h = self.trainer.history[-model_steps:] if model_steps else []
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        stats = {"trusted_examples": len(self.trusted),
                 "disagreement_c": mean([s.c_before for s in h[-20:]]),
                 "theta1_sq_distance": h[-1].dist1 if h else float("nan"),
                 "theta2_sq_distance": h[-1].dist2 if h else float("nan")}
        if self.probe is not None:
            task, questions = self.probe
            stats.update(honest_probe(self.model, self.tokenizer, task, self.simple, questions))
        return stats

    def save_model(self, directory: Path) -> None:
        """model/ stays a plain HF directory (trunk + intended head), the second head beside it."""
        from ida_ray.honest.two_headed import save_two_headed

        save_two_headed(self.model, self.tokenizer, directory)

    def load_model(self, directory: Path) -> None:
        from ida_ray.honest.two_headed import load_two_headed

        self.model.load_state_dict(load_two_headed(directory).state_dict())

    def optimizer_states(self) -> dict:
        o = self.trainer
        return {"theta1_opt": o.opt1.state_dict(), "theta2_opt": o.opt2.state_dict(),
                "adversary_opt": self.adversary_opt.state_dict(),
                # θ₀ of the L2 anchors: a resumed run must keep pulling toward the same point
                "init1": o.init1, "init2": o.init2}

    def load_optimizer_states(self, states: dict) -> None:
        o = self.trainer
        o.opt1.load_state_dict(states["theta1_opt"])
        o.opt2.load_state_dict(states["theta2_opt"])
        self.adversary_opt.load_state_dict(states["adversary_opt"])
        for mine, saved in ((o.init1, states["init1"]), (o.init2, states["init2"])):
            for name in mine:
                mine[name] = saved[name].to(mine[name].device)


def all_reduce_mean(grads: list[torch.Tensor], world_size: int) -> None:
    """Average gradients in place across the data-parallel ranks (a no-op on one process)."""
    import torch.distributed as dist

    if world_size > 1 and dist.is_available() and dist.is_initialized():
        for g in grads:
            dist.all_reduce(g)
            g /= world_size


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
