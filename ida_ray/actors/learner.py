"""The learner: a Ray Train `TorchTrainer` (DDP) that trains the model and the adversary on
minibatches sampled from the replay buffer actor, one round per IDA iteration.

Why one long-running `fit()`: IDA alternates expansion (replicas busy) with training. Calling
`TorchTrainer.fit()` once per iteration would pay the worker-group start (placement group,
worker processes, torch/transformers imports, process group) every iteration: measured at
22-26 s per fit() on a 2-core machine with 1-2 workers, more than a whole small iteration. So
`fit()` runs once, in a background thread of whoever owns the `Learner` (the coordinator), and
the workers' train loop waits between iterations for a command from a small named control
actor (`LearnerControl`). Per command each rank:

  1. samples its own minibatches from the replay buffer actor (seeded by iteration and rank),
  2. trains the model (answer / fan-out / fan-in imitation and distillation examples) and then
     the adversary (regression examples) with `ida_ray.training.Trainer`'s step functions over
     DDP-wrapped modules (gloo on CPU, NCCL on GPU): gradients are averaged across ranks,
  3. calls `ray.train.report(metrics, checkpoint=...)`: rank 0's checkpoint holds the model and
     adversary as HF directories (safetensors) and the optimizer states,
  4. publishes its parameter digest, and rank 0 the new weights payload (an object-store ref),
     to the control actor, where `Learner.train` collects them.

A worker that dies is restarted by Ray Train (FailureConfig) from the latest reported
checkpoint and re-runs the pending command. Resuming a run passes the checkpoint directory in
`resume_from`.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from ida_ray.config import IDAConfig
from ida_ray.errors import IDAError

LEARNER_CONTROL_NAME = "learner-control"
CHECKPOINT_PREFIX = "iteration_"


class LearnerFailure(IDAError):
    """The Ray Train run failed or a training round did not finish in time."""

    kind = "learner_failure"


# ---------------------------------------------------------------------------------------
# Control actor: commands in, per-rank results out.
# ---------------------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class LearnerControl:
    """Hands each training command to every rank and gathers their results.

    Commands are kept by iteration, so a rank restarted by Ray Train can pick up the command
    that was pending when its predecessor died."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._commands: dict[int, dict] = {}
        self._stop = False
        self._results: dict[int, dict[int, dict]] = {}
        self._failure: str | None = None
        self._ready: dict[int, float] = {}
        self._changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def submit(self, command: dict) -> None:
        self._commands[command["iteration"]] = command
        self._results.pop(command["iteration"], None)
        await self._notify()

    async def stop(self) -> None:
        self._stop = True
        await self._notify()

    async def fail(self, message: str) -> None:
        self._failure = message
        await self._notify()

    async def next_command(self, after: int) -> dict:
        """The first command for an iteration > `after`; {"stop": True} once stopped."""
        async with self._changed:
            while True:
                pending = sorted(i for i in self._commands if i > after)
                if pending:
                    return self._commands[pending[0]]
                if self._stop:
                    return {"stop": True}
                await self._changed.wait()

    async def publish(self, iteration: int, rank: int, result: dict) -> None:
        self._results.setdefault(iteration, {})[rank] = result
        await self._notify()

    async def results(self, iteration: int, timeout_s: float) -> dict:
        """{"ranks": {rank: result}} once every rank has published, {"failure": msg} if the
        run failed, {"pending": True} if neither happened within timeout_s."""
        async def ready():
            async with self._changed:
                while True:
                    if self._failure is not None:
                        return {"failure": self._failure}
                    got = self._results.get(iteration, {})
                    if len(got) >= self.world_size:
                        return {"ranks": got}
                    await self._changed.wait()
        try:
            return await asyncio.wait_for(ready(), timeout_s)
        except asyncio.TimeoutError:
            return {"pending": True}

    async def ready(self, rank: int, last: int) -> None:
        """A rank has built its model and waits for commands after iteration `last`. A rank
        that Ray Train restarted drops what its predecessor published for later iterations,
        so a round's results all come from one attempt."""
        self._ready.setdefault(rank, time.time())
        for it, got in self._results.items():
            if it > last:
                got.pop(rank, None)
        await self._notify()

    async def ready_times(self) -> dict[int, float]:
        return dict(self._ready)


