"""Learner checkpoints: what both backends write after each training round and what resume
reads. No Ray.

A checkpoint directory holds
  model/        the objective's model as an HF directory (safetensors + tokenizer), which
                `from_pretrained` and `vllm serve` load (honest: plus the second head's file)
  adversary/    the adversary, the same way
  optimizer.pt  every optimiser's state (loaded as data only: weights_only)
  learner.json  iteration, weight version, objective; written last, so its presence marks a
                complete checkpoint
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ida_ray.errors import IDAError
from ida_ray.training import Objective

CHECKPOINT_PREFIX = "iteration_"
META_FILE = "learner.json"


class LearnerFailure(IDAError):
    """The learner failed: its run died, a round did not finish in time, or a checkpoint is unusable."""

    kind = "learner_failure"


def checkpoint_name(iteration: int) -> str:
    return f"{CHECKPOINT_PREFIX}{iteration:04d}"


def save_checkpoint(directory: str | Path, objective: Objective, iteration: int) -> Path:
    from ida_ray.models import save_pretrained

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    objective.save_model(d / "model")
    save_pretrained(objective.adversary, objective.tokenizer, d / "adversary")
    torch.save(objective.optimizer_states(), d / "optimizer.pt")
    meta = {"iteration": iteration, "weight_version": iteration + 1, "objective": objective.name}
    (d / META_FILE).write_text(json.dumps(meta))
    return d


def load_checkpoint(directory: str | Path, objective: Objective, device="cpu") -> dict:
    """Weights and optimiser states saved by `save_checkpoint` into `objective`; returns learner.json."""
    from ida_ray.models import load_adversary

    d = Path(directory)
    meta_path = d / META_FILE
    if not meta_path.exists():
        raise LearnerFailure(f"{d} is not a complete learner checkpoint (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    saved = meta.get("objective", "imitation")
    if saved != objective.name:
        raise LearnerFailure(f"{d} was trained with objective {saved!r}; this run's objective is {objective.name!r}")
    objective.load_model(d / "model")
    objective.adversary.load_state_dict(load_adversary(d / "adversary").state_dict())
    # Our own file, but loaded as data only: no pickled code runs.
    objective.load_optimizer_states(torch.load(d / "optimizer.pt", map_location=device, weights_only=True))
    return meta


def latest_checkpoint(root: str | Path, max_iteration: int | None = None) -> Path | None:
    """The newest complete checkpoint under root (any depth of launches: root/*/iteration_NNNN
    or root/iteration_NNNN), at or below max_iteration when given."""
    best: tuple[int, float, Path] | None = None
    root = Path(root)
    for meta in [*root.glob(f"{CHECKPOINT_PREFIX}*/{META_FILE}"), *root.glob(f"*/{CHECKPOINT_PREFIX}*/{META_FILE}")]:
        try:
            it = json.loads(meta.read_text())["iteration"]
        except (ValueError, KeyError):
            continue
        if max_iteration is not None and it > max_iteration:
            continue
        key = (it, meta.stat().st_mtime, meta.parent)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None
