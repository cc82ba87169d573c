"""Throughput scaling of tree expansion on the Ray actors, and where the time goes.

    python -m experiments.scaling [--trees 96] [--in-flight 96] [--repeats 2] [--quick]   # docs/results/scaling.json

Measures, on this machine, with vLLM replica actors (ida_ray/actors/replica.py start_replicas),
TreeExpander actors (ida_ray/actors/expander.py) and their ReplicaPools (ida_ray/serving/engine_pool.py):

1. nodes/s for replicas in (1, 2) x expanders in (1, 2, 4), the same total number of trees in
   flight split evenly over the expanders (so a change is parallelism, not batch size); the
   grid is run `--repeats` times in alternating order and each cell keeps its fastest round,
   the one least disturbed by whatever else the machine runs (every round is recorded);
2. the per-node cost (wall seconds and CPU seconds per node) against trees in flight, one
   replica and one expander;
3. a profile: CPU seconds of every process of the local Ray cluster, by component
   (expanders, replica actors = vLLM front end, vLLM engine-core processes = scheduler and
   forward passes, Ray system processes, the driver), sampled with psutil around each
   measurement; a cProfile of one expander's event-loop thread, grouped into tree logic,
   pool batching, Ray calls and serialisation, asyncio, and idle waiting on replicas; and the
   replicas' own counters (requests, batch sizes the vLLM scheduler ran).

Workload (as experiments/throughput.py): expert-driven amplification trees (use_hprime=False)
on "sum" at size 8 with an untrained model, so every model answer is invalid, both branches
of every split are expanded, each tree has 7 nodes, and every generation runs to
max_new_tokens: a fixed amount of work per tree. Result caching is off on the replicas; each
measurement gets fresh questions.
"""
from __future__ import annotations

import cProfile
import json
import os
import pstats
import random
import tempfile
import time
from pathlib import Path

from experiments import common
from ida_ray.actors.expander import TreeExpander
from ida_ray.messages import ExpandJob

DEFAULT_OUT = common.default_out("scaling")
REPLICAS = (1, 2)
EXPANDERS = (1, 2, 4)


class ProfiledExpander(TreeExpander):
    """A TreeExpander whose event-loop thread can be profiled with cProfile. The methods are
    coroutines so they run on the actor's event loop, the thread the trees run on."""

    async def start_profile(self) -> int:
        # CPU time of this thread, not wall time: on a shared machine wall-clock profiling
        # charges whatever function was running when the thread lost its core.
        self._profile = cProfile.Profile(time.thread_time)
        self._profile.enable()
        return os.getpid()

    async def stop_profile(self) -> dict:
        self._profile.disable()
        return profile_fractions(pstats.Stats(self._profile))


# Self time of each function, grouped by where the function lives.
PROFILE_GROUPS = (
    ("idle, waiting on replicas (event-loop poll)", ("select.epoll", "selectors.py", "method 'poll'",
                                                     "method 'control'")),
    ("replica pool batching and dispatch (ida_ray/serving/engine_pool.py)", ("/ida_ray/serving/",)),
    ("tree logic (ida_ray core: amplify, prompts, task expert)", ("/ida_ray/",)),
    ("result records (Tree.to_dict: dataclasses.asdict, deepcopy)", ("dataclasses.py", "/copy.py")),
    ("Ray calls, object refs and (de)serialisation", ("/ray/", "_raylet", "pickle", "cloudpickle", "msgpack")),
    ("asyncio machinery", ("/asyncio/",)),
)


