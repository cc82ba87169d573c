"""The learner's driver side: starts the Ray Train `TorchTrainer` (DDP) and runs one training
round per IDA iteration through the control actor (ida_ray/actors/learner.py).

Why one long-running `fit()`: IDA alternates expansion (replicas busy) with training. Calling
`TorchTrainer.fit()` once per iteration would pay the worker-group start (placement group,
worker processes, torch/transformers imports, process group) every iteration: measured at
22-26 s per fit() on a 2-core machine with 1-2 workers, more than a whole small iteration. So
`fit()` runs once, in a background thread of whoever owns the `Learner` (the Ray backend),
and the ranks (ida_ray/cluster/learner_worker.py) wait between iterations for a command.

A worker that dies is restarted by Ray Train (FailureConfig) from the latest reported
checkpoint and re-runs the pending command. Resuming a run passes the checkpoint directory in
`resume_from`.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import ray

from ida_ray.actors import HEAD_NODE
from ida_ray.actors.learner import LEARNER_CONTROL_NAME, LearnerControl
from ida_ray.checkpoint import LearnerFailure
from ida_ray.cluster.learner_worker import WorkerConfig, learner_loop
from ida_ray.config import IDAConfig
from ida_ray.messages import TrainResult
from ida_ray.storage import CHECKPOINTS_DIR, RunStorage
from ida_ray.training import train_command


class Learner:
    """Starts the TorchTrainer in a background thread; `train(iteration)` runs one round."""

    def __init__(self, cfg: IDAConfig, run_dir: str | Path, *, buffer_name: str, start_iteration: int = 0,
                 resume_from: str | Path | None = None, cpus_per_worker: float = 1.0,
                 torch_threads: int | None = None, max_failures: int = 1,
                 control_name: str = LEARNER_CONTROL_NAME, round_timeout_s: float = 3600.0):
        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve()
        self.buffer_name = buffer_name
        self.start_iteration = start_iteration
        self.resume_from = str(resume_from) if resume_from else None
        self.cpus_per_worker = cpus_per_worker
        self.torch_threads = torch_threads
        self.max_failures = max_failures
        self.control_name = control_name
        self.round_timeout_s = round_timeout_s
        self.name = f"learner-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.control = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.start_seconds: float | None = None
        self.last_digests: dict[int, str | None] = {}
        self.last_nodes: dict[int, str] = {}  # the Ray node of each rank, last round

    @property
    def checkpoints_ref(self) -> str:
        """Where Ray Train writes the checkpoints: <run_dir>/checkpoints, or <storage>/checkpoints
        (a path or URI) with cfg.storage, written there from each worker's own node."""
        if self.cfg.storage:
            return RunStorage(self.cfg.storage, self.cfg.storage_timeout_s).ref(CHECKPOINTS_DIR)
        return str(self.run_dir / CHECKPOINTS_DIR)

    def start(self) -> None:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        namespace = ray.get_runtime_context().namespace
        n = self.cfg.learner_workers
        # On the head, beside the coordinator: the learner's commands must outlive any worker node.
        self.control = LearnerControl.options(name=self.control_name, resources={HEAD_NODE: 0.001}).remote(n)
        config = WorkerConfig(
            ida_config=self.cfg.to_dict(), start_iteration=self.start_iteration, resume_from=self.resume_from,
            namespace=namespace, control_name=self.control_name, buffer_name=self.buffer_name,
            checkpoints_ref=self.checkpoints_ref, run_name=self.name, torch_threads=self.torch_threads)
        resources = {"CPU": self.cpus_per_worker, **self.cfg.resources.learner_resources}
        if self.cfg.use_gpu:
            resources["GPU"] = 1
        if self.cfg.storage:
            storage = RunStorage(self.cfg.storage, self.cfg.storage_timeout_s)
            storage_path, storage_filesystem = storage.checkpoints()
        else:
            storage_path, storage_filesystem = self.checkpoints_ref, None
        self.trainer = TorchTrainer(
            learner_loop, train_loop_config=dataclasses.asdict(config),
            torch_config=TorchConfig(backend="nccl" if self.cfg.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=n, use_gpu=self.cfg.use_gpu, resources_per_worker=resources,
                                         placement_strategy=self.cfg.resources.learner_placement),
            run_config=RunConfig(name=self.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                 # keep two: resume may need the one before the newest
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=self.max_failures)))
        self._started_at = time.time()
        self._thread = threading.Thread(target=self._fit, name="ida-learner-fit", daemon=True)
        self._thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as exc:  # surfaced by train(); the control actor wakes waiters
            self._error = exc
            try:
                ray.get(self.control.fail.remote(f"{type(exc).__name__}: {exc}"))
            except Exception:
                pass

    async def train(self, iteration: int, steps: int | None = None, adversary_steps: int | None = None,
                    broadcast_to: tuple = ()) -> TrainResult:
        """Run one training round on every rank (rank 0 then broadcasts the model into
        `broadcast_to`, with weight_sync "broadcast"); raises LearnerFailure if the run failed."""
        if self.control is None:
            raise LearnerFailure("learner not started")
        t0 = time.time()
        await self.control.submit.remote(train_command(self.cfg, iteration, steps, adversary_steps, broadcast_to))
        while (got := await self.control.results.remote(iteration, 5.0)).pending:
            if self._error is not None:
                raise LearnerFailure(f"learner run failed: {self._error}")
            if self._thread is not None and not self._thread.is_alive():
                raise LearnerFailure("learner run ended without a result")
            if time.time() - t0 > self.round_timeout_s:
                raise LearnerFailure(f"training round {iteration} took longer than {self.round_timeout_s}s")
        if got.failure is not None:
            raise LearnerFailure(f"learner run failed: {got.failure}")
        if self.start_seconds is None:
            ready = await self.control.ready_times.remote()
            if ready:
                self.start_seconds = round(max(ready.values()) - self._started_at, 2)
        first = got.ranks[0]
        self.last_digests = {r: v.digest for r, v in got.ranks.items()}
        self.last_nodes = {r: v.node_id for r, v in got.ranks.items()}
        return TrainResult(stats=first.stats, checkpoint_path=first.checkpoint_path, weights=first.payload_ref[0],
                           seconds=round(time.time() - t0, 3), ranks_in_sync=None if None in self.last_digests.values() else
                           len(set(self.last_digests.values())) == 1, broadcast=first.broadcast)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Let the workers leave their loop and fit() return."""
        if self.control is None:
            return
        try:
            ray.get(self.control.stop.remote(), timeout=10)
        except Exception:
            pass
        if self._thread is not None:
            self._thread.join(timeout_s)
