"""Typed configuration for a run. Loadable from YAML; validated before any resource is taken."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ida_ray.errors import ConfigError
from ida_ray.honest.config import ComparisonConfig, HonestConfig
from ida_ray.models import ModelSpec


@dataclass
class AmplifyConfig:
    tau: float = 0.5  # Gumbel temperature for branch choice and adversarial questions
    branch_choice: str = "adversary"  # "adversary" | "uniform" (ablation)
    max_depth: int = 12
    max_fan_in_rounds: int = 4
    max_new_tokens: int = 48
    # H': use the model in place of the expert where it is confident.
    use_hprime: bool = True
    eps: float = 0.05
    confidence: str = "model"  # "model": P(greedy) >= 1-eps ; "adversary": Adv >= log(1-eps)
    # Share of amplification nodes where H' is switched off and the expert decomposes even
    # though the model is confident. Without these audits a confidently wrong model is never
    # contradicted: H' would hand its own answer back to it as a label.
    audit_fraction: float = 0.1
    # A model-only (distillation) tree's answer becomes M's target only when the model is this
    # sure of the tree's whole path. Early on the model's fan-in is poor and unconfident, and
    # its trees' answers (often wrong) would outnumber the amplified ones.
    distill_min_confidence: float = 0.5
    adversarial_fraction: float = 0.25  # share of questions drawn by the adversary
    adversarial_candidates: int = 8  # k candidates per adversarial question


@dataclass
class TrainConfig:
    lr: float = 3e-3
    adversary_lr: float = 1e-3
    batch_size: int = 64
    steps_per_iteration: int = 300
    adversary_steps_per_iteration: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    replay_capacity: int = 20_000


@dataclass
class IDAConfig:
    task: str = "sum"
    task_kwargs: dict = field(default_factory=dict)
    model: ModelSpec = field(default_factory=ModelSpec)
    amplify: AmplifyConfig = field(default_factory=AmplifyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    iterations: int = 8
    amplify_trees_per_iteration: int = 256
    distill_trees_per_iteration: int = 512
    train_sizes: tuple[int, ...] | None = None  # None: the task's default sizes
    eval_questions_per_size: int = 100
    trees_in_flight: int = 256
    seed: int = 0
    run_dir: str = "runs/latest"
    # Who is the expert H of the amplification trees: "coded" (the task's oracle) or "human" (a
    # person answering each fan-out and fan-in on the page http://<human_host>:<human_port>/human,
    # served by the driver while the run goes on; `ida-ray train --expert human`).
    expert: str = "coded"
    human_timeout_s: float = 1800.0  # how long a request waits for the person; then the tree fails
    human_host: str = "127.0.0.1"  # the page lets whoever reaches it act as the expert: localhost
    human_port: int = 8266
    # distributed
    replicas: int = 1
    expanders: int = 1
    learner_workers: int = 1
    engine: str = "vllm"  # "vllm" | "torch"
    use_gpu: bool = False
    # What the learner optimises. "imitation": -log M(target) on every model example (sections
    # 2-3 of ALGORITHM.md). "honest": the seed-001 objective (section 5) on a two-headed model:
    # the same examples through the intended head (the complex process's labels), plus
    # honest.lam * C on the trusted answers where the task's simple labeller agrees.
    objective: str = "imitation"
    honest: HonestConfig = field(default_factory=HonestConfig)

    def validate(self) -> IDAConfig:
        from ida_ray.tasks import TASKS

        problems = []
        if self.task not in TASKS:
            problems.append(f"task {self.task!r} is not one of {sorted(TASKS)}")
        for name in ("iterations", "amplify_trees_per_iteration", "trees_in_flight", "replicas",
                     "expanders", "learner_workers", "eval_questions_per_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.distill_trees_per_iteration < 0:
            problems.append("distill_trees_per_iteration must be >= 0")
        a = self.amplify
        if a.branch_choice not in ("adversary", "uniform"):
            problems.append(f"amplify.branch_choice must be 'adversary' or 'uniform', got {a.branch_choice!r}")
        if a.confidence not in ("model", "adversary"):
            problems.append(f"amplify.confidence must be 'model' or 'adversary', got {a.confidence!r}")
        if not 0 <= a.distill_min_confidence <= 1:
            problems.append(f"amplify.distill_min_confidence must be in [0, 1], got {a.distill_min_confidence}")
        if not 0 <= a.audit_fraction <= 1:
            problems.append(f"amplify.audit_fraction must be in [0, 1], got {a.audit_fraction}")
        if not 0 < a.eps < 1:
            problems.append(f"amplify.eps must be in (0, 1), got {a.eps}")
        if a.tau < 0:
            problems.append("amplify.tau must be >= 0")
        if not 0 <= a.adversarial_fraction <= 1:
            problems.append("amplify.adversarial_fraction must be in [0, 1]")
        if a.max_depth < 1 or a.max_fan_in_rounds < 1 or a.max_new_tokens < 1:
            problems.append("amplify bounds (max_depth, max_fan_in_rounds, max_new_tokens) must be >= 1")
        if self.engine not in ("vllm", "torch"):
            problems.append(f"engine must be 'vllm' or 'torch', got {self.engine!r}")
        if self.expert not in ("coded", "human"):
            problems.append(f"expert must be 'coded' or 'human', got {self.expert!r}")
        if not self.human_timeout_s > 0:
            problems.append(f"human_timeout_s must be > 0, got {self.human_timeout_s}")
        if not 0 <= self.human_port <= 65535:
            problems.append(f"human_port must be in 0..65535, got {self.human_port}")
        if self.train.lr <= 0 or self.train.batch_size < 1 or self.train.steps_per_iteration < 0:
            problems.append("train.lr must be > 0, batch_size >= 1, steps_per_iteration >= 0")
        if self.train_sizes is not None and (not self.train_sizes or min(self.train_sizes) < 1):
            problems.append("train_sizes must be positive sizes")
        if self.objective not in ("imitation", "honest"):
            problems.append(f"objective must be 'imitation' or 'honest', got {self.objective!r}")
        elif self.objective == "honest":
            from ida_ray.honest.labels import SIMPLE_LABELLERS

            if self.task not in SIMPLE_LABELLERS:
                problems.append(f"objective 'honest' needs a simple labeller for the task; {self.task!r} has none "
                                f"(tasks with one: {sorted(SIMPLE_LABELLERS)})")
            if self.honest.mode != "likelihood":
                problems.append("objective 'honest' in the IDA loop trains on the trees' labels: honest.mode must be "
                                "'likelihood' (comparison mode runs in `python -m experiments.honest`)")
            try:
                self.honest.validate()
            except ConfigError as exc:
                problems.append(str(exc).replace("\n  - ", "; "))
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return self

    def sizes(self, task) -> tuple[int, ...]:
        return tuple(self.train_sizes) if self.train_sizes else tuple(task.default_sizes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IDAConfig:
        d = dict(d)
        nested = {"model": ModelSpec, "amplify": AmplifyConfig, "train": TrainConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        for key, typ in nested.items():
            if key in d and isinstance(d[key], dict):
                sub_known = {f.name for f in dataclasses.fields(typ)}
                bad = set(d[key]) - sub_known
                if bad:
                    raise ConfigError(f"unknown keys in {key}: {sorted(bad)}")
                d[key] = typ(**d[key])
        if isinstance(d.get("honest"), dict):
            d["honest"] = _honest_from_dict(d["honest"])
        if d.get("train_sizes") is not None:
            d["train_sizes"] = tuple(d["train_sizes"])
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> IDAConfig:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data)


def _honest_from_dict(d: dict) -> HonestConfig:
    d = dict(d)
    for key, typ in (("honest", HonestConfig), ("honest.comparison", ComparisonConfig)):
        sub = d if typ is HonestConfig else d.get("comparison")
        if isinstance(sub, dict):
            bad = set(sub) - {f.name for f in dataclasses.fields(typ)}
            if bad:
                raise ConfigError(f"unknown keys in {key}: {sorted(bad)}")
    if isinstance(d.get("comparison"), dict):
        d["comparison"] = ComparisonConfig(**d["comparison"])
    if d.get("theta1_prefixes") is not None:
        d["theta1_prefixes"] = tuple(d["theta1_prefixes"])
    return HonestConfig(**d)
