"""Experiment trackers: each iteration's figures, the config and the plots, to TensorBoard,
Weights & Biases and MLflow (config `logger: [tensorboard, wandb, mlflow]`, options in
`tracking:`).

metrics.jsonl stays the run's own record (resume reads it); the trackers are where runs are
compared. Every number of an iteration's metrics record is logged, nested keys joined with "/"
(`accuracy_by_size/4`, `phase_seconds/train`, `expert_tokens_per_tree`), at step = iteration.

    TensorBoard  event files in <run_dir>/tensorboard (`tensorboard --logdir runs/`)
    W&B          `wandb.init` in <run_dir>; WANDB_MODE=offline keeps the run on disk
                 (`wandb sync <run_dir>/wandb/offline-run-*` uploads it later)
    MLflow       to tracking.mlflow_tracking_uri (a tracking server), else a local file store
                 in <run_dir>/mlruns

The trackers run in the driver (where `ida-ray train` or the driver script runs), so they see
the user's own environment: W&B and MLflow credentials, WANDB_MODE, MLFLOW_TRACKING_URI. A
resumed run continues the same W&B and MLflow runs (their ids are kept in
<run_dir>/trackers.json). A tracker that fails while logging is reported once and switched
off: the run and its checkpoints never depend on a tracker.
"""
from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from ida_ray.errors import ConfigError

LOGGERS = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "trackers.json"
PLOT_NAME = "progress"


@dataclass(kw_only=True)
class TrackingConfig:
    """Options of the experiment trackers named in the config's `logger` list."""

    project: str = "ida-ray"
    """W&B project and MLflow experiment the run is logged under."""
    run_name: str | None = None
    """The run's name in W&B and MLflow (default: the run directory's name)."""
    mlflow_tracking_uri: str | None = None
    """An MLflow tracking server (http://host:5000) or store URI; default: the environment's
    MLFLOW_TRACKING_URI, else a file store in <run_dir>/mlruns."""

    def problems(self) -> list[str]:
        return [] if self.project else ["tracking.project must not be empty"]


def logger_problems(names) -> list[str]:
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        return [f"logger: unknown tracker(s) {unknown}; choose from {list(LOGGERS)}"]
    if len(set(names)) != len(names):
        return [f"logger: a tracker is named twice in {list(names)}"]
    return []


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) record, keys joined with "/"; booleans as 0/1; strings,
    lists and missing values are left out (they are in metrics.jsonl)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """The config as dotted keys (`train.lr`), values as text: hyper-parameters for the trackers."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


class Tracker(ABC):
    name: str
    run_id: str | None = None  # the tracker's own id of the run, kept for resume (None: it needs none)

    @abstractmethod
    def log_iteration(self, iteration: int, figures: dict[str, float], plot: Path | None) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict, first_iteration: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events a crashed run wrote past its last
        # completed iteration, so each step has one value.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=first_iteration if first_iteration else None)
        if not first_iteration:
            rows = "\n".join(f"| {k} | {v} |" for k, v in flat_config(config).items())
            self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, 0)

    def log_iteration(self, iteration, figures, plot):
        for key, value in figures.items():
            self.writer.add_scalar(key, value, iteration)
        if plot is not None and plot.exists():
            import matplotlib.image

            image = matplotlib.image.imread(plot)[..., :3]  # RGBA floats in 0..1 -> RGB
            self.writer.add_image(PLOT_NAME, image, iteration, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, tracking: TrackingConfig, run_id: str | None):
        import wandb

        self.wandb = wandb
        try:
            self.run = wandb.init(project=tracking.project, name=tracking.run_name or run_dir.name, dir=str(run_dir),
                                  config=config, id=run_id, resume="allow" if run_id else None, reinit="create_new")
        except Exception as exc:  # noqa: BLE001 - wandb raises its own types (not logged in, offline, ...)
            raise ConfigError(f"logger wandb: {exc} (set WANDB_MODE=offline to log to disk only)") from exc
        self.run_id = self.run.id

    def log_iteration(self, iteration, figures, plot):
        row = dict(figures)
        if plot is not None and plot.exists():
            row[PLOT_NAME] = self.wandb.Image(str(plot))
        self.run.log(row, step=iteration)

    def close(self):
        self.run.finish()


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict, tracking: TrackingConfig, run_id: str | None):
        import mlflow

        uri = tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            # MLflow 3 keeps its file store for local use behind this switch; a tracking
            # server is the way for a team (tracking.mlflow_tracking_uri).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").as_uri()
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.uri = uri
        try:
            if run_id is None:
                found = self.client.get_experiment_by_name(tracking.project)
                experiment = found.experiment_id if found else self.client.create_experiment(tracking.project)
                run = self.client.create_run(experiment, run_name=tracking.run_name or run_dir.name)
                run_id = run.info.run_id
                params = [mlflow.entities.Param(k, v[:6000]) for k, v in flat_config(config).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                    self.client.log_batch(run_id, params=params[i:i + 100])
            else:
                self.client.update_run(run_id, status="RUNNING")
        except Exception as exc:  # noqa: BLE001 - an unreachable server, a bad URI, ...
            raise ConfigError(f"logger mlflow ({uri}): {exc}") from exc
        self.run_id = run_id

    def log_iteration(self, iteration, figures, plot):
        import mlflow

        now = mlflow.utils.time.get_current_time_millis()
        metrics = [mlflow.entities.Metric(k.replace("/", "."), v, now, iteration) for k, v in figures.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        if plot is not None and plot.exists():
            self.client.log_artifact(self.run_id, str(plot), artifact_path="plots")

    def close(self):
        self.client.set_terminated(self.run_id)


class Trackers:
    """The run's trackers, opened before any cluster resource is taken (a tracker that cannot
    start is a ConfigError, not a failed run an hour in)."""

    def __init__(self, names, tracking: TrackingConfig, run_dir: str | Path, config: dict, first_iteration: int = 0,
                 log=print):
        problems = logger_problems(tuple(names))
        if problems:
            raise ConfigError(problems[0])
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        ids_path = self.run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.exists() and first_iteration else {}
        self.trackers: list[Tracker] = []
        try:
            for name in names:
                if name == "tensorboard":
                    self.trackers.append(TensorBoardTracker(self.run_dir, config, first_iteration))
                elif name == "wandb":
                    self.trackers.append(WandbTracker(self.run_dir, config, tracking, ids.get("wandb")))
                else:
                    self.trackers.append(MLflowTracker(self.run_dir, config, tracking, ids.get("mlflow")))
        except ImportError as exc:
            self.close()
            raise ConfigError(f"logger: {exc.name} is not installed (pip install 'ida-ray[trackers]')") from exc
        except Exception:
            self.close()
            raise
        ids.update({t.name: t.run_id for t in self.trackers if t.run_id is not None})
        ids_path.write_text(json.dumps(ids))

    def log_iteration(self, metrics: dict, plot: str | Path | None = None) -> None:
        figures = flatten(metrics)
        plot = Path(plot) if plot else None
        for tracker in list(self.trackers):
            try:
                tracker.log_iteration(int(metrics["iteration"]), figures, plot)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops the run
                self.log(f"warning: logger {tracker.name} failed and is switched off: {exc}")
                self.trackers.remove(tracker)

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001
                self.log(f"warning: logger {tracker.name} did not close cleanly: {exc}")
        self.trackers = []
