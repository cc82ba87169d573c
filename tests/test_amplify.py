"""The amplification/distillation core on scripted engines: no neural network, no Ray."""
import asyncio
import math
import random
from collections import Counter

import pytest
from scripted_engine import ScriptedEngine, garbage_policy, oracle_policy

from ida_ray.amplify import adversarial_question, amplify_tree, distill_tree, gumbel_argmax
from ida_ray.config import AmplifyConfig
from ida_ray.examples import tree_examples
from ida_ray.prompts import COMPACT
from ida_ray.steps import Split
from ida_ray.tasks import get_task
from ida_ray.tasks.sum_list import SumList
from ida_ray.tree import EXPERT, HPRIME, MODEL, Tree

TASK = get_task("sum")


def run(coro):
    return asyncio.run(coro)


def amp(engine, q, seed=0, **cfg):
    return run(amplify_tree(TASK, engine, q, AmplifyConfig(**cfg), random.Random(seed)))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_garbage_model_degenerates_to_full_expert_tree_with_true_answer(size):
    # Malformed model answers are never given to the expert: both branches get expanded,
    # so amplification is the expert-only HCH tree and must give the ground truth.
    q = TASK.generate(size, random.Random(size))
    tree = amp(ScriptedEngine(garbage_policy), q)
    assert tree.ok, tree.error
    assert tree.answer == TASK.solve(q)
    assert all(n.answered_by == EXPERT for n in tree.nodes())
    assert tree.expert_calls == sum(1 + len(n.rounds) for n in tree.nodes())


def test_confident_right_model_answers_through_hprime_without_expert():
    q = "3,1,4,1,5,9,2,6"
    tree = amp(ScriptedEngine(oracle_policy(TASK)), q)
    assert tree.answer == "31" and tree.expert_calls == 0
    assert tree.root.answered_by == HPRIME and not tree.root.rounds


def test_unconfident_model_only_one_branch_recursed_per_split():
    # A valid but unconfident model: the expert is consulted, one branch per split.
    policy = oracle_policy(TASK, logprob=-3.0)
    tree = amp(ScriptedEngine(policy), "3,1,4,1,5,9,2,6")
    assert tree.answer == "31"
    for node in tree.nodes():
        for rnd in node.rounds:
            assert len(rnd.chosen) == 1
            other = 1 - rnd.chosen[0]
            assert rnd.children[other] is None and rnd.answers[other] == rnd.model_answers[other]
    # 8 -> 4 -> 2 digits: fan-out + fan-in at sizes 8 and 4, one direct answer at base size 2
    assert tree.expert_calls == 5


def test_adversary_picks_the_branch_it_scores_worst_at_zero_temperature():
    def adversary(prompt, completion):
        return -10.0 if prompt == COMPACT.answer_prompt("9,9") else 0.0
    eng = ScriptedEngine(oracle_policy(TASK, logprob=-3.0), adversary_fn=adversary)
    for seed in range(5):
        tree = amp(eng, "1,1,9,9", seed=seed, tau=0.0)
        rnd = tree.root.rounds[0]
        assert rnd.subquestions[rnd.chosen[0]] == "9,9"
        assert rnd.adversary_scores == [0.0, -10.0]


def test_uniform_branch_choice_ablation_ignores_adversary():
    eng = ScriptedEngine(oracle_policy(TASK, logprob=-3.0), adversary_fn=lambda p, c: -10.0 if "9,9" in p else 0.0)
    picks = Counter()
    for seed in range(200):
        rnd = amp(eng, "1,1,9,9", seed=seed, branch_choice="uniform").root.rounds[0]
        picks[rnd.subquestions[rnd.chosen[0]]] += 1
    assert 70 < picks["9,9"] < 130


def test_gumbel_argmax_is_boltzmann():
    rng = random.Random(0)
    scores, tau, n = [0.0, 1.0, 2.0], 1.0, 20000
    counts = Counter(gumbel_argmax(scores, tau, rng) for _ in range(n))
    z = sum(math.exp(s / tau) for s in scores)
    for i, s in enumerate(scores):
        assert abs(counts[i] / n - math.exp(s / tau) / z) < 0.015


