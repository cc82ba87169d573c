"""`ModelReplica`: one serving copy of the model and the adversary, as an async Ray actor.

    handles = start_replicas(2, model_dir, adversary_dir, engine="vllm")
    gens = ray.get(handles[0].generate.remote(["A1,2="]))
    ray.get(handles[0].load_weights.remote(ray.put(WeightsPayload.from_modules(m, a)), 1))

engine="vllm" serves the model on vLLM's AsyncLLM (ida_ray/serving/vllm_engine.py) and the adversary
either on a second vLLM engine with the pooling runner (adversary_backend="vllm", the default
on GPU) or on a torch module batched by MicroBatcher (adversary_backend="torch", the default on
CPU, where the two measured the same and torch saves an engine; see
ida_ray/serving/adversary_scorer.py). engine="torch" serves both with ida_ray.engine.TorchEngine, the
in-process fallback where vLLM is absent.

Weights. The initial model directories are packed into bytes by `start_replicas` and unpacked
by each replica on its own node, so nothing assumes a shared filesystem, and a replica that
Ray restarts comes back on the initial weights at version 0. Every request says the oldest
version it accepts (`min_version`, the latest the calling ReplicaPool swapped in); a replica
behind it refuses with StaleWeights rather than answer on old weights, and the pool loads the
latest payload into it before it serves again. `load_weights(payload, version)` takes a
`WeightsPayload` (ida_ray/serving/weights.py) from the object store, writes it to node-local storage
and reloads the engines in place (~30 ms for the tiny model on CPU); requests wait while the
swap runs and none mixes two versions.

With weight_sync "broadcast" the model's weights instead go straight from the learner's rank 0
into the replicas' vLLM workers, by vLLM's weight-transfer protocol (vLLM 0.32
`vllm.distributed.weight_transfer`; NCCL on GPUs, Gloo on CPU): replicas start with
`weight_transfer="nccl"` or `"gloo"`, and the learner drives them through the methods below
(init_weight_transfer_engine, start_weight_update, update_weights, finish_weight_update,
update_weight_version) with ida_ray.serving.weight_broadcast.WeightBroadcaster. The adversary,
small, still comes as a payload, and so do the model's weights for a replica the broadcast
missed.

Environment: on CPU each engine needs VLLM_CPU_KVCACHE_SPACE (GiB of KV cache), set through
the actor's runtime_env by `start_replicas`.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from ida_ray.actors import node_id
from ida_ray.engine import Generation
from ida_ray.errors import StaleWeights
from ida_ray.serving.step_log import list_summary
from ida_ray.serving.weights import (
    WEIGHTS_FILE,
    WeightsError,
    WeightsPayload,
    check_shapes,
    pack_dir,
    shapes_of_bytes,
    shapes_of_file,
    unpack_dir,
)

ENGINES = ("vllm", "torch")


@dataclass
class RecordedCalls:
    """The model calls a replica served while recording: generate prompts, logprob pairs."""

    generate: list[str] = field(default_factory=list)
    logprob: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class RawRun:
    """Recorded calls run on the engine at once (`ModelReplica.run_raw`)."""

    seconds: float
    replica_process_cpu_seconds: float
    """This process's CPU time over the run (the engine core's, a process of its own, is the caller's to read)."""
    model_calls: int
    generations: list[Generation] | None = None
    """With return_outputs: the generate calls' outputs, in order."""
    logprobs: list[float] | None = None
    """With return_outputs: the logprob calls' scores, in order."""


