"""The natural-language path: the chat prompt format (a tolerant parser, property-tested on
random text), the built-in English task `coins` (its expert-only HCH tree equals the truth at
every size), and the pre-flight rules that tie the two together."""
from __future__ import annotations

import asyncio
import json
import pickle
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from ida_ray.config import load_config
from ida_ray.entrypoints.train import train
from ida_ray.errors import ConfigError, ExpertFailure, ParseError
from ida_ray.models import CHATML_TEMPLATE, train_bpe_tokenizer
from ida_ray.prompts import ChatFormat, prompt_format
from ida_ray.steps import Answer, Split
from ida_ray.tasks import expert_tree_answer, get_task
from ida_ray.tasks.base import Task
from ida_ray.tree import Tree

COINS = get_task("coins")
CHAT = ChatFormat()
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# One line of text that says nothing the parser looks for: chatter around a reply.
_MARKERS = ("answer", "subquestion", "sub-question")
chatter = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40).filter(
    lambda s: not any(m in s.lower() for m in _MARKERS))
one_line = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=40).map(
    str.strip).filter(lambda s: s and s.strip("*_`\"'").strip() == s and not any(m in s.lower() for m in _MARKERS))


# -- the chat format's parser --------------------------------------------------------------
@FAST
@given(st.text(max_size=300))
def test_any_text_parses_to_a_step_or_raises_parse_error(text):
    for read in (CHAT.read_step, CHAT.read_answer):
        try:
            result = read(text)
        except ParseError:
            continue
        assert isinstance(result, (Answer, Split, str))


@FAST
@given(one_line, chatter, chatter, st.sampled_from(["Answer", "answer", "ANSWER", " answer "]), st.sampled_from([":", " :"]))
def test_an_answer_survives_case_whitespace_and_chatter(answer, before, after, word, colon):
    text = f"{before}\n  {word}{colon}   {answer}  \n{after}"
    assert CHAT.read_step(text) == Answer(answer)
    assert CHAT.read_answer(text) == answer
    assert CHAT.read_step(CHAT.format_answer(answer)) == Answer(answer)


@FAST
@given(one_line, one_line, chatter, chatter, st.sampled_from(["Subquestion", "subquestion", "Sub-question"]),
       st.sampled_from([":", ".", ")"]))
def test_a_split_survives_case_whitespace_and_chatter(q1, q2, before, after, word, mark):
    if q1 == q2:
        return
    text = f"{before}\n{word} 1{mark} {q1}\n\n {word} 2{mark}  {q2}\n{after}"
    assert CHAT.read_step(text) == Split(q1, q2)
    assert CHAT.read_step(CHAT.format_step(Split(q1, q2))) == Split(q1, q2)


@pytest.mark.parametrize("text", [
    "", "I think it is 5.", "Answer:", "Answer: 5\nAnswer: 6", "Subquestion 1: a?", "Subquestion 1: a?\nAnswer: 3",
    "Subquestion 1: a?\nSubquestion 1: b?\nSubquestion 2: c?", "Subquestion 2: a?\nSubquestion 3: b?"])
def test_replies_that_say_no_one_thing_are_parse_errors(text):
    with pytest.raises(ParseError):
        CHAT.read_step(text)


def test_fan_in_prompt_is_symmetric_and_one_line_fields_are_enforced():
    sub = (("How many coins does Ann have?", "3"), ("How many coins does Bob have?", "4"))
    assert CHAT.fan_in_prompt("q?", sub) == CHAT.fan_in_prompt("q?", sub[::-1])
    with pytest.raises(ValueError, match="one non-empty line"):
        CHAT.answer_prompt("two\nlines")
    with pytest.raises(ValueError, match="one non-empty line"):
        CHAT.format_answer("")


