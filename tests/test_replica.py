"""vLLM replicas in Ray actors: in-place weight swap, agreement with transformers, batching.

One Ray cluster and two replicas serve the whole module (each vLLM engine takes ~30 s to
start on CPU): replica 0 serves the adversary on vLLM's pooling runner, replica 1 on torch,
so both adversary paths are checked against the same reference.
"""
import asyncio
import copy

import pytest
import torch

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

from ida_ray.actors.replica import start_replicas  # noqa: E402
from ida_ray.config import TrainConfig  # noqa: E402
from ida_ray.engine import TorchEngine  # noqa: E402
from ida_ray.examples import Example  # noqa: E402
from ida_ray.models import ModelSpec, build_adversary, build_model  # noqa: E402
from ida_ray.prompts import COMPACT  # noqa: E402
from ida_ray.serving.engine_pool import ReplicaPool  # noqa: E402
from ida_ray.serving.weights import WeightsError, WeightsPayload  # noqa: E402
from ida_ray.training import ImitationObjective  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

SPEC = ModelSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)  # head size 32: vLLM-CPU
MAX_NEW = 10
TRAIN = {"1,2": "3", "4,4": "8", "9,9": "18", "5": "5", "7,1,1": "9", "2,2,2": "6"}
PROMPTS = ([COMPACT.answer_prompt(q) for q in [*TRAIN, "3,3", "8,1,1", "6"]]
           + ["O1,2,3,4=", "I1,2[1:1][2:2]="])
RAY_INIT = dict(num_cpus=8, namespace=None)  # the `cluster` fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def model_spec():
    """`model_dirs` (tests/conftest.py) from SPEC."""
    return SPEC


@pytest.fixture(scope="module")
def replicas(cluster, model_dirs):
    model_dir, adversary_dir = model_dirs
    common = dict(engine="vllm", max_new_tokens=MAX_NEW, wait=False, num_cpus=1)
    handles = (start_replicas(1, model_dir, adversary_dir, adversary_backend="vllm", name_prefix="tr-pool", **common)
               + start_replicas(1, model_dir, adversary_dir, adversary_backend="torch", name_prefix="tr-torch", **common))
    ray.get([h.ready.remote() for h in handles], timeout=400)
    yield handles
    ray.get([h.shutdown.remote() for h in handles])
    for h in handles:
        ray.kill(h, no_restart=True)


def trained_parts(seed: int, steps: int):
    """A model taught a few answers (so greedy decoding ends with EOS and is non-trivial) and
    an adversary regressed onto targets."""
    model, tok = build_model(SPEC, seed=seed)
    adversary, _ = build_adversary(SPEC, seed=seed + 1)
    trainer = ImitationObjective(model, adversary, tok, TrainConfig(lr=1e-2, adversary_lr=1e-2), seed)
    examples = [Example("answer", COMPACT.answer_prompt(q), a) for q, a in TRAIN.items()]
    adv = [Example("adversary", COMPACT.answer_prompt(q), a, -0.5 * i) for i, (q, a) in enumerate(TRAIN.items())]
    for _ in range(steps):
        trainer.model_step(examples)
        trainer.adversary_step(adv)
    return model, adversary, tok


@pytest.fixture(scope="module")
def weights_v1():
    return trained_parts(seed=3, steps=40)


@pytest.fixture(scope="module")
def swapped(replicas, weights_v1):
    """Every replica serving the trained weights as version 1, swapped through a pool."""
    model, adversary, _ = weights_v1
    pool = ReplicaPool(replicas)
    return asyncio.run(pool.swap_weights(WeightsPayload.from_modules(model, adversary), 1))


def reference(parts) -> TorchEngine:
    model, adversary, tok = parts
    return TorchEngine(copy.deepcopy(model), copy.deepcopy(adversary), tok, max_new_tokens=MAX_NEW)


def test_swap_sets_the_version_and_greedy_equals_transformers(replicas, swapped, weights_v1):
    assert sorted(swapped.values()) == [1, 1]
    assert ray.get([h.weight_version.remote() for h in replicas]) == [1, 1]
    ref = asyncio.run(reference(weights_v1).generate(PROMPTS))
    # The trained prompts end with EOS and produce their answers: outputs are non-trivial.
    assert sum(g.finished for g in ref) >= len(TRAIN) and ref[0].text == "3"
    for h in replicas:
        gens = ray.get(h.generate.remote(PROMPTS))
        for g, r, p in zip(gens, ref, PROMPTS):
            assert (g.text, g.finished) == (r.text, r.finished), p
            assert g.logprob == pytest.approx(r.logprob, abs=2e-3), p
            assert g.weight_version == 1