def test_depth_bound_is_a_recorded_error_not_a_hang():
    # 5 digits split 3 + 2: the 2 is answered at depth 1, the 3 would need depth 2.
    tree = amp(ScriptedEngine(garbage_policy), "1,2,3,4,5", max_depth=1)
    assert tree.error["kind"] == "depth_exceeded" and tree.answer is None
    # completed subtrees are kept in the record
    assert any(n.answer is not None for n in tree.nodes())


class AlwaysSplits(SumList):
    def _combine(self, question, sub):
        return Split(sub[0][0], sub[1][0])


def test_fan_in_round_bound_is_a_recorded_error():
    task = AlwaysSplits()
    tree = run(amplify_tree(task, ScriptedEngine(garbage_policy), "1,2,3", AmplifyConfig(max_fan_in_rounds=3),
                            random.Random(0)))
    assert tree.error["kind"] == "fan_in_rounds_exceeded"
    assert len(tree.root.rounds) == 3


class RaisingExpert(SumList):
    def _combine(self, question, sub):
        raise ZeroDivisionError("boom")


def test_expert_that_raises_is_recorded():
    tree = run(amplify_tree(RaisingExpert(), ScriptedEngine(garbage_policy), "1,2,3", AmplifyConfig(),
                            random.Random(0)))
    assert tree.error["kind"] == "expert_failure" and "boom" in tree.error["message"]


@pytest.mark.parametrize("bad", ["", "1,,2", "12,3", "a,b", "1=2", None])
def test_malformed_question_is_recorded(bad):
    tree = amp(ScriptedEngine(garbage_policy), bad)
    assert tree.error["kind"] == "malformed_question"


def test_tree_json_round_trip_after_real_expansion():
    eng = ScriptedEngine(oracle_policy(TASK, logprob=-3.0), adversary_fn=lambda p, c: -len(p))
    tree = amp(eng, "3,1,4,1,5,9,2,6")
    back = Tree.from_json(tree.to_json())
    assert back == tree
    assert back.nodes()[1].rounds is not None and back.to_json() == tree.to_json()


def test_examples_imitate_expert_steps_and_train_the_adversary():
    eng = ScriptedEngine(oracle_policy(TASK, logprob=-3.0), logprob_fn=lambda p, c: -2.5)
    tree = amp(eng, "3,1,4,1,5,9,2,6")
    ex = tree_examples(tree)
    kinds = Counter(e.kind for e in ex)
    n_nodes = len(tree.nodes())
    assert kinds["answer"] == n_nodes
    assert kinds["fan_out"] == n_nodes  # every node's fan-out was the expert's
    assert kinds["fan_in"] == sum(len(n.rounds) for n in tree.nodes())
    adv = [e for e in ex if e.kind == "adversary"]
    assert adv and all(e.target == -2.5 for e in adv)
    root_answer = [e for e in ex if e.kind == "answer" and e.prompt == COMPACT.answer_prompt(tree.question)]
    assert root_answer[0].completion == "31"


def test_hprime_steps_are_not_imitation_targets():
    tree = amp(ScriptedEngine(oracle_policy(TASK)), "3,1,4,1", audit_fraction=0.0)
    assert tree.root.answered_by == HPRIME and tree.expert_calls == 0
    kinds = Counter(e.kind for e in tree_examples(tree))
    # The confident model's own answer is not fed back to it as a label.
    assert kinds["fan_out"] == 0 and kinds["fan_in"] == 0 and kinds["answer"] == 0
    assert kinds["adversary"] == 1


