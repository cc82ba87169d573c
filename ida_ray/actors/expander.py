"""`TreeExpander`: an async Ray actor that expands many trees at once over a ReplicaPool.

    expander = ray.remote(TreeExpander).remote(replica_handles, task="sum", amplify=AmplifyConfig())
    results = ray.get(expander.expand.remote([ExpandJob("a", "3,5,7", "amplify", iteration=0, seed=1)]))

Jobs are `ida_ray.messages.ExpandJob`s; each result an `ExpandResult` (the tree and its
examples), in job order. In a run, `expand_and_stage` sends the results to the replay buffer
actor itself (ReplayStore.stage) and returns only each tree's `TreeSummary`: trees and examples
go from the expander to the buffer, and the coordinator sees counts. Trees from every concurrent `expand` call share one bound,
`trees_in_flight`; all their model calls go through the pool, which batches them across trees
(`ida_ray.expansion.expand_job` does the tree).

With `human_queue` (the run's `ida_ray.actors.human_queue` actor, `ida-ray train --expert human`), the
expert H of every amplification tree is a person answering on the /human page; distillation
trees are the model's alone and never ask H.

A tree's own failures (bad model output, a failing expert or a person's timeout, a bound hit, a
replica lost after all retries) are recorded on the tree, as everywhere in the core. A malformed
job (not an ExpandJob) is rejected before any tree starts, with an InvalidJob error.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time

from ida_ray.actors import node_id
from ida_ray.config import AmplifyConfig
from ida_ray.errors import StagingError
from ida_ray.expansion import expand_job
from ida_ray.experts import HumanExpert
from ida_ray.lm_expert import LMExpertConfig
from ida_ray.messages import ExpandJob, ExpandResult, InvalidJob, TreeSummary
from ida_ray.prompts import COMPACT, PromptFormat
from ida_ray.serving.engine_pool import ReplicaPool
from ida_ray.tasks import get_task


def check_jobs(jobs: list) -> list[ExpandJob]:
    """The jobs, or InvalidJob naming the first that is not an ExpandJob (ExpandJob checks its
    own fields when it is made)."""
    for i, job in enumerate(jobs):
        if not isinstance(job, ExpandJob):
            raise InvalidJob(f"job {i}: expected an ExpandJob, got {type(job).__name__}")
    return jobs


class TreeExpander:
    def __init__(self, replicas: list, task: str = "sum", task_kwargs: dict | None = None,
                 amplify: AmplifyConfig | dict | None = None, trees_in_flight: int = 256,
                 pool_options: dict | None = None, human_queue=None, fmt: PromptFormat = COMPACT,
                 lm_expert: LMExpertConfig | None = None, run_dir: str | None = None,
                 expert_replicas: list | None = None, replay_buffer=None, stage_timeout_s: float = 600.0):
        """H of amplification trees: the task's coded expert by default; a person when
        human_queue (the run's HumanQueueActor handle) is given; a language model with
        lm_expert (over HTTP, or over expert_replicas, the expert's own replica actors; its
        reply cache under run_dir). fmt: how the model's prompts and replies are written.
        replay_buffer: the run's ReplayBufferActor, where expand_and_stage sends its results
        (waiting at most stage_timeout_s)."""
        if trees_in_flight < 1:
            raise ValueError("trees_in_flight must be >= 1")
        self.task = get_task(task, **(task_kwargs or {}))
        self.cfg = amplify if isinstance(amplify, AmplifyConfig) else AmplifyConfig(**(amplify or {}))
        self.trees_in_flight = trees_in_flight
        self.replay_buffer = replay_buffer
        self.stage_timeout_s = stage_timeout_s
        self.fmt = fmt
        self.pool = ReplicaPool(replicas, **(pool_options or {}))
        self.expert = None  # amplify_tree's default: the task's coded expert
        self.expert_kind = "coded" if human_queue is None and lm_expert is None else "human" if human_queue else "lm"
        if human_queue is not None:
            from ida_ray.actors.human_queue import HumanQueueClient

            self.expert = HumanExpert(self.task, HumanQueueClient(human_queue))
        elif lm_expert is not None:
            from ida_ray.lm_expert import build_lm_expert

            expert_pool = ReplicaPool(expert_replicas, **(pool_options or {})) if expert_replicas else None
            self.expert = build_lm_expert(self.task, lm_expert, run_dir or ".", engine=expert_pool)
        self._slots: asyncio.Semaphore | None = None  # created on the actor's event loop
        self.in_flight = 0
        self.completed = 0
        self.failed = 0
        self.nodes = 0
        self.model_calls = 0
        self.busy_s = 0.0

    def _semaphore(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.trees_in_flight)
        return self._slots

    async def _one(self, job: ExpandJob) -> ExpandResult:
        self.pool.require_version(job.min_weight_version)
        async with self._semaphore():
            self.in_flight += 1
            try:
                result = await expand_job(self.task, self.pool, job, self.cfg, self.expert, self.fmt)
            finally:
                self.in_flight -= 1
        tree = result.tree
        self.completed += 1
        self.failed += tree.error is not None
        self.nodes += len(tree.nodes())
        self.model_calls += tree.model_calls
        return result

    async def expand(self, jobs: list[ExpandJob]) -> list[ExpandResult]:
        jobs = check_jobs(jobs)
        t0 = time.time()
        try:
            return list(await asyncio.gather(*(self._one(j) for j in jobs)))
        finally:
            self.busy_s += time.time() - t0

    async def expand_and_stage(self, jobs: list[ExpandJob]) -> list[TreeSummary]:
        """Expand the jobs, stage their trees and examples in the replay buffer, and return the
        trees' summaries, in job order. A buffer that does not take them within stage_timeout_s
        is a StagingError, raised to the dispatcher, which records the chunk's jobs as failed
        (and the run then fails staging those records)."""
        if self.replay_buffer is None:
            raise RuntimeError("this expander was started without the run's replay buffer: use expand")
        from ray.exceptions import RayActorError

        results = await self.expand(jobs)
        # A StagingError, not the buffer's own RayActorError: the dispatcher would take that
        # for this expander's death and re-expand the chunk elsewhere, to the same dead buffer.
        try:
            await asyncio.wait_for(self.replay_buffer.stage.remote(results), self.stage_timeout_s)
        except TimeoutError:
            raise StagingError(f"the replay buffer did not take {len(results)} trees within "
                               f"resources.stage_timeout_s={self.stage_timeout_s:g}s") from None
        except RayActorError as exc:
            raise StagingError(f"the replay buffer is lost ({type(exc).__name__})") from None
        return [r.summary() for r in results]

    async def swap_weights(self, payload, version: int) -> dict[str, int]:
        """Swap weights through this expander's pool (the coordinator may also swap directly)."""
        return await self.pool.swap_weights(payload, version)

    def remember_weights(self, payload_ref: list, version: int) -> None:
        """The latest payload's ObjectRef, wrapped in a list so Ray passes the reference rather
        than the bytes; used to resync replicas Ray restarts (see ReplicaPool)."""
        self.pool.remember_weights(payload_ref[0], version)

    def set_expert_budget(self, calls: int | None) -> None:
        """Endpoint calls this expander's LM expert may make from now (None: no cap)."""
        if self.expert_kind == "lm":
            self.expert.budget.set(calls)

    def set_amplify(self, amplify: AmplifyConfig | dict) -> None:
        self.cfg = amplify if isinstance(amplify, AmplifyConfig) else dataclasses.replace(self.cfg, **amplify)

    def health(self) -> dict:
        return {"pid": os.getpid(), "node_id": node_id(), "expert": self.expert_kind,
                "expert_stats": self.expert.stats_dict() if self.expert_kind == "lm" else None,
                "trees_in_flight": self.in_flight, "trees_completed": self.completed, "trees_failed": self.failed,
                "nodes": self.nodes, "model_calls": self.model_calls, "busy_s": round(self.busy_s, 2),
                "weight_version": self.pool.weight_version, "pool": self.pool.health()}


def start_expanders(n: int, replicas: list, *, name_prefix: str = "expander", num_cpus: float = 1,
                    max_restarts: int = 2, resources: dict | None = None, **kwargs) -> list:
    """n TreeExpander actors over the same replicas (kwargs go to TreeExpander)."""
    import ray

    cls = ray.remote(TreeExpander)
    return [cls.options(name=f"{name_prefix}-{i}", num_cpus=num_cpus, resources=resources or None,
                        max_restarts=max_restarts,
                        max_concurrency=10_000).remote(replicas, **kwargs) for i in range(n)]