def test_logprob_equals_torch_engine(replicas, swapped, weights_v1):
    prompts = [COMPACT.answer_prompt(q) for q in TRAIN] * 2
    completions = list(TRAIN.values()) + ["12", "0", "", "99", "1,2", "7"]
    ref = asyncio.run(reference(weights_v1).logprob(prompts, completions))
    for h in replicas:
        got = ray.get(h.logprob.remote(prompts, completions))
        assert got == pytest.approx(ref, abs=2e-3)
    assert ref[0] > -1.0 and min(ref) < -3.0  # a taught answer is likely, a wrong one is not


def test_adversary_equals_torch_on_both_backends(replicas, swapped, weights_v1):
    prompts = [COMPACT.answer_prompt(q) for q in TRAIN]
    completions = list(TRAIN.values())
    ref = asyncio.run(reference(weights_v1).adversary(prompts, completions))
    assert max(ref) - min(ref) > 0.5  # the trained adversary tells the examples apart
    health = ray.get([h.health.remote() for h in replicas])
    assert [x["adversary_backend"] for x in health] == ["vllm", "torch"]
    for h in replicas:
        assert ray.get(h.adversary.remote(prompts, completions)) == pytest.approx(ref, abs=1e-3)


def test_concurrent_calls_are_batched(replicas, swapped):
    h = replicas[0]
    prompts = [COMPACT.answer_prompt(f"{i % 10},{i // 10}") for i in range(64)]
    before = ray.get(h.health.remote())["batch_sizes"]["model"]["steps"]
    ray.get([h.generate.remote([p]) for p in prompts])  # 64 separate actor calls at once
    health = ray.get(h.health.remote())
    assert health["batch_sizes"]["model"]["steps"] > before
    assert health["batch_sizes"]["model"]["max"] > 8  # vLLM ran them together
    assert health["calls"]["generate"] >= 64 and health["in_flight"] == 0
    # Through the pool, concurrent single-prompt calls become few multi-prompt actor calls.
    pool = ReplicaPool(replicas)

    async def many():
        return await asyncio.gather(*(pool.generate([p]) for p in prompts))
    gens = asyncio.run(many())
    assert len(gens) == 64 and pool.health()["max_batch_seen"] > 1
    assert pool.health()["batches"] < 64


def test_recorded_calls_replay_raw_on_the_engine(replicas, swapped):
    """The throughput benchmark's yardstick: the calls a replica served, recorded and handed
    back to its engine at once (vLLM's prefix cache emptied first) - all of them run."""
    h = replicas[1]
    prompts = [COMPACT.answer_prompt(f"{i % 10},{i // 10}") for i in range(12)]
    ray.get(h.record_calls.remote(True))
    served, scores = ray.get([h.generate.remote(prompts[:8]), h.logprob.remote(prompts[8:], ["1", "2", "3", "4"])])
    calls = ray.get(h.record_calls.remote(False))
    assert calls.generate == prompts[:8] and calls.logprob == list(zip(prompts[8:], ["1", "2", "3", "4"]))
    ray.get(h.generate.remote(prompts[:2]))  # not recorded once stopped
    assert ray.get(h.record_calls.remote(False)) is None
    got = ray.get(h.run_raw.remote(calls, return_outputs=True))
    assert got.model_calls == 12 and got.seconds > 0
    # The engine really ran them: the same greedy answers and log-probs as when they were served.
    assert [g.text for g in got.generations] == [g.text for g in served]
    assert got.logprobs == pytest.approx(scores, abs=1e-4)


def test_swap_during_requests_never_mixes_versions(replicas, swapped, weights_v1):
    """Requests racing a swap each report the version that produced them, and their outputs
    are that version's; requests after the swap see only the new weights."""
    parts_v2 = trained_parts(seed=11, steps=15)
    ref = {1: asyncio.run(reference(weights_v1).generate(PROMPTS)), 2: asyncio.run(reference(parts_v2).generate(PROMPTS))}
    assert [g.text for g in ref[1]] != [g.text for g in ref[2]]
    payload = ray.put(WeightsPayload.from_modules(parts_v2[0], parts_v2[1]))
    reversed_prompts = PROMPTS[::-1]
    racing = [(PROMPTS, h.generate.remote(PROMPTS)) for h in replicas for _ in range(3)]
    swaps = [h.load_weights.remote(payload, 2) for h in replicas]
    racing += [(reversed_prompts, h.generate.remote(reversed_prompts)) for h in replicas for _ in range(3)]
    assert ray.get(swaps) == [2, 2]
    after = ray.get([h.generate.remote(PROMPTS) for h in replicas])
    for prompts, ref_obj in racing:
        for g, p in zip(ray.get(ref_obj), prompts):
            assert g.weight_version in (1, 2)
            assert g.text == ref[g.weight_version][PROMPTS.index(p)].text, (p, g.weight_version)
    for gens in after:
        assert [g.text for g in gens] == [r.text for r in ref[2]] and {g.weight_version for g in gens} == {2}
    # Back to the trained weights (as version 3) for any later test.
    model, adversary, _ = weights_v1
    assert ray.get([h.load_weights.remote(ray.put(WeightsPayload.from_modules(model, adversary)), 3)
                    for h in replicas]) == [3, 3]


