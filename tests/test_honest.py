"""Answering questions honestly (seed 001): the two-headed model, the objective's pieces (C and
its stop-gradient, the L2 anchors, the θ₁ C-difference rule), the labelling processes, the
confident-comparison filter, and saving/loading."""
import itertools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from ida_ray.errors import ConfigError
from ida_ray.examples import Example
from ida_ray.honest.comparisons import (
    Comparison,
    ConfidentJudge,
    amplified_answers,
    collate_comparisons,
    collect_comparisons,
    comparison_nll,
)
from ida_ray.honest.fit import label_examples
from ida_ray.honest.labels import ComplexLabeller, SumDropsCarryIntoTwenties, build_datasets, simple_labeller
from ida_ray.honest.objective import (
    ComparisonConfig,
    HonestConfig,
    HonestTrainer,
    disagreement,
    intended_nll,
    split_parameters,
)
from ida_ray.honest.two_headed import INSTRUMENTAL_FILE, build_two_headed, load_two_headed, save_two_headed
from ida_ray.losses import collate_lm
from ida_ray.models import ModelSpec
from ida_ray.prompts import COMPACT
from ida_ray.tasks import get_task

TINY = ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=32)
TASK = get_task("sum")
# Tiny models: intra-op threads only add contention on a shared 2-core machine (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture
def model_tok():
    return build_two_headed(TINY, seed=0)


def small_batch(tok, n=8, seed=0):
    rng = random.Random(seed)
    qs = [TASK.generate(rng.choice((2, 3)), rng) for _ in range(n)]
    return collate_lm(tok, [Example("answer", COMPACT.answer_prompt(q), TASK.solve(q)) for q in qs])


def zero_loss(model):
    return torch.zeros(())


def snapshot(params: dict) -> dict:
    return {n: p.detach().clone() for n, p in params.items()}


def moved(before: dict, params: dict) -> bool:
    return any(not torch.equal(before[n], p.detach()) for n, p in params.items())


# -- C and its stop-gradient -----------------------------------------------------------
def test_stop_gradient_blocks_c_from_the_intended_head(model_tok):
    model, tok = model_tok
    batch = small_batch(tok)
    heads = dict(model.named_parameters())
    intended, instrumental = heads["lm.lm_head.weight"], heads["instrumental_head.weight"]
    trunk = heads["lm.model.layers.0.mlp.down_proj.weight"]
    c = disagreement(model, batch, stop_gradient=True)
    assert c > 0
    g_int, g_ins, g_trunk = torch.autograd.grad(c, [intended, instrumental, trunk], allow_unused=True)
    assert g_int is None or torch.count_nonzero(g_int) == 0
    assert g_ins.abs().sum() > 0 and g_trunk.abs().sum() > 0
    # Without the stop-gradient the same C does reach the intended head: the check above can fail.
    g_int_free, = torch.autograd.grad(disagreement(model, batch, stop_gradient=False), [intended])
    assert g_int_free.abs().sum() > 0


def test_intended_head_does_not_move_under_c_alone(model_tok):
    model, tok = model_tok
    cfg = HonestConfig(lam=5.0, alpha1=0.0, alpha2=0.0)
    trainer = HonestTrainer(model, cfg)
    head = model.lm.lm_head.weight.detach().clone()
    ins = model.instrumental_head.weight.detach().clone()
    for _ in range(3):
        trainer.step(zero_loss, small_batch(tok))
    assert torch.equal(model.lm.lm_head.weight, head)
    assert not torch.equal(model.instrumental_head.weight, ins)


def test_c_is_zero_when_heads_agree(model_tok):
    model, tok = model_tok
    batch = small_batch(tok)
    assert disagreement(model, batch) > 1e-3
    with torch.no_grad():
        model.instrumental_head.weight.copy_(model.lm.lm_head.weight)
    assert abs(float(disagreement(model, batch).detach())) < 1e-6


