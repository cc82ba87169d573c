"""Properties every built-in task and its coded expert must have.

For each task in TASKS: the expert-only HCH tree gives the ground truth at every default size;
questions, subquestions and answers stay within the task alphabet; the expert never answers
above base size; fan-in is symmetric; bad questions and bad subanswers raise the documented
errors; and amplification with a model that only produces unusable answers still reaches the
ground truth through the expert.
"""
import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted_engine import ScriptedEngine, oracle_policy

from ida_ray.amplify import amplify_tree
from ida_ray.config import AmplifyConfig
from ida_ray.errors import ConfigError, ExpertCannotAnswer, ExpertFailure, IDAError, MalformedQuestion
from ida_ray.prompts import RESERVED
from ida_ray.steps import Answer, Split
from ida_ray.tasks import QUESTION_CHARS, TASKS, expert_tree_answer, get_task
from ida_ray.tree import EXPERT

# The built-in tasks in the compact symbolic notation; the English task `coins` (chat format)
# has its own tests in tests/test_natural_language.py.
NAMES = sorted(n for n, cls in TASKS.items() if not cls.natural_language)
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def expert_steps(task, question, out=None):
    """Every (question, step, sub) the expert-only tree takes: sub is None for a fan-out, else
    the fan-in's input. Returns (answer, steps)."""
    out = [] if out is None else out
    step = task.expert_fan_out(question)
    out.append((question, step, None))
    while isinstance(step, Split):
        a1, _ = expert_steps(task, step.q1, out)
        a2, _ = expert_steps(task, step.q2, out)
        sub = ((step.q1, a1), (step.q2, a2))
        step = task.expert_fan_in(question, sub)
        out.append((question, step, sub))
    return step.text, out


def legal(text):
    return bool(text) and all(c in QUESTION_CHARS for c in text) and not set(text) & set(RESERVED)


def outcome(fn, *args):
    """A step, or the IDAError kind it raised: lets two calls be compared either way."""
    try:
        return fn(*args)
    except IDAError as exc:
        return type(exc)


# -- registry ----------------------------------------------------------------------------

def test_all_tasks_registered_and_unknown_is_a_config_error():
    assert {"sum", "perm", "assign", "path"} <= set(TASKS)
    for name in NAMES:
        assert get_task(name).name == name
    with pytest.raises(ConfigError, match="built-in tasks"):
        get_task("nope")


@pytest.mark.parametrize("name, kwargs", [("perm", {"base_size": 1}), ("perm", {"n": 11}), ("sum", {"split": "thirds"}),
                                          ("assign", {"base_size": 0}), ("path", {"width": 5})])
def test_bad_task_arguments_are_config_errors(name, kwargs):
    with pytest.raises(ConfigError):
        get_task(name, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_default_sizes_run_up_to_four_times_base_and_questions_stay_short(name):
    task = get_task(name)
    assert min(task.default_sizes) == 1 and max(task.default_sizes) == 4 * task.base_size
    rng = random.Random(0)
    for _ in range(50):
        q = task.generate(max(task.default_sizes), rng)
        assert len(q) <= 40 and len(task.solve(q)) <= 12, q


# -- the expert tree is the ground truth -----------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(seed=SEEDS)
def test_expert_tree_equals_solve_at_every_default_size(name, seed):
    task, rng = get_task(name), random.Random(seed)
    for size in task.default_sizes:
        q = task.generate(size, rng)
        assert task.size(q) == size
        answer, steps = expert_steps(task, q)
        assert answer == expert_tree_answer(task, q) == task.solve(q), q
        assert task.is_valid_answer(q, answer)
        for question, step, _sub in steps:
            assert legal(question) and task.parse(question) is not None
            texts = [step.text] if isinstance(step, Answer) else [step.q1, step.q2]
            assert all(legal(t) for t in texts), (question, step)
            if isinstance(step, Split):  # the expert's subquestions are smaller questions of the task
                assert all(task.size(s) < task.size(question) for s in texts), (question, step)


@PROPERTY
@given(seed=SEEDS)
def test_sum_uneven_split_cuts_off_base_size_digits_and_its_tree_is_the_truth(seed):
    task, rng = get_task("sum", base_size=1, max_digit=3, split="uneven"), random.Random(seed)
    for size in task.default_sizes:
        q = task.generate(size, rng)
        answer, steps = expert_steps(task, q)
        assert answer == task.solve(q)
        for question, step, _sub in steps:
            if isinstance(step, Split):  # one digit, and the rest (in either order)
                sizes = sorted((task.size(step.q1), task.size(step.q2)))
                assert sizes == [1, task.size(question) - 1], (question, step)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(seed=SEEDS)
def test_any_question_the_parser_accepts_gets_the_true_answer(name, seed):
    # Mutate generated questions: whatever still parses (other lengths, exponents, edge
    # cases no generator produces) must be answered right; the rest must be MalformedQuestion.
    task, rng = get_task(name), random.Random(seed)
    alphabet = QUESTION_CHARS + RESERVED
    for _ in range(20):
        q = list(task.generate(rng.choice(task.default_sizes), rng))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(q) + 1)
            op = rng.randrange(3)
            if op == 0 and i < len(q):
                q[i] = rng.choice(alphabet)
            elif op == 1 and i < len(q):
                del q[i]
            else:
                q.insert(i, rng.choice(alphabet))
        q = "".join(q)
        try:
            task.parse(q)
        except MalformedQuestion:
            for call in (task.solve, task.size, task.expert_fan_out):
                with pytest.raises(MalformedQuestion):
                    call(q)
            continue
        if task.size(q) <= 40:  # keep a mutated exponent like 99 from costing seconds
            assert expert_tree_answer(task, q) == task.solve(q), q


