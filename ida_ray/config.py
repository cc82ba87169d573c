"""The configuration of a run, in one place: every option of the loop, the learner and the
cluster, as plain typed values.

    cfg = load_config("default")                        # configs/default.yaml, by name
    cfg = load_config("runs/my.yaml", {"amplify.tau": 0.3, "iterations": 4})
    cfg = IDAConfig(task="perm", iterations=2, backend="local")

A config file holds IDAConfig's keys (nested sections as mappings) and is read over its
`base:` preset (`default` unless it says otherwise; `base: null` starts from the dataclass
defaults below). Presets are the YAML files under `configs/` (the default run, core learning,
the evidence runs), loadable by name or by path. Dotted overrides (`train.lr=1e-3`) go over the
file. Choices are `Literal` types, so the type check below covers them.

`IDAConfig` is checked when it is made (`__post_init__`): types first, then each section's own
ranges (`problems()`, written beside the section), and a ConfigError names every problem.
What needs the task or the machine (question sizes that overflow the context, GPUs asked for
and absent, a questions file) is checked by `ida_ray.preflight` before anything starts.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ida_ray.curriculum import CurriculumConfig
from ida_ray.errors import ConfigError
from ida_ray.honest.config import HonestConfig
from ida_ray.lm_expert import LMExpertConfig
from ida_ray.models import ModelSpec
from ida_ray.replay import RecordsConfig
from ida_ray.trackers import TrackingConfig, logger_problems

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
"""The presets: configs/<name>.yaml in the repository."""


@dataclass(kw_only=True)
class AmplifyConfig:
    """How amplification and distillation trees are expanded (ALGORITHM.md sections 2-3)."""

    tau: float = 0.5
    """Gumbel temperature of the branch choice and of the adversarial questions."""
    branch_choice: Literal["adversary", "uniform"] = "adversary"
    """Which subquestion to recurse on: the adversary's Gumbel-max pick, or uniform (the ablation)."""
    max_depth: int = 12
    """Deepest node a tree may reach before it fails with DepthExceeded."""
    max_fan_in_rounds: int = 4
    """Second-round fan-ins a node may ask for before it fails with FanInRoundsExceeded."""
    max_new_tokens: int = 48
    """Longest model or expert output, in tokens."""
    use_hprime: bool = True
    """H': the model answers in place of the expert where it is confident."""
    eps: float = 0.05
    """H' trusts the model when P(greedy) >= 1 - eps (or Adv >= log(1 - eps))."""
    confidence: Literal["model", "adversary"] = "model"
    """What H' reads as confidence: the model's own P(greedy), or the adversary's score."""
    audit_fraction: float = 0.1
    """Share of amplification nodes where H' is off and the expert decomposes anyway. Without
    audits a confidently wrong model is never contradicted: H' would hand its own answer back."""
    distill_min_confidence: float = 0.5
    """A distillation tree's answer becomes M's target only when the model is this sure of the
    tree's whole path: early on its fan-ins are poor, and their answers would drown the
    amplified ones."""
    adversarial_fraction: float = 0.25
    """Share of an iteration's amplification questions picked by the adversary."""
    adversarial_candidates: int = 8
    """Candidates the adversary scores for each adversarial question."""
    answer_labels: Literal["tree", "ground_truth"] = "tree"
    """Where M's answer examples take their answers: "tree" (IDA: the trees' own answers) or
    "ground_truth" (the task's `solve` at every node of the same trees: the supervised
    baseline run through the same system, with the same questions, trees, expert steps and
    gradient steps as IDA; it labels every node, also those IDA takes no answer from, see
    ida_ray.examples.ground_truth_examples)."""

    def problems(self) -> list[str]:
        p = []
        if self.tau < 0:
            p.append(f"amplify.tau must be >= 0, got {self.tau}")
        if min(self.max_depth, self.max_fan_in_rounds, self.max_new_tokens, self.adversarial_candidates) < 1:
            p.append("amplify.max_depth, max_fan_in_rounds, max_new_tokens, adversarial_candidates must be >= 1")
        if not 0 < self.eps < 1:
            p.append(f"amplify.eps must be in (0, 1), got {self.eps}")
        for name in ("audit_fraction", "distill_min_confidence", "adversarial_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                p.append(f"amplify.{name} must be in [0, 1], got {getattr(self, name)}")
        return p


@dataclass(kw_only=True)
class TrainConfig:
    """The learner's optimisation of the model and the adversary, per iteration."""

    lr: float = 3e-3
    """AdamW learning rate of the model (imitation objective)."""
    adversary_lr: float = 1e-3
    """AdamW learning rate of the adversary."""
    batch_size: int = 64
    """Global minibatch (split over the learner's ranks)."""
    steps_per_iteration: int = 300
    """Model steps per training round."""
    adversary_steps_per_iteration: int = 100
    """Adversary steps per training round."""
    weight_decay: float = 0.0
    """AdamW weight decay of the model."""
    grad_clip: float = 1.0
    """Gradient-norm clip of every step."""
    replay_capacity: int = 20_000
    """Examples the replay buffer keeps (the newest; FIFO eviction)."""
    pack_sequences: bool = False
    """Minibatches of the model and the adversary packed: sequences end to end in rows as wide
    as the longest, each attending to itself alone (`ida_ray.losses.pack_rows`). The same loss
    and gradients as padding every sequence to the longest, on fewer positions: IDA's mix of
    short answers and long fan-ins leaves a padded random minibatch ~60% padding. Objective
    honest packs the adversary's only: its two-headed passes take padded batches."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """The model's learning rate over the run's model steps (iterations x steps_per_iteration):
    "constant", or "cosine" (nanoGPT's: linear warm-up over `warmup_steps`, then a cosine from
    `lr` down to `min_lr_fraction * lr` at the run's last step), so that a run settles at the
    end instead of ending on a full-size step. The adversary's rate stays constant: it tracks
    a model that keeps changing. The schedule spans `iterations`: a run resumed with more
    iterations than it started with stretches what is left of it."""
    warmup_steps: int = 0
    """Model steps of linear warm-up from 0 to `lr` (lr_schedule cosine)."""
    min_lr_fraction: float = 0.1
    """The model's learning rate at the run's last step, as a fraction of `lr` (lr_schedule cosine)."""
    answer_share: float | None = None
    """Share of each model minibatch drawn from answer examples (M's direct answers, what
    distillation teaches), the rest from fan_out and fan_in (the expert's steps H' imitates);
    None draws the three alike, in the proportions the trees made them. A tree makes an answer
    example per node but also a fan-out and fan-ins per expanded node, so with wordy prompts the
    answers at the larger sizes can be a small part of each minibatch (the natural-language
    preset's replay: 46% answers, a quarter of those of sizes 3-4)."""
    balance_answer_sizes: bool = False
    """Draw the model's answer examples equally from each question size the replay holds
    (each draw picks a size, then an answer of that size), instead of in the proportions the
    trees made them. A tree of a size-4 question answers one size-4 node and several smaller
    ones, so the largest sizes, the ones IDA is for, are the rarest answers in the replay (the
    natural-language preset's: sizes 1/2/3/4 in 51/25/12/12%). Fan-outs, fan-ins and the
    adversary's examples are drawn as before. It repeats the rare answers, not adds new ones: on
    that preset it did not help (README "IDA in natural language")."""
    check_ranks_in_sync: bool = False
    """Debug: every learner rank hashes all its parameters after each round, and the round
    reports whether the ranks hold identical weights (`learner_ranks_in_sync`). A pass over
    every weight on every rank each round, so off unless DDP is suspected."""

    def problems(self) -> list[str]:
        p = []
        if self.lr <= 0 or self.adversary_lr <= 0 or self.grad_clip <= 0:
            p.append("train.lr, train.adversary_lr and train.grad_clip must be > 0")
        if self.weight_decay < 0:
            p.append(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1 or self.replay_capacity < 1:
            p.append("train.batch_size and train.replay_capacity must be >= 1")
        if self.steps_per_iteration < 0 or self.adversary_steps_per_iteration < 0:
            p.append("train.steps_per_iteration and train.adversary_steps_per_iteration must be >= 0")
        if self.answer_share is not None and not 0 < self.answer_share <= 1:
            p.append(f"train.answer_share must be in (0, 1] or null, got {self.answer_share}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_fraction <= 1:
            p.append(f"train.warmup_steps must be >= 0 and train.min_lr_fraction in [0, 1], "
                     f"got {self.warmup_steps} and {self.min_lr_fraction}")
        return p

    def lr_factor(self, step: int, total_steps: int) -> float:
        """The model's learning rate at model step `step` of `total_steps`, as a fraction of `lr`."""
        if self.lr_schedule == "constant":
            return 1.0
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay = min(1.0, (step - self.warmup_steps) / max(1, total_steps - 1 - self.warmup_steps))
        return self.min_lr_fraction + 0.5 * (1 - self.min_lr_fraction) * (1 + math.cos(math.pi * decay))


@dataclass(kw_only=True)
class ClusterResources:
    """What each actor asks Ray for (backend "ray"). Expansion and training alternate, so on a
    small machine the actors may ask for more logical CPUs than there are cores: a local
    cluster is started with enough logical CPUs for all of them (ida_ray/entrypoints/train.py)."""

    replica_cpus: float = 1.0
    """Logical CPUs per model replica."""
    replica_gpus: int = 1
    """GPUs per model replica with use_gpu: vLLM's tensor-parallel size (above 1, vLLM starts
    its workers as Ray actors in a placement group of that many GPUs)."""
    expander_cpus: float = 0.5
    """Logical CPUs per tree expander."""
    learner_cpus: float = 1.0
    """Logical CPUs per learner worker."""
    learner_threads: int | None = None
    """torch threads per learner worker; null: Ray's default."""
    replica_resources: dict = field(default_factory=dict)
    """Custom Ray resources each model replica asks for besides its CPUs and GPUs, e.g.
    {replica_node: 1}: the replicas go only to the nodes that declare them (a worker type's
    `resources:` in cluster.yaml). The coordinator and the replay buffer always run on the
    head node."""
    expander_resources: dict = field(default_factory=dict)
    """Custom Ray resources each tree expander asks for (as replica_resources)."""
    learner_resources: dict = field(default_factory=dict)
    """Custom Ray resources each learner worker asks for (as replica_resources)."""
    learner_placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How the learner's workers are placed (Ray Train's placement group strategy): "PACK"
    fills a node before the next, "STRICT_PACK" insists on one node (NVLink between ranks),
    "SPREAD"/"STRICT_SPREAD" one worker per node. Each replica has its own placement group,
    its GPUs on one node (ida_ray.actors.replica.replica_bundles)."""
    restarts: int = 2
    """Times Ray restarts a replica or an expander that dies, and Ray Train restarts the
    learner's workers from the last checkpoint, before the run gives up on it (a replica: the
    others serve; the learner: the run fails, resumable with --resume)."""
    kv_cache_gib: int = 1
    """vLLM-CPU KV cache per engine, GiB."""
    round_timeout_s: float = 3600.0
    """A training round that takes longer fails the run (LearnerFailure): nothing waits unbounded."""

    start_timeout_s: float = 900.0
    """Actors that are not up within this (e.g. waiting for resources the cluster lacks) fail
    the start with a ConfigError naming them."""
    restart_timeout_s: float = 300.0
    """How long a call waits for an expander that Ray is restarting before it is passed over
    (its jobs go to the next expander, or get failed records)."""
    stage_timeout_s: float = 300.0
    """How long an expander, or the loop's commit, waits for the replay buffer to take an
    iteration's trees; past it the run fails with the cause (the buffer is on the head node:
    a buffer that stalls this long is not coming back)."""

    def required_cpus(self, cfg: IDAConfig) -> float:
        expert_replicas = cfg.lm_expert.replicas if cfg.expert == "lm" and cfg.lm_expert.backend == "cluster" else 0
        return ((cfg.replicas + expert_replicas) * self.replica_cpus + cfg.expanders * self.expander_cpus
                + cfg.learner_workers * self.learner_cpus)

    def problems(self) -> list[str]:
        p = []
        for name in ("replica_cpus", "expander_cpus", "learner_cpus"):
            if getattr(self, name) < 0:
                p.append(f"resources.{name} must be a number >= 0, got {getattr(self, name)}")
        if isinstance(self.replica_gpus, bool) or self.replica_gpus < 1:
            p.append(f"resources.replica_gpus must be a whole number >= 1, got {self.replica_gpus}")
        if not self.start_timeout_s > 0:
            p.append(f"resources.start_timeout_s must be > 0, got {self.start_timeout_s}")
        if not self.restart_timeout_s > 0:
            p.append(f"resources.restart_timeout_s must be > 0, got {self.restart_timeout_s}")
        for name in ("round_timeout_s", "stage_timeout_s"):
            if not getattr(self, name) > 0:
                p.append(f"resources.{name} must be > 0, got {getattr(self, name)}")
        if self.kv_cache_gib < 1:
            p.append(f"resources.kv_cache_gib must be >= 1, got {self.kv_cache_gib}")
        for name in ("replica_resources", "expander_resources", "learner_resources"):
            bad = {k: v for k, v in getattr(self, name).items()
                   if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | float) or v < 0}
            if bad:
                p.append(f"resources.{name} maps resource names to amounts >= 0, got {bad}")
            if {"CPU", "GPU"} & set(getattr(self, name)):
                p.append(f"resources.{name} holds custom resources only: CPUs and GPUs have their own fields")
        if self.restarts < 0:
            p.append(f"resources.restarts must be >= 0, got {self.restarts}")
        if self.learner_threads is not None and self.learner_threads < 1:
            p.append(f"resources.learner_threads must be >= 1 or null, got {self.learner_threads}")
        return p


@dataclass(kw_only=True)
class IDAConfig:
    """One run: the task, the loop's sizes, the expert, the objective, where it runs."""

    task: str = "sum"
    """A built-in task's name (sum, perm, assign, path) or a user's Task class as an import
    path, `my_pkg.tasks:Kinship` (docs/TASKS.md)."""
    task_kwargs: dict = field(default_factory=dict)
    """Options of the task's constructor (e.g. sum: base_size, max_digit)."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """M (an HF checkpoint by path, or the tiny Llama built here) and the adversary's shape."""
    amplify: AmplifyConfig = field(default_factory=AmplifyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    iterations: int = 8
    """IDA iterations of the run (in total, when resuming)."""
    amplify_trees_per_iteration: int = 256
    """Amplification trees (H' with the adversary's branch choice) per iteration."""
    distill_trees_per_iteration: int = 512
    """Model-only (distillation) trees per iteration."""
    train_sizes: tuple[int, ...] | None = None
    """Question sizes drawn for training and evaluation; null: the task's default sizes."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Training questions from the smallest sizes first, the next size added once the model
    passes `curriculum.threshold` on the largest so far (ida_ray/curriculum.py; off by default)."""
    eval_questions_per_size: int = 100
    """Held-out questions per size, answered by the model alone after each iteration."""
    trees_in_flight: int = 256
    """Trees expanded concurrently (over all expanders): the batch the engines see."""
    mode: Literal["sync", "async"] = "sync"
    """How expansion and training take turns. "sync": expand, train, swap, evaluate in strict
    turn; the reproducible mode (one config, one run). "async": the next iteration's trees
    expand on the weights the replicas hold while the learner trains on the trees just
    completed, and evaluation runs while they expand; new weights go into each replica between
    its requests (no model call mixes two versions; a tree may span two, every step records
    its own). Backend "ray" only."""
    max_staleness: int | None = None
    """The oldest example a training round may use, in weight versions behind the weights it
    trains (round i trains version i into i+1): older examples are dropped from the replay
    buffer before the round and counted (`examples_dropped_stale`); every round reports the
    oldest version it trained on. None: only the replay capacity bounds their age. In mode
    async fresh examples are one version behind, so it must be >= 1 there."""
    seed: int = 0
    """Seeds the question draws, the models' initial weights and the learner's sampling."""
    run_dir: str = "runs/latest"
    """Where the run writes metrics, checkpoints, trees and its resume state (on the head node)."""
    storage: str | None = None
    """Where the run's durable files go besides run_dir, laid out as run_dir is: a path on a
    mount every node shares, or a URI pyarrow's filesystems take (s3://bucket/runs/a,
    gs://..., s3://bucket/a?endpoint_override=host:9000&scheme=http for MinIO). The learner's
    checkpoints are written there directly from its workers' nodes; the run directory's other
    files are copied there after every iteration; `--resume` on a head without run_dir reads
    the run back from it (ida_ray/storage.py). null: run_dir only (one node, or a shared disk)."""
    storage_timeout_s: float = 600.0
    """A copy to or from storage that takes longer is given up (a push: retried after the
    next iteration, with a warning; a pull or check: the run does not start)."""
    expert: Literal["coded", "human", "lm"] = "coded"
    """H of the amplification trees: the task's coded oracle, a person on the run's /human
    page (http://<pages_host>:<pages_port>/human, served by the driver), or a language model
    (the `lm_expert` section: an OpenAI-compatible endpoint, or its own vLLM replicas)."""
    lm_expert: LMExpertConfig = field(default_factory=LMExpertConfig)
    """H as a language model (expert "lm"): where it is served, retries, cache and budget."""
    human_timeout_s: float = 1800.0
    """How long a request waits for the person; then its tree fails and the run goes on."""
    serve_pages: bool = True
    """Serve the run's pages while it runs: the tree viewer and progress plot at
    http://<pages_host>:<pages_port>/ (and /human with expert "human", which always serves)."""
    pages_host: str = "127.0.0.1"
    """Address the run's pages bind to: the /human page lets whoever reaches it act as the
    expert, so localhost (reach it from elsewhere with an SSH tunnel)."""
    pages_port: int = 8266
    """Port of the run's pages. Taken by another run: the viewer is skipped with a warning
    (expert "human": the run refuses to start)."""
    objective: Literal["imitation", "honest"] = "imitation"
    """What the learner optimises: "imitation" (-log M(target) on every model example,
    ALGORITHM.md sections 2-3) or "honest" (section 5: a two-headed model, the trees' labels
    through the intended head, plus honest.lam * C on the answers the simple labeller agrees with)."""
    honest: HonestConfig = field(default_factory=HonestConfig)
    backend: Literal["ray", "local"] = "ray"
    """Where the iteration runs: "ray" (replica, expander and Ray Train learner actors on a
    local or running cluster) or "local" (one process, the torch engine, no Ray)."""
    engine: Literal["vllm", "torch"] = "vllm"
    """Serving engine of the replicas (backend "ray"): vLLM, or the in-process torch engine."""
    replicas: int = 1
    """Model replicas (backend "ray")."""
    expanders: int = 1
    """Tree expander actors (backend "ray")."""
    learner_workers: int = 1
    """Ray Train DDP workers of the learner (backend "ray")."""
    use_gpu: bool = False
    """Replicas and learner on GPUs."""
    weight_sync: Literal["object_store", "broadcast"] = "object_store"
    """How each round's weights reach M's replicas (backend "ray"). "object_store": the
    learner's rank 0 puts them in Ray's object store as safetensors bytes; each replica writes
    them to its disk and reloads in place. "broadcast": rank 0 sends the model's tensors
    straight into every replica's vLLM workers over vLLM's weight-transfer protocol, in the
    served dtype and in buckets (NCCL on GPUs, Gloo on CPU; ida_ray/serving/weight_broadcast.py),
    so the replicas load nothing from the object store; the payload is still made, for the
    adversary, for replicas Ray restarts, and for a round whose broadcast fails (the cause is
    in the round's metrics, `weight_broadcast`). Engine "vllm" only."""
    weight_sync_timeout_s: float = 300.0
    """The longest a broadcast's group start, or any one of its steps, may take; past it the
    round's weights go by the object store."""
    resources: ClusterResources = field(default_factory=ClusterResources)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    """What the run keeps of its tree records on disk (gzip, retention) and the free space it needs."""
    logger: tuple[str, ...] = ("tensorboard",)
    """Experiment trackers each iteration's figures go to: any of "tensorboard" (event files in
    <run_dir>/tensorboard), "wandb", "mlflow" (ida_ray/trackers.py); [] for none."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """The trackers' options: W&B project / MLflow experiment, run name, MLflow tracking URI."""

    def __post_init__(self):
        if isinstance(self.train_sizes, list):
            self.train_sizes = tuple(self.train_sizes)
        if isinstance(self.logger, list):
            self.logger = tuple(self.logger)
        self.validate()

    def validate(self) -> IDAConfig:
        """ConfigError listing every problem; the config itself otherwise."""
        problems = type_problems(self)
        if not problems:  # ranges cannot be compared on values of the wrong type
            problems = self._problems()
        problems = choice_problems(self) + problems
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return self

    def _problems(self) -> list[str]:
        from ida_ray.tasks import task_class

        p = []
        try:
            task_class(self.task)
        except ConfigError as exc:
            p.append(str(exc))
        if self.objective == "honest" and self.model.lora_rank:
            p.append("objective 'honest' trains its two-headed model whole: model.lora_rank must be 0")
        for name in ("iterations", "amplify_trees_per_iteration", "trees_in_flight", "replicas", "expanders",
                     "learner_workers", "eval_questions_per_size"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.distill_trees_per_iteration < 0:
            p.append(f"distill_trees_per_iteration must be >= 0, got {self.distill_trees_per_iteration}")
        if self.train_sizes is not None and (not self.train_sizes or min(self.train_sizes) < 1):
            p.append(f"train_sizes must be positive sizes, got {self.train_sizes}")
        if self.trees_in_flight < self.expanders:
            p.append(f"trees_in_flight ({self.trees_in_flight}) must be at least expanders ({self.expanders})")
        if self.max_staleness is not None and self.max_staleness < (1 if self.mode == "async" else 0):
            p.append(f"max_staleness must be >= {1 if self.mode == 'async' else 0} in mode {self.mode} (or null), "
                     f"got {self.max_staleness}" + (": async examples are one version behind the learner"
                                                     if self.mode == "async" else ""))
        if self.storage is not None:
            from ida_ray.storage import scheme_problem

            p += [x for x in [scheme_problem(self.storage)] if x]
        if not self.storage_timeout_s > 0:
            p.append(f"storage_timeout_s must be > 0, got {self.storage_timeout_s}")
        if self.weight_sync == "broadcast" and (self.backend != "ray" or self.engine != "vllm"):
            p.append(f"weight_sync 'broadcast' sends into vLLM workers: it needs backend 'ray' and engine 'vllm', "
                     f"got backend {self.backend!r}, engine {self.engine!r}")
        if not self.weight_sync_timeout_s > 0:
            p.append(f"weight_sync_timeout_s must be > 0, got {self.weight_sync_timeout_s}")
        if not self.human_timeout_s > 0:
            p.append(f"human_timeout_s must be > 0, got {self.human_timeout_s}")
        if not 0 <= self.pages_port <= 65535:
            p.append(f"pages_port must be in 0..65535, got {self.pages_port}")
        p += self.model.problems() + self.amplify.problems() + self.train.problems() + self.resources.problems()
        p += self.curriculum.problems()
        p += logger_problems(self.logger) + self.tracking.problems() + self.records.problems()
        if self.expert == "lm":
            p += self.lm_expert.problems()
        if self.objective == "honest":
            from ida_ray.honest.labels import SIMPLE_LABELLERS

            if self.task not in SIMPLE_LABELLERS:
                p.append(f"objective 'honest' needs a simple labeller for the task; {self.task!r} has none "
                         f"(tasks with one: {sorted(SIMPLE_LABELLERS)})")
            if self.honest.mode != "likelihood":
                p.append("objective 'honest' in the IDA loop trains on the trees' labels: honest.mode must be "
                         "'likelihood' (comparison mode runs in `python -m experiments.honest`)")
            p += [f"honest.{x}" for x in self.honest.problems()]
            if self.model.dtype != "float32":
                p.append(f"objective 'honest' trains in float32 only (its second head is built in float32); "
                         f"got model.dtype={self.model.dtype!r}")
        return p

    def sizes(self, task) -> tuple[int, ...]:
        return tuple(self.train_sizes) if self.train_sizes else tuple(task.default_sizes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IDAConfig:
        """From plain values (a YAML file's, or `to_dict()`'s); unknown keys are errors."""
        problems: list[str] = []
        built = _from_mapping(cls, d, "", problems)
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return built


# ---------------------------------------------------------------------------------------
# Building from plain values, and the type check.
# ---------------------------------------------------------------------------------------
def _from_mapping(cls, d, prefix: str, problems: list[str]):
    """An instance of the dataclass `cls` from a mapping, nested sections built in turn;
    unknown keys and wrong types are added to `problems` (and None returned)."""
    if not isinstance(d, dict):
        problems.append(f"{prefix[:-1] or 'the configuration'} must be a mapping, got {d!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        problems.append(f"unknown keys in {prefix[:-1]}: {unknown}" if prefix else f"unknown config keys: {unknown}")
    kwargs = {}
    for name, value in d.items():
        if name not in fields:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _from_mapping(hint, value, f"{prefix}{name}.", problems)
        elif typing.get_origin(hint) in (typing.Union, types.UnionType) or typing.get_origin(hint) is tuple:
            if isinstance(value, list):
                value = tuple(value)
        kwargs[name] = value
    if len(problems):
        return None
    problems += [p for name, value in kwargs.items() if (p := _type_problem(prefix + name, value, hints[name]))]
    if problems:
        return None
    if cls is IDAConfig:
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            problems += str(exc).split("\n  - ")[1:]
            return None
    return cls(**kwargs)


def _type_problem(name: str, value, hint) -> str | None:
    """Why `value` does not fit the annotation `hint` (None if it does)."""
    origin = typing.get_origin(hint)
    if origin is Literal:  # checked by choice_problems: a wrong choice still lets ranges be compared
        return None
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        found = [_type_problem(name, value, h) for h in options]
        if None in found:
            return None
        if value is not None and type(None) in options:  # say what the non-null option wants
            return found[[h is type(None) for h in options].index(False)] + " (or null)"
        return f"{name} has the wrong type: got {value!r}"
    if hint is type(None):
        return None if value is None else f"{name} must be null, got {value!r}"
    if hint is bool:
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{name} must be a whole number, got {value!r}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"{name} must be a number, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"{name} must be a string, got {value!r}"
    if hint is dict or origin is dict:
        return None if isinstance(value, dict) else f"{name} must be a mapping, got {value!r}"
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return f"{name} must be a list, got {value!r}"
        item = typing.get_args(hint)[0]
        bad = [v for v in value if _type_problem(name, v, item)]
        kind = "whole numbers" if item is int else "strings" if item is str else "values of its type"
        return f"{name} must hold {kind}, got {bad[0]!r}" if bad else None
    if dataclasses.is_dataclass(hint):
        return None if isinstance(value, hint) else f"{name} must be a mapping of its options, got {value!r}"
    return None


def choice_problems(obj, prefix: str = "") -> list[str]:
    """Every `Literal` field of the dataclass `obj` (and of its nested sections) against its choices."""
    problems = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            problems.append(f"{prefix}{f.name} must be one of {list(typing.get_args(hint))}, got {value!r}")
        elif dataclasses.is_dataclass(value):
            problems += choice_problems(value, f"{prefix}{f.name}.")
    return problems


def type_problems(obj, prefix: str = "") -> list[str]:
    """Every field of the dataclass `obj` (and of its nested sections) against its annotation."""
    problems = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        p = _type_problem(prefix + f.name, value, hints[f.name])
        if p:
            problems.append(p)
        elif dataclasses.is_dataclass(value):
            problems += type_problems(value, f"{prefix}{f.name}.")
    return problems


# ---------------------------------------------------------------------------------------
# YAML files, presets and dotted overrides: the one loader of the CLI and driver scripts.
# ---------------------------------------------------------------------------------------
def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIGS_DIR.glob("*.yaml"))}


def _resolve(source: str | Path) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    if str(source) in presets():
        return presets()[str(source)]
    if path.suffix in (".yaml", ".yml") or "/" in str(source):
        raise ConfigError(f"config file {source} does not exist")
    raise ConfigError(f"no config file or preset named {source!r} (presets: {sorted(presets())})")


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-3` is a string; configs are written as YAML 1.2 reads
    them (a number), so floats without a dot resolve as floats too."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str):
    return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def config_file_keys(source: str | Path) -> set[str]:
    """The top-level keys a config file sets itself (not through its base)."""
    return set(_read_yaml(_resolve(source)))


def config_values(source: str | Path | None = "default", _seen: tuple = ()) -> dict:
    """The plain values of a config file or preset, its `base:` chain merged under it."""
    if source is None:
        return IDAConfig().to_dict()
    path = _resolve(source)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: its base: chain comes back to itself")
    data = _read_yaml(path)
    base = data.pop("base", "default" if path.resolve() != presets().get("default", Path()).resolve() else None)
    values = config_values(base, _seen + (path.resolve(),))
    if data.get("task", values["task"]) != values["task"]:  # the base's task options are its task's
        values.update(task_kwargs={}, train_sizes=None)
    return _merge(values, data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "task_kwargs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(values: dict, overrides: dict[str, object]) -> dict:
    """Dotted keys (`amplify.tau`) set into nested plain values. A new task without new
    task options drops the old task's options and sizes, as a config file's does."""
    values = _merge(values, {})
    if "task" in overrides and overrides["task"] != values.get("task") and "task_kwargs" not in overrides:
        values.update(task_kwargs={}, train_sizes=None)
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = values
        for part in path:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {key}={value!r}: {part!r} is not a section of the config")
            node[part] = dict(node[part])
            node = node[part]
        node[leaf] = value
    return values


def load_config(source: str | Path | None = "default", overrides: dict[str, object] | None = None) -> IDAConfig:
    """An IDAConfig from a preset name or YAML path (None: the dataclass defaults), with dotted
    overrides on top; ConfigError naming every problem otherwise."""
    return IDAConfig.from_dict(apply_overrides(config_values(source), overrides or {}))


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` from the command line; the value is read as YAML (`3`, `0.5`, `true`, `[1, 2]`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not all(part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not key=value (e.g. amplify.tau=0.3)")
    try:
        return key, load_yaml(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return key, raw

