"""Distributed IDA from a driver script: 2 iterations of the sum task on a local Ray cluster.

    python examples/driver.py            (add address="auto" to train() to use a running cluster)
"""
from ida_ray.config import load_config
from ida_ray.entrypoints.train import train

cfg = load_config("default", {
    "task_kwargs": {"base_size": 2}, "train_sizes": [1, 2, 3, 4], "iterations": 2,
    "amplify_trees_per_iteration": 96, "distill_trees_per_iteration": 64, "eval_questions_per_size": 30,
    "amplify.max_new_tokens": 12, "train.steps_per_iteration": 100, "run_dir": "runs/driver"})

if __name__ == "__main__":  # vLLM spawns engine processes: scripts need the guard
    history = train(cfg, resume=True)  # resume=True: continue runs/driver if it exists
    for m in history:
        print(m["iteration"], m["accuracy_by_size"], f"expert calls/tree {m['expert_calls_per_tree']:.2f}")
