"""The Ray Train learner: DDP really averages gradients across 2 workers, ranks stay
bit-identical, rounds publish checkpoints and weight payloads, and a run resumes from its
checkpoint with optimizer state. Also the replay buffer actor's spill/resume logic."""
from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import ray

from ida_ray.actors.replay_buffer import start_replay_buffer
from ida_ray.checkpoint import LearnerFailure, latest_checkpoint
from ida_ray.cluster.learner_group import Learner
from ida_ray.config import IDAConfig, TrainConfig
from ida_ray.examples import MODEL_KINDS, Example
from ida_ray.expansion import failure_result
from ida_ray.messages import ExpandJob
from ida_ray.models import ModelSpec
from ida_ray.replay import ReplayStore, compact_spill, read_tree_records, spill_path
from ida_ray.serving.weights import WeightsPayload
from ida_ray.tasks import get_task

SPEC = ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=64)


def _examples(version: int = 0, n: int = 40) -> list[Example]:
    out = []
    for i in range(n):
        q = f"{i % 10},{(i * 3) % 10}"
        out.append(Example("answer", f"A{q}=", str(i % 10 + (i * 3) % 10), None, version, f"t{i}"))
        out.append(Example("fan_out", f"O{q}=", f"!{i % 10 + (i * 3) % 10}", None, version, f"t{i}"))
        out.append(Example("adversary", f"A{q}=", str(i % 7), -0.1 * (i % 5), version, f"t{i}"))
    return out


def _tree(iteration: int):
    job = ExpandJob(job_id="j", question="1,2", mode="amplify", iteration=iteration)
    return failure_result(get_task("sum"), job, {"kind": "test", "message": "a record"}).tree


# -- replay buffer (no Ray) ----------------------------------------------------------------
def test_replay_store_spills_and_resumes_only_completed_iterations(tmp_path):
    store = ReplayStore(capacity=100, run_dir=tmp_path, seed=0)
    store.add(_examples(0, 10))
    store.add(_examples(1, 10))
    store.add(_examples(2, 10))  # iteration 2 "crashed" before its checkpoint
    store.add_trees(0, [_tree(0)])
    store.add_trees(2, [_tree(2)])
    assert store.stats()["by_weight_version"] == {0: 30, 1: 30, 2: 30}
    a = store.sample(16, ["answer"], seed=5)
    assert a == store.sample(16, ["answer"], seed=5) and {e.kind for e in a} == {"answer"}
    assert store.sample(4, ["fan_in"], seed=1) == []

    resumed = ReplayStore(capacity=100, run_dir=tmp_path, seed=0, completed_iterations=2)
    st = resumed.stats()
    assert st["by_weight_version"] == {0: 30, 1: 30} and st["dropped_on_resume"] == 30
    # Iteration 0's records were gzipped once iteration 2's were written (records.compress_trees).
    assert sorted(p.name for p in (tmp_path / "trees").iterdir()) == ["iteration_0000.jsonl.gz"]
    assert len(read_tree_records(tmp_path, 0)) == 1
    fresh = ReplayStore(capacity=100, run_dir=tmp_path, seed=0)  # not resuming: starts empty
    assert fresh.stats()["size"] == 0 and not list((tmp_path / "trees").iterdir())


def test_compact_spill_keeps_newest_and_drops_a_torn_line(tmp_path):
    path = spill_path(tmp_path)
    path.parent.mkdir(parents=True)
    lines = [json.dumps(e.to_dict()) for e in _examples(0, 5)]
    path.write_text("\n".join(lines) + '\n{"kind": "answer", "prom')
    assert compact_spill(path, capacity=4, max_weight_version=None) == 1 + len(lines) - 4
    assert path.read_text().splitlines() == lines[-4:]
    with pytest.raises(ValueError):
        ReplayStore(capacity=0, run_dir=tmp_path)


