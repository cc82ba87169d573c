"""Settings of the honest objective (seed 001): plain dataclasses, importable without torch so
that `ida_ray.config.IDAConfig` can nest them (`objective: honest` with an `honest:` section)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ida_ray.errors import ConfigError


@dataclass
class ComparisonConfig:
    """Confident-comparison mode (seed step 3): see `ida_ray.honest.comparisons`."""
    beta: float = 1.0  # P(better ≻ worse) = sigmoid(beta * (log p(better) - log p(worse)))
    samples: int = 4  # sampled answers per question besides the two heads' greedy answers
    # Also propose Amp(H, M)(q): the coded expert splits and combines, the intended head answers
    # the branches it does not recurse on (ida_ray.amplify.amplify_tree, no H', uniform branch).
    amplified: bool = True
    temperature: float = 1.0
    judge_runs: int = 1  # complex-process runs the judge votes over
    slip_rate: float = 0.0  # chance each careful-expert direct answer in a judge run is wrong
    confidence: float = 1.0  # keep a verdict only if |votes_a - votes_b| / judge_runs >= this
    refresh_every: int = 200  # steps between rounds of fresh answers from the model
    questions_per_round: int = 600
    pretrain_steps: int = 600  # likelihood on the small trusted set before comparisons
    # Joint likelihood on the small trusted set while training on comparisons (the seed: "we
    # may still need to use likelihood for pre-training or joint training"). Without it the
    # Bradley-Terry loss alone drove the tiny model's answers to unfinished garbage: it can
    # widen log p(better) - log p(worse) by pushing both down.
    joint_likelihood: float = 1.0

    def problems(self) -> list[str]:
        p = []
        if self.beta <= 0 or self.temperature <= 0:
            p.append("comparison.beta and comparison.temperature must be > 0")
        if self.judge_runs < 1 or self.samples < 0 or self.refresh_every < 1 or self.questions_per_round < 1:
            p.append("comparison.judge_runs, refresh_every, questions_per_round must be >= 1, samples >= 0")
        if not 0 <= self.slip_rate < 1 or not 0 < self.confidence <= 1:
            p.append("comparison.slip_rate must be in [0, 1) and comparison.confidence in (0, 1]")
        if self.pretrain_steps < 0 or self.joint_likelihood < 0:
            p.append("comparison.pretrain_steps and comparison.joint_likelihood must be >= 0")
        return p


@dataclass
class HonestConfig:
    lam: float = 1.0  # λ, weight of the agreement condition C
    alpha1: float = 1e-4  # L2 pull of θ₁ toward its initial values
    alpha2: float = 1e-4  # L2 pull of θ₂ toward its initial values
    theta1_prefixes: tuple[str, ...] = ("lm.lm_head.", "lm.model.embed_tokens.", "lm.model.norm.")
    stop_gradient_intended: bool = True  # the seed's stop-gradient in C; False only for ablation
    theta1_c_difference: bool = True  # θ₁ step minimises λ(C(θ₂new) - C(θ₂old)); False: ablation
    # "likelihood": L on labels | "comparisons": L on confident verdicts
    mode: Literal["likelihood", "comparisons"] = "likelihood"
    optimizer: Literal["adam", "sgd"] = "adam"  # "adam" | "sgd" (stochastic gradient either way; adam is faster here)
    lr1: float = 2e-3
    lr2: float = 2e-3
    momentum: float = 0.9  # sgd only
    grad_clip: float = 1.0
    batch_size: int = 64  # large-set (or comparison) batch
    small_batch_size: int = 32  # small-set batch for C
    steps: int = 1500
    comparison: ComparisonConfig = field(default_factory=ComparisonConfig)

    def problems(self) -> list[str]:
        p = []
        if self.lam < 0 or self.alpha1 < 0 or self.alpha2 < 0:
            p.append("lam, alpha1, alpha2 must be >= 0")
        if self.mode not in ("likelihood", "comparisons"):
            p.append(f"mode must be 'likelihood' or 'comparisons', got {self.mode!r}")
        if self.optimizer not in ("adam", "sgd"):
            p.append(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.lr1 <= 0 or self.lr2 <= 0 or self.grad_clip <= 0:
            p.append("lr1, lr2, grad_clip must be > 0")
        if self.batch_size < 1 or self.small_batch_size < 1 or self.steps < 0:
            p.append("batch sizes must be >= 1 and steps >= 0")
        if not self.theta1_prefixes:
            p.append("theta1_prefixes must name at least one parameter group")
        p += self.comparison.problems()
        return p

    def validate(self) -> HonestConfig:
        """For the honest trainer used on its own (experiments/honest.py), outside an IDAConfig."""
        p = self.problems()
        if p:
            raise ConfigError("invalid honest config:\n  - " + "\n  - ".join(p))
        return self