def test_assign_stops_when_the_second_round_would_repeat_the_first():
    # P == S and P leaves the state unchanged: round 2 would be round 1 again.
    task = get_task("assign")
    for q in ["00|a*2;a*2;a*2;a*2|a", "34|a+0;b<4;a+0;b<4|b", "34|a+0;b<4;a+0;b<4|a"]:
        assert expert_tree_answer(task, q, max_rounds=2) == task.solve(q)


@pytest.mark.parametrize("name, question, answer", [
    ("perm", "30142*5(3)", "3"),  # s = 30142 is the 5-cycle 3 -> 4 -> 2 -> 1 -> 0 -> 3
    ("perm", "30142*4(3)", "0"),
    ("perm", "10*7(0)", "1"),
    ("assign", "37|a+b;b*3;a<5|a", "5"),  # a=0, b=1, a=5
    ("assign", "37|a+b;b*3;a<5|b", "1"),
    ("assign", "37|a-b;b*3;a+9;b<a;a*a|b", "5"),  # a=6, b=1, a=5, b=5, a=5
    ("path", "3172,0581", "3;2;7;3"),
    ("path", "0000,9999,1111", "10;10;10;10"),
])
def test_worked_examples(name, question, answer):
    task = get_task(name)
    assert task.solve(question) == expert_tree_answer(task, question) == answer


# -- alphabet and base size -------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(seed=SEEDS)
def test_expert_answers_only_at_or_below_base_size(name, seed):
    task, rng = get_task(name), random.Random(seed)
    for size in task.default_sizes:
        q = task.generate(size, rng)
        if size <= task.base_size:
            assert task.expert_answer(q) == task.solve(q)
            assert task.expert_fan_out(q) == Answer(task.solve(q))
        else:
            with pytest.raises(ExpertCannotAnswer):
                task.expert_answer(q)
            assert isinstance(task.expert_fan_out(q), Split)


# -- symmetry ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(seed=SEEDS)
def test_fan_out_and_fan_in_are_symmetric_under_swapping_subquestions(name, seed):
    task, rng = get_task(name), random.Random(seed)
    q = task.generate(rng.randint(task.base_size + 1, max(task.default_sizes)), rng)
    _, steps = expert_steps(task, q)
    for question, step, sub in steps:
        if isinstance(step, Split):
            assert Split(step.q2, step.q1) == step
        if sub is None:
            continue
        (q1, a1), (q2, a2) = sub
        assert task.expert_fan_in(question, ((q2, a2), (q1, a1))) == step
        # With other well-formed answers too (a model's wrong ones): same step, or same error.
        w1 = task.solve(task.generate(task.size(q1), rng))
        w2 = task.solve(task.generate(task.size(q2), rng))
        assert (outcome(task.expert_fan_in, question, ((q1, w1), (q2, w2)))
                == outcome(task.expert_fan_in, question, ((q2, w2), (q1, w1))))