def test_prompts_use_the_tokenizers_chat_template_and_the_format_ships_without_it():
    tok = train_bpe_tokenizer(["Ann has 3 coins and Bob has 4."] * 20)
    fmt = prompt_format("chat", tok)
    prompt = fmt.answer_prompt("Ann has 3 coins and Bob has 4. How many coins does Ann have?")
    assert prompt == tok.apply_chat_template([{"role": "user", "content": prompt.split("\n", 1)[1].split(
        "<|im_end|>")[0]}], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert fmt.chat_template == CHATML_TEMPLATE
    copy = pickle.loads(pickle.dumps(fmt))
    assert copy == fmt and copy.answer_prompt("x?") == fmt.answer_prompt("x?")
    assert ChatFormat().answer_prompt("x?") == "x?\nGive the answer.\n"  # no template: the text itself


# -- the coins task --------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31), st.integers(1, 3), st.integers(2, 8))
def test_expert_only_tree_equals_the_truth_at_every_size(size, seed, base_size, names):
    task = get_task("coins", base_size=base_size, names=names)
    q = task.generate(size, random.Random(seed))
    assert task.size(q) == size
    assert expert_tree_answer(task, q) == task.solve(q)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2**31))
def test_every_expert_step_is_well_formed_in_the_chat_format(size, seed):
    q = COINS.generate(size, random.Random(seed))

    def walk(question):
        step = COINS.expert_fan_out(question)
        assert CHAT.parse_step(CHAT.format_step(step), COINS, question) == step
        rounds = 0
        while isinstance(step, Split):
            rounds += 1
            sub = tuple((s, walk(s)) for s in step.questions)
            step = COINS.expert_fan_in(question, sub)
            assert COINS.expert_fan_in(question, sub[::-1]) == step  # symmetric under the swap
            assert CHAT.parse_step(CHAT.format_step(step), COINS, question) == step
        assert rounds <= 2  # a second split depending on the first answers, then the answer
        return step.text

    assert walk(q) == COINS.solve(q)


def test_the_second_split_depends_on_the_first_answers():
    q = "Ann has 3 coins and Bob has 5. Ann gives Bob 2. Bob loses 4. How many coins does Bob have?"
    first = COINS.expert_fan_out(q)
    assert first == Split("Ann has 3 coins and Bob has 5. Ann gives Bob 2. How many coins does Ann have?",
                          "Ann has 3 coins and Bob has 5. Ann gives Bob 2. How many coins does Bob have?")
    second = COINS.expert_fan_in(q, ((first.q1, "1"), (first.q2, "7")))
    assert second == Split("Ann has 1 coin and Bob has 7. Bob loses 4. How many coins does Ann have?",
                           "Ann has 1 coin and Bob has 7. Bob loses 4. How many coins does Bob have?")
    wrong = COINS.expert_fan_in(q, ((first.q1, "2"), (first.q2, "7")))  # it trusts the answers it gets
    assert wrong.q1.startswith("Ann has 2 coins and Bob has 7.")
    assert COINS.expert_fan_in(q, ((second.q1, "1"), (second.q2, "3"))) == Answer("3")
    with pytest.raises(ExpertFailure):
        COINS.expert_fan_in(q, ((first.q1, "one"), (first.q2, "7")))


@pytest.mark.parametrize("bad", ["", "How many coins does Ann have?", "Ann has 3 coins and Ann has 4. How many coins "
                                 "does Ann have?", "Ann has 3 coins and Bob has 4. Cy finds 2. How many coins does Ann "
                                 "have?", "Ann has 3 coins and Bob has 4. Ann eats 2. How many coins does Ann have?",
                                 "Ann has 3 coins and Bob has 4.\nHow many coins does Ann have?"])
def test_malformed_stories_are_malformed_questions(bad):
    with pytest.raises(ValueError):
        COINS.parse(bad)


def test_answers_are_graded_by_value():
    q = "Ann has 3 coins and Bob has 5. Ann finds 2. How many coins does Ann have?"
    assert COINS.is_correct(q, "5") and COINS.is_correct(q, " 5 ") and not COINS.is_correct(q, "6")
    assert not COINS.is_correct(q, "five") and not COINS.is_correct(q, None)
    assert issubclass(type(COINS), Task) and COINS.natural_language


# -- configuration ----------------------------------------------------------------------------
def test_a_natural_language_task_needs_the_chat_format_and_a_tokenizer_for_it(tmp_path):
    from ida_ray.preflight import check_config

    with pytest.raises(ConfigError, match="in natural language: it needs model.prompt_format chat"):
        check_config(load_config("default", {"task": "coins", "run_dir": str(tmp_path / "a")}))
    with pytest.raises(ConfigError, match="needs a model with its own tokenizer"):
        load_config("default", {"task": "coins", "model.prompt_format": "chat"})


