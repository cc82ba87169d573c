"""The per-rank loop of the Ray Train learner: the `train_loop_per_worker` of its TorchTrainer.

Each rank builds the run's objective (DDP-wrapped by `prepare_model`: gloo on CPU, NCCL on
GPU), restores the latest checkpoint if Ray Train restarted it (or the run's resume
checkpoint), then per `TrainCommand` from the control actor:

  1. samples its own minibatches from the replay buffer actor (seeded by iteration and rank)
     and trains the model, then the adversary (`ida_ray.training.train_round`): gradients
     are averaged across ranks;
  2. calls `ray.train.report(metrics, checkpoint=...)`: rank 0's checkpoint is written by
     `ida_ray.checkpoint.save_checkpoint`;
  3. publishes its `RankResult` (the parameter digest with train.check_ranks_in_sync; rank 0 also the checkpoint path and the new
     weights payload, an object-store ref) to the control actor; with weight_sync "broadcast"
     rank 0 first sends the model straight into the replicas (ida_ray/serving/weight_broadcast.py).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from ida_ray.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from ida_ray.config import IDAConfig
from ida_ray.messages import RankResult
from ida_ray.storage import fetch_dir, join_ref


@dataclass(frozen=True)
class WorkerConfig:
    """What every rank is started with (the TorchTrainer's train_loop_config)."""

    ida_config: dict
    start_iteration: int
    resume_from: str | None
    namespace: str
    control_name: str
    buffer_name: str
    checkpoints_ref: str  # Ray Train's storage: a path, or a URI with cfg.storage
    run_name: str
    torch_threads: int | None = None


def learner_loop(config: dict) -> None:
    import torch
    from ray.train.torch import get_device, prepare_model

    from ida_ray.serving.weights import WeightsPayload
    from ida_ray.training import build_objective, param_digest, train_round

    wc = WorkerConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if wc.torch_threads:
        torch.set_num_threads(wc.torch_threads)
    cfg = IDAConfig.from_dict(wc.ida_config)
    device = get_device()
    objective = build_objective(cfg, rank=rank, world_size=world, device=device, wrap=prepare_model)

    last = wc.start_iteration - 1
    restored = ray.train.get_checkpoint()  # set when Ray Train restarted this worker group
    if restored is not None:
        with restored.as_directory() as d:
            last = load_checkpoint(d, objective, device)["iteration"]
    elif wc.resume_from:  # a path, or a URI in the run's storage: copied to this node first
        with tempfile.TemporaryDirectory() as tmp:
            local = fetch_dir(wc.resume_from, Path(tmp) / "checkpoint")
            last = load_checkpoint(local, objective, device)["iteration"]

    control = ray.get_actor(wc.control_name, namespace=wc.namespace)
    buffer = ray.get_actor(wc.buffer_name, namespace=wc.namespace)

    def sample(n: int, kinds: tuple[str, ...], seed: int, balance_sizes: bool = False):
        return ray.get(buffer.sample.remote(n, list(kinds), seed, balance_sizes))

    payload_ref = None  # kept alive until the next round, so the coordinator can fetch it
    broadcaster = None
    if rank == 0 and cfg.weight_sync == "broadcast":  # straight into the replicas' vLLM workers
        from ida_ray.serving.weight_broadcast import WeightBroadcaster

        broadcaster = WeightBroadcaster("nccl" if cfg.use_gpu else "gloo", cfg.model.dtype, cfg.weight_sync_timeout_s,
                                        ranks_per_replica=cfg.resources.replica_gpus if cfg.use_gpu else 1)
    ray.get(control.ready.remote(rank, last))
    while (command := ray.get(control.next_command.remote(last))) is not None:
        t0 = time.time()
        stats = train_round(objective, sample, command, seed=cfg.seed, rank=rank, world_size=world)
        name = checkpoint_name(command.iteration)
        with tempfile.TemporaryDirectory() as tmp:
            t1 = time.time()
            checkpoint = None
            if rank == 0:
                save_checkpoint(tmp, objective, command.iteration)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(dataclasses.asdict(stats), checkpoint=checkpoint, checkpoint_dir_name=name)
            stats.checkpoint_seconds = round(time.time() - t1, 3)
        result = RankResult(rank=rank, stats=stats,
                            digest=param_digest(objective) if cfg.train.check_ranks_in_sync else None,
                            node_id=ray.get_runtime_context().get_node_id())
        if rank == 0:
            result.checkpoint_path = join_ref(wc.checkpoints_ref, wc.run_name, name)
            payload_ref = ray.put(WeightsPayload.from_modules(objective.served_model, objective.adversary))
            result.payload_ref = [payload_ref]
            if broadcaster is not None and command.broadcast_to:
                result.broadcast = broadcaster.send(objective.served_model, command.broadcast_to, stats.weight_version)
        stats.round_seconds = round(time.time() - t0, 3)
        ray.get(control.publish.remote(result))
        last = command.iteration
    if broadcaster is not None:
        broadcaster.close()
    del payload_ref
