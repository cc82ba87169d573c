"""Weights by collective broadcast, from the learner's rank 0 straight into the replicas' vLLM
workers, over vLLM's weight-transfer protocol (vLLM 0.32 `vllm.distributed.weight_transfer`).

    broadcaster = WeightBroadcaster("gloo", "float32", timeout_s=300)   # "nccl" on GPUs
    report = broadcaster.send(model, replica_handles, version)          # every round

The protocol (each replica: `init_weight_transfer_engine` once, then per round
`start_weight_update`, `update_weights` running while the sender broadcasts, and
`finish_weight_update`) is vLLM's; the replica actor passes each call to its engine, which
closes its swap gate for the round (ida_ray/serving/vllm_engine.py), so no request runs on a mix
of two versions. Two transports:

- "nccl" on GPUs: vLLM's own NCCL engine (`NCCLTrainerWeightTransferEngine`), GPU to GPU in the
  served dtype, packed into buffers;
- "gloo" on CPU: the engine below, the same protocol over a torch Gloo group, tensors packed
  into buckets of `bucket_bytes`. It is what the tests and the CPU measurements run; no
  replica fetches a payload or writes one to its disk.

vLLM's Ray client sends one init to every handle, as if they were data-parallel ranks of one
engine; ida-ray's replicas are separate engines, so `ReplicaSyncClient` gives each its own
rank offset in the group, and bounds every call with a timeout (a sync that hangs is the
failure the anchors' users report most).
"""
from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    ModuleSource,
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from ida_ray.errors import IDAError
from ida_ray.messages import BroadcastReport

GLOO = "gloo"
DEFAULT_BUCKET_BYTES = 64 << 20


