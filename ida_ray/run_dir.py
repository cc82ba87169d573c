"""What a run leaves in its directory and what resume reads back. No Ray.

    config.json        the run's IDAConfig
    metrics.jsonl      one record per completed iteration (a re-run iteration's line wins)
    state.json         iterations completed, the checkpoint, the question RNG's state: resume
    plots/progress.png accuracy by size and expert calls per tree, per iteration
    checkpoints/       the learner's checkpoints (ida_ray/checkpoint.py)
    replay/, trees/    the replay buffer's spill and the tree records (ida_ray/replay.py)
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from ida_ray.config import IDAConfig
from ida_ray.errors import ConfigError
from ida_ray.models import ModelSpec

STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "plots/progress.png"
DASHBOARD_FILE = "dashboard_metrics.json"  # the last values sent to the Ray dashboard


def read_state(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is corrupt ({exc}); cannot resume from it") from exc


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def append_metrics(run_dir: str | Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_history(run_dir: str | Path, completed: int) -> list[dict]:
    """The metrics of iterations 0..completed-1 from metrics.jsonl (later lines win, so a
    re-run iteration replaces the record of the attempt that crashed)."""
    path = Path(run_dir) / METRICS_FILE
    by_it: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            if m.get("iteration", completed) < completed:
                by_it[m["iteration"]] = int_size_keys(m)
    return [by_it[i] for i in sorted(by_it)]


def int_size_keys(m: dict) -> dict:
    """JSON turned the size keys into strings; the live history has ints."""
    for key in ("accuracy_by_size", "expert_calls_per_tree_by_size"):
        if isinstance(m.get(key), dict):
            m[key] = {int(k): v for k, v in m[key].items()}
    return m


def check_run_dir(cfg: IDAConfig, resume: bool) -> dict | None:
    """Before any resource is taken: refuse to overwrite a run, and refuse to resume one whose
    model shape differs. Returns the state to resume from (None: a fresh run)."""
    state = read_state(cfg.run_dir)
    if state is None:
        return None
    if not resume:
        raise ConfigError(f"{cfg.run_dir} already holds a run ({state['completed_iterations']} iterations done); "
                          "pass --resume to continue it, or choose another --run-dir")
    old = state.get("config", {})
    # Fields added since a run was saved take their defaults, so older runs stay resumable.
    old_model = {**asdict(ModelSpec()), **old.get("model", {})}
    if old_model != asdict(cfg.model) or old.get("task") != cfg.task or \
            old.get("task_kwargs", {}) != cfg.task_kwargs:
        raise ConfigError(f"cannot resume {cfg.run_dir}: its task or model differs from this configuration "
                          f"(saved: task={old.get('task')!r} model={old.get('model')})")
    if old.get("backend", cfg.backend) != cfg.backend:
        raise ConfigError(f"cannot resume {cfg.run_dir}: it ran on backend {old.get('backend')!r}, this "
                          f"configuration asks for {cfg.backend!r}")
    if not Path(state["checkpoint"]).exists():
        raise ConfigError(f"cannot resume {cfg.run_dir}: checkpoint {state['checkpoint']} is missing")
    return state


def rng_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def rng_state_from_json(data) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss
