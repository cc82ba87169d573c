"""Faults and bad input: nothing lost, nothing hangs.

Without Ray: question files (every line accounted for), the job dispatcher's bookkeeping
(re-issue, give up, exactly one record per job), bad configuration and CLI input (a clear
message and exit status 2 before Ray starts), and what the code binds to and unpickles.
With a local Ray cluster and torch-engine replicas: a replica and an expander killed while
their trees are in flight, and every tree still completing with the right answer.
(tests/test_chaos.py does the same inside whole runs, and kills the driver.)
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import time
from pathlib import Path

import pytest
import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from ida_ray.cluster.job_dispatch import dispatch_jobs
from ida_ray.config import IDAConfig
from ida_ray.entrypoints import cli
from ida_ray.errors import ConfigError, ParseError
from ida_ray.examples import Example
from ida_ray.expansion import failure_result
from ida_ray.messages import ExpandJob, ExpandResult
from ida_ray.questions import context_needed, for_iteration, read_questions
from ida_ray.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
SUM = get_task("sum")


# -- questions files ---------------------------------------------------------------------
def test_text_questions_file_keeps_every_line_and_flags_the_bad_ones(tmp_path):
    path = tmp_path / "qs.txt"
    long_q = ",".join(["1"] * 200)
    path.write_text("# my questions\n1,2,3\n\n  4,5  \n1,,2\n9;9\n" + long_q + "\n7\n")
    entries = read_questions(path, SUM, max_positions=256, max_new_tokens=16)
    assert [(e.line, e.question) for e in entries if e.problem is None] == [(2, "1,2,3"), (4, "4,5"), (8, "7")]
    bad = {e.line: e.problem for e in entries if e.problem}
    assert set(bad) == {5, 6, 7}
    assert "cannot parse" in bad[5] and "cannot parse" in bad[6]
    assert "too long for the model's context" in bad[7]
    assert [e.index for e in entries] == list(range(6))  # job ids u0..u5: one per entry


def test_jsonl_questions_file(tmp_path):
    path = tmp_path / "qs.jsonl"
    path.write_text('"1,2"\n{"question": "3,4,5"}\n{"q": "1"}\n[1, 2]\n{not json\n"1,2,x"\n')
    entries = read_questions(path, SUM, max_positions=256, max_new_tokens=16)
    assert [e.question for e in entries if e.problem is None] == ["1,2", "3,4,5"]
    problems = [e.problem for e in entries if e.problem]
    assert len(problems) == 4
    assert sum("expected a JSON string" in p for p in problems) == 2
    assert any("not valid JSON" in p for p in problems) and any("cannot parse" in p for p in problems)


def test_a_question_whose_tree_overflows_the_context_is_flagged(tmp_path):
    """Its answer prompt fits, but the fan-in prompts of its tree would not."""
    q = ",".join(["9"] * 40)  # 79 characters
    need = context_needed(SUM, q, max_new_tokens=16)
    assert need > 79 + 16 + 3
    path = tmp_path / "qs.txt"
    path.write_text(q + "\n")
    (entry,) = read_questions(path, SUM, max_positions=need - 1, max_new_tokens=16)
    assert "positions" in entry.problem
    (entry,) = read_questions(path, SUM, max_positions=need, max_new_tokens=16)
    assert entry.problem is None


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), (b"\xff\xfe1,2\n", "not UTF-8"), (b"# only a comment\n\n", "holds no questions")])
def test_an_unusable_questions_file_is_a_config_error(tmp_path, content, message):
    path = tmp_path / "qs.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_questions(path, SUM, max_positions=256, max_new_tokens=16)


def test_each_question_is_amplified_in_exactly_one_iteration(tmp_path):
    path = tmp_path / "qs.txt"
    path.write_text("\n".join(str(i % 10) for i in range(11)))
    entries = read_questions(path, SUM, max_positions=256, max_new_tokens=16)
    slices = [for_iteration(entries, it, 3) for it in range(3)]
    assert [len(s) for s in slices] == [4, 4, 3]
    assert [e.index for s in slices for e in s] == list(range(11))


# -- the job dispatcher, on stand-in expanders ---------------------------------------------
class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class FakeExpander:
    """Answers like a TreeExpander, staging its results in `store` (a real ReplayStore), or
    fails as told: "die" (actor lost), "die_after_staging" (lost after staging the chunk) or
    "raise" (a task error with an IDAError cause); `die_times` deaths, then it answers again
    (restarted)."""

    def __init__(self, mode="ok", die_times=10**9, restarting_probes=0, store=None):
        self.mode, self.die_times, self.calls, self.store = mode, die_times, [], store
        self.restarting_probes = restarting_probes  # probes answered "restarting" after a death
        self.expand_and_stage = _Method(self._expand_and_stage)
        self.remember_weights = _Method(self._remember)
        self.health = _Method(self._health)
        self.told = 0

    async def _health(self):
        if self.restarting_probes > 0:
            self.restarting_probes -= 1
            raise ActorUnavailableError("restarting", None)
        if self.mode == "die" and self.die_times > 0:
            raise ActorDiedError()
        return {}

    async def _remember(self, ref, version):
        self.told += 1

    async def _expand_and_stage(self, jobs):
        self.calls.append([j.job_id for j in jobs])
        await asyncio.sleep(0.01)
        if self.mode == "die" and self.die_times > 0:
            self.die_times -= 1
            raise ActorDiedError()
        if self.mode == "raise":
            raise RayTaskError("expand", "traceback", ParseError("bad output"))
        results = [ExpandResult(j.job_id, _done_tree(j), [Example("answer", f"A{j.question}=", "1", tree_id=j.job_id)])
                   for j in jobs]
        self.store.stage(results)
        if self.mode == "die_after_staging" and self.die_times > 0:
            self.die_times -= 1
            raise ActorDiedError()
        return [r.summary() for r in results]


def _done_tree(job):
    tree = failure_result(SUM, job, {"kind": "none"}).tree
    tree.error = tree.root.error = None
    return tree


@pytest.fixture
def store(tmp_path):
    from ida_ray.replay import ReplayStore

    return ReplayStore(capacity=1000, run_dir=tmp_path)


def _jobs(n, prefix="a"):
    return [ExpandJob(job_id=f"{prefix}{i}", question=f"{i % 9 + 1},{i % 7}", mode="amplify", iteration=1, seed=i)
            for i in range(n)]


def test_dispatch_reissues_a_dead_expanders_chunks_exactly_once(store):
    dead, live = FakeExpander("die", die_times=1, store=store), FakeExpander(store=store)
    jobs = _jobs(20)
    trees, failed, stats = asyncio.run(dispatch_jobs([dead, live], jobs, SUM, chunk_size=4,
                                                     on_reissue=lambda h: h._remember(0, 0)))
    assert [t.job_id for t in trees] == [j.job_id for j in jobs] and not failed
    assert all(t.examples == 1 and t.error_kind is None for t in trees)  # none replaced by a failure
    # dead took chunks 0, 2, 4 first and died once; the chunk it died on went to live.
    assert stats.reissued_chunks == 1 and stats.reissued_jobs == 4 and stats.lost_jobs == 0
    expanded = [i for e in (dead, live) for call in e.calls for i in call]
    assert len(expanded) == 20 + 4 and live.told == 1
    assert store.commit(1, [(t.job_id, t.tree_id) for t in trees]) == 20


def test_a_chunk_staged_twice_is_committed_once_in_job_order(store):
    """An expander that staged its chunk and died before answering: the chunk is re-sent and
    staged again. The commit takes, for each job, the copy whose summary the loop holds, in
    job order whatever order the chunks arrived in; a copy staged after the commit is dropped."""
    from ida_ray.errors import StagingError
    from ida_ray.replay import read_tree_records

    flaky, live = FakeExpander("die_after_staging", die_times=1, store=store), FakeExpander(store=store)
    jobs = _jobs(12)
    trees, failed, stats = asyncio.run(dispatch_jobs([flaky, live], jobs, SUM, chunk_size=4))
    assert stats.reissued_chunks == 1 and store.restaged == 4 and not failed
    pairs = [(t.job_id, t.tree_id) for t in trees]
    with pytest.raises(StagingError, match="1 staged jobs not listed"):
        store.commit(1, pairs[:-1])
    with pytest.raises(StagingError, match="1 listed jobs not staged"):
        store.commit(1, pairs + [("a99", "x")])
    with pytest.raises(StagingError, match="1 listed jobs not staged"):  # a job's copy the loop never saw
        store.commit(1, pairs[:-1] + [(pairs[-1][0], "some other tree")])
    assert store.commit(1, pairs) == 12
    assert [e.tree_id for e in store.buffer.all()] == [t.job_id for t in trees]  # FakeExpander: tree_id=job id
    assert [r["tree_id"] for r in read_tree_records(store.run_dir, 1)] == [t.tree_id for t in trees]
    assert store.stats()["staged"] == {}
    asyncio.run(live._expand_and_stage(jobs[:2]))  # late: its iteration is committed
    assert store.stats()["late"] == 2 and store.stats()["staged"] == {}
    with pytest.raises(StagingError):  # committed once: nothing is left to commit again
        store.commit(1, pairs)


def test_dispatch_waits_for_a_lone_expander_to_restart(store):
    """With one expander (the default), a re-send waits for Ray to restart it: calls to a
    restarting actor fail at once, so the dispatcher probes with back-off first."""
    lone = FakeExpander("die", die_times=1, restarting_probes=3, store=store)
    trees, failed, stats = asyncio.run(dispatch_jobs([lone], _jobs(3), SUM, chunk_size=4))
    assert all(t.examples for t in trees) and not failed
    assert stats.reissued_chunks == 1 and lone.restarting_probes == 0


def test_dispatch_gives_up_with_a_record_per_job_and_never_hangs(store):
    jobs = _jobs(6)
    t0 = time.time()
    trees, failed, stats = asyncio.run(dispatch_jobs([FakeExpander("die"), FakeExpander("die")], jobs, SUM,
                                                     chunk_size=4))
    assert time.time() - t0 < 5
    assert [t.job_id for t in trees] == [r.job_id for r in failed] == [j.job_id for j in jobs]
    assert {t.error_kind for t in trees} == {"expander_lost"} and not any(t.examples for t in trees)
    assert [r.tree.question for r in failed] == [j.question for j in jobs] and failed[0].tree.size == 2
    # Both dead for good: each chunk tries once and finds no expander to re-send to.
    assert stats.lost_jobs == 6 and stats.failed_chunks == 2 and stats.reissued_chunks == 0
    # An error raised inside an expander is not retried: it would fail the same way.
    trees, failed, stats = asyncio.run(dispatch_jobs([FakeExpander("raise"), FakeExpander(store=store)], _jobs(3),
                                                     SUM, chunk_size=4))
    assert {t.error_kind for t in trees} == {"parse_error"} and len(failed) == 3 and stats.reissued_chunks == 0
    with pytest.raises(ValueError, match="unique"):
        asyncio.run(dispatch_jobs([FakeExpander(store=store)], _jobs(2) + _jobs(1), SUM, chunk_size=4))


# -- bad configuration and CLI input: a clear message, exit 2, no Ray ------------------------
BAD_CONFIGS = [
    ("iterations: three\n", "iterations must be a whole number"),
    ("train: {lr: fast}\n", "train.lr must be a number"),
    ("amplify: fast\n", "amplify must be a mapping"),
    ("train_sizes: [1, x]\n", "train_sizes must hold whole numbers"),
    ("train: {replay_capacity: 0}\n", "train.replay_capacity must be >= 1"),
    ("train: {adversary_steps_per_iteration: -1}\n", "adversary_steps_per_iteration must be >= 0"),
    ("model: {hidden_size: 30, num_heads: 4}\n", "must be a multiple of model.num_heads"),
    ("model: {num_layers: 0}\n", "model.num_layers=0"),
    ("task_kwargs: {base_size: 0}\n", "base_size >= 1"),
    ("task_kwargs: {digits: 3}\n", "do not fit task 'sum'"),
    ("amplify: {max_new_tokens: 400}\n", "more than model.max_positions=256"),
    ("use_gpu: true\n", "this machine has none"),
    ("resources: {replica_cpus: -1}\n", "resources.replica_cpus must be a number >= 0"),
    ("resources: {kv_cache_gib: lots}\n", "resources.kv_cache_gib must be a whole number"),
    ("resources: [1]\n", "resources must be a mapping"),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the use_gpu case expects a machine without GPUs")
@pytest.mark.parametrize("content, message", BAD_CONFIGS)
def test_bad_config_exits_2_before_ray(tmp_path, capsys, content, message):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    rc = cli.main(["train", "--config", str(path), "--engine", "torch", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT and message in err and "Traceback" not in err, err
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.txt"), "does not exist"),
    (lambda d: (d / "empty.txt").write_text("\n") and str(d / "empty.txt"), "holds no questions"),
])
def test_bad_questions_file_exits_2_before_ray(tmp_path, capsys, make, message):
    rc = cli.main(["train", "--engine", "torch", "--run-dir", str(tmp_path / "run"), "--questions-file", make(tmp_path)])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT and message in err, err
    assert not ray.is_initialized()


def test_run_dir_that_is_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = cli.main(["train", "--engine", "torch", "--run-dir", str(tmp_path / "file")])
    assert rc == cli.EXIT_BAD_INPUT and "not a directory" in capsys.readouterr().err
    assert not ray.is_initialized()


@pytest.mark.parametrize("error, message", [
    (ActorDiedError(), "an actor of the run died (ActorDiedError"),
    (RayTaskError("run_iteration", "tb", ParseError("x")), "run failed (parse_error)"),
])
def test_a_run_that_dies_says_how_to_resume(tmp_path, capsys, monkeypatch, error, message):
    import ida_ray.entrypoints.train

    def dies(*args, **kwargs):
        raise error
    monkeypatch.setattr(ida_ray.entrypoints.train, "train", dies)
    rc = cli.main(["train", "--engine", "torch", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_RUN_FAILED and message in err and f"--resume (with --run-dir {tmp_path / 'run'})" in err


# -- security: what binds where, and what is unpickled --------------------------------------
def test_local_cluster_dashboard_binds_to_localhost(monkeypatch):
    from ida_ray.entrypoints.train import init_ray

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    assert init_ray(IDAConfig(engine="torch"), address=None, dashboard=True) is True
    assert seen["dashboard_host"] == "127.0.0.1" and seen["include_dashboard"] is True


def test_viewer_binds_to_localhost_by_default(tmp_path, monkeypatch):
    import uvicorn

    from ida_ray.entrypoints import viewer

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    assert viewer.main(["--run-dir", str(tmp_path)]) == 0
    assert seen["host"] == "127.0.0.1"


def _source_files():
    for sub in ("ida_ray", "experiments"):
        yield from (ROOT / sub).rglob("*.py")


def test_no_code_unpickles_files():
    """Checkpoints and trees load from safetensors and JSON; the one torch.load (optimizer
    state, our own file) is weights_only. Ray's own object transport is not in scope."""
    offenders = []
    for path in _source_files():
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{path}: {m.group(0)}")
        for pat in (r"\bpickle\.loads?\(", r"\bcloudpickle\.loads?\(", r"\bdill\.loads?\(", r"\bjoblib\.load\(",
                    r"\bnp\.load\([^)]*allow_pickle=True", r"\bpd\.read_pickle\(", r"\bshelve\.open\("):
            offenders += [f"{path}: {m.group(0)}" for m in re.finditer(pat, text)]
    assert not offenders, offenders


