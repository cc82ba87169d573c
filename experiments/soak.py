"""A soak under faults: the default run while a chaos loop kills its parts by process id.

    python -m experiments.soak [--iterations 66] [--kill-every 90] [--seed 0]
                               [--set KEY=VALUE ...] [--out docs/results/soak.json]
    python -m experiments.soak --quick      # a few minutes: tiny run, one kill of each kind

`ida-ray train` runs the default preset as a driver process of its own (a local Ray cluster,
vLLM-CPU replica, Ray Train learner), in runs/soak/disturbed. A chaos loop in this process,
outside the project's API, finds the run's processes (descendants of the driver, by their
`ray::` process titles) and SIGKILLs them at random moments: a replica, an expander or a
learner worker in turn, each after a random wait (mean --kill-every seconds) and only once
the run has completed an iteration since the last kill; and once, the driver itself (its
whole process group: the driver and the Ray cluster it started), after which the run is
resumed with `--resume`. Then the same run, undisturbed, in runs/soak/undisturbed.

Checked at the end, from the run directory alone: every question drawn has exactly one tree
record (per iteration, the records equal the jobs of its metrics line, each tree id once);
no checkpoint lost (the resume state's checkpoint and best/ are intact; every checkpoint the
last two metrics lines name is); and held-out accuracy against the undisturbed run's. A fault
counts as recovered when the run completed an iteration after it.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from experiments import common

KINDS = {"replica": "ray::ModelReplica", "expander": "ray::TreeExpander", "learner": "ray::RayTrainWorker"}
QUICK = ["amplify_trees_per_iteration=24", "distill_trees_per_iteration=16",
         "eval_questions_per_size=10", "amplify.max_new_tokens=8", "train.steps_per_iteration=10",
         "train.adversary_steps_per_iteration=3", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
         "model.intermediate_size=64", "engine=torch", "resources.expander_cpus=0.25"]


def completed(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "state.json").read_text())["completed_iterations"]
    except (OSError, ValueError, KeyError):
        return 0


def processes_of(pid: int, title: str) -> list[int]:
    """Descendants of `pid` whose process title starts with `title`."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for p in children:
        try:
            if p.cmdline()[:1] and p.cmdline()[0].startswith(title):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


class Driver:
    """`ida-ray train` as a process of its own session, its output appended to a log."""

    def __init__(self, run_dir: Path, overrides: list[str], log_path: Path):
        self.run_dir, self.overrides, self.log_path = run_dir, overrides, log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, resume: bool) -> None:
        cmd = [sys.executable, "-m", "ida_ray.entrypoints.train", "--config", "default", "--run-dir", str(self.run_dir),
               "--no-dashboard", "--no-progress", "--no-pages", *(["--resume"] if resume else []), *self.overrides]
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.starts += 1

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)


class Chaos(threading.Thread):
    """Kills the run's parts, one at a time, each once the run has moved on from the last."""

    def __init__(self, driver: Driver, rng: random.Random, kill_every: float, driver_at: int, quick: bool):
        super().__init__(daemon=True)
        self.driver, self.rng, self.kill_every, self.driver_at, self.quick = driver, rng, kill_every, driver_at, quick
        self.faults: list[dict] = []
        self.driver_killed = threading.Event()
        self.stop = threading.Event()

    def _wait_for_progress(self, since: int) -> bool:
        while not self.stop.is_set():
            if completed(self.driver.run_dir) > since:
                return True
            self.stop.wait(0.5)
        return False

    def run(self) -> None:
        kinds = list(KINDS)
        order: list[str] = []
        while not self.stop.is_set():
            if not order:
                order = self.rng.sample(kinds, len(kinds))  # each kind in turn, in a random order
            done = completed(self.driver.run_dir)
            if not self.driver_killed.is_set() and done >= self.driver_at:
                kind = "driver"
            elif self.quick and len(self.faults) >= len(kinds) + 1:
                return  # one of each
            else:
                kind = order[0]
            self.stop.wait(self.rng.uniform(0, 2 * self.kill_every) if not self.quick else self.rng.uniform(0, 3))
            if self.stop.is_set() or self.driver.proc is None or self.driver.proc.poll() is not None:
                continue
            if kind == "driver":
                fault = {"kind": "driver", "pid": self.driver.proc.pid, "time": time.time(),
                         "completed": completed(self.driver.run_dir)}
                self.driver_killed.set()  # first: the main loop resumes a driver it sees gone
                self.driver.kill()
                self.faults.append(fault)
                self._wait_for_progress(fault["completed"])
                continue
            pids = processes_of(self.driver.proc.pid, KINDS[kind])
            if not pids:
                continue  # not up yet (starting, or being restarted)
            pid = self.rng.choice(pids)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            order.pop(0)
            fault = {"kind": kind, "pid": pid, "time": time.time(), "completed": completed(self.driver.run_dir)}
            self.faults.append(fault)
            self._wait_for_progress(fault["completed"])