# ---------------------------------------------------------------------------------------
# DDP training on one rank.
# ---------------------------------------------------------------------------------------
def _adversary_scorer_cls():
    import torch

    from ida_ray.engine import adversary_scores

    class AdversaryScorer(torch.nn.Module):
        """The adversary's scalar score as a module's forward. DDP syncs gradients of what runs
        through the wrapped module's forward; `adversary_scores` calls `adversary.model` and
        `adversary.score` directly, which would bypass a DDP wrapper around the adversary."""

        def __init__(self, adversary):
            super().__init__()
            self.adversary = adversary

        def forward(self, input_ids, attention_mask):
            return adversary_scores(self.adversary, input_ids, attention_mask)

    return AdversaryScorer


def scorer_loss(scorer, batch):
    import torch.nn.functional as F

    return F.mse_loss(scorer(batch["input_ids"], batch["attention_mask"]), batch["target"])


def make_ddp_trainer(model, adversary, tokenizer, train_cfg, seed: int, wrap, device):
    """A `Trainer` whose steps run through DDP-wrapped modules.

    `wrap` is `ray.train.torch.prepare_model` inside a Ray Train worker (moves to the device
    and wraps in DistributedDataParallel when the world has more than one rank). The
    optimizers are built over the unwrapped parameters, which DDP shares, not copies."""
    from ida_ray.losses import collate_adversary, collate_lm, model_loss
    from ida_ray.training import Trainer

    class DDPTrainer(Trainer):
        def __init__(self):
            model.to(device)
            adversary.to(device)
            super().__init__(model, adversary, tokenizer, train_cfg, seed)
            self.model_ddp = wrap(model)
            self.scorer_ddp = wrap(_adversary_scorer_cls()(adversary))

        def _to_device(self, batch):
            return {k: v.to(device) for k, v in batch.items()}

        def model_step(self, examples):
            return self._step(self.model_ddp, self.model_opt, model_loss,
                              self._to_device(collate_lm(self.tokenizer, examples)))

        def adversary_step(self, examples):
            return self._step(self.scorer_ddp, self.adversary_opt, scorer_loss,
                              self._to_device(collate_adversary(self.tokenizer, examples)))

    return DDPTrainer()


def make_honest_trainer(cfg: IDAConfig, wrap, device, rank: int, world_size: int):
    """`HonestIDATrainer` (objective "honest") on this rank. The two-headed model's alternating
    θ₁/θ₂ updates take their gradients with autograd.grad, so they are averaged across ranks by
    an explicit all-reduce; the adversary steps go through DDP as in `make_ddp_trainer`."""
    import torch.distributed as dist

    from ida_ray.honest.ida_trainer import HonestIDATrainer
    from ida_ray.honest.labels import simple_labeller
    from ida_ray.honest.two_headed import build_two_headed
    from ida_ray.losses import collate_adversary
    from ida_ray.models import build_adversary
    from ida_ray.tasks import get_task

    # Same seed on every rank: identical initial weights, as DDP's broadcast would make them.
    model, tokenizer = build_two_headed(cfg.model, cfg.seed)
    adversary, _ = build_adversary(cfg.model, cfg.seed + 1)
    model.to(device)
    adversary.to(device)

    def all_reduce_mean(grads):
        if world_size > 1 and dist.is_initialized():
            for g in grads:
                dist.all_reduce(g)
                g /= world_size

    class DDPHonestTrainer(HonestIDATrainer):
        def __init__(self):
            super().__init__(model, adversary, tokenizer, cfg.train, cfg.honest,
                             simple_labeller(get_task(cfg.task, **cfg.task_kwargs)), cfg.seed + rank, device,
                             reduce_grads=all_reduce_mean)
            self.scorer_ddp = wrap(_adversary_scorer_cls()(adversary))

        def adversary_step(self, examples):
            batch = {k: v.to(device) for k, v in collate_adversary(self.tokenizer, examples).items()}
            return self._step(self.scorer_ddp, self.adversary_opt, scorer_loss, batch)

    return DDPHonestTrainer()


