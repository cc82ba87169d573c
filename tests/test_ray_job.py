"""A run submitted as a Ray job (`ray job submit`), as the README's cluster section does it:
a real head node started by `ray start`, its job server, `ida-ray train --address auto` as the
entrypoint, and the result read back from the job's logs and the run directory."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))  # the venv's ray CLI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(tmp_path):
    """A single-node cluster from `ray start --head`, with its dashboard (the job server)."""
    gcs, dashboard, agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(6))
    temp = Path("/tmp") / f"ray_job_{os.getpid()}"  # its own session dir: unix socket paths stay short
    # Token authentication off for this cluster only: it listens on 127.0.0.1 for this test,
    # and the client here does not read ~/.ray's token (a cluster's users run `ray job submit`,
    # which does).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--temp-dir={temp}", f"--dashboard-agent-listen-port={agent}",
                    f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                    f"--runtime-env-agent-port={runtime_env}",  # not the defaults: another cluster may hold them
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_cluster(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def stop_cluster(temp_dir: str) -> None:
    """Stop the processes of the cluster whose session lives under temp_dir, and only those:
    `ray stop` would stop every Ray cluster on the machine."""
    import psutil

    def ours():
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(temp_dir in part for part in p.info["cmdline"] or ()):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found

    for p in ours():
        p.terminate()
    _, alive = psutil.wait_procs(ours(), timeout=20)
    for p in alive:
        p.kill()


def test_a_run_submitted_as_a_ray_job_completes_and_writes_its_run(head_node, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    run_dir = tmp_path / "run"
    entrypoint = (f"{sys.executable} -m ida_ray.entrypoints.cli train --address auto --engine torch "
                  f"--iterations 1 --run-dir {run_dir} --no-progress amplify_trees_per_iteration=8 "
                  f"distill_trees_per_iteration=4 eval_questions_per_size=4 train.steps_per_iteration=3 "
                  f"train.adversary_steps_per_iteration=1 'train_sizes=[1, 2]' logger=[]")
    env = {"OMP_NUM_THREADS": "1", **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}
    deadline = time.time() + 120
    while True:  # the job server and its agent come up a little after `ray start` returns
        try:
            client = JobSubmissionClient(head_node)
            job = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env})
            break
        except (ConnectionError, RuntimeError) as exc:  # refused, or "No available agent to submit job"
            if time.time() > deadline:
                raise AssertionError(f"the job server at {head_node} took no job in 120 s: {exc}") from exc
            time.sleep(2)
    deadline = time.time() + 600
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job {job} still {status} after 600 s:\n{client.get_job_logs(job)[-3000:]}"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "== ida-ray results ==" in logs and "iterations: 1" in logs
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["iteration"] == 0 and record["weight_version"] == 1 and record["trees"] == 12
    assert json.loads((run_dir / "state.json").read_text())["completed_iterations"] == 1
