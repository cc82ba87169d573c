"""Weight-sync seconds by model size: the object-store path (the default) and the broadcast
path (weight_sync "broadcast", over Gloo on this CPU).

    python -m experiments.weight_sync [--sizes 128x3 256x4 512x6 1024x8] [--repeats 3]
                                      [--out docs/results/weight_sync.json]

For each size (hidden size x layers of the built-in Llama; intermediate 4x hidden, head size
32), a model and adversary are built and one vLLM-CPU replica actor started on them; then,
`--repeats` times, the steps of a swap as the Ray backend runs them after a training round:

  payload   WeightsPayload.from_modules (the learner's rank 0: safetensors bytes of the served
            model and adversary)
  put       ray.put of the payload (into the object store)
  copy      ida_ray.cluster.ray_backend.owned_copy (the coordinator-owned copy a restarted
            replica is resynced from)
  swap      ReplicaPool.swap_weights: the replica fetches the payload, checks its shapes,
            writes the HF directory on its node and reloads it in the engine (vLLM
            reload_weights) - `replica_load` is the part inside the replica

Reported per size: the medians over the repeats; `seconds` is payload + put + copy + swap,
what a round's weights take from the learner to a serving replica.

Then, on the same replica (started with weight_transfer "gloo"), the broadcast path as the
learner's rank 0 runs it (ida_ray.serving.weight_broadcast.WeightBroadcaster.send: vLLM's
weight-transfer protocol, the model's tensors in 64 MiB buckets over a Gloo group, loaded by
vLLM's layerwise reload, the version set): one send to start the group (`join_seconds`), then
`--repeats` sends, their median `seconds`. It carries the model only (the adversary goes by the
object store either way), so its `bytes` are the model's. The NCCL path (GPU) is not measured
here: no GPU on this machine.
"""
from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from experiments import common

DEFAULT_SIZES = ("128x3", "256x4", "512x6", "1024x8")


def spec_of(size: str):
    from ida_ray.models import ModelSpec

    hidden, layers = (int(x) for x in size.split("x"))
    return ModelSpec(hidden_size=hidden, num_layers=layers, num_heads=hidden // 32, intermediate_size=4 * hidden)


async def one_swap(pool, model, adversary, version: int) -> dict:
    import ray

    from ida_ray.cluster.ray_backend import owned_copy
    from ida_ray.serving.weights import WeightsPayload

    t0 = time.perf_counter()
    payload = WeightsPayload.from_modules(model, adversary)
    t1 = time.perf_counter()
    ref = ray.put(payload)
    t2 = time.perf_counter()
    copy = await owned_copy(ref)
    t3 = time.perf_counter()
    swapped = await pool.swap_weights(copy, version)
    t4 = time.perf_counter()
    assert set(swapped.values()) == {version}, swapped
    return {"payload": t1 - t0, "put": t2 - t1, "copy": t3 - t2, "swap": t4 - t3, "bytes": payload.nbytes}


def measure(size: str, repeats: int, log) -> dict:
    import ray

    from ida_ray.actors.replica import start_replicas
    from ida_ray.models import build_adversary, build_model, create_model_dirs
    from ida_ray.serving.engine_pool import ReplicaPool

    spec = spec_of(size)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adversary_dir = create_model_dirs(Path(tmp), spec, seed=0)
        t0 = time.time()
        (replica,) = start_replicas(1, model_dir, adversary_dir, engine="vllm", num_cpus=1, name_prefix=f"sync-{size}",
                                    weight_transfer="gloo")
        start_s = time.time() - t0
    model, _ = build_model(spec, seed=1)  # other weights than the served ones: a real change
    adversary, _ = build_adversary(spec, seed=2)
    params = sum(p.numel() for p in model.parameters())
    adversary_params = sum(p.numel() for p in adversary.parameters())

    async def swaps() -> list[dict]:
        pool, runs = ReplicaPool([replica]), []
        for r in range(repeats):
            got = await one_swap(pool, model, adversary, version=r + 1)
            got["replica_load"] = (await replica.health.remote())["last_swap_s"]
            runs.append(got)
            log(f"{size}: {params / 1e6:.2f}M parameters, swap {r + 1}: " +
                ", ".join(f"{k} {v:.3f}s" for k, v in got.items() if k != "bytes"))
        return runs

    runs = asyncio.run(swaps())
    sends = broadcasts(replica, model, size, repeats, first_version=repeats + 1, log=log)
    ray.kill(replica, no_restart=True)
    med = {k: round(statistics.median(x[k] for x in runs), 4) for k in ("payload", "put", "copy", "swap", "replica_load")}
    device = "cpu (vLLM-CPU replica, one actor on this machine)"
    return [{"path": "object_store", "size": size, "parameters": params, "adversary_parameters": adversary_params,
             "bytes": runs[0]["bytes"], "seconds": round(med["payload"] + med["put"] + med["copy"] + med["swap"], 4),
             "steps_seconds": med, "replica_start_seconds": round(start_s, 1), "repeats": repeats,
             "device": device, "runs": runs},
            {"path": "broadcast_gloo", "size": size, "parameters": params, "bytes": sends[1]["bytes"],
             "seconds": round(statistics.median(x["seconds"] for x in sends[1:]), 4),
             "join_seconds": sends[0]["seconds"], "repeats": repeats, "device": device, "runs": sends}]


def broadcasts(replica, model, size: str, repeats: int, first_version: int, log) -> list[dict]:
    """The first send starts the group; each send is checked to have set the replica's version."""
    import ray

    from ida_ray.serving.weight_broadcast import WeightBroadcaster

    broadcaster, sends = WeightBroadcaster("gloo", "float32", timeout_s=300), []
    try:
        for r in range(repeats + 1):
            report = broadcaster.send(model, (replica,), first_version + r)
            if report.error or ray.get(replica.weight_version.remote()) != first_version + r:
                raise RuntimeError(f"broadcast {r} of {size} failed: {report.error}")
            sends.append({"seconds": report.seconds, "bytes": report.bytes, "joined": report.joined})
            log(f"{size}: broadcast {r}: {report.seconds:.3f}s ({report.bytes / 2**20:.1f} MiB"
                f"{', group started' if report.joined else ''})")
    finally:
        broadcaster.close()
    return sends


def main(argv=None) -> dict:
    ap = common.parser(__doc__, "weight_sync")
    ap.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="hidden x layers of each model")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import ray

    log = common.timed_log("weight_sync")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for size in args.sizes:
            rows += measure(size, args.repeats, log)
            result = {"rows": rows, "device": "cpu (2 cores, vLLM-CPU replica; object-store and Gloo broadcast paths)",
                      "nccl": "not measured: no GPU on this machine"}
            common.write_result(result, args.out, "weight_sync", argv)
            store, sent = rows[-2:]
            log(f"{size}: {store['parameters'] / 1e6:.2f}M parameters: object store {store['seconds']:.3f}s "
                f"({store['bytes'] / 2**20:.1f} MiB with the adversary; {store['steps_seconds']}), broadcast "
                f"{sent['seconds']:.3f}s ({sent['bytes'] / 2**20:.1f} MiB, the model)")
    finally:
        ray.shutdown()
    return result


if __name__ == "__main__":
    main()