def profile_fractions(stats: pstats.Stats, top: int = 12) -> dict:
    """Self CPU time by group, as fractions of the thread's busy (profiled) time, and the top
    functions. Waiting for replicas costs the thread no CPU, so it shows as the difference
    between busy seconds and wall time (the caller reports the ratio)."""
    groups: dict[str, float] = {name: 0.0 for name, _ in PROFILE_GROUPS}
    groups["other"] = 0.0
    total = 0.0
    rows = []
    for (filename, line, funcname), (_, ncalls, tottime, _, _) in stats.stats.items():
        total += tottime
        where = f"{filename} {funcname}"
        rows.append((tottime, f"{Path(filename).name}:{line} {funcname}", ncalls))
        for name, keys in PROFILE_GROUPS:
            if any(k in where for k in keys):
                groups[name] += tottime
                break
        else:
            groups["other"] += tottime
    rows.sort(reverse=True)
    return {"busy_seconds": round(total, 3),
            "busy_fractions": {k: round(v / total, 3) if total else 0.0 for k, v in groups.items()},
            "top_functions": [{"function": f, "self_seconds": round(t, 3), "calls": n} for t, f, n in rows[:top]]}


# -- CPU accounting over the local Ray cluster (every process is the driver's descendant) --
COMPONENTS = {
    "expanders": "TreeExpander actors: tree logic, ReplicaPool batching, Ray calls",
    "replica actors": "ModelReplica actors: vLLM AsyncLLM front end (tokenise, detokenise, outputs), Ray calls",
    "vLLM engine cores": "vLLM EngineCore processes of the model and adversary engines: scheduler, forward passes",
    "Ray system": "raylet, GCS, idle workers",
    "driver": "this script",
}


def classify(proc) -> str:
    try:
        cmd = " ".join(proc.cmdline())
        name = proc.name()
    except Exception:
        return "gone"
    if "Expander" in cmd:
        return "expanders"
    if "ModelReplica" in cmd:
        return "replica actors"
    if "VLLM" in cmd or "VLLM" in name or "EngineCore" in cmd:
        return "vLLM engine cores"
    if proc.pid == os.getpid():
        return "driver"
    return "Ray system"


def cpu_snapshot() -> dict:
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            out[(p.pid, p.create_time())] = (classify(p), t.user + t.system + t.children_user + t.children_system)
        except psutil.Error:
            continue
    return out


def cpu_delta(before: dict, after: dict) -> dict[str, float]:
    by: dict[str, float] = {}
    for key, (kind, cpu) in after.items():
        prev = before.get(key, (kind, 0.0))[1]
        by[kind] = by.get(kind, 0.0) + max(0.0, cpu - prev)
    return {k: round(v, 2) for k, v in sorted(by.items()) if k != "gone"}


# -- measurements ---------------------------------------------------------------------------
def make_jobs(n: int, size: int, seed: int) -> list[ExpandJob]:
    from ida_ray.tasks import get_task

    task, rng = get_task("sum"), random.Random(f"scaling-{seed}")
    return [ExpandJob(job_id=f"{seed}-{i}", question=task.generate(size, rng), mode="amplify", iteration=0,
                      seed=seed * 100_000 + i) for i in range(n)]


def replica_requests(replicas) -> dict:
    import ray

    total: dict[str, int] = {}
    for h in ray.get([r.health.remote() for r in replicas]):
        for k, v in h["requests"].items():
            total[k] = total.get(k, 0) + v
    return total