def test_audit_switches_hprime_off_so_the_expert_corrects_a_confidently_wrong_model():
    # The model is certain of a wrong sum for the whole list (9, not 10) and right everywhere
    # else; the subquestions' answers it gives are the true partial sums.
    q = "3,1,4,2"
    assert TASK.solve(q) == "10"
    oracle = oracle_policy(TASK, logprob=0.0)
    wrong = lambda p: ("9", 0.0) if p == COMPACT.answer_prompt(q) else oracle(p)  # noqa: E731
    unaudited = amp(ScriptedEngine(wrong), q, audit_fraction=0.0)
    assert unaudited.answer == "9" and unaudited.expert_calls == 0  # H' trusts it: the wrong sum stands
    tree = amp(ScriptedEngine(wrong), q, audit_fraction=1.0)
    assert all(n.audited for n in tree.nodes())
    assert tree.root.answer_step.model_output == "9"  # the model was asked, and was wrong
    assert tree.root.fan_out.who == EXPERT and all(r.fan_in.who == EXPERT for r in tree.root.rounds)
    assert tree.ok and tree.answer == "10" and tree.root.answered_by == EXPERT


def test_distill_tree_uses_model_in_every_role():
    eng = ScriptedEngine(oracle_policy(TASK, logprob=-0.01))
    tree = run(distill_tree(TASK, eng, "3,1,4,1,5,9,2,6", AmplifyConfig()))
    assert tree.ok and tree.answer == "31" and tree.expert_calls == 0
    assert tree.root.answered_by == MODEL and len(tree.root.rounds) == 1
    assert tree.confidence == pytest.approx(math.exp(-0.04)) and tree.distill_target
    (ex,) = [e for e in tree_examples(tree) if e.kind == "answer"]
    assert ex.completion == "31"


def test_unconfident_distill_tree_gives_no_answer_target():
    eng = ScriptedEngine(oracle_policy(TASK, logprob=-0.5))  # 4 steps: path probability e^-2
    tree = run(distill_tree(TASK, eng, "3,1,4,1,5,9,2,6", AmplifyConfig(distill_min_confidence=0.5)))
    assert tree.ok and tree.confidence == pytest.approx(math.exp(-2.0)) and tree.distill_target is False
    ex = tree_examples(tree)
    assert not [e for e in ex if e.kind == "answer"] and [e for e in ex if e.kind == "adversary"]
    lenient = run(distill_tree(TASK, eng, "3,1,4,1,5,9,2,6", AmplifyConfig(distill_min_confidence=0.1)))
    assert [e.completion for e in tree_examples(lenient) if e.kind == "answer"] == ["31"]


def test_distill_tree_records_unparseable_model_output():
    tree = run(distill_tree(TASK, ScriptedEngine(garbage_policy), "1,2,3", AmplifyConfig()))
    assert tree.error["kind"] == "parse_error" and not [e for e in tree_examples(tree) if e.kind == "answer"]


def test_adversarial_question_prefers_what_the_adversary_scores_worst():
    eng = ScriptedEngine(oracle_policy(TASK), adversary_fn=lambda p, c: -float(len(p)))
    qs = [run(adversarial_question(TASK, eng, (1, 8), AmplifyConfig(tau=0.0, adversarial_candidates=8),
                                   random.Random(s))) for s in range(20)]
    assert sum(TASK.size(q) == 8 for q in qs) >= 19


def test_many_trees_in_flight_interleave_model_calls():
    class Recording(ScriptedEngine):
        max_batch = 0

        async def generate(self, prompts):
            self.inflight = getattr(self, "inflight", 0) + 1
            self.max_batch = max(self.max_batch, self.inflight)
            await asyncio.sleep(0.001)
            self.inflight -= 1
            return await super().generate(prompts)

    eng = Recording(oracle_policy(TASK, logprob=-3.0))

    async def many():
        return await asyncio.gather(*(amplify_tree(TASK, eng, TASK.generate(6, random.Random(i)), AmplifyConfig(),
                                                   random.Random(i)) for i in range(32)))
    trees = run(many())
    assert all(t.ok for t in trees) and eng.max_batch >= 16


def test_ground_truth_labels_replace_the_trees_answers_and_nothing_else():
    # A model that adds one to every sum it combines, certain of it: its distillation tree
    # answers 32 for a list that sums to 31. IDA's labels are that tree's; the supervised arm
    # (amplify.answer_labels: ground_truth) labels the same nodes with the true sums.
    from ida_ray.expansion import expand_job
    from ida_ray.messages import ExpandJob
    from ida_ray.steps import Answer

    oracle = oracle_policy(TASK, logprob=-0.01)

    def off_by_one(prompt):
        out, lp = oracle(prompt)
        if prompt[0] == "I":  # fan-in: "=<sum>", one too many
            step = COMPACT.read_step(out)
            return COMPACT.format_step(Answer(str(int(step.text) + 1))), lp
        return out, lp

    q = "3,1,4,1,5,9,2,6"
    job = ExpandJob("d0", q, "distill", iteration=1)
    ida = run(expand_job(TASK, ScriptedEngine(off_by_one), job, AmplifyConfig()))
    supervised = run(expand_job(TASK, ScriptedEngine(off_by_one), job,
                                AmplifyConfig(answer_labels="ground_truth")))
    assert ida.tree.answer == supervised.tree.answer == "32"  # the same tree, wrong at the root
    ida_answers = {e.prompt: e.completion for e in ida.examples if e.kind == "answer"}
    truth = {e.prompt: e.completion for e in supervised.examples if e.kind == "answer"}
    assert ida_answers == {COMPACT.answer_prompt(q): "32"}
    assert truth == {COMPACT.answer_prompt(n.question): TASK.solve(n.question) for n in supervised.tree.nodes()}
    assert truth == {COMPACT.answer_prompt(q): "31"}  # the model answered both halves: one node
    # Everything but the answer labels is IDA's: the adversary's examples are the same.
    def others(result):  # tree ids are fresh per expansion
        return [(e.kind, e.prompt, e.completion, e.target) for e in result.examples if e.kind != "answer"]

    assert others(ida) == others(supervised) and others(ida)


def test_ground_truth_labels_skip_a_subquestion_the_task_cannot_solve():
    from ida_ray.examples import ground_truth_examples
    from ida_ray.tree import Node

    tree = Tree(tree_id="t", task="sum", question="1,2", size=2, mode="distill", iteration=0,
                root=Node(question="1,2", depth=0))
    tree.root.rounds = []
    bad = Tree(tree_id="u", task="sum", question="1,x", size=2, mode="distill", iteration=0,
               root=Node(question="1,x", depth=0))
    assert [e.completion for e in ground_truth_examples(tree, TASK, COMPACT)] == ["3"]
    assert ground_truth_examples(bad, TASK, COMPACT) == []


def test_ground_truth_labels_skip_a_node_whose_solve_raises(caplog):
    from ida_ray.examples import ground_truth_examples
    from ida_ray.tree import Node

    class Broken(SumList):
        def solve(self, question):
            raise NotImplementedError("no ground truth here")

    tree = Tree(tree_id="t", task="sum", question="1,2", size=2, mode="distill", iteration=0,
                root=Node(question="1,2", depth=0))
    with caplog.at_level("WARNING"):
        assert ground_truth_examples(tree, Broken(), COMPACT) == []
    assert "NotImplementedError" in caplog.text


def test_answer_examples_carry_their_questions_size_and_unsizable_ones_none():
    """expand_job's answer examples name their question's size (Task.size), what
    train.balance_answer_sizes draws by, for IDA's labels and the supervised baseline's."""
    from ida_ray.examples import question_size
    from ida_ray.expansion import expand_job
    from ida_ray.messages import ExpandJob

    q = TASK.generate(8, random.Random(3))
    for labels in ("ida", "ground_truth"):
        job = ExpandJob("a0", q, "amplify", iteration=0)
        result = run(expand_job(TASK, ScriptedEngine(oracle_policy(TASK, logprob=-3.0)), job,
                                AmplifyConfig(answer_labels=labels)))
        answers = [e for e in result.examples if e.kind == "answer"]
        sizes = Counter(e.size for e in answers)
        assert sizes[8] == 1 and set(sizes) == {8, 4, 2}, sizes  # 8 -> 4 -> 2 digits
        assert {e.prompt: e.size for e in answers} == {COMPACT.answer_prompt(n.question): TASK.size(n.question)
                                                       for n in result.tree.nodes()}
        assert all(e.size is None for e in result.examples if e.kind != "answer")
    assert question_size(TASK, "1,x") is None and question_size(None, "1,2") is None
