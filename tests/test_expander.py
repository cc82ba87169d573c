"""Tree expanders over a pool of two vLLM replicas: every job yields its tree, calls are
batched across trees, the tree bound holds, and a dead replica is routed around.

The pool mixes one vLLM replica (its adversary on torch) with one torch-engine replica: both
give the same greedy answers for the same weights (test_replica.py checks vLLM against
transformers), and one vLLM start-up instead of two keeps the module within its time budget.
"""
import asyncio
import random
import time

import pytest

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

from ida_ray.actors.expander import start_expanders  # noqa: E402
from ida_ray.actors.replica import start_replicas  # noqa: E402
from ida_ray.errors import StaleWeights  # noqa: E402
from ida_ray.messages import ExpandJob, InvalidJob  # noqa: E402
from ida_ray.models import ModelSpec  # noqa: E402
from ida_ray.serving.engine_pool import ReplicaPool  # noqa: E402
from ida_ray.serving.weights import WeightsPayload  # noqa: E402
from ida_ray.tasks import get_task  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

SPEC = ModelSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)  # head size 32: vLLM-CPU
AMPLIFY = {"use_hprime": False, "max_new_tokens": 12}
RAY_INIT = dict(num_cpus=8, namespace=None)  # the `cluster` fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def model_spec():
    """`model_dirs` (tests/conftest.py) from SPEC."""
    return SPEC


@pytest.fixture(scope="module")
def replicas(cluster, model_dirs):
    model_dir, adversary_dir = model_dirs
    common = dict(max_new_tokens=AMPLIFY["max_new_tokens"], max_restarts=0, wait=False)
    handles = (start_replicas(1, model_dir, adversary_dir, engine="vllm", adversary_backend="torch",
                              name_prefix="te-vllm", **common)
               + start_replicas(1, model_dir, adversary_dir, engine="torch", name_prefix="te-torch", **common))
    assert [h["engine"] for h in ray.get([h.ready.remote() for h in handles], timeout=400)] == ["vllm", "torch"]
    yield handles
    for h in handles:
        ray.kill(h, no_restart=True)


@pytest.fixture(scope="module")
def expander(replicas):
    (handle,) = start_expanders(1, replicas, name_prefix="te-expander", amplify=AMPLIFY, trees_in_flight=6,
                                pool_options={"unavailable_timeout_s": 3.0})
    yield handle
    ray.kill(handle, no_restart=True)


def jobs_for(questions, modes=("amplify",), start=0):
    return [ExpandJob(job_id=f"job-{start + i}", question=q, mode=modes[i % len(modes)], iteration=2, seed=i)
            for i, q in enumerate(questions)]


def questions(n, seed, sizes=range(1, 9)):
    task, rng = get_task("sum"), random.Random(seed)
    return [task.generate(rng.choice(list(sizes)), rng) for _ in range(n)]


def test_every_job_yields_its_tree_and_examples(replicas, expander):
    task = get_task("sum")
    qs = questions(16, seed=0) + ["1,2,3,4,5,6,7,8"]
    jobs = jobs_for(qs, modes=("amplify", "distill"))
    results = ray.get(expander.expand.remote(jobs), timeout=300)
    assert [r.job_id for r in results] == [j.job_id for j in jobs]
    for job, res in zip(jobs, results):
        tree = res.tree
        assert tree.question == job.question and tree.mode == job.mode and tree.iteration == 2
        if job.mode == "amplify":
            # The expert drives these trees (no H'), the model's answers are recursed on:
            # the amplified answer is right and every completed node gives examples.
            assert tree.ok and tree.answer == task.solve(job.question), tree.error
            assert any(e.kind == "answer" and e.prompt == f"A{job.question}=" for e in res.examples)
        else:
            # An untrained model's distillation tree fails; the failure is recorded, not raised.
            assert tree.error is not None and tree.error["kind"] in ("output_too_long", "parse_error")
        assert tree.weight_versions == [0]
    deep = results[-1].tree
    assert max(n.depth for n in deep.nodes()) >= 2 and deep.model_calls > 10
    health = ray.get(expander.health.remote())
    assert health["trees_completed"] == len(jobs) and health["trees_in_flight"] == 0
    pool = health["pool"]
    assert pool["mean_batch"] > 1.5  # calls of concurrent trees were sent together
    served = [ray.get(h.health.remote()) for h in replicas]
    assert all(s["calls"].get("generate", 0) > 0 for s in served)  # both replicas took work
    assert max(s["batch_sizes"]["model"]["max"] for s in served) > 1