# -- bad input ------------------------------------------------------------------------------

MALFORMED = {
    "sum": ["1,,2", "12,3", ",1", "1,"],
    "perm": ["30142*5", "30142*0(3)", "30142*05(3)", "30132*5(3)", "30142*5(7)", "3014*5(4)",
             "*5(3)", "30142*5(3)x", "30142*-1(3)", "30142 5 3"],
    "assign": ["37|a+b", "3|a+b|a", "37||a", "37|a+b;|a", "37|c+1|a", "37|a/1|a", "37|a+b|c",
               "37|a+12|a", "37|a+b;b*3|ab", "37|a+b,b*3|a"],
    "path": ["317", "31720", "3172,058", "3172,,0581", "3172,", "317a", "3172;0581"],
}


@pytest.mark.parametrize("name", NAMES)
def test_malformed_questions_raise_malformed_question(name):
    task = get_task(name)
    generic = ["", None, "=", "A1=", "[1]", "1&2", "?", "!1", "#", "x" * 50]
    for bad in MALFORMED[name] + generic:
        for call in (task.parse, task.size, task.solve, task.expert_fan_out, task.expert_answer):
            with pytest.raises(MalformedQuestion):
                call(bad)


BAD_ANSWERS = ["", "#", "x", "-", "1#", "1;", ";", "a1", "?", "9999999999999;1", "12;7;9;15;3", "7"]


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(seed=SEEDS)
def test_malformed_subanswers_make_fan_in_raise_expert_failure(name, seed):
    task, rng = get_task(name), random.Random(seed)
    q = task.generate(rng.randint(task.base_size + 1, max(task.default_sizes)), rng)
    split = task.expert_fan_out(q)
    good = [task.solve(s) for s in split.questions]
    bad = [a for a in BAD_ANSWERS if not task.is_valid_answer(split.q1, a)]
    assert len(bad) >= 8
    for a in bad:
        for sub in (((split.q1, a), (split.q2, good[1])), ((split.q1, good[0]), (split.q2, a))):
            with pytest.raises(ExpertFailure):
                task.expert_fan_in(q, sub)


@pytest.mark.parametrize("name", ["perm", "assign", "path"])
def test_fan_in_on_subquestions_the_expert_never_asked_is_an_expert_failure(name):
    task, rng = get_task(name), random.Random(0)
    q = task.generate(2 * task.base_size + 2, rng)
    other = task.expert_fan_out(task.generate(2 * task.base_size + 2, rng))
    with pytest.raises(ExpertFailure):
        task.expert_fan_in(q, tuple((s, task.solve(s)) for s in other.questions))
    with pytest.raises(ExpertFailure):  # a subquestion that does not even parse
        task.expert_fan_in(q, (("#", "1"), (other.q1, task.solve(other.q1))))


@pytest.mark.parametrize("name, question, sub", [
    # one start point from round 1, one from round 2
    ("perm", "30142*5(3)", (("30142*2(3)", "2"), ("30142*3(2)", "3"))),
    ("perm", "30142*5(3)", (("30142*2(1)", "3"), ("30142*3(3)", "1"))),
    ("perm", "30142*5(3)", (("30142*1(3)", "4"), ("30142*4(3)", "0"))),  # not the expert's exponents
    ("perm", "30142*5(3)", (("01234*2(3)", "3"), ("30142*3(3)", "1"))),  # another permutation
    # the two registers asked of different states, or of different programs
    ("assign", "37|a+b;b*3;a<5;b-1|a", (("37|a+b;b*3|a", "0"), ("38|a+b;b*3|b", "1"))),
    ("assign", "37|a+b;b*3;a<5;b-1|a", (("37|a+b;b*3|a", "0"), ("37|a<5;b-1|b", "0"))),
    ("assign", "37|a+b;b*3;a<5;b-1|a", (("37|a+b;b*3|a", "0"), ("37|a+b;b*3|a", "0"))),
    ("assign", "37|a+b;b*3;a<5;b-1|a", (("37|a+b|a", "0"), ("37|a+b|b", "7"))),
    # not the two halves
    ("path", "3172,0581,1111", (("3172", "3;1;7;2"), ("0581,1111", "1;2;2;2"))),
    ("path", "3172,0581,1111", (("3172,0581", "3;2;7;3"), ("3172", "3;1;7;2"))),
])
def test_fan_in_on_mismatched_subquestions_is_an_expert_failure(name, question, sub):
    task = get_task(name)
    with pytest.raises(ExpertFailure):
        task.expert_fan_in(question, sub)


