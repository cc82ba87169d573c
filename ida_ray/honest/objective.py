"""The two-stage objective of seed 001 ("Step 1: make the intended model pay for itself") and
the alternating optimiser the seed proposes for it.

Symbols (seed -> code):
  θ₀          the initial parameters (`HonestTrainer.init1`, `init2`)
  θ₁          stage-1 parameters: the intended head and a small part of the trunk ("world
              model"), selected by `HonestConfig.theta1_prefixes` (default: intended head,
              embeddings, final norm)
  θ₂          stage-2 parameters: the rest of the trunk and, by default, the instrumental head
  L(θ)        log-probability of the large set's labels under the *first* head, which is the
              intended head (seed: "we condition on the first head correctly predicting the
              large dataset"); `data_loss` returns -L (or, in comparison mode, minus the
              log-likelihood of the judge's verdicts, see `comparisons.py`)
  C(θ)        the heads' disagreement on the small trusted set: mean over its questions of
              Σ_answer tokens KL(sg[p_intended] || p_instrumental), teacher-forced on the trusted
              label, with a stop-gradient (sg) through the intended head (seed: "when
              differentiating the consistency test C we should treat the intended head as
              fixed")
  λ           `lam`;  the L2 prior weights on θ₁ and θ₂ are `alpha1`, `alpha2`

Unnormalised log posterior (MAP target), with Z the mass of stage-2 parameters consistent
with θ₁:
  L(θ₁,θ₂) - α₁/2 |θ₁-θ₁₀|² - α₂/2 |θ₂-θ₂₀|² - λ C(θ₁,θ₂) - log Z(θ₁),
  Z(θ₁) = ∫ exp(-α₂/2 |θ₂'-θ₂₀|² - λ C(θ₁,θ₂')) dθ₂'.

Optimiser (seed: "updating θ₂ by SGD as normal and updating θ₁ at each step to minimize the
difference C(new θ₂) - C(old θ₂)"), one `HonestTrainer.step`:
  1. θ₂ <- θ₂ - η₂ ∇θ₂ [ -L + α₂/2 |θ₂-θ₂₀|² + λ C ]
  2. θ₁ <- θ₁ - η₁ ∇θ₁ [ -L + α₁/2 |θ₁-θ₁₀|² + λ (C(θ₁, θ₂new) - C(θ₁, θ₂old)) ]
The bracketed C difference stands in for λ C - (-log Z)'s gradient, which is
λ (∇C(θ₁,θ₂) - E_{θ₂'|θ₁}[∇C(θ₁,θ₂')]): the old θ₂ plays the sample θ₂'. So θ₁ is pushed
toward places where the θ₂ step is what brings the heads into agreement ("keep C from
rising" on θ₁'s own account), not toward agreement as such.

Choices the seed leaves open, and why:
* θ₁ and θ₂ are disjoint groups, each anchored to its own initial values (the seed's "rough
  plan": stage 1 fills in the heads and part of the world model, stage 2 the rest). The seed's
  comment thread also reads θ₁ as a full-size point halfway between θ₀ and θ₂; that nested
  form is not implemented.
* The seed puts both heads in stage 1. Then the instrumental head is moved by C only through
  the C-difference, and a trunk narrower than the vocabulary cannot make two unrelated linear
  heads agree: on the sum task (hidden 64, docs/results/honest.json) C ended at 5-7 nats per
  answer, the C-difference pushing the heads apart, against ~0.01 with the instrumental head
  in θ₂. So the default puts the instrumental head in θ₂, where conditioning on agreement can
  act on it; `SEED_THETA1` gives the seed's placement.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call

from ida_ray.errors import ConfigError
from ida_ray.honest.config import ComparisonConfig, HonestConfig  # noqa: F401  (re-exported)
from ida_ray.honest.two_headed import TwoHeadedLM
from ida_ray.losses import sequence_nll


def split_parameters(model: TwoHeadedLM, theta1_prefixes) -> tuple[dict, dict]:
    """(θ₁, θ₂) as {name: parameter}; neither may be empty."""
    theta1, theta2 = {}, {}
    for name, p in model.named_parameters():
        (theta1 if name.startswith(tuple(theta1_prefixes)) else theta2)[name] = p
    if not theta1:
        raise ConfigError(f"theta1_prefixes {tuple(theta1_prefixes)} match no parameter; θ₁ would be empty")
    if not theta2:
        raise ConfigError(f"theta1_prefixes {tuple(theta1_prefixes)} take every parameter; θ₂ would be empty")
    return theta1, theta2


def intended_nll(model: TwoHeadedLM, batch: dict) -> torch.Tensor:
    """-L on a batch from `ida_ray.losses.collate_lm`: mean per-answer NLL, intended head."""
    logits = model(batch["input_ids"], batch["attention_mask"]).intended
    return sequence_nll(logits, batch["labels"]).mean()


def disagreement(model: TwoHeadedLM, batch: dict, stop_gradient: bool = True,
                 params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """C: mean over sequences of Σ over answer tokens of KL(sg[p_intended] || p_instrumental).

    `params` overrides some of the model's parameters (e.g. θ₂ at its previous value) while
    the others stay live, so gradients still reach them.
    """
    args = (batch["input_ids"], batch["attention_mask"])
    out = functional_call(model, params, args, strict=False) if params else model(*args)
    target = out.intended.float()
    if stop_gradient:
        target = target.detach()
    log_p = torch.log_softmax(target[:, :-1], -1)
    log_q = torch.log_softmax(out.instrumental.float()[:, :-1], -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    answer_positions = (batch["labels"][:, 1:] != -100).float()
    return (kl * answer_positions).sum(1).mean()


def anchor(params: dict, init: dict, alpha: float) -> torch.Tensor:
    """α/2 Σ |p - p₀|², the L2 prior around the initial values."""
    return 0.5 * alpha * sum(((p - init[n]) ** 2).sum() for n, p in params.items())


def sq_distance(params: dict, init: dict) -> float:
    with torch.no_grad():
        return float(sum(((p - init[n]) ** 2).sum() for n, p in params.items()))


@dataclass
class StepStats:
    data_loss: float  # -L on the batch (before the step)
    c_before: float  # C at (θ₁, θ₂old)
    c_after: float  # C at (θ₁, θ₂new), before θ₁ moves
    dist1: float  # |θ₁-θ₁₀|²
    dist2: float  # |θ₂-θ₂₀|²

    @property
    def delta_c(self) -> float:
        return self.c_after - self.c_before


class HonestTrainer:
    """`reduce_grads`, when given, is called with each update's list of gradients before
    clipping, to average them in place across data-parallel ranks (`ida_ray.honest.ida_trainer.all_reduce_mean`): the
    alternating updates take gradients with `torch.autograd.grad`, which DDP's hooks do not see."""

    def __init__(self, model: TwoHeadedLM, cfg: HonestConfig,
                 reduce_grads: Callable[[list[torch.Tensor]], None] | None = None):
        self.model, self.cfg, self.reduce_grads = model, cfg.validate(), reduce_grads
        self.theta1, self.theta2 = split_parameters(model, cfg.theta1_prefixes)
        self.init1 = {n: p.detach().clone() for n, p in self.theta1.items()}
        self.init2 = {n: p.detach().clone() for n, p in self.theta2.items()}
        self.opt1 = self._optimizer(self.theta1.values(), cfg.lr1)
        self.opt2 = self._optimizer(self.theta2.values(), cfg.lr2)
        self.history: list[StepStats] = []

    def _optimizer(self, params, lr):
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(list(params), lr=lr, momentum=self.cfg.momentum)
        return torch.optim.Adam(list(params), lr=lr)

    def _apply(self, loss: torch.Tensor, params: dict, opt) -> None:
        if not loss.requires_grad:  # nothing in this step depends on these parameters
            if self.reduce_grads is None:
                return
            grads = [None] * len(params)  # other ranks may have a gradient: join their all-reduce
        else:
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]
        if self.reduce_grads is not None:
            self.reduce_grads(grads)
        for p, g in zip(params.values(), grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(list(params.values()), self.cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _c(self, small: dict, params=None) -> torch.Tensor:
        return disagreement(self.model, small, self.cfg.stop_gradient_intended, params)

    def step(self, data_loss: Callable[[TwoHeadedLM], torch.Tensor], small: dict | None) -> StepStats:
        """One alternating update. `data_loss(model)` returns -L on the current batch;
        `small` is a `collate_lm` batch of the small trusted set (for C), or None when there is
        no trusted example yet (then the step is likelihood and prior only)."""
        cfg, use_c = self.cfg, self.cfg.lam > 0 and small is not None
        self.model.train()
        # 1. θ₂ by SGD on the full objective, θ₁ held fixed.
        old2 = {n: p.detach().clone() for n, p in self.theta2.items()}
        loss_data = data_loss(self.model)
        c_before = self._c(small) if use_c else torch.zeros(())
        loss2 = loss_data + anchor(self.theta2, self.init2, cfg.alpha2) + cfg.lam * c_before
        self._apply(loss2, self.theta2, self.opt2)
        # 2. θ₁: data and prior as usual; C enters only as C(θ₁, θ₂new) - C(θ₁, θ₂old).
        loss1 = data_loss(self.model) + anchor(self.theta1, self.init1, cfg.alpha1)
        c_after = torch.zeros(())
        if use_c:
            c_after = self._c(small)
            if cfg.theta1_c_difference:
                loss1 = loss1 + cfg.lam * (c_after - self._c(small, params=old2))
        self._apply(loss1, self.theta1, self.opt1)
        self.model.eval()
        stats = StepStats(float(loss_data.detach()), float(c_before.detach()), float(c_after.detach()),
                          sq_distance(self.theta1, self.init1), sq_distance(self.theta2, self.init2))
        if not math.isfinite(stats.data_loss):
            raise FloatingPointError(f"honest objective diverged: -L = {stats.data_loss}")
        self.history.append(stats)
        return stats

    @torch.no_grad()
    def disagreement_on(self, small: dict) -> float:
        self.model.eval()
        return float(self._c(small))


SEED_THETA1 = ("lm.lm_head.", "instrumental_head.", "lm.model.embed_tokens.", "lm.model.norm.")
"""θ₁ as the seed places it: both heads in stage 1 (an ablation; see the module docstring)."""
