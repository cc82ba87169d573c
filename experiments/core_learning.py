"""Single-process IDA on the sum task (no Ray, in-process torch engine): the core learns.

    python -m experiments.core_learning [--iterations 16] [--seed 0] [--fresh] [--set KEY=VALUE ...]
                                        [--out docs/results/core_learning.json]

The run is the preset configs/core_learning.yaml (backend local), through the one IDA loop
(ida_ray.entrypoints.train.train); --iterations, --seed, --run-dir and --set override it.
Writes, per iteration, held-out accuracy by size (model alone, greedy) and expert calls per
amplification tree, and a PNG beside the JSON. No ground-truth label is used in training:
the only supervision is the coded expert, which answers single digits itself (base size 1).
"""
from __future__ import annotations

import time

from experiments import common

PRESET = "core_learning"


def core_config(overrides: dict | None = None):
    """The preset with the given dotted overrides."""
    from ida_ray.config import load_config

    return load_config(PRESET, overrides)


def main(argv=None) -> dict:
    ap = common.parser(__doc__, "core_learning")
    ap.add_argument("--iterations", type=int, default=None, help="IDA iterations (default: the preset's, 16)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the run (default: the preset's, 0)")
    ap.add_argument("--run-dir", default=None, help="run directory (default: the preset's, runs/core_learning)")
    common.add_fresh(ap)
    common.add_overrides(ap)
    args = ap.parse_args(argv)

    from ida_ray.entrypoints.train import train
    from ida_ray.tasks import get_task

    overrides = common.parse_overrides(ap, args.overrides)
    for key, value in (("iterations", args.iterations), ("seed", args.seed), ("run_dir", args.run_dir)):
        if value is not None:
            overrides[key] = value
    # A bad override, or a run directory that already holds a run, stops it before anything starts.
    (cfg,) = common.check_configs(ap, lambda: [core_config(overrides)], args.fresh)
    t0 = time.time()
    history = train(cfg, progress=False, log=common.timed_log(t0=t0))
    largest = max(cfg.sizes(get_task(cfg.task, **cfg.task_kwargs)))
    result = {
        "task": cfg.task, "expert_base_size": cfg.task_kwargs["base_size"], "largest_size": largest, "seed": cfg.seed,
        "wall_seconds": round(time.time() - t0, 1), "config": cfg.to_dict(),
        "iterations": [{"iteration": m["iteration"], "accuracy_by_size": m["accuracy_by_size"],
                        "expert_calls_per_tree": m["expert_calls_per_tree"], "answered_by": m["answered_by"],
                        "model_loss": m["model_loss"], "seconds": m["seconds"]} for m in history],
    }
    out = common.write_result(result, args.out, "core_learning", argv)
    from ida_ray.plots import plot_history

    plot_history(history, common.png_beside(out), title="ida-ray core: sum task, single process")
    last = {int(k): v for k, v in history[-1]["accuracy_by_size"].items()}
    print(f"accuracy at size {largest}: {last[largest]:.2f}; "
          f"expert calls/tree: {history[0]['expert_calls_per_tree']:.2f} -> {history[-1]['expert_calls_per_tree']:.2f}")
    print(f"wrote {out} and {common.png_beside(out)}")
    return result


if __name__ == "__main__":
    main()
