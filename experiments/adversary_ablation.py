"""The adversary's worth: expert calls needed to reach a held-out accuracy, with the adversary
choosing which branch to expand (AmplifyConfig.branch_choice="adversary") against a fair coin
("uniform"), on the same seeds.

    python -m experiments.adversary_ablation [--seeds 0 1] [--task sum] [--metric largest --threshold 0.8]
                                           [--minutes-per-run 20] [--workers 2] [--quick] [--set KEY=VALUE ...]

Each run is the IDA loop on the local backend (experiments.evidence_learning.run_ida) on the
preset configs/adversary_ablation.yaml: the learning evidence's configuration of the task
(configs/evidence_<task>.yaml) in smaller iterations, 128 + 128 trees and 150 model steps;
--seeds, --log-dir, --quick and --set override it. Everything but the branch choice is the
same between the two arms of a seed: model and adversary initialisation, question stream, training. In
the uniform arm the adversary is still trained and still picks the adversarial share of the
questions; only the split decision ignores it. A run stops once it reaches the threshold, or
after the iteration cap (the same for both arms), or at its time bound (a safety net: a run it
stops is censored like one that never got there, so compare `stopped_by`).

Expert calls are counted cumulatively over amplification trees (every H step: fan-out,
fan-in, direct answer). The calls needed to reach the threshold are interpolated linearly in
accuracy between the two iterations that straddle it; a run that never reaches it within
its budget is reported as censored, with its total calls as a lower bound. The ratio is
uniform / adversary per seed, and their geometric mean over seeds.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import as_completed
from pathlib import Path

import yaml

from experiments import common
from experiments.evidence_learning import QUICK, ROOT, TASK_NAMES, preset, run_ida, task_logger

DEFAULT_OUT = common.default_out("adversary")
ARMS = ("adversary", "uniform")
PRESET = "adversary_ablation"


def accuracy_metric(acc: dict, metric: str) -> float:
    """'mean': mean held-out accuracy over sizes; 'largest': accuracy at the largest size."""
    acc = {int(k): v for k, v in acc.items()}
    if metric == "mean":
        return sum(acc.values()) / len(acc)
    if metric == "largest":
        return acc[max(acc)]
    raise ValueError(f"metric must be 'mean' or 'largest', got {metric!r}")


def calls_to_threshold(cumulative_calls: list[float], scores: list[float], threshold: float) -> float | None:
    """Expert calls at which `scores` first reaches `threshold`, linear between iterations
    (from 0 calls at score 0 before the first); None if it never does."""
    prev_calls, prev_score = 0.0, 0.0
    for calls, score in zip(cumulative_calls, scores):
        if score >= threshold:
            if score == prev_score:
                return calls
            frac = (threshold - prev_score) / (score - prev_score)
            return prev_calls + max(0.0, min(1.0, frac)) * (calls - prev_calls)
        prev_calls, prev_score = calls, max(prev_score, score)
    return None


def _dotted(values: dict, prefix: str = "") -> dict:
    """Nested sections as dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "task_kwargs":
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def ablation_overrides() -> dict:
    """What configs/adversary_ablation.yaml changes in the learning evidence's run (its own
    keys, as dotted overrides): the same changes go over any task's evidence preset."""
    from ida_ray.config import presets

    own = yaml.safe_load(presets()[PRESET].read_text())
    own.pop("base", None)
    return _dotted(own)


def ablation_config(task: str, seed: int, quick: bool, run_dir: str, arm: str | None = None,
                    overrides: dict | None = None):
    """The learning evidence's preset of the task with the ablation's smaller iterations (fewer
    trees and steps each, so the threshold crossing is located more finely in expert calls):
    for sum, exactly the preset configs/adversary_ablation.yaml. Then the seed, the run
    directory, the quick-run sizes, the arm's branch choice and --set on top."""
    from ida_ray.config import load_config

    over = {**ablation_overrides(), "seed": seed, "run_dir": run_dir, **(QUICK if quick else {})}
    if arm is not None:
        over["amplify.branch_choice"] = arm
    return load_config(preset(task), {**over, **(overrides or {})})


