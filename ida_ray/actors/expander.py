"""`TreeExpander`: an async Ray actor that expands many trees at once over a ReplicaPool.

    expander = ray.remote(TreeExpander).remote(replica_handles, task="sum", amplify=AmplifyConfig())
    results = ray.get(expander.expand.remote([{"question": "3,5,7", "mode": "amplify", "seed": 1,
                                               "iteration": 0, "source": "train", "job_id": "a"}]))

A job is {"question", "mode": "amplify" | "distill", "seed", "iteration", "source", "job_id"}
(optional "hprime": bool overrides AmplifyConfig.use_hprime for an amplify job). Each result is
{"job_id", "tree": Tree.to_dict(), "examples": [Example.to_dict(), ...]}, in job order. Trees
from every concurrent `expand` call share one bound, `trees_in_flight`; all their model calls
go through the pool, which batches them across trees.

With `human_queue` (the run's `ida_ray.actors.human_queue` actor, `ida-ray train --expert human`), the
expert H of every amplification tree is a person answering on the /human page; distillation
trees are the model's alone and never ask H.

A tree's own failures (bad model output, a failing expert or a person's timeout, a bound hit, a
replica lost after all retries) are recorded on the tree, as everywhere in the core. A malformed
job is rejected before any tree starts, with an InvalidJob error naming the job and the problem.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time

from ida_ray.serving.engine_pool import ReplicaPool
from ida_ray.amplify import amplify_tree, distill_tree
from ida_ray.config import AmplifyConfig
from ida_ray.errors import IDAError
from ida_ray.examples import tree_examples
from ida_ray.human_expert import HumanExpert
from ida_ray.tasks import get_task

MODES = ("amplify", "distill")


class InvalidJob(IDAError, ValueError):
    kind = "invalid_job"


def check_job(job, index: int) -> dict:
    """The job with defaults filled in, or InvalidJob."""
    if not isinstance(job, dict):
        raise InvalidJob(f"job {index}: expected a dict, got {type(job).__name__}")
    if not isinstance(job.get("question"), str):
        raise InvalidJob(f"job {index}: 'question' must be a string, got {job.get('question')!r}")
    mode = job.get("mode", "amplify")
    if mode not in MODES:
        raise InvalidJob(f"job {index}: 'mode' must be one of {MODES}, got {mode!r}")
    out = {"seed": 0, "iteration": 0, "source": "train", "job_id": str(index), **job, "mode": mode}
    for key in ("seed", "iteration"):
        if not isinstance(out[key], int):
            raise InvalidJob(f"job {index}: {key!r} must be an int, got {out[key]!r}")
    return out


class TreeExpander:
    def __init__(self, replicas: list, task: str = "sum", task_kwargs: dict | None = None,
                 amplify: AmplifyConfig | dict | None = None, trees_in_flight: int = 256,
                 pool_options: dict | None = None, human_queue=None):
        """human_queue: the run's HumanQueueActor handle; its person is H of amplification trees
        (default: the task's coded expert)."""
        if trees_in_flight < 1:
            raise ValueError("trees_in_flight must be >= 1")
        self.task = get_task(task, **(task_kwargs or {}))
        self.cfg = amplify if isinstance(amplify, AmplifyConfig) else AmplifyConfig(**(amplify or {}))
        self.trees_in_flight = trees_in_flight
        self.pool = ReplicaPool(replicas, **(pool_options or {}))
        self.expert = None  # amplify_tree's default: the task's coded expert
        if human_queue is not None:
            from ida_ray.actors.human_queue import HumanQueueClient

            self.expert = HumanExpert(self.task, HumanQueueClient(human_queue))
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

    async def _one(self, job: dict) -> dict:
        async with self._semaphore():
            self.in_flight += 1
            try:
                if job["mode"] == "amplify":
                    tree = await amplify_tree(self.task, self.pool, job["question"], self.cfg,
                                              random.Random(job["seed"]), job["iteration"],
                                              hprime=job.get("hprime"), source=job["source"], expert=self.expert)
                else:
                    tree = await distill_tree(self.task, self.pool, job["question"], self.cfg, job["iteration"],
                                              source=job["source"])
            finally:
                self.in_flight -= 1
        self.completed += 1
        self.failed += tree.error is not None
        self.nodes += len(tree.nodes())
        self.model_calls += tree.model_calls
        return {"job_id": job["job_id"], "tree": tree.to_dict(), "examples": [e.to_dict() for e in tree_examples(tree)]}

    async def expand(self, jobs: list[dict]) -> list[dict]:
        jobs = [check_job(j, i) for i, j in enumerate(jobs)]
        t0 = time.time()
        try:
            return list(await asyncio.gather(*(self._one(j) for j in jobs)))
        finally:
            self.busy_s += time.time() - t0

    async def swap_weights(self, payload, version: int) -> dict[str, int]:
        """Swap weights through this expander's pool (the coordinator may also swap directly)."""
        return await self.pool.swap_weights(payload, version)

    def remember_weights(self, payload_ref: list, version: int) -> None:
        """The latest payload's ObjectRef, wrapped in a list so Ray passes the reference rather
        than the bytes; used to resync replicas Ray restarts (see ReplicaPool)."""
        self.pool.remember_weights(payload_ref[0], version)

    def set_amplify(self, amplify: AmplifyConfig | dict) -> None:
        self.cfg = amplify if isinstance(amplify, AmplifyConfig) else dataclasses.replace(self.cfg, **amplify)

    def health(self) -> dict:
        return {"pid": os.getpid(), "expert": "coded" if self.expert is None else "human",
                "trees_in_flight": self.in_flight, "trees_completed": self.completed, "trees_failed": self.failed,
                "nodes": self.nodes, "model_calls": self.model_calls, "busy_s": round(self.busy_s, 2),
                "weight_version": self.pool.weight_version, "pool": self.pool.health()}


def start_expanders(n: int, replicas: list, *, name_prefix: str = "expander", num_cpus: float = 1,
                    max_restarts: int = 2, **kwargs) -> list:
    """n TreeExpander actors over the same replicas (kwargs go to TreeExpander)."""
    import ray

    cls = ray.remote(TreeExpander)
    return [cls.options(name=f"{name_prefix}-{i}", num_cpus=num_cpus, max_restarts=max_restarts,
                        max_concurrency=10_000).remote(replicas, **kwargs) for i in range(n)]