def measure(replicas, n_expanders: int, jobs: list[ExpandJob], in_flight: int, amplify: dict, label: str,
            expander_cls=None) -> dict:
    """Expand `jobs` over n_expanders (each with in_flight / n_expanders trees in flight)."""
    import ray

    from ida_ray.actors.expander import start_expanders

    per = max(1, in_flight // n_expanders)
    if expander_cls is None:
        expanders = start_expanders(n_expanders, replicas, name_prefix=f"scaling-{label}", amplify=amplify,
                                    trees_in_flight=per)
    else:
        expanders = [ray.remote(expander_cls).options(name=f"scaling-{label}-{i}", num_cpus=1,
                                                      max_concurrency=10_000).remote(replicas, amplify=amplify,
                                                                                     trees_in_flight=per)
                     for i in range(n_expanders)]
    ray.get([e.health.remote() for e in expanders])  # started before the clock starts
    shares = [jobs[i::n_expanders] for i in range(n_expanders)]
    req0, cpu0 = replica_requests(replicas), cpu_snapshot()
    profile = None
    if expander_cls is not None:
        ray.get(expanders[0].start_profile.remote())
    t0 = time.perf_counter()
    results = ray.get([e.expand.remote(s) for e, s in zip(expanders, shares)])
    wall = time.perf_counter() - t0
    if expander_cls is not None:
        profile = ray.get(expanders[0].stop_profile.remote())
    cpu, req1 = cpu_delta(cpu0, cpu_snapshot()), replica_requests(replicas)
    pools = ray.get([e.health.remote() for e in expanders])
    for e in expanders:
        ray.kill(e, no_restart=True)

    trees = [r.tree for rs in results for r in rs]
    nodes = sum(len(t.nodes()) for t in trees)
    requests = {k: req1.get(k, 0) - req0.get(k, 0) for k in req1}
    cpu_total = sum(cpu.values())
    row = {"replicas": len(replicas), "expanders": n_expanders, "trees_in_flight": per * n_expanders,
           "trees": len(trees), "trees_failed": sum(t.error is not None for t in trees), "nodes": nodes,
           "seconds": round(wall, 2), "nodes_per_s": round(nodes / wall, 2),
           "seconds_per_node": round(wall / nodes, 4), "cpu_seconds_per_node": round(cpu_total / nodes, 4),
           "model_requests": requests.get("generate", 0) + requests.get("logprob", 0),
           "adversary_requests": requests.get("adversary", 0),
           "pool_mean_batch": round(sum(p["pool"]["mean_batch"] for p in pools) / len(pools), 2),
           "cpu_seconds": cpu, "cpu_busy_fraction_of_machine": round(cpu_total / (wall * (os.cpu_count() or 1)), 3),
           # Other users' load on the machine during the measurement (1-minute average).
           "load_average_after": round(os.getloadavg()[0], 1)}
    if profile is not None:
        # The profiled expander thread's CPU seconds over the wall time: the rest of the time
        # it waited on replicas (or for a core).
        profile["busy_fraction_of_wall"] = round(profile["busy_seconds"] / wall, 3)
        row["expander_profile"] = profile
    return row


def replica_direct_rate(replica, n: int, size: int, seed: int, batch: int = 64) -> float:
    """Generate calls/s of one replica called straight from the driver, batches of `batch`
    sent at once: the replica's own ceiling, with no expander or pool in the way."""
    import ray

    from ida_ray.prompts import COMPACT

    prompts = [COMPACT.answer_prompt(j.question) for j in make_jobs(n, size, seed)]
    t0 = time.perf_counter()
    ray.get([replica.generate.remote(prompts[i: i + batch]) for i in range(0, n, batch)])
    return round(n / (time.perf_counter() - t0), 1)


def best_of(rows: list[dict]) -> dict:
    """The fastest repeat (the one least disturbed by other load), with every repeat's rate."""
    best = dict(max(rows, key=lambda r: r["nodes_per_s"]))
    best["nodes_per_s_repeats"] = [r["nodes_per_s"] for r in rows]
    return best


def cpu_fractions(cpu: dict[str, float]) -> dict[str, float]:
    total = sum(cpu.values())
    return {k: round(v / total, 3) for k, v in cpu.items()} if total else {}


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    grid = result["grid"]
    for i, r in enumerate(REPLICAS):
        rows = [g for g in grid if g["replicas"] == r]
        ax1.plot([g["expanders"] for g in rows], [g["nodes_per_s"] for g in rows], "o-", color=f"C{i}",
                 label=f"{r} replica(s)")
    ax1.set(xlabel="expanders", ylabel="nodes / s", title=f"throughput, {result['config']['in_flight']} trees in flight",
            xticks=list(EXPANDERS))
    ax1.set_ylim(bottom=0)
    ax1.legend()
    sweep = result["in_flight_sweep"]
    ax2.plot([s["trees_in_flight"] for s in sweep], [1000 * s["seconds_per_node"] for s in sweep], "o-", label="wall ms / node")
    ax2.plot([s["trees_in_flight"] for s in sweep], [1000 * s["cpu_seconds_per_node"] for s in sweep], "s--",
             label="CPU ms / node (all processes)")
    ax2.set(xscale="log", yscale="log", xlabel="trees in flight (1 replica, 1 expander)", ylabel="ms per node",
            title="per-node cost against trees in flight")
    ax2.legend()
    fr = result["profile"]["cpu_fractions"]
    ax3.barh(list(fr), list(fr.values()), color="C2")
    ax3.set(xlabel="share of the local cluster's CPU seconds", xlim=(0, 1),
            title="where the CPU time goes (1 replica, 1 expander)")
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv=None) -> dict:
    ap = common.parser(__doc__, "scaling")
    ap.add_argument("--trees", type=int, default=96, help="trees per grid measurement")
    ap.add_argument("--in-flight", type=int, default=96, help="total trees in flight in the grid")
    ap.add_argument("--sweep", type=int, nargs="+", default=[1, 8, 64, 256], help="trees in flight to sweep")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the grid; the fastest of each cell is kept")
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray cluster")
    common.add_quick(ap, "smoke run: few trees, short sweep")
    args = ap.parse_args(argv)
    if args.quick:
        args.trees, args.in_flight, args.sweep, args.repeats = 16, 16, [1, 16], 1
    if min(args.trees, args.in_flight, args.repeats, *args.sweep) < 1:
        ap.error("--trees, --in-flight, --repeats and --sweep levels must be >= 1")

    import ray

    from ida_ray.actors.replica import start_replicas
    from ida_ray.models import ModelSpec, create_model_dirs

    t_all = time.perf_counter()
    amplify = {"use_hprime": False, "max_new_tokens": args.max_new_tokens}
    spec = ModelSpec()
    model_dir, adversary_dir = create_model_dirs(Path(tempfile.mkdtemp(prefix="ida-scaling-")), spec, seed=0)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    seed = iter(range(1, 10_000))
    try:
        t0 = time.perf_counter()
        replicas = start_replicas(max(REPLICAS), model_dir, adversary_dir, engine="vllm",
                                  max_new_tokens=args.max_new_tokens, name_prefix="scaling-replica", cache_size=0)
        start_s = time.perf_counter() - t0
        print(f"{len(replicas)} vLLM replicas started in {start_s:.0f}s", flush=True)
        for i, rep in enumerate(replicas):  # first requests on a fresh engine are slower
            measure([rep], 1, make_jobs(4, args.size, next(seed)), 4, amplify, f"warm{i}")

        # Rounds alternate the order of the grid, so a drift in the machine's other load
        # does not fall on one end of it.
        cells = [(r, e) for r in REPLICAS for e in EXPANDERS]
        runs: dict[tuple[int, int], list[dict]] = {c: [] for c in cells}
        for k in range(args.repeats):
            for r, e in (cells if k % 2 == 0 else cells[::-1]):
                row = measure(replicas[:r], e, make_jobs(args.trees, args.size, next(seed)), args.in_flight, amplify,
                              f"r{r}e{e}k{k}")
                runs[(r, e)].append(row)
                print(f"  replicas {r} expanders {e}: {row['nodes_per_s']:7.2f} nodes/s  "
                      f"({row['seconds']}s, load {row['load_average_after']}, CPU {row['cpu_seconds']})", flush=True)
        grid = [best_of(runs[c]) for c in cells]
        sweep = []
        for level in args.sweep:
            n = min(max(4, 2 * level), max(args.trees, level))
            row = measure(replicas[:1], 1, make_jobs(n, args.size, next(seed)), level, amplify, f"sweep{level}")
            sweep.append(row)
            print(f"  {level:>4} trees in flight: {1000 * row['seconds_per_node']:8.1f} ms/node wall, "
                  f"{1000 * row['cpu_seconds_per_node']:8.1f} ms/node CPU", flush=True)
        prof = measure(replicas[:1], 1, make_jobs(args.trees, args.size, next(seed)), args.in_flight, amplify,
                       "profile", expander_cls=ProfiledExpander)
        direct = replica_direct_rate(replicas[0], max(64, args.in_flight), args.size, next(seed))
        replica_health = ray.get([r.health.remote() for r in replicas])
        for r in replicas:
            ray.get(r.shutdown.remote())
            ray.kill(r, no_restart=True)
    finally:
        ray.shutdown()

    base = next(g for g in grid if g["replicas"] == 1 and g["expanders"] == 1)
    result = {
        "workload": {"task": "sum", "size": args.size, "mode": "amplify", "use_hprime": False,
                     "max_new_tokens": args.max_new_tokens, "model": vars(spec), "untrained": True,
                     "result_cache": "off", "nodes_per_tree": 7},
        "config": {"trees": args.trees, "in_flight": args.in_flight, "sweep": args.sweep, "quick": args.quick,
                   "repeats": args.repeats, "grid_value": "fastest of the repeats",
                   "ray_num_cpus": args.num_cpus},
        "machine": common.machine_info(device="cpu"),
        "replica_start_seconds": round(start_s, 1),
        "nodes_per_s": {f"{g['replicas']}x{g['expanders']}": g["nodes_per_s"] for g in grid},
        "nodes_per_s_by_replicas": {str(r): {str(g["expanders"]): g["nodes_per_s"] for g in grid if g["replicas"] == r}
                                    for r in REPLICAS},
        "speedup_over_1x1": {f"{g['replicas']}x{g['expanders']}": round(g["nodes_per_s"] / base["nodes_per_s"], 2)
                             for g in grid},
        "seconds_per_node_by_trees_in_flight": {str(s["trees_in_flight"]): s["seconds_per_node"] for s in sweep},
        "profile": {
            "measured_on": f"1 replica, 1 expander, {prof['trees_in_flight']} trees in flight, {prof['trees']} trees",
            "nodes_per_s": prof["nodes_per_s"],
            "components": COMPONENTS,
            "cpu_seconds": prof["cpu_seconds"],
            "cpu_fractions": cpu_fractions(prof["cpu_seconds"]),
            "cpu_busy_fraction_of_machine": prof["cpu_busy_fraction_of_machine"],
            "expander_event_loop": prof["expander_profile"],
            "replica_batches": [{"name": h["name"], "requests": h["requests"],
                                 "model_batch_mean": h["batch_sizes"]["model"]["mean"],
                                 "model_batch_max": h["batch_sizes"]["model"]["max"],
                                 "adversary_batch_mean": h["batch_sizes"]["adversary"]["mean"]}
                                for h in replica_health],
            "model_requests_per_node": round(prof["model_requests"] / prof["nodes"], 2),
            # Model requests through expander and pool against the replica's own ceiling: close
            # means the replica is the bottleneck, far below means time goes elsewhere.
            "through_expander_model_requests_per_s": round(prof["model_requests"] / prof["seconds"], 1),
            "replica_direct_generate_calls_per_s": direct,
        },
        "grid": grid,
        "in_flight_sweep": sweep,
        "wall_seconds": round(time.perf_counter() - t_all, 1),
    }
    common.write_result(result, args.out, "scaling", argv)
    plot(result, common.png_beside(args.out))
    print(json.dumps({k: result[k] for k in ("nodes_per_s", "speedup_over_1x1", "seconds_per_node_by_trees_in_flight")}))
    print(json.dumps(result["profile"]["cpu_fractions"]), json.dumps(result["profile"]["expander_event_loop"]))
    print(f"wrote {args.out} ({result['wall_seconds']:.0f}s)")
    return result


if __name__ == "__main__":  # vLLM spawns engine processes: keep module import side-effect free
    main()