class ModelReplica:
    def __init__(self, model_dir, adversary_dir=None, *, engine: str = "vllm", adversary_backend: str | None = None,
                 max_new_tokens: int = 48, use_gpu: bool = False, tensor_parallel_size: int = 1,
                 max_num_seqs: int = 256, weight_transfer: str | None = None, name: str = "replica",
                 seed: int = 0, cache_size: int = 200_000, dtype: str = "float32"):
        """model_dir / adversary_dir: a local HF directory, or its files packed by
        `ida_ray.serving.weights.pack_dir` (what `start_replicas` passes, so no shared filesystem is
        needed). The engines start on the first call (`ready()`)."""
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.name = name
        self.engine_kind = engine
        # Default: the pooling engine on GPU; on CPU the torch module (measured as fast, and it
        # saves a second engine: see ida_ray/serving/adversary_scorer.py).
        self.adversary_backend = adversary_backend or ("vllm" if engine == "vllm" and use_gpu else "torch")
        if engine == "torch" and self.adversary_backend != "torch":
            raise ValueError("engine='torch' serves the adversary with torch too")
        self.max_new_tokens = max_new_tokens
        self.cache_size = cache_size  # greedy results kept per weight version; 0 turns caching off
        self.options = dict(use_gpu=use_gpu, tensor_parallel_size=tensor_parallel_size, max_num_seqs=max_num_seqs,
                            weight_transfer=weight_transfer, seed=seed, dtype=dtype)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"ida-{name}-"))
        self.model_dir = self._local_dir(model_dir, "initial/model")
        self.adversary_dir = None if adversary_dir is None else self._local_dir(adversary_dir, "initial/adversary")
        # Names and shapes the served models expect: a payload is checked before any swap.
        self.model_shapes = shapes_of_file(self.model_dir / WEIGHTS_FILE)
        self.adversary_shapes = None if self.adversary_dir is None else shapes_of_file(self.adversary_dir / WEIGHTS_FILE)
        self.engine = None
        self._start_lock: asyncio.Lock | None = None
        self.calls: Counter = Counter()  # actor method calls by kind
        self.requests: Counter = Counter()  # prompts (items) by kind
        self.in_flight = 0
        self.recorded: RecordedCalls | None = None  # model calls, while the throughput benchmark records them
        self.swaps = 0
        self.last_swap_s = None
        self.started_at = None

    def _local_dir(self, src, sub: str) -> Path:
        if isinstance(src, dict):
            return unpack_dir(src, self.workdir / sub)
        path = Path(src)
        if not (path / WEIGHTS_FILE).is_file():
            raise WeightsError(f"{path}: no {WEIGHTS_FILE} on this node; pass the directory packed with "
                               "ida_ray.serving.weights.pack_dir (start_replicas does) when nodes share no filesystem")
        return path

    # -- start-up ------------------------------------------------------------------
    async def _engine(self):
        if self.engine is not None:
            return self.engine
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.engine is None:
                t0 = time.time()
                # Built off the event loop, so health() answers while engines start.
                self.engine = await asyncio.to_thread(self._build_engine)
                self.started_at = time.time()
                self.start_seconds = round(self.started_at - t0, 2)
        return self.engine

    def _build_engine(self):
        if self.engine_kind == "vllm":
            from ida_ray.serving.vllm_engine import VllmEngine, VllmSettings

            o = self.options
            settings = VllmSettings(use_gpu=o["use_gpu"], tensor_parallel_size=o["tensor_parallel_size"],
                                    max_num_seqs=o["max_num_seqs"], weight_transfer=o["weight_transfer"],
                                    seed=o["seed"], dtype=o["dtype"])
            return VllmEngine(self.model_dir, self.adversary_dir, max_new_tokens=self.max_new_tokens,
                              adversary_backend=self.adversary_backend, settings=settings,
                              cache_size=self.cache_size)
        import torch

        from ida_ray.engine import TorchEngine
        from ida_ray.models import load_adversary, load_model, load_tokenizer

        adversary = None if self.adversary_dir is None else load_adversary(self.adversary_dir)
        model = load_model(self.model_dir, getattr(torch, self.options["dtype"]))
        return TorchEngine(model, adversary, load_tokenizer(self.model_dir), max_new_tokens=self.max_new_tokens,
                           cache_size=self.cache_size)

    async def ready(self) -> dict:
        """Start the engines if needed; returns health()."""
        await self._engine()
        return self.health()

    # -- serving -------------------------------------------------------------------
    async def _serve(self, kind: str, n: int, call, min_version: int):
        engine = await self._engine()
        if engine.weight_version < min_version:
            # Restarted by Ray on its creation weights while the run has moved on: answering
            # would mix old weights into the trees (and past the staleness bound in mode async).
            self.calls["refused_stale"] += 1
            raise StaleWeights(f"{self.name} holds weight version {engine.weight_version}; the request needs "
                               f">= {min_version}")
        self.calls[kind] += 1
        self.requests[kind] += n
        self.in_flight += 1
        try:
            return await call(engine)
        finally:
            self.in_flight -= 1

    # min_version: the oldest weight version the caller accepts (ReplicaPool sends the latest it
    # has swapped in); a replica behind it raises StaleWeights instead of answering.
    async def generate(self, prompts: list[str], min_version: int = 0):
        prompts = list(prompts)
        if self.recorded is not None:
            self.recorded.generate += prompts
        return await self._serve("generate", len(prompts), lambda e: e.generate(prompts), min_version)

    async def logprob(self, prompts: list[str], completions: list[str], min_version: int = 0) -> list[float]:
        prompts, completions = list(prompts), list(completions)
        _same_length(prompts, completions)
        if self.recorded is not None:
            self.recorded.logprob += list(zip(prompts, completions))
        return await self._serve("logprob", len(prompts), lambda e: e.logprob(prompts, completions), min_version)

    # -- the raw engine (the throughput benchmark's yardstick) -----------------------------
    def record_calls(self, on: bool) -> RecordedCalls | None:
        """Start (on) or stop recording the model calls this replica serves; stopping returns them."""
        got, self.recorded = self.recorded, (RecordedCalls() if on else None)
        return None if on else got

    async def run_raw(self, calls: RecordedCalls, return_outputs: bool = False) -> RawRun:
        """`calls` handed to this replica's engine all at once - no trees, no pool, no actor
        call per batch: what the engine does with the same model calls at its own pace."""
        engine = await self._engine()
        if self.engine_kind == "vllm":  # the calls were just served: no head start from their cached prefixes
            await engine.llm.reset_prefix_cache()
        prompts, completions = [p for p, _ in calls.logprob], [c for _, c in calls.logprob]
        t0, cpu0 = time.perf_counter(), time.process_time()
        generations, logprobs = await asyncio.gather(engine.generate(list(calls.generate)),
                                                     engine.logprob(prompts, completions))
        return RawRun(seconds=time.perf_counter() - t0, replica_process_cpu_seconds=time.process_time() - cpu0,
                      model_calls=len(generations) + len(logprobs), generations=generations if return_outputs else None,
                      logprobs=logprobs if return_outputs else None)

    async def adversary(self, prompts: list[str], completions: list[str], min_version: int = 0) -> list[float]:
        prompts, completions = list(prompts), list(completions)
        _same_length(prompts, completions)
        return await self._serve("adversary", len(prompts), lambda e: e.adversary(prompts, completions), min_version)

    # -- weights -------------------------------------------------------------------
    async def load_weights(self, payload: WeightsPayload, version: int, model: bool = True) -> int:
        """Swap the payload's weights in place; returns the version now served. model=False:
        the payload's adversary only (weight_sync "broadcast" has sent the model already)."""
        if not isinstance(payload, WeightsPayload):
            raise WeightsError(f"load_weights needs a WeightsPayload, got {type(payload).__name__}")
        if not model:
            if payload.adversary is None:
                return self.weight_version()
            payload = replace(payload, model=None)
        if payload.model is not None:
            check_shapes(self.model_shapes, shapes_of_bytes(payload.model), "model")
        if payload.adversary is not None and self.adversary_shapes is not None:
            check_shapes(self.adversary_shapes, shapes_of_bytes(payload.adversary), "adversary")
        engine = await self._engine()
        t0 = time.time()
        if self.engine_kind == "vllm":
            target = self.workdir / f"v{version}"
            model_dir, adversary_dir = payload.write_dirs(target)
            await engine.reload(model_dir, adversary_dir, version)
            for old in self.workdir.glob("v*"):  # keep node-local storage to one version
                if old != target:
                    shutil.rmtree(old, ignore_errors=True)
        else:
            await asyncio.to_thread(engine.load_state, payload.model_state(), payload.adversary_state(), version)
        self.swaps += 1
        self.last_swap_s = round(time.time() - t0, 4)
        return engine.weight_version

    def weight_version(self) -> int:
        return 0 if self.engine is None else self.engine.weight_version

    # vLLM's weight-transfer protocol (weight_sync "broadcast"); see the module docstring.
    def _vllm(self):
        if self.engine_kind != "vllm":
            raise WeightsError("vLLM weight transfer needs engine='vllm'")
        return self._engine()

    async def init_weight_transfer_engine(self, request) -> None:
        await (await self._vllm()).init_weight_transfer_engine(request)

    async def start_weight_update(self) -> None:
        await (await self._vllm()).start_weight_update()

    async def update_weights(self, request) -> None:
        await (await self._vllm()).update_weights(request)

    async def finish_weight_update(self) -> None:
        await (await self._vllm()).finish_weight_update()

    async def update_weight_version(self, new_version: str) -> None:
        (await self._vllm())._set_version(int(new_version))
        self.swaps += 1

    async def shutdown_weight_transfer_engine(self) -> None:
        await (await self._vllm()).llm.shutdown_weight_transfer_engine()

    # -- status --------------------------------------------------------------------
    def health(self) -> dict:
        e = self.engine
        out = {"name": self.name, "pid": os.getpid(), "node_id": node_id(), "placement_group": placement_group_id(),
               "engine": self.engine_kind,
               "adversary_backend": self.adversary_backend,
               "started": e is not None, "version": self.weight_version(), "in_flight": self.in_flight,
               "queue_depth": 0, "calls": dict(self.calls), "requests": dict(self.requests),
               "swaps": self.swaps, "last_swap_s": self.last_swap_s,
               "batch_sizes": {"model": list_summary([]), "adversary": list_summary([])}}
        if e is None:
            return out
        out["start_seconds"] = self.start_seconds
        if self.engine_kind == "vllm":
            out["queue_depth"] = e.queue_depth()
            out["batch_sizes"] = {"model": e.model_batches.summary(), "adversary": e.adversary_batch_summary()}
        else:
            out["queue_depth"] = sum(len(b._pending) for b in (e._gen, e._lp, e._adv))
            out["batch_sizes"] = {"model": list_summary(e._gen.batch_sizes + e._lp.batch_sizes),
                                  "adversary": list_summary(e._adv.batch_sizes)}
        return out

    def shutdown(self) -> None:
        if self.engine is not None and self.engine_kind == "vllm":
            self.engine.shutdown()
        self.engine = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def _same_length(prompts, completions) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")