class WeightSyncError(IDAError, RuntimeError):
    """A broadcast of weights that failed or passed its timeout."""

    kind = "weight_sync_error"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _gloo_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A Gloo process group outside torch.distributed's default group (the learner's DDP
    group stays the default): rank 0 hosts the TCP store."""
    timeout = timedelta(seconds=timeout_s)
    store = torch.distributed.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout,
                                       wait_for_workers=False)
    return torch.distributed.ProcessGroupGloo(store, rank, world_size, timeout)


def _buckets(metas: list[tuple[str, str, list[int]]], bucket_bytes: int) -> list[list[int]]:
    """Indices of consecutive tensors grouped so each group's bytes stay within bucket_bytes
    (a larger tensor goes alone)."""
    out, current, size = [], [], 0
    for i, (_, dtype_name, shape) in enumerate(metas):
        n = _nbytes(dtype_name, shape)
        if current and size + n > bucket_bytes:
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        out.append(current)
    return out


def _nbytes(dtype_name: str, shape: list[int]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel * getattr(torch, dtype_name).itemsize


# ---------------------------------------------------------------------------------------
# The replica side (inside vLLM's worker process; registered in vLLM's factory by
# ida_ray/serving/vllm_worker.py, which every engine ida-ray starts imports).
# ---------------------------------------------------------------------------------------
@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int  # this engine's first rank in the group (the sender is rank 0)
    world_size: int
    timeout_s: float = 300.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int = DEFAULT_BUCKET_BYTES


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Receives checkpoint-format weights bucket by bucket and loads them with vLLM's
    layerwise reload, as the NCCL engine does."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        rank = init_info.rank_offset + self.parallel_config.rank
        self.group = _gloo_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                 init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        from ida_ray.serving.vllm_worker import repack_lm_heads

        finalize_layerwise_reload(self.model, self.model_config)
        repack_lm_heads(self.model)  # a tied head is loaded by no weight of its own (vllm_worker.py)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call init_weight_transfer_engine first")
        metas = list(zip(update_info.names, update_info.dtype_names, update_info.shapes))
        for bucket in _buckets(metas, update_info.bucket_bytes):
            sizes = [_nbytes(metas[i][1], metas[i][2]) for i in bucket]
            flat = torch.empty(sum(sizes), dtype=torch.uint8)
            self.group.broadcast(flat, 0).wait()
            weights, offset = [], 0
            for i, n in zip(bucket, sizes):
                name, dtype_name, shape = metas[i]
                weights.append((name, flat[offset:offset + n].view(getattr(torch, dtype_name)).view(shape)))
                offset += n
            self.model.load_weights(weights)

    def shutdown(self) -> None:
        self.group = None


# ---------------------------------------------------------------------------------------
# The sender side (the learner's rank 0).
# ---------------------------------------------------------------------------------------
@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = GLOO

    master_address: str
    master_port: int
    world_size: int
    timeout_s: float = 300.0
    bucket_bytes: int = DEFAULT_BUCKET_BYTES


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source: WeightSource, is_sender: bool = True, bucket_bytes: int) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source: WeightSource | None = None):
        if source is None:
            raise ValueError("the gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        worker_info = GlooInitInfo(master_address=init_info.master_address, master_port=init_info.master_port,
                                   rank_offset=1, world_size=init_info.world_size, timeout_s=init_info.timeout_s)
        # The workers block in their rendezvous until the sender joins: both at once.
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.group = _gloo_group(init_info.master_address, init_info.master_port, 0, init_info.world_size,
                                       init_info.timeout_s)
            joined.result()
        return engine

    def send_weights(self) -> None:
        metas = [(m.name, str(m.dtype).split(".")[-1], list(m.shape)) for m in self.source.metadata()]
        if not self.is_sender:
            for _ in self.source:
                pass
            return
        update = GlooUpdateInfo(names=[m[0] for m in metas], dtype_names=[m[1] for m in metas],
                                shapes=[m[2] for m in metas], bucket_bytes=self.bucket_bytes)
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            received = pool.submit(self.client.update_weights, asdict(update))
            pairs = iter(self.source)
            for bucket in _buckets(metas, self.bucket_bytes):
                parts = []
                for i in bucket:
                    name, tensor = next(pairs)
                    if name != metas[i][0]:
                        raise WeightSyncError(f"the weight source yielded {name!r} where its metadata said {metas[i][0]!r}")
                    parts.append(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8))
                self.group.broadcast(torch.cat(parts), 0).wait()
            received.result()
        finally:
            # Never join a worker still blocked in a broadcast that will not come (vLLM's NCCL
            # engine does the same): the error goes out, and the caller drops the group.
            pool.shutdown(wait=False)
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = None


def register() -> None:
    """Make "gloo" a weight-transfer backend in this process (vLLM's two factories)."""
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    if GLOO not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(GLOO, GlooWeightTransferEngine)
    if GLOO not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(GLOO, GlooTrainerWeightTransferEngine)


# ---------------------------------------------------------------------------------------
# The control plane: the sender's calls to the replica actors.
# ---------------------------------------------------------------------------------------
class ReplicaSyncClient:
    """vLLM's `VLLMWeightSyncClient` over ida-ray's replica actors (ida_ray/actors/replica.py):
    replica i holds ranks `1 + i * ranks_per_replica` on (its tensor-parallel workers after
    it), and every call waits at most `timeout_s`."""

    def __init__(self, replicas: list, *, timeout_s: float, ranks_per_replica: int = 1):
        self.replicas = list(replicas)
        self.timeout_s = timeout_s
        self.ranks_per_replica = ranks_per_replica

    @property
    def world_size(self) -> int:
        """The sender and every replica's workers."""
        return 1 + len(self.replicas) * self.ranks_per_replica

    def _wait(self, refs: list, step: str) -> None:
        import ray

        try:
            ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WeightSyncError(f"weight broadcast: {step} got no answer from the replicas within "
                                  f"{self.timeout_s:.0f}s") from None
        except ray.exceptions.RayError as exc:
            raise WeightSyncError(f"weight broadcast: {step} failed on a replica: {exc}") from exc

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        first = init_info["rank_offset"]
        self._wait([r.init_weight_transfer_engine.remote(WeightTransferInitRequest(
            init_info={**init_info, "rank_offset": first + i * self.ranks_per_replica}))
            for i, r in enumerate(self.replicas)], "joining the group")

    def start_weight_update(self) -> None:
        self._wait([r.start_weight_update.remote() for r in self.replicas], "start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        request = WeightTransferUpdateRequest(update_info=update_info)
        self._wait([r.update_weights.remote(request) for r in self.replicas], "receiving the weights")

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._wait([r.finish_weight_update.remote() for r in self.replicas], "finish_weight_update")
        if weight_version is not None:
            self.set_version(int(weight_version))

    def set_version(self, version: int) -> None:
        self._wait([r.update_weight_version.remote(str(version)) for r in self.replicas], "setting the version")


# ---------------------------------------------------------------------------------------
# The learner's rank 0: one sender for the run.
# ---------------------------------------------------------------------------------------
class ServedSource(ModuleSource):
    """The model's parameters as the replicas serve them: floating-point ones cast to the
    served dtype before they travel (half the bytes of fp32 for bf16)."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__(module)
        self.dtype = dtype

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(m.name, self.dtype if m.dtype.is_floating_point else m.dtype, m.shape)
                for m in super().metadata()]

    def __iter__(self):
        for name, tensor in super().__iter__():
            yield name, tensor.detach().to(self.dtype) if tensor.is_floating_point() else tensor


class WeightBroadcaster:
    """weight_sync "broadcast" on the learner's rank 0: sends each round's model into the
    replicas and sets their version. The group is started on first use, and again when the
    replicas are not the processes it was started with (Ray restarted one: its new engine is in
    no group) or when the last broadcast failed. A failure is reported, not raised: the round's
    weights then go by the object store (ida_ray/cluster/ray_backend.py)."""

    def __init__(self, transport: str, dtype: str, timeout_s: float, *, ranks_per_replica: int = 1,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.transport = transport  # "gloo" (CPU) or "nccl" (GPU)
        self.dtype = getattr(torch, dtype)
        self.timeout_s = timeout_s
        self.ranks_per_replica = ranks_per_replica
        self.bucket_bytes = bucket_bytes
        self.sender: TrainerWeightTransferEngine | None = None
        self.client: ReplicaSyncClient | None = None
        self.processes: tuple | None = None  # the replicas' pids when the group started

    def send(self, model: torch.nn.Module, replicas: tuple, version: int) -> BroadcastReport:
        t0, joined = time.monotonic(), False
        source = ServedSource(model, self.dtype)
        nbytes = sum(_nbytes(str(m.dtype).split(".")[-1], list(m.shape)) for m in source.metadata())
        try:
            processes = self._processes(replicas)
            if self.sender is None or processes != self.processes:
                self.close()
                self._start(source, replicas)
                self.processes, joined = processes, True
            self.sender.source = source
            self.sender.send_weights()
            self.client.set_version(version)
            error = None
        except Exception as exc:  # noqa: BLE001 - reported with the round; the object store serves it
            self.close()
            error = f"{type(exc).__name__}: {exc}"
        return BroadcastReport(replicas=len(replicas), seconds=round(time.monotonic() - t0, 4), bytes=nbytes,
                               joined=joined, error=error)

    def _processes(self, replicas: tuple) -> tuple:
        import ray

        try:
            health = ray.get([r.health.remote() for r in replicas], timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WeightSyncError(f"the replicas did not report their health within {self.timeout_s:.0f}s") from None
        return tuple(h["pid"] for h in health)

    def _start(self, source: WeightSource, replicas: tuple) -> None:
        import ray
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        register()
        self.client = ReplicaSyncClient(list(replicas), timeout_s=self.timeout_s,
                                        ranks_per_replica=self.ranks_per_replica)
        address, port = ray.util.get_node_ip_address(), free_port()
        if self.transport == GLOO:
            info = GlooTrainerInitInfo(master_address=address, master_port=port, world_size=self.client.world_size,
                                       rank=0, timeout_s=self.timeout_s, bucket_bytes=self.bucket_bytes)
        else:
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            info = NCCLTrainerInitInfo(master_address=address, master_port=port, world_size=self.client.world_size,
                                       rank=0)
        self.sender = WeightTransferTrainerFactory.trainer_init(info, client=self.client, source=source)

    def close(self) -> None:
        if self.sender is not None:
            try:
                self.sender.shutdown()
            except Exception:  # noqa: BLE001 - a broken group has nothing left to tear down
                pass
        self.sender, self.client, self.processes = None, None, None