# -- the learner's data path (no Ray) ------------------------------------------------------
def test_batches_are_made_ahead_on_another_thread_in_order_and_train_as_a_plain_loop():
    import threading
    import time

    import torch

    from ida_ray.training import ImitationObjective, RoundStats, TrainCommand, prefetched, train_round

    made, main = [], threading.get_ident()

    def make(x):
        made.append((x, threading.get_ident(), time.perf_counter()))
        return x * 10

    consumed = []
    for y in prefetched(make, list(range(6)), depth=2):
        consumed.append((y, time.perf_counter()))
        time.sleep(0.05)  # "the step": the next batches are made meanwhile
    assert [y for y, _ in consumed] == [0, 10, 20, 30, 40, 50]
    assert {tid for _, tid, _ in made} != {main}
    # Batch 2 was ready before batch 1 had been consumed for long: made during the step.
    assert made[2][2] < consumed[1][1] + 0.04
    assert list(prefetched(make, [])) == []

    # A round with prefetching trains exactly as model_step over the same minibatches does.
    cfg = IDAConfig(model=SPEC, train=TrainConfig(batch_size=8, lr=1e-2))
    examples = _examples(0, 40)
    lm = [e for e in examples if e.kind != "adversary"]
    adv = [e for e in examples if e.kind == "adversary"]
    sample = lambda n, kinds, seed: (lm if "adversary" not in kinds else adv)[:n]  # noqa: E731
    a, b = ImitationObjective.build(cfg), ImitationObjective.build(cfg)
    stats = train_round(a, sample, TrainCommand(0, 4, 2), seed=0)
    assert isinstance(stats, RoundStats) and stats.model_steps == 4 and stats.adversary_steps == 2
    plain = [b.model_step(lm[i * 8:(i + 1) * 8]) for i in range(4)]
    plain_adversary = [b.adversary_step(adv[i * 8:(i + 1) * 8]) for i in range(2)]
    assert stats.model_loss == pytest.approx(sum(plain) / 4, rel=1e-6)
    assert stats.adversary_loss == pytest.approx(sum(plain_adversary) / 2, rel=1e-6)
    for pa, pb in zip([*a.model.parameters(), *a.adversary.parameters()], [*b.model.parameters(), *b.adversary.parameters()]):
        assert torch.equal(pa, pb)


def test_answer_share_sets_the_share_of_answers_in_the_rounds_model_examples(tmp_path):
    """train.answer_share draws that share of the round's model examples from the answers and
    the rest from the expert's steps, from a real replay store; unset, the draw is the one the
    round always made; a replay holding no answers yet falls back on what it holds."""
    from ida_ray.training import model_examples

    store = ReplayStore(capacity=1000, run_dir=tmp_path, seed=0)
    examples = _examples(0, 40)  # 40 answers, 40 fan-outs
    store.add(examples + [Example("fan_in", f"I{i}=", f"!{i}", None, 0, f"t{i}") for i in range(120)])
    held = {"answer": 40, "fan_out": 40, "fan_in": 120}
    drawn = model_examples(store.sample, 4000, None, 7)
    assert drawn == store.sample(4000, MODEL_KINDS, seed=14)
    share_alike = sum(e.kind == "answer" for e in drawn) / len(drawn)
    assert abs(share_alike - held["answer"] / sum(held.values())) < 0.03  # 0.2, as the replay holds them
    drawn = model_examples(store.sample, 4000, 0.75, 7)
    kinds = Counter(e.kind for e in drawn)
    assert len(drawn) == 4000 and kinds["answer"] == 3000 and kinds["fan_out"] + kinds["fan_in"] == 1000
    assert 0.6 < kinds["fan_in"] / kinds["fan_out"] / 3 < 1.4  # the steps in the replay's proportions
    first = Counter(e.kind for e in drawn[:64])["answer"]
    assert 32 < first < 64  # shuffled: a minibatch holds about the share, not all answers
    assert model_examples(store.sample, 100, 0.75, 7) == model_examples(store.sample, 100, 0.75, 7)  # seeded
    assert model_examples(store.sample, 100, 0.75, 7) != model_examples(store.sample, 100, 0.75, 8)
    assert {e.kind for e in model_examples(store.sample, 100, 1.0, 7)} == {"answer"}

    steps_only = ReplayStore(capacity=100, run_dir=tmp_path / "steps", seed=0)
    steps_only.add([e for e in examples if e.kind == "fan_out"])
    assert {e.kind for e in model_examples(steps_only.sample, 50, 0.75, 7)} == {"fan_out"}
    assert model_examples(ReplayStore(capacity=10, run_dir=tmp_path / "empty").sample, 50, 0.75, 7) == []

    assert TrainConfig(answer_share=0.5).problems() == []
    for bad in (0.0, 1.5, -0.1):
        assert any("train.answer_share" in p for p in TrainConfig(answer_share=bad).problems())


