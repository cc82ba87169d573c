"""M from a Hugging Face directory (`model.path`): a second architecture built here (a tiny
Qwen2 with a byte-level BPE tokenizer trained on the task's text: no BOS token, tied
embeddings, a chat template) stands in for a user's checkpoint. The learner, the engines and
evaluation start from its weights; checkpoints stay HF directories of that architecture; vLLM
and transformers agree on its greedy output; its weights swap into a vLLM replica."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ida_ray.config import load_config
from ida_ray.entrypoints.train import train
from ida_ray.errors import ConfigError
from ida_ray.losses import encode
from ida_ray.models import ModelSpec, build_model, create_tiny_qwen2, load_tokenizer, task_corpus
from ida_ray.supervised import labelled_examples
from ida_ray.tasks import get_task
from ida_ray.training import ImitationObjective

TASK = get_task("sum", base_size=1, max_digit=3)
RAY_INIT = dict(num_cpus=2, namespace="test-hf-model")  # the `ray_cluster` fixture (tests/conftest.py)
SIZES = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return create_tiny_qwen2(tmp_path_factory.mktemp("qwen") / "model", task_corpus(TASK, SIZES))


@pytest.fixture(scope="module")
def trained_qwen_dir(qwen_dir, tmp_path_factory):
    """The tiny Qwen2 trained briefly on right answers, so that its greedy choices are clear
    (an untrained model's logits are near ties, where two engines may break them differently)."""
    from ida_ray.config import TrainConfig
    from ida_ray.models import build_adversary, save_pretrained

    spec = ModelSpec(path=str(qwen_dir))
    model, tok = build_model(spec)
    adversary, _ = build_adversary(ModelSpec(path=str(qwen_dir), hidden_size=32, num_layers=1, num_heads=2,
                                             intermediate_size=64))
    objective = ImitationObjective(model, adversary, tok, TrainConfig(lr=1e-2, batch_size=32))
    torch.manual_seed(0)
    import random

    objective.fit(labelled_examples(TASK, SIZES, 400, random.Random(1)), steps=150, adversary_steps=0)
    out = tmp_path_factory.mktemp("qwen_trained")
    return save_pretrained(model, tok, out / "model"), save_pretrained(adversary, tok, out / "adversary")


def test_the_tokenizer_is_the_models_own_and_has_no_bos(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    assert tok.bos_token_id is None and tok.eos_token == "<|im_end|>" and tok.chat_template
    ids, n_prompt = encode(tok, "A3,1=", "4", eos=True)
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[:n_prompt]) == "A3,1="  # no BOS in front


def tiny_run(run_dir, path, **more):
    return load_config("default", {
        "backend": "local", "engine": "torch", "iterations": 1, "train_sizes": list(SIZES),
        "amplify_trees_per_iteration": 16, "distill_trees_per_iteration": 8, "eval_questions_per_size": 8,
        "train.steps_per_iteration": 5, "train.adversary_steps_per_iteration": 2, "run_dir": str(run_dir),
        "model": {"path": str(path), "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        **more})


def test_learner_and_engine_start_from_the_checkpoints_weights(qwen_dir, tmp_path):
    from ida_ray.local_backend import LocalBackend

    backend = LocalBackend(tiny_run(tmp_path, qwen_dir))
    saved = AutoModelForCausalLM.from_pretrained(qwen_dir).state_dict()
    for module in (backend.objective.served_model, backend.engine.model):
        assert type(module).__name__ == "Qwen2ForCausalLM"
        assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())


def test_one_iteration_on_a_model_by_path_checkpoints_its_architecture(qwen_dir, tmp_path):
    (m,) = train(tiny_run(tmp_path, qwen_dir), progress=False, log=lambda s: None)
    assert m["trees"] == 24 and m["model_steps"] == 5
    ckpt = tmp_path / "checkpoints" / "local" / "iteration_0000" / "model"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)  # what `vllm serve` and from_pretrained load
    assert load_tokenizer(ckpt).chat_template and reloaded.config.tie_word_embeddings


def test_a_model_path_that_does_not_load_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match="does not load as a Hugging Face causal LM"):
        train(tiny_run(tmp_path / "run", tmp_path / "no_such_model"), progress=False, log=lambda s: None)
    assert not (tmp_path / "run" / "state.json").exists()


@pytest.mark.vllm
@pytest.mark.ray
def test_vllm_and_transformers_agree_and_a_swap_lands_on_the_second_architecture(ray_cluster, trained_qwen_dir):
    from ida_ray.actors.replica import start_replicas
    from ida_ray.engine import TorchEngine
    from ida_ray.models import load_adversary, load_model
    from ida_ray.prompts import COMPACT
    from ida_ray.serving.engine_pool import ReplicaPool
    from ida_ray.serving.weights import WeightsPayload

    model_dir, adversary_dir = trained_qwen_dir
    import random

    rng = random.Random(7)
    prompts = [COMPACT.answer_prompt(TASK.generate(rng.choice(SIZES), rng)) for _ in range(24)]
    local = TorchEngine(load_model(model_dir), load_adversary(adversary_dir), load_tokenizer(model_dir),
                        max_new_tokens=8)
    expected = asyncio.run(local.generate(prompts))
    (replica,) = start_replicas(1, model_dir, adversary_dir, engine="vllm", max_new_tokens=8, name_prefix="qwen",
                                max_restarts=0, num_cpus=1)
    pool = ReplicaPool([replica])
    try:
        got = asyncio.run(pool.generate(prompts))
        assert [g.text for g in got] == [g.text for g in expected]
        assert [round(g.logprob, 2) for g in got] == pytest.approx([round(g.logprob, 2) for g in expected], abs=0.05)
        # New weights (a different model of the same architecture) swap in, tied embeddings and all.
        fresh = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            for p in fresh.parameters():
                p.mul_(0.5)
        payload = WeightsPayload.from_modules(fresh, None)
        assert asyncio.run(pool.swap_weights(payload, 1)) == {"replica[0]": 1}
        local.load_state(fresh.state_dict(), None, 1)
        after, want = asyncio.run(pool.generate(prompts)), asyncio.run(local.generate(prompts))
        assert [g.text for g in after] == [g.text for g in want]
        # The log-probs too: they are what H' trusts. On vLLM-CPU a tied LM head kept its old
        # packed weights through vLLM's reload (ida_ray/serving/vllm_worker.py), which leaves
        # most greedy texts as they were and the log-probs far off.
        assert [g.logprob for g in after] == pytest.approx([g.logprob for g in want], abs=0.05)
        assert {g.weight_version for g in after} == {1}
    finally:
        pool.close()
        import ray

        ray.kill(replica, no_restart=True)


@pytest.mark.vllm
@pytest.mark.ray
def test_weights_broadcast_into_a_replica_serve_as_the_payload_would_and_a_broken_one_falls_back(
        ray_cluster, trained_qwen_dir, monkeypatch):
    """weight_sync "broadcast" on CPU (ida_ray/serving/weight_broadcast.py): this process is the
    learner's rank 0 and sends by vLLM's weight-transfer protocol over Gloo into the replica's
    vLLM worker; a broadcast that dies midway leaves the replica serving nothing until the
    object-store payload has replaced the half-loaded weights."""
    import ray

    from ida_ray.actors.replica import start_replicas
    from ida_ray.engine import TorchEngine
    from ida_ray.models import load_adversary, load_model
    from ida_ray.prompts import COMPACT
    from ida_ray.serving import weight_broadcast
    from ida_ray.serving.engine_pool import ReplicaPool
    from ida_ray.serving.weights import WeightsPayload

    model_dir, adversary_dir = trained_qwen_dir
    import random

    rng = random.Random(8)
    prompts = [COMPACT.answer_prompt(TASK.generate(rng.choice(SIZES), rng)) for _ in range(24)]
    local = TorchEngine(load_model(model_dir), load_adversary(adversary_dir), load_tokenizer(model_dir),
                        max_new_tokens=8)
    (replica,) = start_replicas(1, model_dir, adversary_dir, engine="vllm", max_new_tokens=8, name_prefix="gloo",
                                max_restarts=0, num_cpus=1, weight_transfer="gloo")
    pool = ReplicaPool([replica])
    # Small buckets, so a round is several broadcasts and one can die between them.
    broadcaster = weight_broadcast.WeightBroadcaster("gloo", "float32", timeout_s=20, bucket_bytes=1 << 15)
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)

    def scale(by: float) -> None:
        with torch.no_grad():
            for p in fresh.parameters():
                p.mul_(by)

    def served_as_local(version: int) -> None:
        local.load_state(fresh.state_dict(), None, version)
        got, want = ray.get(replica.generate.remote(prompts, version)), asyncio.run(local.generate(prompts))
        assert [g.text for g in got] == [g.text for g in want]
        assert [g.logprob for g in got] == pytest.approx([g.logprob for g in want], abs=0.05)
        assert {g.weight_version for g in got} == {version}

    try:
        for version, by in ((1, 0.5), (2, 0.8)):  # the group stays up between rounds
            scale(by)
            report = broadcaster.send(fresh, (replica,), version)
            assert report.error is None and report.joined == (version == 1) and report.replicas == 1
            assert report.bytes == sum(p.numel() * 4 for p in fresh.parameters())
            served_as_local(version)
        # Then the round's payload, as RayBackend.swap sends it: the replica takes its adversary
        # and keeps the broadcast model (this payload's model differs, so a reload would show).
        other, adversary = AutoModelForCausalLM.from_pretrained(model_dir), load_adversary(adversary_dir)
        with torch.no_grad():
            for p in list(other.parameters()) + list(adversary.parameters()):
                p.mul_(0.3)
        completions = ["3"] * 8
        before = ray.get(replica.adversary.remote(prompts[:8], completions, 2))
        assert asyncio.run(pool.swap_weights(WeightsPayload.from_modules(other, adversary), 2)) == {"replica[0]": 2}
        served_as_local(2)
        local.load_state(None, adversary.state_dict(), 2)
        scores, want = ray.get(replica.adversary.remote(prompts[:8], completions, 2)), \
            asyncio.run(local.adversary(prompts[:8], completions))
        assert scores == pytest.approx(want, abs=1e-3) and scores != pytest.approx(before, abs=1e-3)

        class DiesMidway(weight_broadcast.ServedSource):
            def __iter__(self):
                for i, pair in enumerate(super().__iter__()):
                    if i == 4:
                        raise RuntimeError("the learner died mid-broadcast")
                    yield pair

        scale(1.25)
        monkeypatch.setattr(weight_broadcast, "ServedSource", DiesMidway)
        report = broadcaster.send(fresh, (replica,), 3)
        assert "died mid-broadcast" in report.error and broadcaster.sender is None
        assert ray.get(replica.weight_version.remote()) == 2
        # Half its layers are loaded: it computes nothing until the payload is in (the swap
        # waits for the worker's receive to give up, within the group's 20 s). New prompts: the
        # replica's cache holds version 2's answers to the others, and may serve those.
        waiting = replica.generate.remote([COMPACT.answer_prompt(TASK.generate(4, rng)) for _ in range(2)], 2)
        assert not ray.wait([waiting], timeout=2)[0]
        assert asyncio.run(pool.swap_weights(WeightsPayload.from_modules(fresh, None), 3)) == {"replica[0]": 3}
        assert {g.weight_version for g in ray.get(waiting, timeout=60)} == {3}
        served_as_local(3)
        monkeypatch.undo()
        scale(0.9)  # and the next round starts a new group
        report = broadcaster.send(fresh, (replica,), 4)
        assert report.error is None and report.joined
        served_as_local(4)
    finally:
        broadcaster.close()
        pool.close()
        ray.kill(replica, no_restart=True)