def run_disturbed(run_dir: Path, overrides: list[str], iterations: int, kill_every: float, seed: int,
                  quick: bool, timeout_s: float) -> dict:
    driver = Driver(run_dir, overrides, run_dir.parent / f"{run_dir.name}.log")
    chaos = Chaos(driver, random.Random(seed), kill_every, driver_at=max(1, iterations // 3), quick=quick)
    t0 = time.time()
    driver.start(resume=False)
    chaos.start()
    try:
        while completed(run_dir) < iterations:
            if time.time() - t0 > timeout_s:
                raise TimeoutError(f"the disturbed run did not finish within {timeout_s:g} s; see {driver.log_path}")
            code = driver.proc.poll()
            if code is not None:
                if chaos.driver_killed.is_set() and driver.starts == 1:
                    driver.start(resume=True)  # the one driver kill: resume
                    continue
                if completed(run_dir) < iterations:
                    raise RuntimeError(f"the run exited with {code} after {completed(run_dir)} iterations; "
                                       f"see {driver.log_path}")
            time.sleep(0.5)
        driver.proc.wait(300)
    finally:
        chaos.stop.set()
        chaos.join(30)
        if driver.proc is not None and driver.proc.poll() is None:
            driver.kill()
    for f in chaos.faults:
        f["recovered"] = completed(run_dir) > f["completed"]
        f["seconds_into_run"] = round(f.pop("time") - t0, 1)
    return {"faults": chaos.faults, "minutes": round((time.time() - t0) / 60, 2), "driver_starts": driver.starts}


def run_undisturbed(run_dir: Path, overrides: list[str], timeout_s: float) -> float:
    driver = Driver(run_dir, overrides, run_dir.parent / f"{run_dir.name}.log")
    t0 = time.time()
    driver.start(resume=False)
    try:
        code = driver.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        driver.kill()
        raise TimeoutError(f"the undisturbed run did not finish within {timeout_s:g} s") from None
    if code != 0:
        raise RuntimeError(f"the undisturbed run exited with {code}; see {driver.log_path}")
    return round((time.time() - t0) / 60, 2)


def audit(run_dir: Path, iterations: int) -> dict:
    """What the run directory holds: questions, tree records, what is lost."""
    from ida_ray.checkpoint import checkpoint_problem
    from ida_ray.replay import read_tree_records
    from ida_ray.run_dir import read_history

    history = read_history(run_dir, completed(run_dir))
    questions = records = lost = duplicated = 0
    for m in history:
        trees = read_tree_records(run_dir, m["iteration"])
        jobs = m["jobs"]["submitted"] + m["jobs"]["rejected"]
        ids = Counter(t["tree_id"] for t in trees)
        questions += jobs
        records += len(trees)
        lost += max(0, jobs - len(ids))
        duplicated += sum(n - 1 for n in ids.values())
    state = json.loads((run_dir / "state.json").read_text())
    named = {state["checkpoint"], *(m["checkpoint"] for m in history[-2:])}
    bad = [c for c in named if checkpoint_problem(c) is not None]
    best = run_dir / "best"
    return {"iterations": len(history), "questions": questions, "tree_records": records, "trees_lost": lost,
            "trees_duplicated": duplicated, "checkpoints_lost": len(bad) + (0 if best.is_dir() else 1),
            "checkpoint_problems": [checkpoint_problem(c) for c in bad],
            "accuracy": {str(k): v for k, v in history[-1]["accuracy_by_size"].items()} if history else {},
            "replica_faults": history[-1].get("replica_faults") if history else None,
            "reissued_chunks": sum(m["jobs"].get("reissued_chunks", 0) for m in history)}


def main(argv=None) -> dict:
    ap = common.parser(__doc__, "soak")
    common.add_seed(ap)
    common.add_quick(ap, "a few minutes: a tiny run on the torch engine, one kill of each kind")
    common.add_overrides(ap)
    ap.add_argument("--iterations", type=int, default=66,
                    help="iterations of each run (default 66: over 30 min disturbed here at the default run's "
                         "~28 s an iteration; docs/results/soak.json was 33 at ~55 s)")
    ap.add_argument("--kill-every", type=float, default=90.0, help="mean seconds between kills")
    ap.add_argument("--root", default="runs/soak", help="where the two runs go")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds a run may take before the soak fails")
    args = ap.parse_args(argv)

    iterations = 8 if args.quick else args.iterations
    # Ray's and Ray Train's restarts of a part are bounded (resources.restarts, default 2); a
    # soak kills each part more often than that.
    overrides = (QUICK if args.quick else []) + [f"iterations={iterations}", f"seed={args.seed}",
                                                 "resources.restarts=1000"] + \
        [f"{k}={v}" for k, v in common.parse_overrides(ap, args.overrides).items()]
    root = Path(args.root)
    for name in ("disturbed", "undisturbed"):
        d = root / name
        if d.exists():
            import shutil

            shutil.rmtree(d)
        (root / f"{name}.log").unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)

    chaos = run_disturbed(root / "disturbed", overrides, iterations, args.kill_every, args.seed, args.quick,
                          args.timeout)
    disturbed = audit(root / "disturbed", iterations)
    undisturbed_minutes = run_undisturbed(root / "undisturbed", overrides, args.timeout)
    undisturbed = audit(root / "undisturbed", iterations)
    faults = Counter(f["kind"] for f in chaos["faults"])
    recoveries = Counter(f["kind"] for f in chaos["faults"] if f["recovered"])
    result = {"minutes": chaos["minutes"], "undisturbed_minutes": undisturbed_minutes, "iterations": iterations,
              "faults": dict(faults), "recoveries": dict(recoveries), "questions": disturbed["questions"],
              "tree_records": disturbed["tree_records"], "trees_lost": disturbed["trees_lost"],
              "trees_duplicated": disturbed["trees_duplicated"], "checkpoints_lost": disturbed["checkpoints_lost"],
              "accuracy_disturbed": disturbed["accuracy"], "accuracy_undisturbed": undisturbed["accuracy"],
              "fault_log": chaos["faults"], "driver_starts": chaos["driver_starts"],
              "pool_recoveries": {"replica_faults_last_iteration": disturbed["replica_faults"],
                                  "reissued_chunks": disturbed["reissued_chunks"]},
              "overrides": overrides, "quick": args.quick}
    common.write_result(result, args.out, "soak", argv)
    print(f"soak: {result['minutes']} min, faults {dict(faults)}, recovered {dict(recoveries)}; questions "
          f"{result['questions']}, tree records {result['tree_records']}, lost {result['trees_lost']}, checkpoints lost "
          f"{result['checkpoints_lost']}; accuracy disturbed {result['accuracy_disturbed']} undisturbed "
          f"{result['accuracy_undisturbed']}", flush=True)
    return result


if __name__ == "__main__":
    main()