def replica_runtime_env(kv_cache_gib: int = 1, omp_threads_bind: str | None = None, use_gpu: bool = False) -> dict:
    # VLLM_CPU_KVCACHE_SPACE sizes the CPU KV cache per engine; without it vLLM-CPU takes a
    # share of all memory per engine, too much with several engines on one node.
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "TOKENIZERS_PARALLELISM": "false"}
    if not use_gpu:
        # vLLM-CPU otherwise runs the model in a separate worker process beside the engine
        # core (the multiproc executor), and every step crosses a process boundary. With this
        # flag the CPU platform keeps the uni-process executor: the model runs inside the
        # engine-core process (AsyncLLM still keeps the engine core apart from this actor).
        # Measured with experiments.throughput's workload at 256 trees in flight: ~20% fewer
        # CPU-seconds per node on a 2-core machine, same outputs.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if omp_threads_bind:
        # vLLM-CPU's default ("auto") pins every engine's threads to the same cores, which
        # suits one engine per node; "nobind" lets the OS place several engines sharing a node.
        env["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind
    return {"env_vars": env}


_CREATION_ARGS: dict[str, tuple] = {}


def placement_group_id() -> str | None:
    """The placement group this actor runs in (hex id), or None."""
    import ray

    group = ray.util.get_current_placement_group() if ray.is_initialized() else None
    return group.id.hex() if group is not None else None


def replica_bundles(num_cpus: float, use_gpu: bool, tensor_parallel_size: int, resources: dict | None) -> list[dict]:
    """One replica's placement group bundles: the actor's CPUs and custom resources in the
    first, and with use_gpu one GPU per tensor-parallel rank, a bundle each (vLLM's Ray
    executor runs its workers in the placement group it is started in, one GPU per bundle;
    with one rank the actor itself holds the GPU). [] when there is nothing to reserve."""
    first = {k: v for k, v in {"CPU": num_cpus, **(resources or {})}.items() if v}
    if use_gpu:
        return [{**first, "GPU": 1}] + [{"GPU": 1} for _ in range(tensor_parallel_size - 1)]
    return [first] if first else []


def start_replicas(n: int, model_dir, adversary_dir=None, *, engine: str = "vllm", use_gpu: bool = False,
                   tensor_parallel_size: int = 1, max_new_tokens: int = 48, name_prefix: str = "replica",
                   adversary_backend: str | None = None, num_cpus: float = 1, max_restarts: int = 2,
                   max_task_retries: int = 0, kv_cache_gib: int = 1, omp_threads_bind: str | None = None,
                   max_num_seqs: int = 256,
                   weight_transfer: str | None = None, cache_size: int = 200_000, dtype: str = "float32",
                   resources: dict | None = None, placement: bool | None = None, wait: bool = True,
                   timeout_s: float = 600) -> list:
    """Start n named replica actors (name_prefix-0, ...) and, with wait, block until every
    engine has started. resources: custom Ray resources each asks for (placement). With
    `placement` (default: with use_gpu) each replica runs in a placement group of its own,
    "<name>-placement" (replica_bundles, STRICT_PACK: a tensor-parallel replica's GPUs on one
    node), which Ray keeps when it restarts the actor and removes when the job ends (remove it
    by name to free it sooner). A replica that fails to start is killed, its group removed,
    and the error raised."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if n < 1:
        raise ValueError("start_replicas needs n >= 1")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    # One copy of the packed directories in the object store, shared by every replica. Ray
    # restarts an actor from its creation arguments, so the driver keeps these references
    # alive for as long as it runs (ray-project/ray#53727).
    model_files = ray.put(pack_dir(model_dir))
    adversary_files = None if adversary_dir is None else ray.put(pack_dir(adversary_dir))
    _CREATION_ARGS[name_prefix] = (model_files, adversary_files)
    actor_cls = ray.remote(ModelReplica)
    gpus = (1 if tensor_parallel_size == 1 else 0) if use_gpu else 0  # TP>1: vLLM places its own workers
    handles, groups = [], []
    use_groups = use_gpu if placement is None else placement
    bundles = replica_bundles(num_cpus, use_gpu, tensor_parallel_size, resources) if use_groups else []
    for i in range(n):
        name = f"{name_prefix}-{i}"
        scheduling = {}  # not `placement`: that is the caller's choice, read above
        if bundles:
            groups.append(placement_group(bundles, strategy="STRICT_PACK", name=f"{name}-placement"))
            scheduling = {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                groups[-1], placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}
        handles.append(actor_cls.options(
            name=name, num_cpus=num_cpus, num_gpus=gpus, resources=resources or None, max_restarts=max_restarts,
            max_task_retries=max_task_retries, max_concurrency=10_000,
            runtime_env=replica_runtime_env(kv_cache_gib, omp_threads_bind, use_gpu), **scheduling,
        ).remote(model_files, adversary_files, engine=engine, adversary_backend=adversary_backend,
                 max_new_tokens=max_new_tokens, use_gpu=use_gpu, tensor_parallel_size=tensor_parallel_size,
                 max_num_seqs=max_num_seqs, weight_transfer=weight_transfer, name=name, cache_size=cache_size,
                 dtype=dtype))
    if wait:
        try:
            try:
                ray.get([g.ready() for g in groups], timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(f"the replicas' placement groups ({bundles} each, on one node) were not placed "
                                   f"within {timeout_s:g}s: no node of the cluster has those resources free") from None
            ray.get([h.ready.remote() for h in handles], timeout=timeout_s)
        except Exception:
            for h in handles:
                ray.kill(h, no_restart=True)
            for g in groups:
                remove_placement_group(g)
            raise
    return handles
