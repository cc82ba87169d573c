"""The coordinator: a named async Ray actor ("ida-coordinator") that hosts the IDA loop
(`ida_ray.loop.IDARun`) over the Ray backend (`ida_ray.cluster.ray_backend.RayBackend`), in
the cluster, so the run's actors are reached from one place that outlives no driver call.
Every method hands off to the run or the backend."""
from __future__ import annotations

import copy

import ray

from ida_ray.actors import HEAD_NODE, node_id
from ida_ray.cluster.ray_backend import RayBackend
from ida_ray.config import IDAConfig
from ida_ray.loop import IDARun
from ida_ray.questions import UserQuestion

COORDINATOR_NAME = "ida-coordinator"


class IDACoordinator:
    def __init__(self, cfg: IDAConfig, resume: bool = False, user_questions: list[UserQuestion] | None = None,
                 questions_file: str | None = None):
        """user_questions: the entries of a questions file, read and checked by the driver
        (`ida_ray.preflight.check_questions_file`); each is amplified once over the run."""
        self.backend = RayBackend(cfg)
        self.run = IDARun(cfg, self.backend, resume=resume, user_questions=user_questions,
                          questions_file=questions_file)

    async def setup(self) -> dict:
        return await self.run.start()

    async def run_iteration(self, it: int) -> dict:
        return await self.run.run_iteration(it)

    def progress(self) -> dict:
        return self.run.progress()

    def get_history(self) -> list[dict]:
        return copy.deepcopy(self.run.history)

    def dashboard_snapshot(self) -> dict:
        return copy.deepcopy(self.backend.metrics.snapshot)

    async def health(self) -> dict:
        return {"completed": self.run.completed, "progress": self.run.progress(), "node_id": node_id(),
                **await self.backend.health()}

    async def shutdown(self) -> None:
        self.run.set_phase("shutting down")
        await self.run.close()
        await self.backend.close()
        self.run.set_phase("stopped")


def start_coordinator(cfg: IDAConfig, resume: bool = False, name: str = COORDINATOR_NAME,
                      user_questions: list[UserQuestion] | None = None, questions_file: str | None = None):
    # The learner's fit() thread blocks in ray.get by design (it is not the event loop);
    # Ray's warning about blocking gets in async actors would only mislead.
    env = {"env_vars": {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}}
    cls = ray.remote(num_cpus=0, max_concurrency=1000)(IDACoordinator)
    return cls.options(name=name, runtime_env=env, resources={HEAD_NODE: 0.001}).remote(
        cfg, resume, list(user_questions or []), None if questions_file is None else str(questions_file))
