"""Running IDA: the public API behind `ida-ray train` and driver scripts.

    from ida_ray.config import load_config
    from ida_ray.entrypoints.train import train
    history = train(load_config("default", {"iterations": 4, "run_dir": "runs/demo"}))

`train` checks the configuration and the run directory before touching Ray, then runs the
loop (`ida_ray.loop.IDARun`) on the configured backend: "ray" joins a running cluster
(address="auto") or starts a local one (dashboard on 127.0.0.1) and hosts the loop in the
coordinator actor; "local" runs it in this process on the torch engine. It shows progress
bars, prints a results summary and returns the per-iteration metrics. The run directory holds
metrics.jsonl, plots/progress.png, state.json, the learner's checkpoints, the replay buffer's
spill and the tree records (ida_ray/run_dir.py).

With cfg.expert == "human" a person is the expert H: `train` also serves the /human page on
http://<cfg.pages_host>:<cfg.pages_port>/human, where the amplification trees' requests wait
(ida_ray/viewer/human_page.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import time
from pathlib import Path

from ida_ray.config import IDAConfig
from ida_ray.errors import ConfigError
from ida_ray.loop import format_accuracy, format_honest, iteration_line
from ida_ray.run_dir import PLOT_FILE, check_run_dir, read_history

NAMESPACE = "ida-ray"


# ---------------------------------------------------------------------------------------
def init_ray(cfg: IDAConfig, address: str | None, dashboard: bool = True, actor_logs: bool = False) -> bool:
    """Connect to Ray. Returns True when this call started a local cluster (and so the caller
    should shut it down). Without actor_logs the actors' output (vLLM, Ray Train) stays in
    Ray's session logs (/tmp/ray/session_latest/logs) and the console shows the progress;
    errors still reach the driver as exceptions."""
    import ray

    if ray.is_initialized():
        return False
    need = cfg.resources.required_cpus(cfg)
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=actor_logs)
        have = ray.cluster_resources().get("CPU", 0)
        if have < need:
            print(f"warning: the cluster has {have:g} CPUs, the run asks for {need:g}; it will wait for the "
                  "autoscaler (see resources in the config)", file=sys.stderr)
        return False
    # Expansion and training alternate, so the actors may share cores: give the local
    # cluster enough logical CPUs for all of them.
    num_cpus = max(os.cpu_count() or 1, math.ceil(need))
    ray.init(num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=dashboard, dashboard_host="127.0.0.1",
             log_to_driver=actor_logs)
    return True


class ProgressBars:
    """An outer bar over iterations and an inner one over the current phase's work items, fed
    from the run's `progress()` (in this process, or the coordinator's)."""

    def __init__(self, iterations: int, enabled: bool, log=print):
        from tqdm.auto import tqdm

        self.tqdm, self.enabled, self.log = tqdm, enabled, log
        self.outer = self._bar(iterations, "iterations", 0, "it") if enabled else None
        self.inner, self.phase = None, None

    def _bar(self, total, desc, position, unit):
        return self.tqdm(total=total, desc=desc, position=position, unit=unit, leave=position == 0,
                         dynamic_ncols=True)

    def show(self, it: int, p: dict) -> None:
        if not self.enabled:
            return
        if p["phase"] != self.phase:
            self.phase = p["phase"]
            self._close_inner()
            self.inner = self._bar(p["total"] or None, f"  iter {it}: {self.phase}", 1,
                                   "tree" if p["total"] else "it")
        if p["total"]:
            self.inner.n = p["done"]
            self.inner.refresh()

    def iteration_done(self, m: dict) -> None:
        self._close_inner()
        self.phase = None
        if self.outer is not None:
            self.outer.update(1)
            self.outer.write(iteration_line(m))
        else:
            self.log(iteration_line(m))

    def _close_inner(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None

    def close(self) -> None:
        self._close_inner()
        if self.outer is not None:
            self.outer.close()


def summary(history: list[dict], run_dir: str | Path, initial_accuracy: dict | None = None) -> str:
    if not history:
        return "no iterations ran"
    first, last = history[0], history[-1]
    mean = lambda m: sum(m["accuracy_by_size"].values()) / len(m["accuracy_by_size"])  # noqa: E731
    before = ""
    if initial_accuracy:
        before = f" (before training: {sum(initial_accuracy.values()) / len(initial_accuracy):.2f})"
    acc = lambda m: {int(k): v for k, v in m["accuracy_by_size"].items()}  # noqa: E731
    largest = max(acc(last))
    lines = [
        "", "== ida-ray results ==",
        f"iterations: {len(history)}   weight version: {last['weight_version']}   "
        f"replica versions: {last.get('replica_versions')}",
        f"held-out accuracy (model alone), mean over sizes: {mean(first):.2f} -> {mean(last):.2f}{before}",
        f"accuracy at the largest size ({largest}): {acc(first).get(largest, float('nan')):.2f} -> "
        f"{acc(last)[largest]:.2f}",
        f"expert calls per amplification tree: {first['expert_calls_per_tree']:.2f} -> "
        f"{last['expert_calls_per_tree']:.2f}",
        f"final accuracy by size: {format_accuracy(last['accuracy_by_size'])}",
        *([format_honest(last["honest"])] if last.get("honest") else []),
        f"seconds per iteration: {', '.join(str(round(m['seconds'])) for m in history)}",
        f"run directory: {Path(run_dir).resolve()} (metrics.jsonl, plots/progress.png, checkpoints/, trees/)",
    ]
    return "\n".join(lines)


def train(cfg: IDAConfig, *, resume: bool = False, address: str | None = None, progress: bool = True,
          dashboard: bool = True, actor_logs: bool = False, questions_file: str | Path | None = None,
          log=print) -> list[dict]:
    """Run (or resume) an IDA run on cfg.backend; returns the metrics of every iteration.

    questions_file: questions to amplify besides the run's own draws (ida_ray/questions.py);
    a resumed run reuses the file it was started with unless given another."""
    from ida_ray.preflight import check_config, check_questions_file

    # Every input is checked before any resource is taken: a mistake costs no cluster time.
    cfg = check_config(cfg, address=address)
    page_socket = None
    if cfg.expert == "human":  # bound now and held: Ray, started before the page, could take the port
        from ida_ray.entrypoints.viewer import reserve_port

        try:
            page_socket = reserve_port(cfg.pages_host, cfg.pages_port)
        except OSError as exc:
            raise ConfigError(f"cannot serve the human page on {cfg.pages_host}:{cfg.pages_port}: "
                              f"{exc.strerror or exc}; choose another with --pages-port") from None
    with page_socket or contextlib.nullcontext():  # closed here too if the run ends before its page serves
        state = check_run_dir(cfg, resume)
        if state and state.get("resume_note"):
            log(f"warning: {state['resume_note']}")
        if questions_file is None and state:
            questions_file = state.get("questions_file")
        user_questions = check_questions_file(cfg, questions_file)
        questions_file = None if questions_file is None else str(Path(questions_file).resolve())
        if state and state["completed_iterations"] >= cfg.iterations:  # nothing to run: no cluster needed
            history = read_history(cfg.run_dir, state["completed_iterations"])[:cfg.iterations]
            log(f"{cfg.run_dir}: {state['completed_iterations']} iterations already done (asked for {cfg.iterations})")
            log(summary(history, cfg.run_dir, state.get("initial_accuracy")))
            return history
        t0 = time.time()
        from ida_ray.trackers import Trackers

        # In the driver, with the user's environment (credentials, WANDB_MODE); before any cluster.
        trackers = Trackers(cfg.logger, cfg.tracking, cfg.run_dir, cfg.to_dict(),
                            first_iteration=state["completed_iterations"] if state else 0, log=log)
        pages = serve_viewer(cfg, log) if cfg.serve_pages and cfg.expert != "human" else None
        try:
            if cfg.backend == "local":
                history, initial = asyncio.run(_train_local(cfg, resume, user_questions, questions_file, progress, log,
                                                            trackers))
            else:
                history, initial = _train_ray(cfg, resume, user_questions, questions_file, address, progress, dashboard,
                                              actor_logs, log, trackers, page_socket)
        finally:
            trackers.close()
            if pages is not None:
                pages.stop()
        log(summary(history, cfg.run_dir, initial))
        log(f"total {time.time() - t0:.0f}s")
        return history


def serve_viewer(cfg: IDAConfig, log):
    """The tree viewer over the run directory, served from this process while the run goes
    (new trees and iterations appear as they are written); None, with a warning, where the
    port is taken: a page is never a reason to stop a run."""
    from ida_ray.entrypoints.viewer import PageServer
    from ida_ray.viewer import create_app
    from ida_ray.viewer.app import page_guard

    token = page_guard(cfg.pages_host)  # off localhost, the pages ask for this token
    try:
        server = PageServer(create_app(cfg.run_dir, token=token), cfg.pages_host, cfg.pages_port).start()
    except OSError as exc:
        log(f"warning: the tree viewer is not served ({exc}); choose a free port with --pages-port, or browse "
            f"the run later with `ida-ray view --run-dir {cfg.run_dir}`")
        return None
    log(f"tree viewer and progress: {server.url}/" + (f"?token={token}" if token else ""))
    return server


def _ready_line(cfg: IDAConfig, info: dict) -> str:
    parts = ", ".join(f"{k} {v:.0f}s" for k, v in info["setup_seconds"].items() if k != "total")
    return (f"ready in {info['setup_seconds']['total']:.0f}s ({parts}); {info['completed_iterations']} iterations "
            f"already done; accuracy before training: {format_accuracy(info['initial_accuracy'])}")


async def _train_local(cfg, resume, user_questions, questions_file, progress, log, trackers) -> tuple[list[dict], dict]:
    """The loop in this process (backend "local")."""
    from ida_ray.local_backend import LocalBackend
    from ida_ray.loop import IDARun

    log(f"starting the local backend (torch engine, {cfg.objective} objective, no Ray) ...")
    run = IDARun(cfg, LocalBackend(cfg), resume=resume, user_questions=user_questions, questions_file=questions_file)
    bars = ProgressBars(cfg.iterations - run.completed, progress, log)
    try:
        info = await run.start()
        log(_ready_line(cfg, info))
        for it in range(run.completed, cfg.iterations):
            task = asyncio.ensure_future(run.run_iteration(it))
            while not task.done():
                bars.show(it, run.progress())
                await asyncio.wait([task], timeout=0.5)
            bars.iteration_done(task.result())
            trackers.log_iteration(task.result(), run.run_dir / PLOT_FILE)
            if task.result().get("stop"):
                break
        return run.history, run.initial_accuracy
    finally:
        bars.close()
        await run.close()
        await run.backend.close()


def _train_ray(cfg, resume, user_questions, questions_file, address, progress, dashboard, actor_logs,
               log, trackers, page_socket=None) -> tuple[list[dict], dict]:
    """The loop in the coordinator actor on a Ray cluster (backend "ray")."""
    import ray

    from ida_ray.actors.coordinator import start_coordinator

    started = init_ray(cfg, address, dashboard, actor_logs)
    coordinator = human = None
    try:
        if cfg.expert == "human":  # the page is up (or the run stops) before any actor starts
            from ida_ray.viewer.human_page import HumanPage

            human = HumanPage(cfg, page_socket, log)
        coordinator = start_coordinator(cfg, resume, user_questions=user_questions, questions_file=questions_file)
        if human is not None:
            human.coordinator = coordinator
        log(f"starting {cfg.replicas} {cfg.engine} replica(s), {cfg.expanders} expander(s), "
            f"{cfg.learner_workers} learner worker(s) ...")
        info = ray.get(coordinator.setup.remote())
        log(_ready_line(cfg, info))
        bars = ProgressBars(cfg.iterations - info["completed_iterations"], progress, log)
        try:
            for it in range(info["completed_iterations"], cfg.iterations):
                ref = coordinator.run_iteration.remote(it)
                while not ray.wait([ref], timeout=0.5)[0]:
                    if progress:
                        bars.show(it, ray.get(coordinator.progress.remote()))
                m = ray.get(ref)
                bars.iteration_done(m)
                trackers.log_iteration(m, Path(cfg.run_dir).resolve() / PLOT_FILE)
                if m.get("stop"):
                    break
        finally:
            bars.close()
        return ray.get(coordinator.get_history.remote()), info["initial_accuracy"]
    finally:
        if coordinator is not None:
            try:
                ray.get(coordinator.shutdown.remote(), timeout=120)
            except Exception as exc:  # noqa: BLE001 - still tear down the cluster we started
                log(f"warning: coordinator shutdown: {exc}")
            ray.kill(coordinator)
        if human is not None:
            human.close()
        if started:
            ray.shutdown()


if __name__ == "__main__":
    from ida_ray.entrypoints.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