def test_a_payload_that_does_not_fit_is_rejected(replicas, swapped, tiny_spec):
    other, _ = build_model(tiny_spec)
    version = ray.get(replicas[0].weight_version.remote())
    with pytest.raises(WeightsError, match="shape|missing"):
        try:
            ray.get(replicas[0].load_weights.remote(WeightsPayload.from_modules(other), version + 1))
        except ray.exceptions.RayTaskError as exc:
            raise exc.cause from None
    assert ray.get(replicas[0].weight_version.remote()) == version
    with pytest.raises(WeightsError):
        WeightsPayload(None, None)


def test_payload_roundtrip_keeps_tensors(tmp_path, weights_v1):
    model, adversary, _ = weights_v1
    payload = WeightsPayload.from_modules(model, adversary)
    state = payload.model_state()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    mdir, adir = payload.write_dirs(tmp_path)
    again = WeightsPayload.from_dirs(mdir, adir)
    assert again.model == payload.model and again.adversary == payload.adversary
    assert again.model_config["hidden_size"] == SPEC.hidden_size


def test_fast_prompt_encoding_equals_the_tokenizer():
    """The replica's char-level fast path gives exactly ida_ray.losses.encode's ids, including
    text with unknown characters and text that spells a special token."""
    from ida_ray.losses import encode
    from ida_ray.serving.vllm_engine import PromptEncoder
    from ida_ray.tokenizer import build_tokenizer

    tok = build_tokenizer()
    fast = PromptEncoder(tok)
    assert fast.chars is not None  # the project's tokenizer takes the fast path
    cases = [("A1,2=", "3"), ("I1,2[1:1][2:2]=", "!3"), ("O9,9,9=", "?9&9,9"), ("A\u00e9\n=", "x"),
             ("A<s>1=", "</s>"), ("", "")]
    for prompt, completion in cases:
        for eos in (True, False):
            assert fast(prompt, completion, eos) == encode(tok, prompt, completion, eos=eos), (prompt, completion)


def test_a_replica_in_its_own_placement_group(cluster, model_dirs):
    """`placement=True` (the default with GPUs): each replica runs in a STRICT_PACK placement
    group of its own, bundle 0 holding the actor's CPUs and custom resources; a group no node
    can hold fails the start with what it asked for, promptly, and is removed."""
    from ray.util import get_placement_group, placement_group_table
    from ray.util.placement_group import remove_placement_group

    from ida_ray.actors.replica import replica_bundles

    assert replica_bundles(1, True, 4, {"replica_node": 1}) == [{"CPU": 1, "replica_node": 1, "GPU": 1}] + [{"GPU": 1}] * 3
    assert replica_bundles(0, False, 1, None) == []
    (handle,) = start_replicas(1, *model_dirs, engine="torch", max_new_tokens=4, name_prefix="tr-placed", num_cpus=1,
                               placement=True, timeout_s=120)
    try:
        group = get_placement_group("tr-placed-0-placement")
        table = placement_group_table(group)
        assert table["state"] == "CREATED" and table["strategy"] == "STRICT_PACK"
        assert list(table["bundles"].values()) == [{"CPU": 1.0}]
        assert ray.get(handle.ready.remote(), timeout=60)["placement_group"] == group.id.hex()
    finally:
        ray.kill(handle, no_restart=True)
        remove_placement_group(get_placement_group("tr-placed-0-placement"))
    with pytest.raises(TimeoutError, match="placement groups"):
        start_replicas(1, *model_dirs, engine="torch", name_prefix="tr-unplaced", num_cpus=1, placement=True,
                       resources={"no_such_node": 1}, timeout_s=3)
    try:
        state = placement_group_table(get_placement_group("tr-unplaced-0-placement"))["state"]
    except ValueError:  # removed groups may no longer be found by name
        state = "REMOVED"
    assert state == "REMOVED"
