"""The Ray backend of the IDA loop: model replicas (vLLM or torch engines), tree expanders over
them, the replay buffer actor and the Ray Train learner. It runs inside the coordinator actor
(ida_ray/actors/coordinator.py), which hosts the loop.

  start    replay buffer, learner workers (starting while the replicas start), replicas from
           the initial or the resume checkpoint's weights, expanders over them
  expand   jobs in chunks over the expanders, re-issuing the chunks of an expander that dies
           (ida_ray/cluster/job_dispatch.py); replica queue depths watched meanwhile
  record   examples and tree records into the replay buffer actor
  train    one round on every learner rank (ida_ray/cluster/learner_group.py)
  swap     the new weights payload into every replica, checked by version; the expanders'
           pools keep it to resync replicas that Ray restarts
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from ida_ray.cluster.dashboard import IDAMetrics
from ida_ray.cluster.job_dispatch import dispatch_jobs, expander_reachable
from ida_ray.config import IDAConfig
from ida_ray.errors import ConfigError, StagingError
from ida_ray.loop import Backend, Progress
from ida_ray.messages import DispatchStats, ExpandJob, ExpandResult, TrainResult, TreeSummary
from ida_ray.run_dir import DASHBOARD_FILE, write_json_atomic
from ida_ray.storage import checkpoint_on_disk
from ida_ray.tasks import get_task

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
def _payload_copy(payload):
    """The payload again, as a new object owned by whoever called this task."""
    return payload


async def owned_copy(ref, timeout_s: float = 600.0):
    """The learner's weights payload as an object the caller (the coordinator) owns. The
    learner worker that put it owns the original, and an object dies with its owner: after Ray
    Train restarts that worker, a replica that Ray restarts could not be resynced until the
    next round. The copy is made by a task beside the original (a task's result belongs to its
    caller), so the bytes never pass through the coordinator; it holds a second copy of the
    weights in the learner node's object store until the next swap. A copy that does not
    finish within timeout_s is given up, and the original used."""
    copy = _payload_copy.remote(ref)
    ready, _ = await asyncio.to_thread(ray.wait, [copy], timeout=timeout_s, fetch_local=False)
    if not ready:
        log.warning("the weights payload was not copied within %.0fs; swapping the learner's own", timeout_s)
        ray.cancel(copy, force=True)
        return ref
    return copy


class RayBackend(Backend):
    def __init__(self, cfg: IDAConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.task = get_task(cfg.task, **cfg.task_kwargs)
        self.metrics = IDAMetrics(self.run_dir.name)
        self.replicas: list = []
        self.expanders: list = []
        self.expert_replicas: list = []  # the LM expert's own replicas (lm_expert.backend cluster)
        self.engine = None  # the ReplicaPool, once the replicas are up
        self.buffer = None
        self.learner = None
        self.latest_weights: tuple[object, int] | None = None  # (payload ref, version) last swapped
        self.expert_share: int | None = None  # each expander's LM-expert calls this iteration (None: no cap)
        self.max_queue_depth: dict[str, int] = {}
        self.setup_seconds: dict[str, float] = {}

    async def start(self, completed: int, checkpoint: str | None, report=lambda phase: None) -> dict:
        from ida_ray.actors.expander import start_expanders
        from ida_ray.actors.replay_buffer import REPLAY_BUFFER_NAME, start_replay_buffer
        from ida_ray.actors.replica import start_replicas
        from ida_ray.cluster.learner_group import Learner
        from ida_ray.models import create_model_dirs
        from ida_ray.serving.weights import WeightsPayload

        cfg, res = self.cfg, self.cfg.resources
        report("starting replay buffer")
        self.buffer = start_replay_buffer(cfg.train.replay_capacity, self.run_dir, cfg.seed,
                                          completed_iterations=completed if checkpoint else None, records=cfg.records)
        await self.buffer.stats.remote()
        # The learner's workers start (model build, process group) while the replicas start.
        report("starting learner")
        self.learner = Learner(cfg, self.run_dir, buffer_name=REPLAY_BUFFER_NAME, start_iteration=completed,
                               resume_from=checkpoint, cpus_per_worker=res.learner_cpus,
                               torch_threads=res.learner_threads, round_timeout_s=res.round_timeout_s,
                               max_failures=res.restarts)
        self.learner.start()
        t1 = time.time()
        report(f"starting {cfg.replicas} {cfg.engine} replica(s)")
        if checkpoint:  # a path, or a URI in cfg.storage: copied here, and the copy removed once served
            async with checkpoint_on_disk(checkpoint, self.run_dir, cfg.storage_timeout_s) as local:
                await self.launch_replicas(local / "model", local / "adversary")
                # The checkpoint's weights are served; give them their version number (and keep
                # them in the object store for resyncs).
                ref = ray.put(WeightsPayload.from_dirs(local / "model", local / "adversary"))
                await self.engine.swap_weights(ref, completed)
                self.latest_weights = (ref, completed)
        else:
            await self.launch_replicas(*create_model_dirs(self.run_dir / "initial", cfg.model, cfg.seed))
        self.setup_seconds["replicas"] = round(time.time() - t1, 2)
        report(f"starting {cfg.expanders} expander(s)")
        human_queue = None
        if cfg.expert == "human":  # the driver's queue actor (the one its /human page answers)
            from ida_ray.actors.human_queue import start_human_queue

            human_queue = await asyncio.to_thread(start_human_queue, cfg.human_timeout_s)
        lm = cfg.lm_expert if cfg.expert == "lm" else None
        if lm is not None and lm.backend == "cluster":  # H's own replicas: its weights never change
            t2 = time.time()
            report(f"starting {lm.replicas} expert replica(s) of {lm.path}")
            self.expert_replicas = await asyncio.to_thread(
                start_replicas, lm.replicas, lm.path, None, engine=cfg.engine, use_gpu=cfg.use_gpu,
                tensor_parallel_size=lm.gpus_per_replica, max_new_tokens=lm.max_tokens, name_prefix="expert",
                num_cpus=res.replica_cpus, kv_cache_gib=res.kv_cache_gib)
            self.setup_seconds["expert_replicas"] = round(time.time() - t2, 2)
        self.expanders = start_expanders(cfg.expanders, self.replicas, num_cpus=res.expander_cpus,
                                         resources=res.expander_resources, max_restarts=res.restarts, task=cfg.task,
                                         task_kwargs=cfg.task_kwargs, amplify=cfg.amplify, fmt=cfg.model.make_format(),
                                         trees_in_flight=max(1, math.ceil(cfg.trees_in_flight / cfg.expanders)),
                                         human_queue=human_queue, lm_expert=lm, run_dir=str(self.run_dir),
                                         expert_replicas=self.expert_replicas or None, replay_buffer=self.buffer,
                                         stage_timeout_s=res.stage_timeout_s)
        try:
            await asyncio.wait_for(asyncio.gather(*(e.health.remote() for e in self.expanders)), res.start_timeout_s)
        except TimeoutError:
            raise ConfigError(f"the {cfg.expanders} expander(s) did not start within resources.start_timeout_s="
                              f"{res.start_timeout_s:g}s: does the cluster have the CPUs they ask for "
                              f"(resources.expander_cpus={res.expander_cpus}, on top of "
                              f"{res.required_cpus(cfg) - cfg.expanders * res.expander_cpus:g} for the other "
                              f"actors)?") from None
        return dict(self.setup_seconds)

    async def launch_replicas(self, model_dir: Path, adversary_dir: Path) -> None:
        """M's replicas, serving these weights, and the pool over them."""
        from ida_ray.actors.replica import start_replicas
        from ida_ray.serving.engine_pool import ReplicaPool

        cfg, res = self.cfg, self.cfg.resources
        # start_replicas blocks until every engine is up: run it off the actor's event loop.
        self.replicas = await asyncio.to_thread(
            start_replicas, cfg.replicas, str(model_dir), str(adversary_dir), engine=cfg.engine,
            use_gpu=cfg.use_gpu, max_new_tokens=cfg.amplify.max_new_tokens, num_cpus=res.replica_cpus,
            kv_cache_gib=res.kv_cache_gib, dtype=cfg.model.dtype, resources=res.replica_resources,
            weight_transfer=("nccl" if cfg.use_gpu else "gloo") if cfg.weight_sync == "broadcast" else None,
            tensor_parallel_size=res.replica_gpus if cfg.use_gpu else 1, max_restarts=res.restarts)
        self.engine = ReplicaPool(self.replicas)

    async def expand(self, jobs: list[ExpandJob], on_done: Progress) -> tuple[list[TreeSummary], DispatchStats]:
        """Chunks small enough that progress shows and a lost expander costs little. The
        expanders stage trees and examples in the replay buffer; this sees their summaries."""
        chunk = max(4, math.ceil(len(jobs) / (len(self.expanders) * 8)))
        self.max_queue_depth = {}
        await asyncio.gather(*(self._tell_weights(e) for e in self.expanders), return_exceptions=True)
        watcher = asyncio.ensure_future(self._watch_replicas())
        try:
            trees, failed, stats = await dispatch_jobs(
                self.expanders, jobs, self.task, chunk_size=chunk, on_chunk_done=on_done, on_reissue=self._tell_state,
                restart_timeout_s=self.cfg.resources.restart_timeout_s)
        finally:
            watcher.cancel()
        await self.stage(failed)
        return trees, stats

    async def stage(self, results: list[ExpandResult]) -> None:
        if results:
            await self._to_buffer(self.buffer.stage.remote(results), f"stage {len(results)} trees")

    async def _to_buffer(self, call, what: str):
        timeout = self.cfg.resources.stage_timeout_s
        try:
            return await asyncio.wait_for(call, timeout)
        except TimeoutError:
            raise StagingError(f"the replay buffer did not {what} within resources.stage_timeout_s={timeout:g}s") \
                from None
        except RayActorError as exc:
            raise StagingError(f"the replay buffer is lost ({type(exc).__name__}); could not {what}") from exc

    async def set_expert_budget(self, calls: int | None) -> None:
        """Each expander's share of the iteration's expert calls. An expander that Ray is
        restarting (async mode sets the budget while the last round's kills land) is waited for
        up to resources.restart_timeout_s; one that does not come back gets its share with the
        first chunk re-issued to it (_tell_state), and the dispatch routes around it meanwhile."""
        self.expert_share = None if calls is None else math.ceil(calls / len(self.expanders))

        async def tell(expander) -> None:
            try:
                await expander.set_expert_budget.remote(self.expert_share)
            except RayActorError:
                if not await expander_reachable(expander, self.cfg.resources.restart_timeout_s):
                    log.warning("an expander did not come back to take its expert budget; it gets it on re-issue")
                    return
                await expander.set_expert_budget.remote(self.expert_share)

        await asyncio.gather(*(tell(e) for e in self.expanders))

    async def _tell_weights(self, expander) -> None:
        """A restarted expander's pool starts without the latest weights."""
        if self.latest_weights is not None:
            ref, version = self.latest_weights
            await expander.remember_weights.remote([ref], version)

    async def _tell_state(self, expander) -> None:
        """What a restarted expander lost: the latest weights and this iteration's expert share
        (so a restart can overspend the run's budget by at most one share)."""
        await self._tell_weights(expander)
        await expander.set_expert_budget.remote(self.expert_share)

    async def record(self, iteration: int, trees: list[tuple[str, str]]) -> int:
        return await self._to_buffer(self.buffer.commit.remote(iteration, trees), f"commit iteration {iteration}")

    async def drop_stale(self, min_version: int) -> int:
        return await self.buffer.drop_stale.remote(min_version)

    async def train(self, iteration: int) -> TrainResult:
        broadcast_to = tuple(self.replicas) if self.cfg.weight_sync == "broadcast" else ()
        return await self.learner.train(iteration, broadcast_to=broadcast_to)

    async def swap(self, trained: TrainResult) -> dict[str, int]:
        """The round's weights into every replica. With weight_sync "broadcast" the learner has
        sent the model already: the pool loads only the payload's adversary into a replica that
        holds it, and the whole payload into one that does not (the broadcast failed, or Ray
        restarted it since)."""
        if trained.broadcast is not None and trained.broadcast.error:
            log.warning("weight broadcast of version %d failed (%s); the object store serves it",
                        trained.weight_version, trained.broadcast.error)
        weights = await owned_copy(trained.weights)
        swapped = await self.engine.swap_weights(weights, trained.weight_version)
        self.latest_weights = (weights, trained.weight_version)
        for e in self.expanders:  # their pools resync replicas that Ray restarts
            e.remember_weights.remote([weights], trained.weight_version)
        return swapped

    async def figures(self) -> dict:
        health = await self.replica_health()
        self.metrics.record_replicas(health)
        return {"replica_versions": {h["name"]: h["version"] for h in health},
                "replica_nodes": {h["name"]: h["node_id"] for h in health},
                "learner_nodes": {str(r): n for r, n in self.learner.last_nodes.items()},
                "replica_max_queue_depth": dict(self.max_queue_depth), "replica_faults": await self._pool_faults(),
                "learner_start_seconds": self.learner.start_seconds}

    def publish(self, m: dict, trees: list[TreeSummary], phases: dict[str, float]) -> None:
        self.metrics.record_trees(m, trees)
        self.metrics.record_losses(m["model_loss"], m["adversary_loss"])
        self.metrics.record_accuracy(m["accuracy_by_size"])
        self.metrics.record_honest(m.get("honest"))
        self.metrics.record_expert(m)
        self.metrics.record_iteration(m["iteration"] + 1, m["buffer"], phases)
        write_json_atomic(self.run_dir / DASHBOARD_FILE, self.metrics.snapshot)

    async def _watch_replicas(self, every_s: float = 2.0) -> None:
        """While trees expand, send each replica's queue depth and weight version to the
        dashboard and keep the deepest queue seen (an idle replica's queue is always empty)."""
        while True:
            health = await self.replica_health()
            self.metrics.record_replicas(health)
            for h in health:
                self.max_queue_depth[h["name"]] = max(self.max_queue_depth.get(h["name"], 0), h.get("queue_depth", 0))
            await asyncio.sleep(every_s)

    async def replica_health(self, timeout_s: float = 10.0) -> list[dict]:
        """health() of every replica that answers; one that is dead or restarting is left out
        (the pools route around it), so a lost replica never stops the loop."""
        async def one(r):
            return await asyncio.wait_for(r.health.remote(), timeout_s)
        got = await asyncio.gather(*(one(r) for r in self.replicas), return_exceptions=True)
        return [h for h in got if isinstance(h, dict)]

    async def _pool_faults(self) -> dict:
        """Replica faults the expanders' pools handled so far (batches re-sent after a replica
        died, items failed for good, restarted replicas brought back to the latest weights,
        batches a restarted replica refused for its old weights), summed over the expanders
        that answer; an expander restarted by Ray starts from 0."""
        got = await asyncio.gather(*(e.health.remote() for e in self.expanders), return_exceptions=True)
        pools = [h["pool"] for h in got if isinstance(h, dict)]
        return {k: sum(p.get(k, 0) for p in pools) for k in ("resent", "failed_items", "resyncs", "refused_stale")}

    async def health(self) -> dict:
        return {"replicas": await self.replica_health(),
                "expanders": list(await asyncio.gather(*(e.health.remote() for e in self.expanders))),
                "replay_buffer": await self.buffer.stats.remote() if self.buffer else None,
                "learner_start_seconds": self.learner.start_seconds if self.learner else None}

    async def close(self) -> None:
        """Stop the learner's run, then the actors this backend started."""
        if self.learner is not None:
            await asyncio.to_thread(self.learner.stop)
            if self.learner.control is not None:
                ray.kill(self.learner.control)
        for r in self.replicas + self.expert_replicas:
            try:
                await asyncio.wait_for(r.shutdown.remote(), 30)
            except Exception:  # noqa: BLE001 - a dead replica has nothing left to shut down
                pass
        for h in self.expanders + self.replicas + self.expert_replicas + ([self.buffer] if self.buffer else []):
            ray.kill(h, no_restart=True)
        if self.engine is not None:
            self.engine.close()
