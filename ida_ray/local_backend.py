"""The in-process backend: the whole IDA loop in one process, on the torch engine, no Ray.

The engine serves its own copy of the weights: like a replica, it sees new weights only when
they are swapped in after training. The learner is the same `train_round` over the same
objective that every Ray Train rank runs, sampling from the same `ReplayStore`, and it writes
the same checkpoints, so a local run resumes, and reads, like a cluster run.
"""
from __future__ import annotations

import asyncio
import copy
import shutil
import time
from pathlib import Path

from ida_ray.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from ida_ray.config import IDAConfig
from ida_ray.engine import TorchEngine, gather_limited
from ida_ray.errors import ConfigError
from ida_ray.expansion import expand_job
from ida_ray.loop import Backend, Progress
from ida_ray.messages import DispatchStats, ExpandJob, ExpandResult, TrainResult, TreeSummary
from ida_ray.replay import ReplayStore
from ida_ray.storage import CHECKPOINTS_DIR, RunStorage, bounded, checkpoint_on_disk
from ida_ray.tasks import get_task
from ida_ray.training import build_objective, train_command, train_round

KEEP_CHECKPOINTS = 2  # resume may need the one before the newest


class LocalBackend(Backend):
    def __init__(self, cfg: IDAConfig):
        from transformers.utils import logging as hf_logging

        from ida_ray.preflight import backend_problems

        problems = backend_problems(cfg)
        if problems:  # refused, not ignored, however the backend is made
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        hf_logging.disable_progress_bar()  # a checkpoint per iteration: no bar for each shard
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.task = get_task(cfg.task, **cfg.task_kwargs)
        self.objective = build_objective(cfg)
        self.fmt = cfg.model.make_format(self.objective.tokenizer)
        self.engine = TorchEngine(copy.deepcopy(self.objective.served_model), copy.deepcopy(self.objective.adversary),
                                  self.objective.tokenizer, max_new_tokens=cfg.amplify.max_new_tokens)
        self.store: ReplayStore | None = None
        self.storage = RunStorage(cfg.storage, cfg.storage_timeout_s) if cfg.storage else None
        self.expert = None  # H: the task's coded expert, unless a language model
        if cfg.expert == "lm":
            from ida_ray.lm_expert import build_lm_expert

            self.expert = build_lm_expert(self.task, cfg.lm_expert, self.run_dir)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR / "local"

    async def start(self, completed: int, checkpoint: str | None, report=lambda phase: None) -> dict:
        t0 = time.time()
        self.store = ReplayStore(self.cfg.train.replay_capacity, self.run_dir, self.cfg.seed,
                                 completed_iterations=completed if checkpoint else None, records=self.cfg.records)
        if checkpoint:  # a path, or a URI in cfg.storage
            async with checkpoint_on_disk(checkpoint, self.run_dir, self.cfg.storage_timeout_s) as local:
                load_checkpoint(local, self.objective)
            self._serve(self._weights(), completed)
        return {"engine": round(time.time() - t0, 2)}

    async def expand(self, jobs: list[ExpandJob], on_done: Progress) -> tuple[list[TreeSummary], DispatchStats]:
        async def one(job: ExpandJob) -> ExpandResult:
            result = await expand_job(self.task, self.engine, job, self.cfg.amplify, self.expert, self.fmt)
            on_done(1)
            return result

        results = await gather_limited([one(j) for j in jobs], self.cfg.trees_in_flight)
        self.store.stage(results)
        return [r.summary() for r in results], DispatchStats(submitted=len(jobs), chunks=1)

    async def stage(self, results: list[ExpandResult]) -> None:
        self.store.stage(results)

    async def set_expert_budget(self, calls: int | None) -> None:
        if self.expert is not None:
            self.expert.budget.set(calls)

    async def record(self, iteration: int, trees: list[tuple[str, str]]) -> int:
        return self.store.commit(iteration, trees)

    async def drop_stale(self, min_version: int) -> int:
        return self.store.drop_stale(min_version)

    async def train(self, iteration: int) -> TrainResult:
        t0 = time.time()
        command = train_command(self.cfg, iteration)
        # Off the event loop: progress stays live while the model trains.
        stats = await asyncio.to_thread(train_round, self.objective, self.store.sample, command, seed=self.cfg.seed)
        t1 = time.time()
        path = save_checkpoint(self.checkpoints / checkpoint_name(iteration), self.objective, iteration)
        ref = str(path)
        if self.storage is not None:  # as the Ray learner does: the checkpoint lives in storage
            name = f"local/{path.name}"
            ref = await asyncio.to_thread(bounded, lambda: self.storage.put_checkpoint(path, name),
                                          self.cfg.storage_timeout_s, f"copying {path} to {self.cfg.storage}")
            for _, old in self.storage.checkpoint_names()[KEEP_CHECKPOINTS:]:
                self.storage.delete_checkpoint(old)
        for old in sorted(self.checkpoints.glob("iteration_*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        stats.checkpoint_seconds = round(time.time() - t1, 3)
        stats.round_seconds = round(time.time() - t0, 3)
        return TrainResult(stats=stats, checkpoint_path=ref, weights=self._weights(),
                           seconds=stats.round_seconds)

    async def swap(self, trained: TrainResult) -> dict[str, int]:
        self._serve(trained.weights, trained.weight_version)
        return {"local": self.engine.weight_version}

    def _weights(self) -> tuple[dict, dict]:
        return (copy.deepcopy(self.objective.served_model.state_dict()),
                copy.deepcopy(self.objective.adversary.state_dict()))

    def _serve(self, weights: tuple[dict, dict], version: int) -> None:
        model_state, adversary_state = weights
        self.engine.load_state(model_state, adversary_state, version)

    async def close(self) -> None:
        if self.expert is not None:
            await self.expert.client.close()
