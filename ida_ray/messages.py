"""The typed messages that pass between the parts of a run: tree jobs and their results,
training commands and round results. Plain dataclasses, engine- and Ray-agnostic; Ray
pickles them across actors as they are."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from ida_ray.errors import IDAError
from ida_ray.examples import Example
from ida_ray.tree import Tree

Mode = Literal["amplify", "distill"]
Source = Literal["train", "adversarial", "user"]


class InvalidJob(IDAError, ValueError):
    kind = "invalid_job"


@dataclass(frozen=True)
class ExpandJob:
    """One tree to expand."""

    job_id: str
    """Unique within an iteration: "a3" (amplification), "d7" (distillation), "u2" (questions file)."""
    question: str
    mode: Mode
    iteration: int
    source: Source = "train"
    seed: int = 0
    """Seeds the tree's branch choices and audits, so a re-issued tree is the same tree."""
    hprime: bool | None = None
    """Overrides AmplifyConfig.use_hprime for this tree (None: the config's)."""
    min_weight_version: int = 0
    """The weights the run had published when it made the job: no model call of the tree is
    answered by older ones (a replica that Ray restarted on its creation weights refuses)."""

    def __post_init__(self):
        if not isinstance(self.question, str):
            raise InvalidJob(f"job {self.job_id}: question must be a string, got {self.question!r}")
        if self.mode not in ("amplify", "distill"):
            raise InvalidJob(f"job {self.job_id}: mode must be 'amplify' or 'distill', got {self.mode!r}")
        if self.source not in ("train", "adversarial", "user"):
            raise InvalidJob(f"job {self.job_id}: source must be train, adversarial or user, got {self.source!r}")
        for name in ("seed", "iteration", "min_weight_version"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidJob(f"job {self.job_id}: {name} must be an int, got {value!r}")

    def rng(self) -> random.Random:
        return random.Random(self.seed)


@dataclass
class ExpandResult:
    """A job's tree (a failed one carries its error) and the training examples it yields."""

    job_id: str
    tree: Tree
    examples: list[Example]

    def summary(self) -> TreeSummary:
        t = self.tree
        nodes = t.nodes()
        return TreeSummary(
            job_id=self.job_id, tree_id=t.tree_id, iteration=t.iteration, mode=t.mode, source=t.source, size=t.size,
            error_kind=t.error["kind"] if t.error else None, expert_calls=t.expert_calls, model_calls=t.model_calls,
            nodes=len(nodes), answered_by=dict(Counter(n.answered_by for n in nodes if n.answered_by)),
            expert_usage=dict(t.expert_usage), examples=len(self.examples))


@dataclass(frozen=True)
class TreeSummary:
    """What the loop needs of an expanded tree: its counts, not its nodes or examples. The
    expander hands the tree and its examples to the replay buffer (ReplayStore.stage), and the
    loop, which only counts, gets this: the coordinator is off the data path."""

    job_id: str
    tree_id: str
    iteration: int
    mode: Mode
    source: Source
    size: int
    error_kind: str | None
    """The tree's error record's kind; None: the tree completed."""
    expert_calls: int
    model_calls: int
    nodes: int
    answered_by: dict[str, int]
    """Nodes answered by each of expert, hprime and model."""
    expert_usage: dict[str, int]
    """An LM expert's requests, cache hits, parse retries and tokens (Tree.expert_usage)."""
    examples: int
    """Training examples the tree gave."""


@dataclass
class DispatchStats:
    """What expanding an iteration's jobs took: on the Ray backend, chunks over the expanders,
    re-sends and losses; the local backend expands in one piece."""

    submitted: int = 0
    chunks: int = 0
    reissued_chunks: int = 0
    """Chunks sent again after their expander died."""
    reissued_jobs: int = 0
    failed_chunks: int = 0
    """Chunks given failure records (no expander answered, or it raised)."""
    lost_jobs: int = 0
    rejected: int = 0
    """Questions-file entries refused before expansion (malformed_question)."""


@dataclass(frozen=True)
class TrainCommand:
    """One training round, the same on every learner rank."""

    iteration: int
    model_steps: int
    adversary_steps: int
    first_step: int = 0
    """The run's model steps before this round: where the learning-rate schedule stands."""
    total_steps: int = 0
    """The run's model steps in all (the schedule's end; 0: the rate stays at train.lr)."""
    broadcast_to: tuple = ()
    """weight_sync "broadcast": the replica actors rank 0 sends the round's model to, straight
    into their vLLM workers (ida_ray/serving/weight_broadcast.py); empty: none."""


@dataclass
class RoundStats:
    """One rank's training round."""

    iteration: int
    weight_version: int
    model_loss: float
    adversary_loss: float
    model_steps: int
    adversary_steps: int
    model_train_seconds: float
    train_seconds: float
    local_batch_size: int
    objective_stats: dict = field(default_factory=dict)
    """The objective's own figures of the round (honest: C, the trusted set, the probe)."""
    checkpoint_seconds: float = 0.0
    round_seconds: float = 0.0
    oldest_weight_version: int | None = None
    """The oldest weight version among the examples the round trained on (None: no examples):
    what max_staleness bounds."""


@dataclass
class BroadcastReport:
    """Rank 0's broadcast of a round's model into the replicas (weight_sync "broadcast")."""

    replicas: int
    seconds: float
    """From the first call to the replicas to the last: group (re)started, weights sent,
    version set."""
    bytes: int = 0
    joined: bool = False
    """Whether the group was (re)started this round (first round, or a replica restarted)."""
    error: str | None = None
    """Why it failed (None: every replica holds the round's model); the object-store payload
    then serves the round."""


@dataclass
class RankResult:
    """What a learner rank publishes after a round."""

    rank: int
    stats: RoundStats
    digest: str | None
    node_id: str = ""
    """The Ray node the rank ran on."""
    """sha256 of the rank's parameters: equal on every rank when DDP keeps them in sync."""
    checkpoint_path: str | None = None
    """Rank 0: the round's checkpoint directory."""
    payload_ref: list | None = None
    """Rank 0: [ObjectRef of the WeightsPayload], in a list so Ray passes the reference."""
    broadcast: BroadcastReport | None = None
    """Rank 0, with weight_sync "broadcast": how the round's model went to the replicas."""


@dataclass
class TrainResult:
    """A training round as the loop sees it, from either backend."""

    stats: RoundStats
    """Rank 0's round."""
    checkpoint_path: str
    weights: object
    """What `Backend.swap` serves: a payload ObjectRef (ray) or the modules' states (local)."""
    seconds: float
    ranks_in_sync: bool | None = None
    """Whether every rank held identical weights after the round (None: not checked,
    train.check_ranks_in_sync off)."""
    broadcast: BroadcastReport | None = None
    """The round's broadcast into the replicas (weight_sync "broadcast"), else None."""

    @property
    def weight_version(self) -> int:
        return self.stats.weight_version