def run_arm(arm: str, seed: int, task: str, metric: str, threshold: float, budget_s: float, quick: bool,
            log_dir: str, overrides: dict | None = None) -> dict:
    """One IDA run with the given branch choice; runs in a worker process."""
    common.one_thread()
    t0 = time.time()
    cfg = ablation_config(task, seed, quick, arm_run_dir(log_dir, arm, seed), arm, overrides)
    log = task_logger(f"{arm}-seed{seed}", log_dir)
    _, history, stopped_by = run_ida(
        cfg, budget_s, log, stop=lambda h: accuracy_metric(h[-1]["accuracy_by_size"], metric) >= threshold)
    per_iteration = [m["expert_calls_per_tree"] * m["amplify_trees"] for m in history]
    cumulative = [sum(per_iteration[: i + 1]) for i in range(len(per_iteration))]
    scores = [accuracy_metric(m["accuracy_by_size"], metric) for m in history]
    needed = calls_to_threshold(cumulative, scores, threshold)
    return {"arm": arm, "seed": seed, "reached": needed is not None,
            "expert_calls_to_threshold": round(needed, 1) if needed is not None else None,
            "expert_calls_lower_bound": round(cumulative[-1], 1) if needed is None else None,
            "iterations": len(history), "stopped_by": stopped_by,
            "score_per_iteration": [round(s, 4) for s in scores],
            "cumulative_expert_calls": [round(c, 1) for c in cumulative],
            "expert_calls_per_tree": [m["expert_calls_per_tree"] for m in history],
            "accuracy_by_size_per_iteration": [m["accuracy_by_size"] for m in history],
            "seconds": round(time.time() - t0, 1)}


def arm_run_dir(log_dir: str, arm: str, seed: int) -> str:
    return f"{log_dir}/{arm}-{seed}"


def summarise(runs: list[dict], seeds: list[int]) -> dict:
    """Per-seed ratios uniform/adversary; censored runs give bounds, not values."""
    per_seed = {}
    for seed in seeds:
        arms = {r["arm"]: r for r in runs if r["seed"] == seed}
        if set(arms) != set(ARMS):
            continue
        adv, uni = arms["adversary"], arms["uniform"]
        entry = {"adversary_calls": adv["expert_calls_to_threshold"], "uniform_calls": uni["expert_calls_to_threshold"],
                 "adversary_reached": adv["reached"], "uniform_reached": uni["reached"]}
        if adv["reached"] and uni["reached"]:
            entry["ratio_uniform_over_adversary"] = round(uni["expert_calls_to_threshold"] / adv["expert_calls_to_threshold"], 3)
        elif adv["reached"]:  # uniform needs more than its total: the ratio is at least this
            entry["ratio_at_least"] = round(uni["expert_calls_lower_bound"] / adv["expert_calls_to_threshold"], 3)
        elif uni["reached"]:
            entry["ratio_at_most"] = round(uni["expert_calls_to_threshold"] / adv["expert_calls_lower_bound"], 3)
        per_seed[str(seed)] = entry
    ratios = [e["ratio_uniform_over_adversary"] for e in per_seed.values() if "ratio_uniform_over_adversary" in e]
    out = {"per_seed": per_seed,
           "expert_calls_ratio_uniform_over_adversary": (round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 3)
                                                         if ratios else None),
           "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
           "seeds_with_both_arms_reaching_threshold": len(ratios)}
    out["goal_1_5x_met"] = out["expert_calls_ratio_uniform_over_adversary"] is not None and \
        out["expert_calls_ratio_uniform_over_adversary"] >= 1.5
    return out


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"adversary": ("C0", "o-"), "uniform": ("C3", "s--")}
    for r in result["runs"]:
        color, style = styles[r["arm"]]
        ax.plot(r["cumulative_expert_calls"], r["score_per_iteration"], style, color=color, alpha=0.8,
                label=f"{r['arm']} choice, seed {r['seed']}")
    cfg = result["config"]
    ax.axhline(cfg["threshold"], color="gray", lw=0.8, ls=":")
    ax.set(xlabel="cumulative expert calls", ylabel=f"held-out accuracy ({cfg['metric']})", ylim=(-0.02, 1.02),
           title=f"{cfg['task']}: branch choice by adversary vs uniform "
                 f"(ratio {result['expert_calls_ratio_uniform_over_adversary']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv=None) -> dict:
    ap = common.parser(__doc__, "adversary")
    ap.add_argument("--task", default="sum", choices=TASK_NAMES)
    common.add_seeds(ap, default=[0, 1])
    ap.add_argument("--metric", default="largest", choices=("mean", "largest"))
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--minutes-per-run", type=float, default=20.0,
                    help="safety bound on one run; both arms get the same iteration cap (the preset's iterations)")
    common.add_workers(ap)
    common.add_quick(ap, "smoke run: 2 tiny iterations per run")
    ap.add_argument("--log-dir", default=str(ROOT / "runs" / "adversary_ablation"),
                    help="logs <arm>-seed<seed>.log and run directories <arm>-<seed>/ (default: %(default)s)")
    common.add_fresh(ap)
    common.add_overrides(ap)
    args = ap.parse_args(argv)
    if len(args.seeds) < 1 or not 0 < args.threshold <= 1 or args.workers < 1:
        ap.error("need at least one seed, 0 < threshold <= 1 and workers >= 1")
    overrides = common.parse_overrides(ap, args.overrides)
    common.check_configs(ap, lambda: [ablation_config(args.task, seed, args.quick, arm_run_dir(args.log_dir, arm, seed),
                                                      arm, overrides)
                                      for seed in args.seeds for arm in ARMS], args.fresh)

    t0 = time.time()
    runs = []
    with common.process_pool(args.workers) as pool:
        # Seed-major order, so with two workers both arms of a seed run side by side under the
        # same machine load.
        futures = [pool.submit(run_arm, arm, seed, args.task, args.metric, args.threshold,
                               60 * args.minutes_per_run, args.quick, args.log_dir, overrides)
                   for seed in args.seeds for arm in ARMS]
        for fut in as_completed(futures):
            runs.append(fut.result())
    runs.sort(key=lambda r: (r["seed"], ARMS.index(r["arm"])))
    sample = ablation_config(args.task, args.seeds[0], args.quick, args.log_dir, overrides=overrides).to_dict()
    sample["amplify"]["branch_choice"] = "varied: adversary | uniform"
    result = {
        "config": {"task": args.task, "metric": args.metric, "threshold": args.threshold,
                   "minutes_per_run": args.minutes_per_run, "quick": args.quick,
                   "preset": PRESET if args.task == "sum" else f"{preset(args.task)} + {PRESET}'s own keys",
                   "overrides": overrides, "ida": sample,
                   "calls_counted": "cumulative expert calls over amplification trees, "
                                    "linearly interpolated at the threshold"},
        "seeds": args.seeds,
        **summarise(runs, args.seeds),
        "runs": runs,
        "machine": common.machine_info(),
        "wall_seconds": round(time.time() - t0, 1),
    }
    common.write_result(result, args.out, "adversary_ablation", argv)
    plot(result, common.png_beside(args.out))
    for seed, e in result["per_seed"].items():
        print(f"seed {seed}: {e}")
    print(f"expert calls ratio uniform/adversary: {result['expert_calls_ratio_uniform_over_adversary']} "
          f"(range {result['ratio_min']}..{result['ratio_max']})")
    print(f"wrote {args.out} ({result['wall_seconds']:.0f}s)")
    return result


if __name__ == "__main__":
    main()