def param_digest(*modules) -> str:
    """sha256 over every parameter's bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for m in modules:
        for name, p in sorted(m.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Per-rank batch so the DDP-averaged step sees about the configured global batch."""
    return max(1, math.ceil(global_batch / world_size))


def save_checkpoint(directory: str | Path, trainer, iteration: int, extra: dict | None = None) -> Path:
    """model/ and adversary/ as HF directories (safetensors + tokenizer, loadable by vLLM),
    optimizer.pt with both optimizers' states, learner.json last (its presence marks a
    complete checkpoint)."""
    import torch

    from ida_ray.models import save_pretrained

    d = Path(directory)
    two_headed = getattr(trainer, "two_headed", None)
    if two_headed is not None:  # model/ stays a plain HF directory (intended head) + the second head
        from ida_ray.honest.two_headed import save_two_headed

        save_two_headed(two_headed, trainer.tokenizer, d / "model")
    else:
        save_pretrained(trainer.model, trainer.tokenizer, d / "model")
    save_pretrained(trainer.adversary, trainer.tokenizer, d / "adversary")
    torch.save(trainer.optimizer_states(), d / "optimizer.pt")
    meta = {"iteration": iteration, "weight_version": iteration + 1,
            "objective": "honest" if two_headed is not None else "imitation", **(extra or {})}
    (d / "learner.json").write_text(json.dumps(meta))
    return d


def load_checkpoint(directory: str | Path, trainer, device="cpu") -> dict:
    """Load weights and optimizer states saved by `save_checkpoint`; returns learner.json."""
    import torch

    from ida_ray.models import load_adversary, load_model

    d = Path(directory)
    meta_path = d / "learner.json"
    if not meta_path.exists():
        raise LearnerFailure(f"{d} is not a complete learner checkpoint (no learner.json)")
    meta = json.loads(meta_path.read_text())
    two_headed = getattr(trainer, "two_headed", None)
    wanted, saved = ("honest" if two_headed is not None else "imitation"), meta.get("objective", "imitation")
    if saved != wanted:
        raise LearnerFailure(f"{d} was trained with objective {saved!r}; this run's objective is {wanted!r}")
    if two_headed is not None:
        from ida_ray.honest.two_headed import load_two_headed

        two_headed.load_state_dict(load_two_headed(d / "model").state_dict())
    else:
        trainer.model.load_state_dict(load_model(d / "model").state_dict())
    trainer.adversary.load_state_dict(load_adversary(d / "adversary").state_dict())
    # Our own file, but loaded as data only: no pickled code runs.
    trainer.load_optimizer_states(torch.load(d / "optimizer.pt", map_location=device, weights_only=True))
    return meta