# -- through the real system -------------------------------------------------------------------
RAY_INIT = dict(num_cpus=3, namespace="test-natural-language")  # the `ray_cluster` fixture (tests/conftest.py)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "coins.yaml"


def coins_run(run_dir, **more):
    """examples/coins.yaml, cut to one small iteration."""
    return load_config(str(EXAMPLE), {
        "iterations": 1, "amplify_trees_per_iteration": 24, "distill_trees_per_iteration": 16,
        "eval_questions_per_size": 8, "train.steps_per_iteration": 10, "train.adversary_steps_per_iteration": 4,
        "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 2, "model.intermediate_size": 128,
        "resources.replica_cpus": 1, "resources.expander_cpus": 0.5, "resources.learner_cpus": 1,
        "run_dir": str(run_dir), **more})


@pytest.mark.vllm
@pytest.mark.ray
def test_one_iteration_in_natural_language_through_ray_and_vllm(ray_cluster, tmp_path):
    (m,) = train(coins_run(tmp_path), progress=False, log=lambda s: None)
    assert m["trees"] == 40 and m["weight_version"] == 1 and m["replica_versions"] == {"replica-0": 1}
    # M was built once, into the run: a Qwen2 with the BPE tokenizer and chat template trained here.
    base = tmp_path / "base_model"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["path"] == str(base) and json.loads((base / "config.json").read_text())[
        "architectures"] == ["Qwen2ForCausalLM"]
    trees = [Tree.from_json(line) for line in (tmp_path / "trees" / "iteration_0000.jsonl").read_text().splitlines()]
    amplified = [t for t in trees if t.mode == "amplify"]
    assert len(amplified) == 24 and sum(t.error is None for t in amplified) >= 20
    # The model saw English stories as ChatML messages; the expert's steps are written in the chat format.
    prompts = [t.root.answer_step.prompt for t in amplified]
    assert all(p.startswith("<|im_start|>user\n") and "How many coins does" in p for p in prompts)
    fan_outs = [n.fan_out.output for t in amplified for n in t.nodes() if n.fan_out is not None and n.fan_out.output]
    assert any(o.startswith("Subquestion 1: ") and "\nSubquestion 2: " in o for o in fan_outs)
    second_splits = [r.fan_in.output for t in amplified for n in t.nodes() for r in n.rounds
                     if r.fan_in is not None and r.fan_in.output.startswith("Subquestion 1: ")]
    assert second_splits  # the fan-ins that split again, on the first answers
    for t in amplified:
        if t.error is None:
            assert COINS.is_valid_answer(t.question, t.root.answer)
    ckpt = Path(json.loads((tmp_path / "state.json").read_text())["checkpoint"]) / "model"
    assert AutoModelForCausalLM.from_pretrained(ckpt).config.model_type == "qwen2"


@pytest.fixture(scope="module")
def trained_coins_model(tmp_path_factory):
    """The tiny Qwen2 of examples/coins.yaml, trained briefly on right answers in the chat format
    (an untrained model's logits are near ties, which two engines may break differently)."""
    from ida_ray.config import TrainConfig
    from ida_ray.examples import Example
    from ida_ray.models import build_adversary, build_base_model, build_model, save_pretrained
    from ida_ray.training import ImitationObjective

    cfg = build_base_model(coins_run(tmp_path_factory.mktemp("coins_base")))
    model, tok = build_model(cfg.model)
    adversary, _ = build_adversary(cfg.model)
    fmt = cfg.model.make_format(tok)
    rng = random.Random(3)
    qs = [COINS.generate(rng.randint(1, 2), rng) for _ in range(300)]
    examples = [Example("answer", fmt.answer_prompt(q), fmt.format_answer(COINS.solve(q))) for q in qs]
    objective = ImitationObjective(model, adversary, tok, TrainConfig(lr=1e-2, batch_size=32))
    torch.manual_seed(0)
    objective.fit(examples, steps=60, adversary_steps=0)
    out = tmp_path_factory.mktemp("coins_trained")
    return save_pretrained(model, tok, out / "model"), save_pretrained(adversary, tok, out / "adversary"), fmt