def test_c_under_overridden_parameters_matches_the_model_with_those_values(model_tok):
    model, tok = model_tok
    batch = small_batch(tok)
    _, theta2 = split_parameters(model, HonestConfig().theta1_prefixes)
    now = snapshot(theta2)
    shifted = {n: p + 0.05 for n, p in now.items()}
    assert torch.allclose(disagreement(model, batch, params=now), disagreement(model, batch))
    c_shifted = disagreement(model, batch, params=shifted)
    with torch.no_grad():
        for n, p in theta2.items():
            p.copy_(shifted[n])
    assert torch.allclose(c_shifted, disagreement(model, batch))


# -- the alternating optimiser ------------------------------------------------------------
def test_l2_anchors_pull_each_group_toward_its_initial_values(model_tok):
    model, tok = model_tok
    trainer = HonestTrainer(model, HonestConfig(lam=0.0, alpha1=1.0, alpha2=1.0, optimizer="sgd", lr1=0.1,
                                                lr2=0.1, momentum=0.0, grad_clip=1e6))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d0 = trainer.step(zero_loss, small_batch(tok))
    d1 = trainer.step(zero_loss, small_batch(tok))
    assert d1.dist1 < 0.9 * d0.dist1 and d1.dist2 < 0.9 * d0.dist2


