"""What a run leaves in its directory and what resume reads back. No Ray.

    config.json        the run's IDAConfig
    metrics.jsonl      one record per completed iteration (a re-run iteration's line wins)
    state.json         iterations completed, the checkpoint, the question RNG's state: resume
    plots/progress.png accuracy by size and expert calls per tree, per iteration
    checkpoints/       the learner's checkpoints (ida_ray/checkpoint.py)
    replay/, trees/    the replay buffer's spill and the tree records (ida_ray/replay.py)
    best/              the model and adversary of the iteration with the best held-out
                       accuracy so far, with best.json (`ida-ray export` and `ida-ray eval` read it)
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ida_ray.config import IDAConfig
from ida_ray.errors import ConfigError
from ida_ray.models import ModelSpec
from ida_ray.storage import CHECKPOINTS_DIR

STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "plots/progress.png"
DASHBOARD_FILE = "dashboard_metrics.json"  # the last values sent to the Ray dashboard
BEST_DIR = "best"
BEST_FILE = "best.json"


def read_state(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is corrupt ({exc}); cannot resume from it") from exc
    return _relocated(Path(run_dir), state)


def _relocated(run_dir: Path, state: dict) -> dict:
    """The state with its checkpoint found under `run_dir` where the run directory has moved since
    it was written (renamed, or copied off the cluster that ran it): state.json names the local
    checkpoint by the absolute path it had then. A URI, or a path that still exists, is as it was."""
    from ida_ray.storage import is_uri

    checkpoint = state.get("checkpoint")
    if not checkpoint or is_uri(checkpoint) or Path(checkpoint).exists():
        return state
    parts = Path(checkpoint).parts
    if CHECKPOINTS_DIR not in parts:
        return state
    at = len(parts) - 1 - parts[::-1].index(CHECKPOINTS_DIR)
    here = run_dir.joinpath(*parts[at:])
    return {**state, "checkpoint": str(here)} if here.exists() else state


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
    model shape differs. Returns the state to resume from (None: a fresh run). With
    cfg.storage, a run directory without a run is filled from storage's copy when resuming
    (a new head node), and a fresh run refuses storage that holds one."""
    from ida_ray.storage import RunStorage, bounded

    storage = RunStorage(cfg.storage, cfg.storage_timeout_s) if cfg.storage else None
    state = read_state(cfg.run_dir)
    if storage is not None:
        stored = bounded(storage.stored_state, cfg.storage_timeout_s, f"reading storage {cfg.storage}")
        # Storage ahead of run_dir (a new head, or an old head's stale copy): storage's run wins.
        if stored is not None and (state is None or stored["completed_iterations"] > state["completed_iterations"]):
            if not resume:
                raise ConfigError(f"storage {cfg.storage} already holds a run ({stored['completed_iterations']} "
                                  "iterations done); pass --resume to continue it, or choose another storage location")
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            bounded(lambda: storage.pull_run_dir(cfg.run_dir), cfg.storage_timeout_s,
                    f"copying the run from {cfg.storage}")
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
    return usable_state(cfg.run_dir, state, storage)


def usable_state(run_dir: str | Path, state: dict, storage=None) -> dict:
    """`state`, or where its checkpoint is missing, truncated or corrupted, the state of the
    newest earlier checkpoint that is intact (its iterations after that one run again; the
    reason is in state["resume_note"]). ConfigError when none is."""
    from ida_ray.checkpoint import META_FILE, checkpoint_problem, latest_checkpoint

    remote = storage is not None and not storage.local  # storage: an ida_ray.storage.RunStorage
    if remote:  # from learner.json and file sizes; the sha256s are checked where it is loaded
        problem = storage.checkpoint_problem(state["checkpoint"])
    else:
        problem = checkpoint_problem(state["checkpoint"]) if Path(state["checkpoint"]).exists() else \
            f"checkpoint {state['checkpoint']} is missing"
    if problem is None:
        return state
    passed_over: list[str] = []
    before = state["completed_iterations"] - 2
    if remote:
        earlier, iteration = None, None
        for it, name in storage.checkpoint_names():
            ref = storage.checkpoint_ref(name)
            if it <= before:
                p = storage.checkpoint_problem(ref)
                if p is None:
                    earlier, iteration = ref, it
                    break
                passed_over.append(f"warning: {p}; passing over checkpoint {ref}")
    else:
        root = Path(storage.path(CHECKPOINTS_DIR)) if storage is not None else Path(run_dir) / CHECKPOINTS_DIR
        earlier = latest_checkpoint(root, max_iteration=before, log=passed_over.append)
        iteration = json.loads((earlier / META_FILE).read_text())["iteration"] if earlier else None
    rng = state.get("rng_states", {}).get(str(iteration)) if earlier else None
    if earlier is None or rng is None:
        raise ConfigError(f"cannot resume {run_dir}: {problem}, and no earlier checkpoint is intact"
                          + (f" with its question state ({'; '.join(passed_over)})" if passed_over else ""))
    return {**state, "completed_iterations": iteration + 1, "checkpoint": str(earlier), "rng_state": rng,
            "resume_note": f"{problem}: resuming from the checkpoint of iteration {iteration} ({earlier}) instead; "
                           f"iterations {iteration + 1}..{state['completed_iterations'] - 1} run again"}


