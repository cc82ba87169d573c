"""Single-process IDA on the sum task (no Ray, in-process torch engine): the core learns.

    python -m experiments.core_learning [--iterations 14] [--out docs/results/core_learning.json]

Writes, per iteration, held-out accuracy by size (model alone, greedy) and expert calls per
amplification tree, and a PNG beside the JSON. No ground-truth label is used in training:
the only supervision is the coded expert, which answers lists of at most 2 digits itself.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from ida_ray.config import AmplifyConfig, IDAConfig, TrainConfig
from ida_ray.local_loop import LocalIDA


def core_config(iterations: int, run_dir: str, seed: int = 0) -> IDAConfig:
    return IDAConfig(
        task="sum", task_kwargs={"base_size": 1, "max_digit": 3}, iterations=iterations, seed=seed,
        amplify_trees_per_iteration=384, distill_trees_per_iteration=768, eval_questions_per_size=100,
        amplify=AmplifyConfig(max_new_tokens=24, adversarial_fraction=0.75),
        train=TrainConfig(steps_per_iteration=300, adversary_steps_per_iteration=50, replay_capacity=10000),
        run_dir=run_dir, engine="torch")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default="runs/core_learning")
    ap.add_argument("--out", default="docs/results/core_learning.json")
    args = ap.parse_args(argv)
    cfg = core_config(args.iterations, args.run_dir, args.seed)
    t0 = time.time()
    history = asyncio.run(LocalIDA(cfg, log=lambda s: print(f"[{time.time() - t0:5.0f}s] {s}", flush=True)).run())
    task_base = cfg.task_kwargs["base_size"]
    result = {
        "task": cfg.task, "expert_base_size": task_base, "largest_size": 4 * task_base, "seed": args.seed,
        "wall_seconds": round(time.time() - t0, 1), "config": cfg.to_dict(),
        "iterations": [{"iteration": m["iteration"], "accuracy_by_size": m["accuracy_by_size"],
                        "expert_calls_per_tree": m["expert_calls_per_tree"], "answered_by": m["answered_by"],
                        "model_loss": m["model_loss"], "seconds": m["seconds"]} for m in history],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    from ida_ray.plots import plot_history

    plot_history(history, out.with_suffix(".png"), title="ida-ray core: sum task, single process")
    last = history[-1]["accuracy_by_size"]
    print(f"accuracy at size {4 * task_base}: {last[4 * task_base]:.2f}; "
          f"expert calls/tree: {history[0]['expert_calls_per_tree']:.2f} -> {history[-1]['expert_calls_per_tree']:.2f}")
    return result


if __name__ == "__main__":
    main()