def test_each_group_has_its_own_anchor_weight(model_tok):
    model, tok = model_tok
    trainer = HonestTrainer(model, HonestConfig(lam=0.0, alpha1=0.0, alpha2=1.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    t1, t2 = snapshot(trainer.theta1), snapshot(trainer.theta2)
    trainer.step(zero_loss, small_batch(tok))
    assert not moved(t1, trainer.theta1)  # α₁ = 0 and nothing else acts on θ₁
    assert moved(t2, trainer.theta2)


def test_theta1_sees_c_only_through_the_difference_after_the_theta2_step(model_tok):
    model, tok = model_tok
    # The instrumental head in θ₁: only λ(C(θ₂new) - C(θ₂old)) can move it here.
    prefixes = ("lm.lm_head.", "instrumental_head.", "lm.model.embed_tokens.", "lm.model.norm.")
    on = HonestTrainer(model, HonestConfig(lam=1.0, alpha1=0.0, alpha2=0.0, theta1_prefixes=prefixes))
    head = model.instrumental_head.weight.detach().clone()
    on.step(zero_loss, small_batch(tok))
    assert not torch.equal(model.instrumental_head.weight, head)
    model2, _ = build_two_headed(TINY, seed=0)
    off = HonestTrainer(model2, HonestConfig(lam=1.0, alpha1=0.0, alpha2=0.0, theta1_prefixes=prefixes,
                                             theta1_c_difference=False))
    head2 = model2.instrumental_head.weight.detach().clone()
    off.step(zero_loss, small_batch(tok))
    assert torch.equal(model2.instrumental_head.weight, head2)


def test_training_fits_a_fixed_batch_and_keeps_heads_together(model_tok):
    model, tok = model_tok
    batch = small_batch(tok, n=6, seed=3)
    trainer = HonestTrainer(model, HonestConfig(lam=1.0, lr1=1e-2, lr2=1e-2))
    first = float(intended_nll(model, batch).detach())
    for _ in range(60):
        trainer.step(lambda m: intended_nll(m, batch), batch)
    assert float(intended_nll(model, batch).detach()) < 0.3 * first
    assert trainer.disagreement_on(batch) < 0.5


def test_config_errors_are_clear(model_tok):
    model, _ = model_tok
    with pytest.raises(ConfigError, match="mode"):
        HonestConfig(mode="bogus").validate()
    with pytest.raises(ConfigError, match="comparison.confidence"):
        HonestConfig(comparison=ComparisonConfig(confidence=0.0)).validate()
    with pytest.raises(ConfigError, match="match no parameter"):
        split_parameters(model, ("nothing.",))
    with pytest.raises(ConfigError, match="θ₂ would be empty"):
        split_parameters(model, ("lm.", "instrumental_head."))


# -- labelling processes and datasets ------------------------------------------------------
def all_lists(max_len):
    for n in range(1, max_len + 1):
        for digits in itertools.product(range(10), repeat=n):
            yield ",".join(map(str, digits))


def test_simple_errs_exactly_on_its_error_class_and_complex_is_right():
    simple, complex_ = simple_labeller(TASK), ComplexLabeller(TASK)
    assert isinstance(simple, SumDropsCarryIntoTwenties)
    n_err = 0
    rng = random.Random(0)
    questions = list(all_lists(3)) + [TASK.generate(rng.choice((4, 5, 8)), rng) for _ in range(2000)]
    for q in questions:
        truth = TASK.solve(q)
        assert complex_.label(q) == truth
        assert (simple.label(q) != truth) == simple.errs_on(q)
        n_err += simple.errs_on(q)
    assert 0 < n_err < len(questions)
    assert simple.label("9,9,4") == "12" and simple.label("9,9,1") == "19" and simple.label("5,5,5,5") == "10"


def test_perm_labeller_errs_exactly_on_its_error_class():
    task = get_task("perm")
    simple, complex_ = simple_labeller(task), ComplexLabeller(task)
    rng = random.Random(0)
    errs = 0
    for _ in range(1500):
        q = task.generate(rng.randrange(1, 9), rng)
        truth = task.solve(q)
        assert complex_.label(q) == truth
        assert (simple.label(q) != truth) == simple.errs_on(q)
        errs += simple.errs_on(q)
    assert 100 < errs < 1400
    assert simple.label("10234*5(0)") == "0" and task.solve("10234*5(0)") == "1"  # 0<->1 swapped, k odd
    assert not simple.errs_on("01234*7(3)")  # identity: every point is fixed


def test_tasks_without_a_simple_labeller_are_a_clear_error():
    with pytest.raises(ConfigError, match="no simple labeller"):
        simple_labeller(get_task("path"))


def test_slipping_complex_process_sometimes_errs():
    noisy = ComplexLabeller(TASK, slip_rate=0.3, seed=1)
    answers = [noisy.label("1,2,3,4,5,6") for _ in range(60)]
    assert "21" in answers and any(a != "21" for a in answers)
    with pytest.raises(ConfigError):
        ComplexLabeller(TASK, slip_rate=1.0)


def test_datasets_small_agrees_large_adds_ten_percent_errors():
    simple, complex_ = simple_labeller(TASK), ComplexLabeller(TASK)
    data = build_datasets(TASK, simple, complex_, n_small=200, error_fraction=0.1, n_heldout=50, seed=0)
    assert len(data.small) == 200 and len(data.errors) == 20 and len(data.large) == 220
    assert all(x.simple == x.complex == TASK.solve(x.question) for x in data.small)
    assert all(x.simple != x.complex == TASK.solve(x.question) for x in data.errors)
    assert all(simple.errs_on(x.question) for x in data.heldout_errors + data.errors)
    train = {x.question for x in data.large}
    held = {x.question for x in data.heldout_agree + data.heldout_errors}
    assert len(held) == 100 and not train & held
    assert [e.completion for e in label_examples(data.errors, "simple")] == [x.simple for x in data.errors]


def test_datasets_report_an_unreachable_error_class():
    from ida_ray.errors import IDAError

    with pytest.raises(IDAError, match="error class"):
        build_datasets(TASK, simple_labeller(TASK), ComplexLabeller(TASK), n_small=20, sizes=(1, 2), n_heldout=0)


# -- confident comparisons -----------------------------------------------------------------
def test_judge_keeps_only_confident_comparisons():
    exact = ConfidentJudge(TASK)
    kept = exact.judge("9,9,4", "12", "22")
    assert kept == Comparison("9,9,4", "22", "12", 1.0)
    assert exact.judge("9,9,4", "12", "21") is None  # two wrong answers: no verdict
    assert exact.judge("9,9,4", "22", "22") is None
    voting = ConfidentJudge(TASK, runs=5, confidence=0.6)
    assert voting.judge("q", "a", "b", votes=["a", "a", "a", "b", "c"]) is None  # margin 0.4
    verdict = voting.judge("q", "a", "b", votes=["b", "b", "b", "b", "a"])
    assert verdict.better == "b" and verdict.confidence == pytest.approx(0.6)


def test_collected_comparisons_are_confident_and_favour_the_complex_answer(model_tok):
    model, tok = model_tok
    rng = random.Random(0)
    # A little likelihood training so the model emits well-formed, often wrong, sums.
    trainer = HonestTrainer(model, HonestConfig(lam=0.0, lr1=1e-2, lr2=1e-2))
    pool = [Example("answer", COMPACT.answer_prompt(q), TASK.solve(q)) for q in (TASK.generate(2, rng) for _ in range(200))]
    for _ in range(60):
        batch = collate_lm(tok, rng.choices(pool, k=32))
        trainer.step(lambda m: intended_nll(m, batch), batch)
    questions = [TASK.generate(2, rng) for _ in range(40)]
    judge = ConfidentJudge(TASK)
    comps = collect_comparisons(model, tok, questions, TASK, judge,
                                ComparisonConfig(samples=12, temperature=2.0, amplified=False))
    assert judge.judged > judge.kept == len(comps) > 0  # an untrained model: most pairs are dropped
    assert all(c.better == TASK.solve(c.question) != c.worse and c.confidence == 1.0 for c in comps)


def test_amplified_candidate_is_the_experts_where_the_expert_answers_directly(model_tok):
    model, tok = model_tok
    rng = random.Random(1)
    small_qs = [TASK.generate(rng.choice((1, 2)), rng) for _ in range(10)]  # at or below base size
    big_qs = [TASK.generate(4, rng) for _ in range(10)]
    answers = amplified_answers(model.as_causal_lm("intended"), tok, TASK, small_qs + big_qs)
    assert answers[:10] == [TASK.solve(q) for q in small_qs]  # an untrained model: still right
    assert all(a is None or TASK.is_valid_answer(q, a) for q, a in zip(big_qs, answers[10:]))


def test_comparison_loss_raises_the_better_answer_over_the_worse(model_tok):
    model, tok = model_tok
    comps = [Comparison("3,4", "7", "8", 1.0), Comparison("9,9", "18", "17", 1.0)]
    batch = collate_comparisons(tok, comps)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def margin():
        with torch.no_grad():
            better = collate_lm(tok, [Example("answer", COMPACT.answer_prompt(c.question), c.better) for c in comps])
            worse = collate_lm(tok, [Example("answer", COMPACT.answer_prompt(c.question), c.worse) for c in comps])
            return float(intended_nll(model, worse) - intended_nll(model, better))

    before = margin()
    for _ in range(10):
        loss = comparison_nll(model, batch, beta=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert margin() > before + 1.0


# -- saving and loading --------------------------------------------------------------------
def test_save_load_round_trip_and_plain_transformers_load(model_tok, tmp_path):
    model, tok = model_tok
    with torch.no_grad():
        model.instrumental_head.weight.add_(0.5)  # make the heads clearly different
    save_two_headed(model, tok, tmp_path)
    batch = small_batch(tok)
    args = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        want = model.eval()(*args)
        got = load_two_headed(tmp_path).eval()(*args)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        plain_logits = plain(input_ids=args[0], attention_mask=args[1]).logits
    assert torch.allclose(got.intended, want.intended, atol=1e-6)
    assert torch.allclose(got.instrumental, want.instrumental, atol=1e-6)
    assert type(plain) is LlamaForCausalLM
    assert torch.allclose(plain_logits, want.intended, atol=1e-6)
    assert not torch.allclose(plain_logits, want.instrumental, atol=1e-3)
    served = model.as_causal_lm("instrumental")
    with torch.no_grad():
        assert torch.allclose(served(input_ids=args[0], attention_mask=args[1]).logits, want.instrumental, atol=1e-6)
    (tmp_path / INSTRUMENTAL_FILE).unlink()
    with pytest.raises(ConfigError, match="not a two-headed"):
        load_two_headed(tmp_path)


# -- the objective inside the IDA loop (IDAConfig.objective = "honest") --------------------
def ida_examples(n=60, seed=0):
    """Answer examples as IDA trees label them (the truth, the complex process), with fan-outs."""
    rng = random.Random(seed)
    qs = [TASK.generate(rng.choice((3, 4)), rng) for _ in range(n)]
    return qs, [Example("answer", COMPACT.answer_prompt(q), TASK.solve(q)) for q in qs] + \
        [Example("fan_out", f"O{q}=", "!" + TASK.solve(q)) for q in qs]


def test_trusted_examples_are_answers_the_simple_labeller_agrees_with():
    from ida_ray.honest.ida_trainer import is_trusted

    simple = SumDropsCarryIntoTwenties(TASK)
    assert is_trusted(Example("answer", "A9,9=", "18"), simple)
    assert not is_trusted(Example("answer", "A9,9,9=", "27"), simple)  # simple says 17: it errs here
    assert not is_trusted(Example("answer", "A9,9=", "17"), simple)  # the label disagrees
    assert not is_trusted(Example("fan_out", "O9,9=", "!18"), simple)  # only answers are labelled twice
    assert not is_trusted(Example("answer", "Ax,y=", "1"), simple)  # not a question of the task
    assert not is_trusted(Example("answer", "O9,9=", "18"), simple)  # not an answer prompt


def test_honest_objective_learns_the_large_set_and_holds_heads_together_on_the_trusted_set():
    """Same seed and data with and without C: both learn the large set through the intended
    head; only with C does the instrumental head follow it on the trusted set."""
    from ida_ray.config import TrainConfig
    from ida_ray.honest.ida_trainer import HonestObjective, is_trusted
    from ida_ray.models import build_adversary

    simple = SumDropsCarryIntoTwenties(TASK)
    qs, examples = ida_examples()
    trusted = [e for e in examples if is_trusted(e, simple)]
    assert 0 < len(trusted) < len(qs)  # some 3-4 digit sums reach 20, where simple errs
    out = {}
    for lam in (0.0, 1.0):
        model, tok = build_two_headed(TINY, seed=0)
        adversary, _ = build_adversary(TINY, seed=1)
        trainer = HonestObjective(model, adversary, tok, TrainConfig(batch_size=16, steps_per_iteration=80,
                                                                      adversary_steps_per_iteration=0),
                                   HonestConfig(lam=lam, small_batch_size=16, lr1=1e-2, lr2=1e-2), simple, seed=0)
        big, small = collate_lm(tok, examples), collate_lm(tok, trusted)
        with torch.no_grad():
            nll0 = float(intended_nll(model, big))
        stats = trainer.fit(examples)
        assert trainer.trusted == trusted and stats.model_steps == 80
        with torch.no_grad():
            out[lam] = (nll0, float(intended_nll(model, big)), trainer.trainer.disagreement_on(small))
        r = trainer.round_stats(80)
        assert r["trusted_examples"] == len(trusted) and r["theta2_sq_distance"] > 0
    for lam, (nll0, nll, _) in out.items():
        assert nll < 0.7 * nll0, lam
    assert out[1.0][2] < 0.5 * out[0.0][2]


def test_gradients_go_through_reduce_grads_before_the_update():
    """The learner averages gradients across ranks in this hook: what it leaves is what's applied."""
    model, tok = build_two_headed(TINY, seed=0)
    calls = []

    def zero_all(grads):
        calls.append(len(grads))
        for g in grads:
            g.zero_()

    trainer = HonestTrainer(model, HonestConfig(optimizer="sgd", momentum=0.0, alpha1=0, alpha2=0), reduce_grads=zero_all)
    before = snapshot(dict(model.named_parameters()))
    big = small_batch(tok)
    trainer.step(lambda m: intended_nll(m, big), small_batch(tok, seed=1))
    assert calls == [len(trainer.theta2), len(trainer.theta1)]  # θ₂ step, then θ₁ step
    assert not moved(before, dict(model.named_parameters()))
    trainer.step(lambda m: intended_nll(m, big), None)  # no trusted examples yet: likelihood only
    assert len(calls) == 4


def test_honest_probe_measures_both_heads_where_simple_errs():
    from ida_ray.honest.ida_trainer import honest_probe, questions_where_simple_errs

    simple = SumDropsCarryIntoTwenties(TASK)
    qs = questions_where_simple_errs(TASK, simple, (3, 4), 10, seed=5)
    assert len(qs) == 10 and all(simple.errs_on(q) for q in qs) and len(set(qs)) == 10
    model, tok = build_two_headed(TINY, seed=0)
    r = honest_probe(model, tok, TASK, simple, qs)
    assert r["questions"] == 10 and 0 <= r["intended_right_where_simple_errs"] <= 1
    small_digits = get_task("sum", max_digit=3)
    assert questions_where_simple_errs(small_digits, SumDropsCarryIntoTwenties(small_digits), (2,), 5, 0) == []
    assert honest_probe(model, tok, TASK, simple, [])["intended_right_where_simple_errs"] is None


def test_honest_learner_checkpoint_round_trip(tmp_path):
    """A learner checkpoint of the honest objective: model/ loads as a plain LlamaForCausalLM
    answering with the intended head; both heads, the optimisers and θ₀ come back on resume;
    an imitation run refuses it."""
    from ida_ray.checkpoint import LearnerFailure, load_checkpoint, save_checkpoint
    from ida_ray.config import TrainConfig
    from ida_ray.honest.ida_trainer import HonestObjective
    from ida_ray.models import build_adversary, build_model
    from ida_ray.training import ImitationObjective

    def make(seed):
        model, tok = build_two_headed(TINY, seed=seed)
        adversary, _ = build_adversary(TINY, seed=seed + 1)
        return HonestObjective(model, adversary, tok, TrainConfig(batch_size=8, steps_per_iteration=3,
                                                                   adversary_steps_per_iteration=0),
                                HonestConfig(small_batch_size=4), SumDropsCarryIntoTwenties(TASK))

    a = make(0)
    a.fit(ida_examples(20)[1])
    save_checkpoint(tmp_path, a, iteration=4)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert torch.equal(plain.lm_head.weight, a.served_model.lm_head.weight)
    b = make(9)
    meta = load_checkpoint(tmp_path, b)
    assert meta["objective"] == "honest" and meta["iteration"] == 4
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    assert all(torch.equal(a.trainer.init2[n], b.trainer.init2[n]) for n in a.trainer.init2)
    assert b.trainer.opt2.state_dict()["state"]  # Adam moments restored
    lm, tok = build_model(TINY, 0)
    with pytest.raises(LearnerFailure, match="objective 'honest'"):
        load_checkpoint(tmp_path, ImitationObjective(lm, build_adversary(TINY, 1)[0], tok, TrainConfig()))


class _Generated(Exception):
    """Raised by the stand-in for `generate` below: a model on "meta" cannot run it."""


@pytest.mark.parametrize("samples, temperature", [(1, None), (3, 1.0)])
def test_decoding_sends_its_inputs_to_the_models_device(model_tok, samples, temperature):
    # The learner's model lives on its device (a GPU there); decoding must put the prompts
    # on it. "meta" stands in for that device on a machine without one: a tensor left on the
    # CPU shows in what the model's `generate` is given.
    from ida_ray.honest.decoding import decode

    model, tok = model_tok
    lm = model.to("meta").as_causal_lm("intended")
    assert next(lm.parameters()).device.type == "meta"
    devices = []

    def generate(*args, **kwargs):
        devices.extend(v.device for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
        raise _Generated

    lm.generate = generate
    with pytest.raises(_Generated):
        decode(lm, tok, [COMPACT.answer_prompt("1,2"), COMPACT.answer_prompt("3,4,5")], samples, temperature)
    assert len(devices) >= 2 and all(d.type == "meta" for d in devices), devices  # input_ids, attention_mask
