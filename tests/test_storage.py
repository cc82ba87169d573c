"""Storage by URI (IDAConfig.storage, ida_ray/storage.py): a run's checkpoints, tree records,
replay spill and state in storage, so that learners on other nodes and a resume on a new head
need no shared disk. Tested against a second local directory standing in for a shared mount,
and against a real S3 server on 127.0.0.1 (moto's server mode, `moto[server]` from the
registry); a run is resumed from storage alone onto an empty run directory, with the local
backend and with the Ray backend (its Ray Train checkpoints written straight to S3)."""
from __future__ import annotations

import gzip
import json
import socket
import threading

import pytest

from ida_ray.config import load_config
from ida_ray.entrypoints.train import train
from ida_ray.errors import ConfigError
from ida_ray.replay import read_tree_records
from ida_ray.storage import RunStorage, StorageError, bounded, fetch_dir

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = {"backend": "local", "engine": "torch", "iterations": 2, "train_sizes": [1, 2, 3],
        "amplify_trees_per_iteration": 24, "distill_trees_per_iteration": 16, "eval_questions_per_size": 10,
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train.steps_per_iteration": 10, "train.adversary_steps_per_iteration": 2, "logger": [], "serve_pages": False}


class S3Server:
    """moto's S3 server on 127.0.0.1 with a request log: `uri(name)` is a storage URI in it."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()

    def uri(self, name: str) -> str:
        # Credentials in the URI (moto takes any): Ray's worker processes need no environment.
        return (f"s3://testing:testing@ida-bucket/{name}?endpoint_override={self.host}:{self.port}"
                "&scheme=http&region=us-east-1&allow_bucket_creation=true")


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.server.stop()


@pytest.fixture(params=["directory", "s3"])
def storage_uri(request, tmp_path, s3):
    """A storage location: a second local directory (a shared mount), or an S3 bucket."""
    name = request.node.name.replace("[", "-").rstrip("]")
    return str(tmp_path / "shared") if request.param == "directory" else s3.uri(name)


def make_run_dir(root):
    (root / "trees").mkdir(parents=True)
    (root / "replay").mkdir()
    (root / "checkpoints" / "ida" / "iteration_0000").mkdir(parents=True)
    (root / "cache").mkdir()
    (root / "trees" / "iteration_0000.jsonl").write_text('{"tree_id": "a"}\n')
    (root / "trees" / "iteration_0007.jsonl.gz").write_bytes(gzip.compress(b'{"tree_id": "g"}\n'))
    (root / "replay" / "examples.jsonl").write_text('{"x": 1}\n')
    (root / "checkpoints" / "ida" / "iteration_0000" / "learner.json").write_text("{}")
    (root / "cache" / "copy").write_text("fetched")
    (root / "metrics.jsonl").write_text('{"iteration": 0}\n')
    (root / "state.json").write_text('{"completed_iterations": 1}')
    (root / "trees" / "iteration_0001.jsonl.partial").write_text("half")


def test_push_copies_what_changed_state_last_and_pull_restores_it(tmp_path, storage_uri):
    run_dir = tmp_path / "run"
    make_run_dir(run_dir)
    storage = RunStorage(storage_uri)
    storage.check()
    order = []
    put = storage._put
    storage._put = lambda local, rel: (order.append(rel), put(local, rel))

    assert storage.push_run_dir(run_dir) == 5
    assert order[-1] == "state.json"  # the commit point: everything it counts is there first
    assert sorted(order) == ["metrics.jsonl", "replay/examples.jsonl", "state.json", "trees/iteration_0000.jsonl",
                             "trees/iteration_0007.jsonl.gz"]
    # Nothing changed, nothing copied; a changed and a removed file are mirrored.
    assert storage.push_run_dir(run_dir) == 0
    (run_dir / "metrics.jsonl").write_text('{"iteration": 0}\n{"iteration": 1}\n')
    (run_dir / "trees" / "iteration_0000.jsonl").unlink()
    order.clear()
    assert storage.push_run_dir(run_dir) == 1 and order == ["metrics.jsonl"]

    elsewhere = tmp_path / "new-head"
    fresh = RunStorage(storage_uri)
    assert fresh.stored_state() == {"completed_iterations": 1}
    assert fresh.pull_run_dir(elsewhere) == 4
    got = sorted(p.relative_to(elsewhere).as_posix() for p in elsewhere.rglob("*") if p.is_file())
    assert got == ["metrics.jsonl", "replay/examples.jsonl", "state.json", "trees/iteration_0007.jsonl.gz"]
    # Bytes as they were: gzipped tree records are neither gzipped again nor unpacked on the way.
    gz = "trees/iteration_0007.jsonl.gz"
    assert (elsewhere / gz).read_bytes() == (run_dir / gz).read_bytes()
    assert fresh._stored_run_files()[gz] == (run_dir / gz).stat().st_size
    assert (elsewhere / "metrics.jsonl").read_text().count("\n") == 2
    # What was pulled counts as pushed: the new head's first push copies nothing again.
    assert fresh.push_run_dir(elsewhere) == 0

    # A process that pushes to storage it did not pull from (a restarted coordinator) lists it
    # first: files already there by size are not copied again (JSON rewritten in place is),
    # and a file there that is gone here is deleted, so storage never keeps a stale copy.
    with storage.fs.open_output_stream(storage.path("trees", "iteration_0009.jsonl")) as f:
        f.write(b"stale")
    restarted = RunStorage(storage_uri)
    assert restarted.push_run_dir(run_dir) == 1  # state.json
    assert sorted(restarted._stored_run_files()) == ["metrics.jsonl", "replay/examples.jsonl", "state.json", gz]
    # One push at a time: a second while one is still copying is refused, not interleaved.
    with restarted._push_lock:
        with pytest.raises(StorageError, match="still running"):
            restarted.push_run_dir(run_dir)


def test_a_local_storage_uri_names_checkpoints_by_plain_path(tmp_path):
    storage = RunStorage(f"file://{tmp_path}/shared")
    assert storage.local and storage.uri == str(tmp_path / "shared")
    assert storage.checkpoint_ref("ida/iteration_0001") == str(tmp_path / "shared" / "checkpoints" / "ida" / "iteration_0001")


def test_a_checkpoint_in_s3_is_checked_by_its_manifest_listed_and_fetched(tmp_path, s3):
    from ida_ray.checkpoint import META_FILE, _manifest, checkpoint_problem

    local = tmp_path / "iteration_0003"
    (local / "model").mkdir(parents=True)
    (local / "model" / "model.safetensors").write_bytes(b"w" * 1000)
    (local / "optimizer.pt").write_bytes(b"o" * 10)
    (local / META_FILE).write_text(json.dumps({"iteration": 3, "files": _manifest(local)}))
    storage = RunStorage(s3.uri("checkpoint-test"))
    ref = storage.put_checkpoint(local, "ida/iteration_0003")
    assert ref.startswith("s3://") and storage.checkpoint_problem(ref) is None
    assert storage.checkpoint_names() == [(3, "ida/iteration_0003")]
    fetched = fetch_dir(ref, tmp_path / "fetched")
    assert checkpoint_problem(fetched) is None and (fetched / "model" / "model.safetensors").read_bytes() == b"w" * 1000

    with storage.fs.open_output_stream(storage.path("checkpoints", "ida", "iteration_0003", "model", "model.safetensors")) as f:
        f.write(b"w" * 10)  # truncated in storage
    assert "model/model.safetensors is truncated" in storage.checkpoint_problem(ref)
    storage.fs.delete_file(storage.path("checkpoints", "ida", "iteration_0003", META_FILE))
    assert "not a complete learner checkpoint" in storage.checkpoint_problem(ref)
    with pytest.raises(StorageError, match="not in storage"):
        fetch_dir(storage.checkpoint_ref("ida/iteration_0009"), tmp_path / "absent")


def test_unreachable_or_hanging_storage_stops_the_run_before_it_starts(tmp_path):
    # Nothing listens: refused. A server that accepts and never answers: given up after the timeout.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held = []
    stop = threading.Event()

    def accept_and_hold():
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept_and_hold, daemon=True).start()
    try:
        # (The S3 client retries a refused connection for about 12 s before it gives up.)
        for port, timeout, why in ((dead_port, 120, "cannot be written"), (silent.getsockname()[1], 3, "no answer within 3s")):
            uri = f"s3://k:s@bucket/run?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
            cfg = load_config("default", {**TINY, "run_dir": str(tmp_path / f"run{port}"), "storage": uri,
                                          "storage_timeout_s": timeout})
            with pytest.raises(ConfigError, match=why):
                train(cfg, progress=False)
            assert not (tmp_path / f"run{port}").exists()
    finally:
        stop.set()
        silent.close()
    with pytest.raises(ConfigError, match="scheme 'ftp'"):
        load_config("default", {**TINY, "storage": "ftp://host/run"})
    with pytest.raises(StorageError, match="no answer within 0s"):
        bounded(lambda: threading.Event().wait(5), 0.2, "waiting")


def test_a_local_run_resumes_from_storage_alone_on_an_empty_run_dir(tmp_path, storage_uri):
    first = tmp_path / "head-1"
    cfg = load_config("default", {**TINY, "run_dir": str(first), "storage": storage_uri})
    history = train(cfg, progress=False)
    assert [m["iteration"] for m in history] == [0, 1]
    assert history[-1]["storage_push_failures"] == 0 and history[-1]["storage_files_pushed"] > 0
    with pytest.raises(ConfigError, match="already holds a run"):  # a fresh run never overwrites storage's
        train(load_config("default", {**TINY, "run_dir": str(tmp_path / "other"), "storage": storage_uri}),
              progress=False)

    second = tmp_path / "head-2"  # a new machine: nothing of the run on its disk
    resumed = train(load_config("default", {**TINY, "iterations": 3, "run_dir": str(second), "storage": storage_uri}),
                    resume=True, progress=False)
    assert [m["iteration"] for m in resumed] == [0, 1, 2]
    assert resumed[:2] == history[:2]  # the first two iterations' records came from storage
    state = json.loads((second / "state.json").read_text())
    assert state["completed_iterations"] == 3
    storage = RunStorage(storage_uri)
    assert state["checkpoint"] == storage.checkpoint_ref("local/iteration_0002")
    assert [it for it, _ in storage.checkpoint_names()] == [2, 1]  # two kept, as on local disk
    for it in range(3):
        assert len(read_tree_records(second, it)) == 40
    assert (second / "best" / "best.json").exists()
    # Storage has the whole run again: a third head resumes it as far as it went.
    done = train(load_config("default", {**TINY, "iterations": 3, "run_dir": str(tmp_path / "head-3"),
                                         "storage": storage_uri}), resume=True, progress=False)
    assert [m["iteration"] for m in done] == [0, 1, 2]


@pytest.mark.ray
@pytest.mark.slow
def test_the_ray_learner_writes_checkpoints_to_s3_and_a_new_head_resumes_from_them(ray_cluster, tmp_path, s3):
    uri = s3.uri("ray-run")
    ray_cfg = {**TINY, "backend": "ray", "replicas": 1, "expanders": 1, "learner_workers": 1,
               "storage": uri, "resources": {"replica_cpus": 0.5, "expander_cpus": 0.25, "learner_cpus": 0.5}}
    first = tmp_path / "head-1"
    history = train(load_config("default", {**ray_cfg, "run_dir": str(first)}), progress=False)
    assert [m["iteration"] for m in history] == [0, 1]
    assert history[-1]["checkpoint"].startswith("s3://")
    # Ray Train wrote the checkpoints to S3 from the learner worker; none on the head's disk.
    assert not (first / "checkpoints").exists() or not any((first / "checkpoints").rglob("learner.json"))
    storage = RunStorage(uri)
    assert [it for it, _ in storage.checkpoint_names()][:2] == [1, 0]

    second = tmp_path / "head-2"
    resumed = train(load_config("default", {**ray_cfg, "iterations": 3, "run_dir": str(second)}),
                    resume=True, progress=False)
    assert [m["iteration"] for m in resumed] == [0, 1, 2]
    last = resumed[-1]
    assert last["weight_version"] == 3 and last["replica_versions"] == {"replica-0": 3}
    assert last["buffer"] > history[-1]["buffer"]  # iteration 0 and 1's examples came back from storage
    assert len(read_tree_records(second, 2)) == 40