@pytest.mark.vllm
@pytest.mark.ray
def test_vllm_and_transformers_agree_on_chat_prompts(ray_cluster, trained_coins_model):
    from ida_ray.actors.replica import start_replicas
    from ida_ray.engine import TorchEngine
    from ida_ray.models import load_adversary, load_model, load_tokenizer
    from ida_ray.serving.engine_pool import ReplicaPool

    model_dir, adversary_dir, fmt = trained_coins_model
    rng = random.Random(11)
    prompts = [fmt.answer_prompt(COINS.generate(rng.randint(1, 4), rng)) for _ in range(16)]
    prompts += [fmt.fan_out_prompt(COINS.generate(rng.randint(2, 4), rng)) for _ in range(4)]
    local = TorchEngine(load_model(model_dir), load_adversary(adversary_dir), load_tokenizer(model_dir),
                        max_new_tokens=24)
    expected = asyncio.run(local.generate(prompts))
    (replica,) = start_replicas(1, model_dir, adversary_dir, engine="vllm", max_new_tokens=24, name_prefix="coins",
                                max_restarts=0, num_cpus=1)
    pool = ReplicaPool([replica])
    try:
        got = asyncio.run(pool.generate(prompts))
        assert [g.text for g in got] == [g.text for g in expected]
        assert sum(g.text.startswith("Answer: ") for g in got[:16]) >= 12  # it learnt the reply form
        assert [g.logprob for g in got] == pytest.approx([g.logprob for g in expected], abs=0.05)
    finally:
        pool.close()
        import ray

        ray.kill(replica, no_restart=True)


# -- LoRA ---------------------------------------------------------------------------------------
def test_lora_trains_adapters_serves_merged_weights_and_resumes(tmp_path):
    from ida_ray.examples import Example
    from ida_ray.models import build_base_model, load_model
    from ida_ray.training import build_objective

    cfg = build_base_model(coins_run(tmp_path, **{"model.lora_rank": 4, "backend": "local", "engine": "torch"}))
    objective = build_objective(cfg)
    base = load_model(cfg.model.path).state_dict()
    trainable = {n for n, p in objective.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    served = objective.served_model.state_dict()  # B = 0: M itself, under the base model's key names
    assert set(served) == set(base) and all(torch.equal(served[k], base[k]) for k in base)
    fmt = cfg.model.make_format(objective.tokenizer)
    rng = random.Random(0)
    qs = [COINS.generate(1, rng) for _ in range(64)]
    objective.fit([Example("answer", fmt.answer_prompt(q), fmt.format_answer(COINS.solve(q))) for q in qs],
                  steps=10, adversary_steps=0)
    ids = objective.tokenizer(fmt.answer_prompt(qs[0]), return_tensors="pt").input_ids
    with torch.no_grad():
        trained = objective.model(ids).logits
        assert torch.allclose(objective.served_model(ids).logits, trained, atol=1e-5)  # merged == adapters
    frozen = {k: v for k, v in objective.model.get_base_model().state_dict().items() if "lora_" not in k}
    assert all(torch.equal(v, base[k.replace(".base_layer.", ".")]) for k, v in frozen.items())
    objective.save_model(tmp_path / "ckpt" / "model")
    with torch.no_grad():  # model/ is a plain HF directory of the merged weights; lora/ resumes
        assert torch.allclose(load_model(tmp_path / "ckpt" / "model")(ids).logits, trained, atol=1e-5)
        resumed = build_objective(cfg)
        resumed.load_model(tmp_path / "ckpt" / "model")
        assert torch.equal(resumed.model(ids).logits, trained)


def test_one_local_iteration_with_lora(tmp_path):
    (m,) = train(coins_run(tmp_path, **{"model.lora_rank": 4, "backend": "local", "engine": "torch"}),
                 progress=False, log=lambda s: None)
    assert m["model_steps"] == 10 and m["trees"] == 40
    ckpt = Path(json.loads((tmp_path / "state.json").read_text())["checkpoint"]) / "model"
    assert (ckpt / "lora" / "adapter_config.json").exists() and (ckpt / "config.json").exists()
    with pytest.raises(ConfigError, match="lora_rank must be 0"):
        load_config(str(EXAMPLE), {"model.lora_rank": 4, "objective": "honest"})
