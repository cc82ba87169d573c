"""Mode sync against mode async on the same run: wall time per iteration at equal trees and
steps, and held-out accuracy after equal wall time.

    python -m experiments.async_sync [--seeds 0] [--iterations 5] [--max-staleness 2]
                                     [--set KEY=VALUE ...] [--out docs/results/async.json]

Each arm is the default preset (configs/default.yaml: a local Ray cluster, a vLLM-CPU replica,
the Ray Train learner) run by `ida-ray train`'s own loop for `--iterations` iterations, with
`mode: sync` or `mode: async` (and `max_staleness`), the same trees and gradient steps per
iteration, one after the other on this machine (never both at once: they would share the
cores). Seconds per iteration are the mean over iterations 1.. (iteration 0 has nothing to
overlap with: in async mode its trees expand before any training). Accuracy at equal time:
each arm's held-out accuracy after the last iteration it finished within the loop time the
faster-finishing arm took for all its iterations (start-up excluded: the same for both).
"""
from __future__ import annotations

import time

from experiments import common

PRESET = "default"


def arm_config(mode: str, seed: int, iterations: int, max_staleness: int, overrides: dict):
    from ida_ray.config import load_config

    return load_config(PRESET, {"run_dir": f"runs/async_sync/{mode}_seed_{seed}", "iterations": iterations,
                                "mode": mode, "max_staleness": max_staleness if mode == "async" else None,
                                **overrides, "seed": seed})


def run_arm(cfg) -> dict:
    from ida_ray.entrypoints.train import train

    t0 = time.time()
    history = train(cfg, progress=False, log=common.timed_log(f"{cfg.mode} seed {cfg.seed}", t0=t0))
    elapsed, rows = 0.0, []
    for m in history:
        elapsed += m["seconds"]
        rows.append({"iteration": m["iteration"], "seconds": m["seconds"], "loop_seconds": round(elapsed, 2),
                     "phase_seconds": m["phase_seconds"], "expansion_seconds": m["expansion_seconds"],
                     "accuracy_by_size": {str(k): v for k, v in m["accuracy_by_size"].items()},
                     "expert_calls_per_tree": m["expert_calls_per_tree"],
                     "oldest_weight_version_trained": m["oldest_weight_version_trained"],
                     "examples_dropped_stale": m["examples_dropped_stale"]})
    return {"seed": cfg.seed, "wall_seconds": round(time.time() - t0, 1), "iterations": rows}


def accuracy_at(run: dict, seconds: float) -> dict | None:
    """Held-out accuracy after the last iteration finished within `seconds` of loop time."""
    done = [r for r in run["iterations"] if r["loop_seconds"] <= seconds + 1e-6]
    return done[-1]["accuracy_by_size"] if done else None


def mean(xs):
    xs = list(xs)
    return round(sum(xs) / len(xs), 3) if xs else None


def main(argv=None) -> dict:
    ap = common.parser(__doc__, "async")
    common.add_seeds(ap, default=(0,))
    common.add_fresh(ap)
    common.add_overrides(ap)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--max-staleness", type=int, default=2)
    args = ap.parse_args(argv)
    overrides = common.parse_overrides(ap, args.overrides)
    cfgs = common.check_configs(ap, lambda: [arm_config(mode, s, args.iterations, args.max_staleness, overrides)
                                             for s in args.seeds for mode in ("sync", "async")], args.fresh)
    runs: dict[str, list[dict]] = {"sync": [], "async": []}
    result: dict = {}
    for cfg in cfgs:
        runs[cfg.mode].append(run_arm(cfg))
        if len(runs["sync"]) != len(runs["async"]):
            continue
        pairs = []
        for s, a in zip(runs["sync"], runs["async"]):
            equal = min(s["iterations"][-1]["loop_seconds"], a["iterations"][-1]["loop_seconds"])
            pairs.append({"seed": s["seed"], "equal_loop_seconds": equal,
                          "sync_accuracy": accuracy_at(s, equal), "async_accuracy": accuracy_at(a, equal)})
        largest = max(int(k) for k in runs["sync"][0]["iterations"][0]["accuracy_by_size"])

        def per_iteration(arm):
            return mean(r["seconds"] for run in runs[arm] for r in run["iterations"][1:])

        def at_equal(arm):
            got = [p[f"{arm}_accuracy"] for p in pairs]
            return {"largest_size": mean(g[str(largest)] for g in got if g),
                    "mean_over_sizes": mean(sum(g.values()) / len(g) for g in got if g)}

        sync_s, async_s = per_iteration("sync"), per_iteration("async")
        result = {
            "sync_seconds_per_iteration": sync_s, "async_seconds_per_iteration": async_s,
            "speedup": round(sync_s / async_s, 3) if async_s else None,
            "sync_accuracy_at_equal_time": at_equal("sync"), "async_accuracy_at_equal_time": at_equal("async"),
            "max_staleness": args.max_staleness, "iterations": args.iterations, "seeds": list(args.seeds[:len(pairs)]),
            "device": "cpu (2 cores, vLLM-CPU replica, torch CPU learner)", "pairs": pairs, "runs": runs,
            "config": {mode: arm_config(mode, 0, args.iterations, args.max_staleness, overrides).to_dict()
                       for mode in ("sync", "async")}}
        common.write_result(result, args.out, "async", argv)
        print(f"after {len(pairs)} seed(s): seconds per iteration sync {sync_s} async {async_s}; accuracy at equal "
              f"time sync {result['sync_accuracy_at_equal_time']} async {result['async_accuracy_at_equal_time']}",
              flush=True)
    return result


if __name__ == "__main__":
    main()
