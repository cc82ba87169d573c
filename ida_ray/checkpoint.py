"""Learner checkpoints: what both backends write after each training round and what resume
reads. No Ray.

A checkpoint directory holds
  model/        the objective's model as an HF directory (safetensors + tokenizer), which
                `from_pretrained` and `vllm serve` load (honest: plus the second head's file)
  adversary/    the adversary, the same way
  optimizer.pt  every optimiser's state (loaded as data only: weights_only)
  learner.json  iteration, weight version, objective, and the size and sha256 of every other
                file; written last, so its presence marks a complete checkpoint

A checkpoint is written into <name>.partial and renamed into place, so a writer killed mid-way
leaves the previous checkpoints as they were and no directory under the real name.
`checkpoint_problem` re-reads a checkpoint against its learner.json: a truncated or corrupted
file is named, and `latest_checkpoint` and resume pass over it to the one before.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ida_ray.errors import DiskFull, IDAError
from ida_ray.training import Objective

CHECKPOINT_PREFIX = "iteration_"
META_FILE = "learner.json"


class LearnerFailure(IDAError):
    """The learner failed: its run died, a round did not finish in time, or a checkpoint is unusable."""

    kind = "learner_failure"


def checkpoint_name(iteration: int) -> str:
    return f"{CHECKPOINT_PREFIX}{iteration:04d}"


PARTIAL_SUFFIX = ".partial"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _manifest(d: Path) -> dict[str, dict]:
    return {str(p.relative_to(d)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != META_FILE}


def save_checkpoint(directory: str | Path, objective: Objective, iteration: int) -> Path:
    from ida_ray.models import save_pretrained

    d = Path(directory)
    tmp = d.with_name(d.name + PARTIAL_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed writer left
    try:
        tmp.mkdir(parents=True)
        objective.save_model(tmp / "model")
        save_pretrained(objective.adversary, objective.tokenizer, tmp / "adversary")
        torch.save(objective.optimizer_states(), tmp / "optimizer.pt")
        meta = {"iteration": iteration, "weight_version": iteration + 1, "objective": objective.name,
                "files": _manifest(tmp)}
        (tmp / META_FILE).write_text(json.dumps(meta))
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(d.parent).free if d.parent.exists() else 0
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or free < 16 * 2**20:
            raise DiskFull(f"no room to write checkpoint {d} ({free / 2**20:.1f} MB free): the previous "
                           f"checkpoints are intact; free some space and resume ({exc})") from exc
        raise
    if d.exists():  # the same iteration written again (a re-run after a crash): the new one wins
        shutil.rmtree(d)
    os.replace(tmp, d)
    return d


def checkpoint_problem(directory: str | Path) -> str | None:
    """Why the checkpoint at `directory` cannot be used (None: it is complete and intact)."""
    d = Path(directory)
    meta_path = d / META_FILE
    if not meta_path.exists():
        return f"{d} is not a complete learner checkpoint (no {META_FILE})"
    try:
        meta = json.loads(meta_path.read_text())
        meta["iteration"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{meta_path} is corrupt ({exc})"
    for name, want in meta.get("files", {}).items():  # checkpoints from before manifests have none
        path = d / name
        if not path.is_file():
            return f"{path} is missing from checkpoint {d}"
        if path.stat().st_size != want["bytes"]:
            return f"{path} is truncated or overwritten ({path.stat().st_size} bytes, {want['bytes']} written)"
        if _sha256(path) != want["sha256"]:
            return f"{path} is corrupted (its sha256 differs from the one written with it)"
    return None


def load_checkpoint(directory: str | Path, objective: Objective, device="cpu") -> dict:
    """Weights and optimiser states saved by `save_checkpoint` into `objective`; returns learner.json."""
    from ida_ray.models import load_adversary

    d = Path(directory)
    problem = checkpoint_problem(d)
    if problem:
        raise LearnerFailure(problem)
    meta = json.loads((d / META_FILE).read_text())
    saved = meta.get("objective", "imitation")
    if saved != objective.name:
        raise LearnerFailure(f"{d} was trained with objective {saved!r}; this run's objective is {objective.name!r}")
    objective.load_model(d / "model")
    objective.adversary.load_state_dict(load_adversary(d / "adversary").state_dict())
    # Our own file, but loaded as data only: no pickled code runs.
    objective.load_optimizer_states(torch.load(d / "optimizer.pt", map_location=device, weights_only=True))
    return meta


def latest_checkpoint(root: str | Path, max_iteration: int | None = None, log=None) -> Path | None:
    """The newest complete and intact checkpoint under root (any depth of launches:
    root/*/iteration_NNNN or root/iteration_NNNN), at or below max_iteration when given. One
    that fails `checkpoint_problem` is passed over (and reported to `log`)."""
    found: list[tuple[int, float, Path]] = []
    root = Path(root)
    for meta in [*root.glob(f"{CHECKPOINT_PREFIX}*/{META_FILE}"), *root.glob(f"*/{CHECKPOINT_PREFIX}*/{META_FILE}")]:
        try:
            it = json.loads(meta.read_text())["iteration"]
        except (ValueError, KeyError, TypeError):
            continue
        if max_iteration is None or it <= max_iteration:
            found.append((it, meta.stat().st_mtime, meta.parent))
    for _, _, d in sorted(found, key=lambda k: k[:2], reverse=True):
        problem = checkpoint_problem(d)
        if problem is None:
            return d
        if log:
            log(f"warning: {problem}; passing over checkpoint {d}")
    return None