# -- a second round that depends on the first answers ----------------------------------

@pytest.mark.parametrize("name", ["perm", "assign"])
def test_fan_in_issues_a_second_split_built_from_the_first_answers(name):
    task, rng = get_task(name), random.Random(1)
    second_rounds = 0
    for _ in range(100):
        q = task.generate(max(task.default_sizes), rng)
        first = task.expert_fan_out(q)
        answers = [task.solve(s) for s in first.questions]
        step = task.expert_fan_in(q, tuple(zip(first.questions, answers)))
        if not isinstance(step, Split):
            continue
        second_rounds += 1
        assert set(step.questions).isdisjoint(first.questions)
        # The second split carries the first answers: other answers give another split.
        for s, a in zip(first.questions, answers):
            for alt in (str(d) for d in range(10)):
                if alt == a or not task.is_valid_answer(s, alt):
                    continue
                sub = tuple((t, alt if t == s else b) for t, b in zip(first.questions, answers))
                other = outcome(task.expert_fan_in, q, sub)
                assert other != step
    assert second_rounds >= 25  # perm skips round 2 when s^a(x) or s^b(x) is x itself


def test_perm_second_round_starts_from_the_first_answers():
    task = get_task("perm")
    q = "30142*5(3)"  # k = 5 = 2 + 3; s^2(3) = 2, s^3(3) = 1
    assert task.expert_fan_out(q) == Split("30142*2(3)", "30142*3(3)")
    step = task.expert_fan_in(q, (("30142*2(3)", "2"), ("30142*3(3)", "1")))
    assert step == Split("30142*3(2)", "30142*2(1)")
    assert task.expert_fan_in(q, (("30142*3(2)", "3"), ("30142*2(1)", "3"))) == Answer("3")


# -- amplification with a useless model -----------------------------------------------

def unusable_policy(prompt):
    """Every output unusable as an answer: unparseable, reserved characters, or out of format."""
    outputs = ["#", "", "?1&2", "!5", "x", "12;7", "-3", "1,2"]
    return outputs[len(prompt) % len(outputs)], -4.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_amplification_with_an_unusable_model_is_driven_to_the_truth_by_the_expert(name, seed):
    task, rng = get_task(name), random.Random(seed)
    engine = ScriptedEngine(unusable_policy)
    for size in task.default_sizes:
        q = task.generate(size, rng)
        tree = asyncio.run(amplify_tree(task, engine, q, AmplifyConfig(use_hprime=False), random.Random(seed)))
        assert tree.ok, tree.error
        assert tree.answer == task.solve(q)
        assert all(n.answered_by == EXPERT for n in tree.nodes())
        assert tree.expert_calls == sum(1 + len(n.rounds) for n in tree.nodes())


@pytest.mark.parametrize("name", NAMES)
def test_amplification_through_prompts_with_a_model_that_imitates_the_expert(name):
    # Unconfident, so the expert steps in, one branch per split; the other branch keeps the
    # model's (right) answer. Exercises every prompt and step format of the task end to end.
    task, rng = get_task(name), random.Random(3)
    engine = ScriptedEngine(oracle_policy(task, logprob=-3.0))
    for size in task.default_sizes:
        q = task.generate(size, rng)
        tree = asyncio.run(amplify_tree(task, engine, q, AmplifyConfig(), random.Random(size)))
        assert tree.ok and tree.answer == task.solve(q), (q, tree.error)
        assert all(len(rnd.chosen) == 1 for n in tree.nodes() for rnd in n.rounds)


def test_perm_solves_any_exponent_along_the_cycle():
    # A model-made subquestion may carry an exponent of any length; the supervised arm solves it.
    perm = get_task("perm")
    for question in ("30142*{k}(3)", "10234*{k}(4)", "01234*{k}(2)"):
        s = question.split("*")[0]
        for k in range(1, 40):
            x = int(question[-2])
            for _ in range(k):
                x = int(s[x])
            assert perm.solve(question.format(k=k)) == str(x)
    assert perm.solve("30142*" + "9" * 60 + "(3)") == perm.solve(f"30142*{int('9' * 60) % 5}(3)")
