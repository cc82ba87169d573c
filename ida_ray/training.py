"""The learner's inner loop: optimise the model on imitation/distillation examples and the
adversary on its regression examples. Pure torch; the Ray Train learner wraps the same
modules in DDP and calls the same step functions."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ida_ray.config import TrainConfig
from ida_ray.examples import MODEL_KINDS, Example
from ida_ray.losses import adversary_loss, collate_adversary, collate_lm, model_loss


@dataclass
class TrainStats:
    model_loss: float = float("nan")
    adversary_loss: float = float("nan")
    model_steps: int = 0
    adversary_steps: int = 0


class Trainer:
    def __init__(self, model, adversary, tokenizer, cfg: TrainConfig, seed: int = 0):
        self.model, self.adversary, self.tokenizer, self.cfg = model, adversary, tokenizer, cfg
        self.model_opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.adversary_opt = torch.optim.AdamW(adversary.parameters(), lr=cfg.adversary_lr)
        self.rng = random.Random(seed)

    def _step(self, module, opt, loss_fn, batch) -> float:
        module.train()
        loss = loss_fn(module, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.grad_clip)
        opt.step()
        module.eval()
        return float(loss.detach())

    def prepare_round(self, examples: list[Example]) -> None:
        """Called with a round's model examples before its steps (the honest objective picks its
        trusted set here); nothing to do for plain imitation."""

    def model_step(self, examples: list[Example]) -> float:
        return self._step(self.model, self.model_opt, model_loss, collate_lm(self.tokenizer, examples))

    def adversary_step(self, examples: list[Example]) -> float:
        return self._step(self.adversary, self.adversary_opt, adversary_loss,
                          collate_adversary(self.tokenizer, examples))

    def fit(self, examples: list[Example], steps: int | None = None, adversary_steps: int | None = None) -> TrainStats:
        """Sample minibatches uniformly from `examples` for the configured number of steps."""
        steps = self.cfg.steps_per_iteration if steps is None else steps
        adversary_steps = self.cfg.adversary_steps_per_iteration if adversary_steps is None else adversary_steps
        lm = [e for e in examples if e.kind in MODEL_KINDS]
        adv = [e for e in examples if e.kind == "adversary"]
        self.prepare_round(lm)
        stats = TrainStats()
        bs = self.cfg.batch_size
        losses = [self.model_step([self.rng.choice(lm) for _ in range(bs)]) for _ in range(steps if lm else 0)]
        if losses:
            stats.model_loss, stats.model_steps = sum(losses[-20:]) / len(losses[-20:]), len(losses)
        losses = [self.adversary_step([self.rng.choice(adv) for _ in range(bs)])
                  for _ in range(adversary_steps if adv else 0)]
        if losses:
            stats.adversary_loss, stats.adversary_steps = sum(losses[-20:]) / len(losses[-20:]), len(losses)
        return stats

    def optimizer_states(self) -> dict:
        return {"model_opt": self.model_opt.state_dict(), "adversary_opt": self.adversary_opt.state_dict()}

    def load_optimizer_states(self, states: dict) -> None:
        self.model_opt.load_state_dict(states["model_opt"])
        self.adversary_opt.load_state_dict(states["adversary_opt"])

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "adversary": self.adversary.state_dict(),
                "model_opt": self.model_opt.state_dict(), "adversary_opt": self.adversary_opt.state_dict()}