class _Payload:
    """Unpickling this creates a file: the mark of code run by a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_booby_trapped_checkpoint_runs_no_code(tmp_path):
    from ida_ray.checkpoint import load_checkpoint
    from ida_ray.config import TrainConfig
    from ida_ray.models import ModelSpec, build_adversary, build_model, create_model_dirs
    from ida_ray.training import ImitationObjective

    spec = ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    ckpt = tmp_path / "iteration_0000"
    create_model_dirs(ckpt, spec)
    (ckpt / "learner.json").write_text(json.dumps({"iteration": 0}))
    marker = tmp_path / "pwned"
    torch.save({"model_opt": _Payload(marker)}, ckpt / "optimizer.pt")
    model, tok = build_model(spec)
    adversary, _ = build_adversary(spec)
    trainer = ImitationObjective(model, adversary, tok, TrainConfig())
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global|unpickl"):
        load_checkpoint(ckpt, trainer)
    assert not marker.exists()

    # A model directory holding a pickle instead of safetensors does not run it either.
    from ida_ray.models import load_model

    evil = tmp_path / "evil_model"
    evil.mkdir()
    (evil / "config.json").write_text((ckpt / "model" / "config.json").read_text())
    torch.save(_Payload(marker), evil / "pytorch_model.bin")
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises, it must not unpickle
        load_model(evil)
    assert not marker.exists()


# -- replicas and expanders killed with trees in flight (local Ray, torch engine) ------------
# `cluster` and `model_dirs` (the tiny spec) are the fixtures of tests/conftest.py.
RAY_INIT = dict(num_cpus=6, namespace="test-faults")
AMPLIFY = {"use_hprime": False, "max_new_tokens": 6}  # the expert drives: every answer is right


def _questions(n, seed, sizes=(5, 6, 7, 8)):
    rng = random.Random(seed)
    return [SUM.generate(rng.choice(sizes), rng) for _ in range(n)]


def _wait_until(check, timeout_s=60.0):
    deadline = time.time() + timeout_s
    while not check():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.ray
def test_a_replica_killed_mid_expansion_loses_no_tree(cluster, model_dirs):
    """The replica dies with batches in flight; Ray restarts it; the pool re-sends those batches
    to it once its probe sees it answer. Every tree completes, none records an error."""
    from ida_ray.actors.expander import start_expanders
    from ida_ray.actors.replica import start_replicas

    (replica,) = start_replicas(1, *model_dirs, engine="torch", max_new_tokens=6, name_prefix="tf-rep",
                                max_restarts=1, num_cpus=1)
    (expander,) = start_expanders(1, [replica], name_prefix="tf-exp1", num_cpus=0.5, amplify=AMPLIFY,
                                  trees_in_flight=12, pool_options={"probe_max_interval_s": 1.0})
    try:
        qs = _questions(30, seed=1)
        jobs = [ExpandJob(f"r{i}", q, "amplify", iteration=0, seed=i) for i, q in enumerate(qs)]
        ref = expander.expand.remote(jobs)
        _wait_until(lambda: ray.get(replica.health.remote())["calls"].get("generate", 0) >= 3)
        ray.kill(replica, no_restart=False)
        results = ray.get(ref, timeout=300)
        trees = [r.tree for r in results]
        assert [r.job_id for r in results] == [j.job_id for j in jobs]
        assert [t.error for t in trees] == [None] * len(qs)
        assert [t.answer for t in trees] == [SUM.solve(q) for q in qs]
        pool = ray.get(expander.health.remote())["pool"]
        assert pool["resent"] >= 1 and pool["replicas"][0]["failures"] >= 1 and pool["replicas"][0]["up"]
    finally:
        ray.kill(expander, no_restart=True)
        ray.kill(replica, no_restart=True)


@pytest.mark.ray
def test_an_expander_killed_mid_expansion_has_its_trees_reissued(cluster, model_dirs, tmp_path):
    """Two expanders share a replica and stage their trees in a replay buffer actor; one is
    killed with chunks in flight (Ray restarts it). Its chunks are re-issued, the buffer commits
    exactly one tree per job, and every answer is right. With every expander gone for good,
    each job gets a failed record, promptly."""
    from ida_ray.actors.expander import start_expanders
    from ida_ray.actors.replay_buffer import start_replay_buffer
    from ida_ray.actors.replica import start_replicas
    from ida_ray.replay import read_tree_records
    from ida_ray.tree import Tree

    (replica,) = start_replicas(1, *model_dirs, engine="torch", max_new_tokens=6, name_prefix="tf-rep2",
                                max_restarts=0, num_cpus=1)
    buffer = start_replay_buffer(1000, tmp_path, name="tf-buffer")
    expanders = start_expanders(2, [replica], name_prefix="tf-exp2", num_cpus=0.5, amplify=AMPLIFY,
                                trees_in_flight=8, replay_buffer=buffer, stage_timeout_s=60)
    try:
        qs = _questions(32, seed=2)
        jobs = [ExpandJob(f"e{i}", q, "amplify", iteration=0, seed=i) for i, q in enumerate(qs)]

        async def run():
            dispatch = asyncio.ensure_future(dispatch_jobs(expanders, jobs, SUM, chunk_size=4))
            while (await expanders[0].health.remote())["trees_in_flight"] == 0:
                await asyncio.sleep(0.05)
            ray.kill(expanders[0], no_restart=False)
            return await dispatch

        summaries, failed, stats = asyncio.run(asyncio.wait_for(run(), 300))
        assert [t.job_id for t in summaries] == [j.job_id for j in jobs] and not failed
        assert ray.get(buffer.commit.remote(0, [(t.job_id, t.tree_id) for t in summaries]), timeout=60) > 0
        trees = [Tree.from_dict(r) for r in read_tree_records(tmp_path, 0)]
        assert [t.tree_id for t in trees] == [t.tree_id for t in summaries]
        assert len({t.tree_id for t in trees}) == len(jobs)
        assert [t.answer for t in trees] == [SUM.solve(q) for q in qs] and not any(t.error for t in trees)
        assert stats.reissued_chunks >= 1 and stats.lost_jobs == 0
        # The restarted expander serves again.
        def back():
            try:
                return ray.get(expanders[0].health.remote(), timeout=10)["trees_in_flight"] == 0
            except ray.exceptions.RayActorError:
                return False
        _wait_until(back, 120)

        for e in expanders:
            ray.kill(e, no_restart=True)
        t0 = time.time()
        summaries, failed, stats = asyncio.run(dispatch_jobs(expanders, jobs[:5], SUM, chunk_size=4))
        assert time.time() - t0 < 60
        assert [t.error_kind for t in summaries] == ["expander_lost"] * 5 and stats.lost_jobs == 5
        assert [r.tree.error["kind"] for r in failed] == ["expander_lost"] * 5
    finally:
        for e in expanders:
            ray.kill(e, no_restart=True)
        ray.kill(replica, no_restart=True)
        ray.kill(buffer, no_restart=True)


def test_the_swapped_payload_outlives_the_learner_worker_that_made_it(cluster, model_dirs):
    """The Ray backend swaps a copy of the learner's payload that the coordinator owns
    (`owned_copy`): the learner worker that put the original may die, and its objects with it,
    while a replica Ray restarts still needs the latest weights to resync from."""
    from ida_ray.cluster.ray_backend import owned_copy
    from ida_ray.serving.weights import WeightsPayload

    @ray.remote(num_cpus=0)
    class Maker:  # stands in for the learner's rank 0: it owns the payload it puts
        def put(self, model_dir, adversary_dir):
            payload = WeightsPayload.from_dirs(model_dir, adversary_dir)
            # Past Ray's inline limit (100 KiB), as any real model is: kept in the object store.
            payload.model_config["padding"] = "x" * 2**21
            self.ref = ray.put(payload)
            return [self.ref]

    maker = Maker.remote()
    (original,) = ray.get(maker.put.remote(*map(str, model_dirs)), timeout=60)
    owned = asyncio.run(owned_copy(original, timeout_s=60))
    assert owned != original
    ray.kill(maker, no_restart=True)
    deadline = time.time() + 60
    while True:  # ray.kill is asynchronous: the original goes once the owner is gone
        try:
            ray.get(original, timeout=10)
        except ray.exceptions.ObjectLostError:  # OwnerDiedError
            break
        assert time.time() < deadline, "the original payload outlived its owner"
        time.sleep(0.5)
    copy = ray.get(owned, timeout=60)
    assert copy.model == WeightsPayload.from_dirs(*model_dirs).model and len(copy.model_config["padding"]) == 2**21