def rng_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def rng_state_from_json(data) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss


def best_score(accuracy_by_size: dict) -> tuple[float, float]:
    """What "best" means for a run's models: held-out accuracy at the largest size (the
    questions IDA exists to answer), then the mean over sizes."""
    acc = {int(k): v for k, v in accuracy_by_size.items()}
    return acc[max(acc)], sum(acc.values()) / len(acc)


def keep_best(run_dir: str | Path, checkpoint: str | Path, record: dict) -> Path:
    """Make `checkpoint`'s model/ and adversary/ the run's best/, with best.json = `record`.

    Checkpoint files are never rewritten, so best/ hard-links them where it can (no copy of
    the weights; the checkpoint's own pruning then frees nothing best/ still needs). The new
    best/ is built beside the old one and swapped in by renames: a crash leaves one whole best/."""
    import shutil

    run_dir, checkpoint = Path(run_dir), Path(checkpoint)
    best, new, old = run_dir / BEST_DIR, run_dir / f"{BEST_DIR}.new", run_dir / f"{BEST_DIR}.old"
    shutil.rmtree(new, ignore_errors=True)

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(src, dst)

    for part in ("model", "adversary"):
        if (checkpoint / part).is_dir():
            shutil.copytree(checkpoint / part, new / part, copy_function=link_or_copy)
    new.mkdir(exist_ok=True)
    (new / BEST_FILE).write_text(json.dumps(record, indent=1))
    if best.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(best, old)
    os.replace(new, best)
    shutil.rmtree(old, ignore_errors=True)
    return best


def read_best(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / BEST_DIR / BEST_FILE
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class ModelSource:
    """Where a model to evaluate or export lives, and what is known about how it was trained."""

    model_dir: Path  # an HF directory (from_pretrained, vllm serve)
    adversary_dir: Path | None
    run_dir: Path | None  # the run it came from, when it came from one
    iteration: int | None  # the iteration whose checkpoint it is, when known
    config: dict | None  # that run's config.json (or the exported model's ida_ray.json)
    which: str  # "best", "last", "checkpoint" or "model"


EXPORT_INFO_FILE = "ida_ray.json"  # beside an exported model: task, format, config, figures


def find_model(path: str | Path, which: str = "best") -> ModelSource:
    """The model at `path`: a run directory (its best/ model, or with which="last" the last
    checkpoint's), a learner checkpoint (model/ and adversary/), an exported model, or any HF
    directory. ConfigError when there is none."""
    path = Path(path).expanduser().resolve()
    if which not in ("best", "last"):
        raise ConfigError(f"which must be 'best' or 'last', got {which!r}")
    if (path / STATE_FILE).exists() or (path / "config.json").exists() and (path / METRICS_FILE).exists():
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else None
        best = read_best(path)
        if which == "best" and best is not None:
            return ModelSource(path / BEST_DIR / "model", _dir_or_none(path / BEST_DIR / "adversary"), path,
                               best["iteration"], config, "best")
        state = read_state(path)
        if not state or not state.get("checkpoint"):
            raise ConfigError(f"run {path} has no completed iteration, so no model to use")
        from ida_ray.storage import local_checkpoint

        ckpt, _ = local_checkpoint(state["checkpoint"], path)  # a URI in the run's storage: copied here
        return ModelSource(ckpt / "model", _dir_or_none(ckpt / "adversary"), path,
                           state["completed_iterations"] - 1, config, "last")
    if (path / "model" / "config.json").exists():  # a learner checkpoint
        from ida_ray.checkpoint import META_FILE

        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
        run = next((p for p in path.parents if (p / STATE_FILE).exists()), None)
        config = json.loads((run / "config.json").read_text()) if run and (run / "config.json").exists() else None
        return ModelSource(path / "model", _dir_or_none(path / "adversary"), run, meta.get("iteration"), config,
                           "checkpoint")
    if (path / "config.json").exists():  # an HF directory, maybe one `ida-ray export` wrote
        info = json.loads((path / EXPORT_INFO_FILE).read_text()) if (path / EXPORT_INFO_FILE).exists() else {}
        return ModelSource(path, _dir_or_none(path / "adversary"), None, info.get("iteration"), info.get("config"),
                           "model")
    raise ConfigError(f"{path} is not a run directory, a checkpoint or an HF model directory (no config.json)")


def _dir_or_none(path: Path) -> Path | None:
    return path if (path / "config.json").exists() else None