def test_cosine_schedule_sets_the_model_rate_each_step_and_leaves_the_adversary_at_its_own():
    """lr_schedule cosine: a round takes its steps at the rates of its place in the run (the
    first round warms up, the last ends at min_lr_fraction * lr); the adversary's stays put."""
    from ida_ray.training import ImitationObjective, train_command, train_round

    train = TrainConfig(batch_size=8, lr=1e-2, steps_per_iteration=4, adversary_steps_per_iteration=1,
                        lr_schedule="cosine", warmup_steps=2, min_lr_fraction=0.1)
    cfg = IDAConfig(model=SPEC, train=train, iterations=3)
    examples = _examples(0, 40)
    sample = lambda n, kinds, seed: [e for e in examples if e.kind in kinds][:n]  # noqa: E731
    objective = ImitationObjective.build(cfg)
    seen = []
    step_on = objective.model_step_on
    objective.model_step_on = lambda batch: (seen.append(objective.model_opt.param_groups[0]["lr"]), step_on(batch))[1]
    for it in range(3):
        command = train_command(cfg, it)
        assert (command.first_step, command.total_steps) == (4 * it, 12)
        train_round(objective, sample, command, seed=0)
    assert seen[:2] == pytest.approx([5e-3, 1e-2])            # warm-up: 1/2, 2/2 of lr
    assert seen[-1] == pytest.approx(1e-3)                      # the run's last step: 0.1 * lr
    assert all(a >= b for a, b in zip(seen[1:], seen[2:]))      # then only down
    assert objective.adversary_opt.param_groups[0]["lr"] == 1e-3  # adversary_lr, untouched
    # The constant schedule (the default) leaves lr where it was built.
    plain = IDAConfig(model=SPEC, train=TrainConfig(batch_size=8, lr=1e-2))
    constant = ImitationObjective.build(plain)
    train_round(constant, sample, train_command(plain, 5, model_steps=2, adversary_steps=0), seed=0)
    assert constant.model_opt.param_groups[0]["lr"] == 1e-2


