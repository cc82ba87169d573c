"""A run submitted as a Ray job (`ray job submit`), as the README's cluster section does it:
a real head node started by `ray start`, its job server, `ida-ray train --address auto` as the
entrypoint, and the result read back from the job's logs and the run directory."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(tmp_path):
    """A single-node cluster from `ray start --head`, with its dashboard (the job server)."""
    gcs, dashboard = free_port(), free_port()
    temp = Path("/tmp") / f"ray_job_{os.getpid()}"  # its own session dir: unix socket paths stay short
    # Token authentication off for this cluster only: it listens on 127.0.0.1 for this test,
    # and the client here does not read ~/.ray's token (a cluster's users run `ray job submit`,
    # which does).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--temp-dir={temp}",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_a_run_submitted_as_a_ray_job_completes_and_writes_its_run(head_node, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head_node)
    deadline = time.time() + 60
    while True:  # the job server comes up a moment after `ray start` returns
        try:
            client.list_jobs()
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)
    run_dir = tmp_path / "run"
    entrypoint = (f"{sys.executable} -m ida_ray.entrypoints.cli train --address auto --engine torch "
                  f"--iterations 1 --run-dir {run_dir} --no-progress amplify_trees_per_iteration=8 "
                  f"distill_trees_per_iteration=4 eval_questions_per_size=4 train.steps_per_iteration=3 "
                  f"train.adversary_steps_per_iteration=1 'train_sizes=[1, 2]' logger=[]")
    env = {"OMP_NUM_THREADS": "1", **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}
    job = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env})
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
