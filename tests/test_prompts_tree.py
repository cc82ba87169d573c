import pytest

from ida_ray.errors import ParseError
from ida_ray.prompts import COMPACT, RESERVED
from ida_ray.steps import Answer, Split
from ida_ray.tasks import QUESTION_CHARS, get_task
from ida_ray.tokenizer import build_tokenizer

SUM = get_task("sum")


def test_split_is_canonical_and_fan_in_prompt_symmetric():
    assert Split("5,6", "1,2") == Split("1,2", "5,6")
    a = COMPACT.fan_in_prompt("1,2,5,6", (("1,2", "3"), ("5,6", "11")))
    b = COMPACT.fan_in_prompt("1,2,5,6", (("5,6", "11"), ("1,2", "3")))
    assert a == b == "I1,2,5,6[1,2:3][5,6:11]="


@pytest.mark.parametrize("step", [Answer("17"), Split("1,2", "3,4")])
def test_format_parse_round_trip(step):
    assert COMPACT.parse_step(COMPACT.format_step(step), SUM, "1,2,3,4") == step


@pytest.mark.parametrize("text", ["", "17", "!", "?1,2", "?1,2&", "?&3", "?1&2&3", "!1&2", "?1,2&x,y", "!a", "x!1"])
def test_malformed_output_raises_one_error_type(text):
    with pytest.raises(ParseError):
        COMPACT.parse_step(text, SUM, "1,2,3,4")


def test_answer_validation_uses_the_task():
    assert COMPACT.parse_answer("12", SUM, "5,7") == "12"
    for bad in ["", "012", "1,2", "A"]:
        with pytest.raises(ParseError):
            COMPACT.parse_answer(bad, SUM, "5,7")


def test_reserved_characters_never_in_questions():
    assert not set(RESERVED) & set(QUESTION_CHARS)


def test_tokenizer_round_trips_every_character():
    tok = build_tokenizer()
    text = "I" + QUESTION_CHARS + "[?!&]="
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok(text)["input_ids"][0] == tok.bos_token_id


def test_step_record_from_generation_keeps_the_models_output_and_round_trips():
    from ida_ray.engine import Generation
    from ida_ray.tree import EXPERT, MODEL, StepRecord, _step

    gen = Generation("!7", -0.25, True, 3)
    rec = StepRecord.from_generation("fan_out", "O3,4=", gen)
    assert (rec.role, rec.prompt, rec.output, rec.who) == ("fan_out", "O3,4=", "", MODEL)
    assert (rec.model_output, rec.logprob, rec.weight_version) == ("!7", -0.25, 3)
    assert rec.target_logprob is None and rec.adversary_score is None
    taken = StepRecord.from_generation("fan_in", "I", gen, who=EXPERT, output="!8")
    assert taken.who == EXPERT and taken.output == "!8" and taken.model_output == "!7"
    assert _step(dict(vars(taken))) == taken