def test_trees_in_flight_stay_within_the_bound(expander):
    ref = expander.expand.remote(jobs_for(questions(18, seed=1, sizes=(6, 7, 8)), start=100))
    seen = []
    while True:
        done, _ = ray.wait([ref], timeout=0.05)
        seen.append(ray.get(expander.health.remote())["trees_in_flight"])
        if done:
            break
    assert len(ray.get(ref)) == 18
    assert max(seen) <= 6 and max(seen) > 1


def test_a_malformed_job_is_rejected_before_any_tree(expander):
    with pytest.raises(InvalidJob, match="mode must be 'amplify' or 'distill'"):
        ExpandJob("j", "1", "guess", iteration=0)  # a job checks its own fields when it is made
    with pytest.raises(InvalidJob, match="seed must be an int"):
        ExpandJob("j", "1", "amplify", iteration=0, seed="3")
    before = ray.get(expander.health.remote())["trees_completed"]
    with pytest.raises(InvalidJob, match="expected an ExpandJob, got dict"):
        try:
            ray.get(expander.expand.remote([ExpandJob("a", "1,2", "amplify", iteration=0), {"question": "1"}]))
        except ray.exceptions.RayTaskError as exc:
            raise exc.cause from None
    assert ray.get(expander.health.remote())["trees_completed"] == before


def test_a_dead_replica_is_routed_around_and_losing_all_is_recorded(replicas, expander):
    task = get_task("sum")
    ray.kill(replicas[1], no_restart=True)
    qs = questions(8, seed=2)
    results = ray.get(expander.expand.remote(jobs_for(qs, start=200)), timeout=300)
    assert [r.tree.answer for r in results] == [task.solve(q) for q in qs]
    pool = ray.get(expander.health.remote())["pool"]
    assert [r["up"] for r in pool["replicas"]] == [True, False]
    ray.kill(replicas[0], no_restart=True)
    t0 = time.time()
    (res,) = ray.get(expander.expand.remote(jobs_for(["1,2,3"], start=300)), timeout=120)
    assert res.tree.error["kind"] == "engine_failure"  # recorded on the tree, no hang
    assert time.time() - t0 < 60


def test_a_restarted_replica_is_brought_back_to_the_latest_weights(cluster, model_dirs):
    """Ray restarts a killed replica on its initial weights (version 0). Asked for the version
    the pool swapped in, it refuses (StaleWeights) rather than answer on old weights; the pool
    takes it out of rotation, reloads the last swapped payload into it and the request is
    answered at the current version. No answer ever comes from the restarted weights."""
    model_dir, adversary_dir = model_dirs
    (handle,) = start_replicas(1, model_dir, adversary_dir, engine="torch", max_new_tokens=4, name_prefix="te-restart",
                               max_restarts=1)
    pool = ReplicaPool([handle], probe_max_interval_s=1.0)
    assert asyncio.run(pool.swap_weights(WeightsPayload.from_dirs(model_dir, adversary_dir), 5)) == {"replica[0]": 5}
    ray.kill(handle, no_restart=False)
    deadline = time.time() + 120
    # ray.kill is asynchronous: the old incarnation may still answer (at version 5) for a moment,
    # so wait until an answer comes from the restarted one.
    while True:
        assert time.time() < deadline, "the replica was not restarted"
        try:
            if ray.get(handle.weight_version.remote(), timeout=10) == 0:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)

    # Asked directly for version 5, the restarted replica refuses for every kind of call.
    for call in (handle.generate.remote(["A1,2="], min_version=5),
                 handle.logprob.remote(["A1,2="], ["3"], min_version=5),
                 handle.adversary.remote(["A1,2="], ["3"], min_version=5)):
        with pytest.raises(ray.exceptions.RayTaskError) as refused:
            ray.get(call, timeout=60)
        assert isinstance(refused.value.cause, StaleWeights)

    async def serve():
        return (await pool.generate(["A1,2="]))[0], (await pool.adversary(["A1,2="], ["3"]))[0]
    first, score = asyncio.run(serve())
    assert first.weight_version == 5  # the first answer after the restart is already on the latest weights
    assert isinstance(score, float)
    health = pool.health()
    assert health["refused_stale"] == 1 and health["resyncs"] == 1 and health["replicas"][0]["up"]
    assert ray.get(handle.weight_version.remote()) == 5
    assert ray.get(handle.health.remote())["calls"]["refused_stale"] == 4
    pool.close()
    ray.kill(handle, no_restart=True)