def train_round(trainer, buffer, command: dict, rank: int, world_size: int, seed: int) -> dict:
    """One iteration's training on this rank: sample, model steps, adversary steps. Every rank
    must take the same number of DDP steps (a collective per step), so ranks agree by
    all-reduce on whether there is data of each kind before stepping."""
    import torch
    import torch.distributed as dist

    from ida_ray.examples import MODEL_KINDS, Example

    it, bs = command["iteration"], local_batch_size(trainer.cfg.batch_size, world_size)
    steps, adv_steps = command["steps"], command["adversary_steps"]
    base = (seed * 1_000_003 + it) * 1009 + rank
    lm, adv = ray.get([buffer.sample.remote(steps * bs, list(MODEL_KINDS), base * 2),
                       buffer.sample.remote(adv_steps * bs, ["adversary"], base * 2 + 1)])
    have = torch.tensor([len(lm) > 0, len(adv) > 0], dtype=torch.int64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
    lm, adv = [Example(**e) for e in lm], [Example(**e) for e in adv]
    trainer.prepare_round(lm)
    t0 = time.time()
    m_losses = [trainer.model_step(lm[i * bs:(i + 1) * bs]) for i in range(steps if have[0] else 0)]
    t_model = time.time() - t0
    a_losses = [trainer.adversary_step(adv[i * bs:(i + 1) * bs]) for i in range(adv_steps if have[1] else 0)]
    tail = lambda v: sum(v[-20:]) / len(v[-20:]) if v else float("nan")  # noqa: E731
    stats = torch.tensor([tail(m_losses), tail(a_losses)], dtype=torch.float64)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(stats)
        stats /= world_size
    out = {"model_loss": float(stats[0]), "adversary_loss": float(stats[1]),
           "model_steps": len(m_losses), "adversary_steps": len(a_losses),
           "model_train_seconds": round(t_model, 3), "train_seconds": round(time.time() - t0, 3),
           "local_batch_size": bs}
    if hasattr(trainer, "round_stats"):
        out["honest"] = trainer.round_stats(len(m_losses))
    return out


def learner_loop(config: dict) -> None:
    """The train_loop_per_worker of the TorchTrainer."""
    import torch

    import ray.train
    from ray.train.torch import get_device, prepare_model

    from ida_ray.models import build_adversary, build_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("torch_threads"):
        torch.set_num_threads(config["torch_threads"])
    cfg = IDAConfig.from_dict(config["ida_config"])
    device = get_device()
    probe_questions = None
    if cfg.objective == "honest":
        from ida_ray.honest.ida_trainer import honest_probe, questions_where_simple_errs
        from ida_ray.tasks import get_task

        trainer = make_honest_trainer(cfg, prepare_model, device, rank, world)
        task = get_task(cfg.task, **cfg.task_kwargs)
        if rank == 0:  # held out: a seed the run's own question draws never use
            probe_questions = questions_where_simple_errs(task, trainer.simple, cfg.sizes(task), 64,
                                                          seed=cfg.seed + 7_919_993)
    else:
        model, tokenizer = build_model(cfg.model, cfg.seed)
        adversary, _ = build_adversary(cfg.model, cfg.seed + 1)
        trainer = make_ddp_trainer(model, adversary, tokenizer, cfg.train, cfg.seed + rank, prepare_model, device)

    last = config["start_iteration"] - 1
    restored = ray.train.get_checkpoint()  # set when Ray Train restarted this worker group
    if restored is not None:
        with restored.as_directory() as d:
            last = load_checkpoint(d, trainer, device)["iteration"]
    elif config.get("resume_from"):
        meta = load_checkpoint(config["resume_from"], trainer, device)
        last = meta["iteration"]

    ns = config["namespace"]
    control = ray.get_actor(config["control_name"], namespace=ns)
    buffer = ray.get_actor(config["buffer_name"], namespace=ns)
    payload_ref = None  # kept alive until the next round, so the coordinator can fetch it
    ray.get(control.ready.remote(rank, last))
    while True:
        command = ray.get(control.next_command.remote(last))
        if command.get("stop"):
            break
        it = command["iteration"]
        t0 = time.time()
        metrics = train_round(trainer, buffer, command, rank, world, cfg.seed)
        metrics.update(iteration=it, weight_version=it + 1)
        if probe_questions is not None:
            metrics["honest"].update(honest_probe(trainer.two_headed, trainer.tokenizer, task, trainer.simple,
                                                  probe_questions))
        with tempfile.TemporaryDirectory() as tmp:
            t1 = time.time()
            checkpoint = None
            if rank == 0:
                save_checkpoint(tmp, trainer, it)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{it:04d}")
            metrics["checkpoint_seconds"] = round(time.time() - t1, 3)
        result = {"metrics": metrics, "digest": param_digest(getattr(trainer, "two_headed", trainer.model),
                                                             trainer.adversary)}
        if rank == 0:
            result["checkpoint_path"] = str(Path(config["storage_path"]) / config["name"] /
                                            f"{CHECKPOINT_PREFIX}{it:04d}")
            payload_ref = ray.put(build_payload(trainer.model, trainer.adversary))
            result["payload_ref"] = [payload_ref]  # in a list: Ray passes nested refs as refs
        result["metrics"]["round_seconds"] = round(time.time() - t0, 3)
        ray.get(control.publish.remote(it, rank, result))
        last = it
    del payload_ref


def build_payload(model, adversary):
    """The weights that replicas load after a training round (safetensors bytes)."""
    from ida_ray.serving.weights import WeightsPayload

    return WeightsPayload.from_modules(model, adversary)


# ---------------------------------------------------------------------------------------
# Driver side: owned by the coordinator.
# ---------------------------------------------------------------------------------------
@dataclass
class LearnerResult:
    iteration: int
    weight_version: int
    model_loss: float
    adversary_loss: float
    model_steps: int
    adversary_steps: int
    seconds: float
    checkpoint_path: str
    # ObjectRef of the WeightsPayload, owned by rank 0: it lives until that worker's next
    # round or the run's end, so swap it into the replicas before training again.
    payload_ref: object
    digests: dict[int, str] = field(default_factory=dict)
    rank_metrics: dict[int, dict] = field(default_factory=dict)

    @property
    def ranks_in_sync(self) -> bool:
        return len(set(self.digests.values())) == 1


def latest_checkpoint(checkpoints_root: str | Path, max_iteration: int | None = None) -> Path | None:
    """The newest complete learner checkpoint under run_dir/checkpoints (any launch), at or
    below max_iteration when given."""
    best: tuple[int, float, Path] | None = None
    for meta in Path(checkpoints_root).glob(f"*/{CHECKPOINT_PREFIX}*/learner.json"):
        try:
            it = json.loads(meta.read_text())["iteration"]
        except (ValueError, KeyError):
            continue
        if max_iteration is not None and it > max_iteration:
            continue
        key = (it, meta.stat().st_mtime, meta.parent)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


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

    @property
    def storage_path(self) -> Path:
        return self.run_dir / "checkpoints"

    def start(self) -> None:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        namespace = ray.get_runtime_context().namespace
        n = self.cfg.learner_workers
        self.control = LearnerControl.options(name=self.control_name).remote(n)
        config = {
            "ida_config": self.cfg.to_dict(), "start_iteration": self.start_iteration,
            "resume_from": self.resume_from, "namespace": namespace, "control_name": self.control_name,
            "buffer_name": self.buffer_name, "storage_path": str(self.storage_path), "name": self.name,
            "torch_threads": self.torch_threads,
        }
        resources = {"CPU": self.cpus_per_worker}
        if self.cfg.use_gpu:
            resources["GPU"] = 1
        self.trainer = TorchTrainer(
            learner_loop, train_loop_config=config,
            torch_config=TorchConfig(backend="nccl" if self.cfg.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=n, use_gpu=self.cfg.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=self.name, storage_path=str(self.storage_path),
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

    async def train(self, iteration: int, steps: int | None = None, adversary_steps: int | None = None) -> LearnerResult:
        """Run one training round on every rank; raises LearnerFailure if the run failed."""
        if self.control is None:
            raise LearnerFailure("learner not started")
        t = self.cfg.train
        t0 = time.time()
        await self.control.submit.remote({
            "iteration": iteration,
            "steps": t.steps_per_iteration if steps is None else steps,
            "adversary_steps": t.adversary_steps_per_iteration if adversary_steps is None else adversary_steps})
        while True:
            got = await self.control.results.remote(iteration, 5.0)
            if "ranks" in got:
                break
            if "failure" in got or self._error is not None:
                raise LearnerFailure(f"learner run failed: {got.get('failure') or self._error}")
            if self._thread is not None and not self._thread.is_alive():
                raise LearnerFailure("learner run ended without a result")
            if time.time() - t0 > self.round_timeout_s:
                raise LearnerFailure(f"training round {iteration} took longer than {self.round_timeout_s}s")
        if self.start_seconds is None:
            ready = await self.control.ready_times.remote()
            if ready:
                self.start_seconds = round(max(ready.values()) - self._started_at, 2)
        ranks = got["ranks"]
        m = ranks[0]["metrics"]
        return LearnerResult(
            iteration=iteration, weight_version=m["weight_version"], model_loss=m["model_loss"],
            adversary_loss=m["adversary_loss"], model_steps=m["model_steps"], adversary_steps=m["adversary_steps"],
            seconds=round(time.time() - t0, 3), checkpoint_path=ranks[0]["checkpoint_path"],
            payload_ref=ranks[0]["payload_ref"][0], digests={r: v["digest"] for r, v in ranks.items()},
            rank_metrics={r: v["metrics"] for r, v in ranks.items()})

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