def test_packed_minibatches_give_the_padded_loss_and_gradients_on_fewer_positions():
    """train.pack_sequences: several sequences to a row, each attending to itself alone - the
    same loss and gradients as the padded batch (a sequence that saw its row-mates would not
    give them), on fewer rows; and a round trains the same with either."""
    import torch

    from ida_ray.losses import collate_adversary, collate_adversary_packed, collate_lm, collate_lm_packed, model_loss
    from ida_ray.models import build_model
    from ida_ray.training import ImitationObjective, TrainCommand, train_round

    model, tokenizer = build_model(SPEC, 0)
    examples = [e for e in _examples(0, 40) if e.kind != "adversary"]
    examples += [Example("fan_in", "I" + "1,2,3,4,5,6,7" * (1 + i % 3) + "=", str(i), None, 0, f"f{i}") for i in range(12)]
    random.Random(0).shuffle(examples)  # as the replay buffer samples them
    padded, packed = collate_lm(tokenizer, examples), collate_lm_packed(tokenizer, examples)
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1]
    assert packed["input_ids"].shape[0] < 0.5 * padded["input_ids"].shape[0]
    assert int(packed["sequences"]) == len(examples) and (packed["labels"] != -100).sum() == (padded["labels"] != -100).sum()
    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model_loss(model, batch)
        loss.backward()
        grads.append((float(loss), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert max(float((a - b).abs().max()) for a, b in zip(grads[0][1], grads[1][1])) < 1e-5

    # The adversary's score, read at each packed sequence's last token, is the padded one's.
    adversary_examples = [Example("adversary", e.prompt, e.completion, -float(i % 5), 0, e.tree_id)
                          for i, e in enumerate(examples)]
    objective = ImitationObjective.build(IDAConfig(model=SPEC))
    scores = [objective.scorer(collate(objective.tokenizer, adversary_examples))
              for collate in (collate_adversary, collate_adversary_packed)]
    assert torch.allclose(scores[0], scores[1], atol=1e-5)

    def trained(pack: bool):
        objective = ImitationObjective.build(IDAConfig(model=SPEC, train=TrainConfig(batch_size=16, lr=1e-2,
                                                                                     pack_sequences=pack)))
        sample = lambda n, kinds, seed: [e for e in examples + adversary_examples if e.kind in kinds][:n]  # noqa: E731
        stats = train_round(objective, sample, TrainCommand(0, 4, 2), seed=0)
        weights = [*objective.model.parameters(), *objective.adversary.parameters()]
        return stats.model_loss, stats.adversary_loss, weights

    (m_padded, a_padded, w_padded), (m_packed, a_packed, w_packed) = trained(False), trained(True)
    assert m_padded == pytest.approx(m_packed, rel=1e-4) and a_padded == pytest.approx(a_packed, rel=1e-4)
    assert max(float((a - b).abs().max()) for a, b in zip(w_padded, w_packed)) < 1e-4


# -- DDP on Ray Train ----------------------------------------------------------------------
# The `ray_cluster` fixture (tests/conftest.py). Ray Train workers cannot import this test
# module: it ships its functions by value.
RAY_INIT = dict(num_cpus=2, log_to_driver=True, namespace="test-learner")
RAY_PICKLE_BY_VALUE = True


def _grad_check_loop(config):
    """Each rank takes a DDP step on its own batch, and checks the synced gradient against
    the mean of every rank's local (unsynced) gradient computed on a copy of the model."""
    import copy

    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model

    from ida_ray.losses import collate_lm, model_loss
    from ida_ray.training import ImitationObjective, param_digest

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    cfg = IDAConfig.from_dict(config["ida_config"])
    trainer = ImitationObjective.build(cfg, rank=rank, world_size=world, device=get_device(), wrap=prepare_model)
    model, tok = trainer.model, trainer.tokenizer
    examples = [Example(**e) for e in config["examples"] if e["kind"] == "answer"]
    batch = examples[rank * 8:(rank + 1) * 8]  # different data on each rank
    local = copy.deepcopy(model)
    local.zero_grad()
    model_loss(local, collate_lm(tok, batch)).backward()
    local_grad = torch.cat([p.grad.flatten() for p in local.parameters()])
    gathered = [torch.zeros_like(local_grad) for _ in range(world)]
    dist.all_gather(gathered, local_grad)
    trainer.model_step(batch)  # zero_grad, DDP backward (all-reduce average), clip, step
    synced = torch.cat([p.grad.flatten() for p in model.parameters()])
    for _ in range(3):
        trainer.model_step(examples[(rank + 2) * 4:(rank + 3) * 4])
    digests = [None] * world
    dist.all_gather_object(digests, param_digest(trainer))
    # Ray Train V2 attaches metrics to checkpoints only: rank 0 writes its findings to a file.
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({
        "world": world,
        "ranks_differ": float((gathered[0] - gathered[1]).abs().max()),
        "synced_vs_mean": float((synced - torch.stack(gathered).mean(0)).abs().max()),
        "synced_vs_local": float((synced - local_grad).abs().max()),
        "digests": digests}))
    ray.train.report({})


def _cfg(tmp_path, workers: int) -> IDAConfig:
    return IDAConfig(model=SPEC, learner_workers=workers, seed=3, run_dir=str(tmp_path),
                     train=TrainConfig(batch_size=8, steps_per_iteration=4, adversary_steps_per_iteration=2,
                                       grad_clip=1e9, lr=1e-2, check_ranks_in_sync=True))


def test_ddp_two_workers_average_gradients(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = _cfg(tmp_path, 2)
    out = tmp_path / "gradcheck.json"
    TorchTrainer(
        _grad_check_loop, train_loop_config={"ida_config": cfg.to_dict(), "examples": [e.to_dict() for e in _examples()],
                                             "out": str(out)},
        torch_config=TorchConfig(backend="gloo"), scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(storage_path=str(tmp_path / "store"), name="gradcheck")).fit()
    m = json.loads(out.read_text())
    assert m["world"] == 2
    assert m["ranks_differ"] > 1e-3  # the two ranks really saw different data
    assert m["synced_vs_mean"] < 1e-5  # DDP gradient = mean of the ranks' gradients
    assert m["synced_vs_local"] > 1e-4  # ... not rank 0's own gradient
    assert m["digests"][0] == m["digests"][1]  # parameters identical after 4 steps


def test_learner_rounds_checkpoint_resume(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path, 2)
    buffer = start_replay_buffer(1000, tmp_path, seed=0, name="buffer-a")
    ray.get(buffer.add.remote(_examples()))
    learner = Learner(cfg, tmp_path, buffer_name="buffer-a", control_name="control-a")
    learner.start()
    try:
        r0 = asyncio.run(learner.train(0))
        d0 = learner.last_digests
        r1 = asyncio.run(learner.train(1, steps=2, adversary_steps=1))
        d1 = learner.last_digests
        # The payload lives in rank 0's object store until its next round or the run's end.
        payload = ray.get(r1.weights)
    finally:
        learner.stop()
    assert not learner._thread.is_alive()
    assert learner.start_seconds is not None and learner.start_seconds > 0
    s0, s1 = r0.stats, r1.stats
    assert (s0.model_steps, s0.adversary_steps, s1.model_steps, s1.adversary_steps) == (4, 2, 2, 1)
    assert r0.ranks_in_sync and r1.ranks_in_sync and len(d1) == 2
    assert d0[0] != d1[0]  # training changed the weights
    assert s1.model_loss == s1.model_loss and s1.adversary_loss == s1.adversary_loss  # not NaN
    assert r1.weight_version == 2 and s1.local_batch_size == 4  # batch 8 over 2 ranks
    assert isinstance(payload, WeightsPayload) and payload.model and payload.adversary
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None and ckpt.name == "iteration_0001" and str(ckpt) == r1.checkpoint_path
    assert {p.name for p in ckpt.iterdir()} >= {"model", "adversary", "optimizer.pt", "learner.json"}

    # Resume from the checkpoint with one worker: same weights, optimizer state restored.
    cfg1 = _cfg(tmp_path, 1)
    learner = Learner(cfg1, tmp_path, buffer_name="buffer-a", control_name="control-b",
                      start_iteration=2, resume_from=ckpt)
    learner.start()
    try:
        asyncio.run(learner.train(2, steps=0, adversary_steps=0))
    finally:
        learner.stop()
    assert learner.last_digests[0] == d1[0]  # no steps: exactly the checkpointed weights
    assert latest_checkpoint(tmp_path / "checkpoints").name == "iteration_0002"


def test_learner_failure_is_reported_not_hung(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path, 1)
    learner = Learner(cfg, tmp_path, buffer_name="no-such-buffer", control_name="control-c", max_failures=0)
    learner.start()
    with pytest.raises(LearnerFailure, match="no-such-buffer|failed"):
        asyncio.run(learner.train(0))
    learner.stop()


def test_learner_honest_objective_two_workers(ray_cluster, tmp_path):
    """objective "honest" through the same Ray Train learner: the θ₁/θ₂ updates are averaged
    across 2 ranks (bit-identical two-headed weights), the round reports C and the held-out
    probe, the checkpoint keeps both heads, and replicas get the intended head."""
    from dataclasses import replace

    import torch
    from safetensors.torch import load

    from ida_ray.honest.config import HonestConfig
    from ida_ray.honest.two_headed import INSTRUMENTAL_FILE, load_two_headed

    cfg = replace(_cfg(tmp_path, 2), objective="honest", honest=HonestConfig(small_batch_size=8)).validate()
    buffer = start_replay_buffer(1000, tmp_path, seed=0, name="buffer-h")
    ray.get(buffer.add.remote(_examples()))
    learner = Learner(cfg, tmp_path, buffer_name="buffer-h", control_name="control-h")
    learner.start()
    try:
        r0 = asyncio.run(learner.train(0))
        payload = ray.get(r0.weights)
    finally:
        learner.stop()
    assert r0.ranks_in_sync and len(learner.last_digests) == 2 and r0.stats.model_steps == 4
    h = r0.stats.objective_stats
    assert h["trusted_examples"] > 0 and h["disagreement_c"] >= 0 and h["questions"] > 0
    assert 0 <= h["intended_right_where_simple_errs"] <= 1
    ckpt = Path(r0.checkpoint_path)
    assert (ckpt / "model" / INSTRUMENTAL_FILE).exists()
    two = load_two_headed(ckpt / "model")
    served = load(payload.model)  # what every replica loads: the intended head, not the instrumental one
    assert torch.equal(served["lm_head.weight"], two.lm.lm_head.weight)
    assert not torch.equal(served["lm_head.weight"], two.instrumental_head.weight)


def test_balance_answer_sizes_draws_answers_equally_from_each_size(tmp_path):
    """train.balance_answer_sizes: each size the replay holds gets about the same share of the
    answers drawn, however rare it is there; fan-outs and fan-ins are drawn as before; with and
    without answer_share; the draw is seeded; unsized answers are one more group."""
    from ida_ray.training import model_examples

    store = ReplayStore(capacity=2000, run_dir=tmp_path, seed=0)
    held = {1: 400, 2: 200, 3: 50, 4: 10}  # the larger, the rarer, as trees make them
    store.add([Example("answer", f"A{s}-{i}=", str(i), None, 0, f"t{s}{i}", s) for s, n in held.items()
               for i in range(n)])
    store.add([Example("fan_out", f"O{i}=", f"!{i}", None, 0, f"o{i}") for i in range(340)])
    alike = Counter(e.size for e in model_examples(store.sample, 8000, 0.5, 7) if e.kind == "answer")
    assert alike[4] < 0.03 * 4000  # 10 of 660 answers: ~1.5% of the draw
    drawn = model_examples(store.sample, 8000, 0.5, 7, balance_answer_sizes=True)
    kinds = Counter(e.kind for e in drawn)
    assert kinds["answer"] == 4000 and kinds["fan_out"] == 4000
    sizes = Counter(e.size for e in drawn if e.kind == "answer")
    assert set(sizes) == {1, 2, 3, 4} and all(850 < sizes[s] < 1150 for s in held), sizes
    assert len({e.prompt for e in drawn if e.size == 4}) == 10  # every size-4 answer, many times over
    assert drawn == model_examples(store.sample, 8000, 0.5, 7, balance_answer_sizes=True)  # seeded

    # Without answer_share: the kinds in the replay's proportions (660 answers of 1000), the
    # answers among them by size.
    drawn = model_examples(store.sample, 8000, None, 7, balance_answer_sizes=True)
    kinds = Counter(e.kind for e in drawn)
    assert abs(kinds["answer"] / 8000 - 0.66) < 0.03
    sizes = Counter(e.size for e in drawn if e.kind == "answer")
    assert all(abs(sizes[s] / kinds["answer"] - 0.25) < 0.04 for s in held), sizes

    store.add([Example("answer", f"X{i}=", "0", None, 0, f"x{i}") for i in range(5)])  # unsized
    sizes = Counter(e.size for e in store.sample(5000, ("answer",), 3, balance_sizes=True))
    assert set(sizes) == {1, 2, 3, 4, None} and all(850 < c < 1150 for c in sizes.values()), sizes
