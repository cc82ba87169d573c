"""Fuzzed inputs: random text and random bytes into every parser a user, a model or a browser
reaches. Each gives its one error type (ParseError for model output, MalformedQuestion for
questions, ConfigError for configs, files and overrides) or an HTTP 4xx, never another
exception, a hang or a 5xx."""
from __future__ import annotations

import json
import random

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ida_ray.config import IDAConfig, config_values, load_config, load_yaml, parse_override
from ida_ray.errors import ConfigError, MalformedQuestion, ParseError
from ida_ray.prompts import COMPACT, ChatFormat
from ida_ray.questions import read_questions
from ida_ray.tasks import TASKS, get_task
from ida_ray.viewer import create_app

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Text near the grammar as well as far from it: the characters the formats and tasks use.
near = st.text(alphabet=st.sampled_from(list("0123456789,;:!?&[]=AOI -.\n\t|aAnswerSubquestion12")), max_size=120)
any_text = st.one_of(st.text(max_size=200), near, st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
TASK_OBJECTS = {name: get_task(name) for name in TASKS}


class Tok:
    """A tokenizer stand-in with a chat template: ChatFormat keeps only the template and tokens."""

    chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    special_tokens_map = {"eos_token": "<|im_end|>"}


CHAT = ChatFormat(Tok())


@FUZZ
@given(any_text, st.sampled_from(sorted(TASKS)))
def test_model_output_parses_or_raises_parse_error(text, task_name):
    task = TASK_OBJECTS[task_name]
    q = task.generate(3, random.Random(0))
    for fmt in (COMPACT, CHAT):
        for parse in (fmt.read_answer, fmt.read_step, lambda t: fmt.parse_answer(t, task, q),
                      lambda t: fmt.parse_step(t, task, q)):
            try:
                parse(text)
            except ParseError:
                pass


@FUZZ
@given(any_text, st.sampled_from(sorted(TASKS)))
def test_questions_parse_or_raise_malformed_question(text, task_name):
    task = TASK_OBJECTS[task_name]
    try:
        size = task.size(text)
    except MalformedQuestion:
        return
    assert isinstance(size, int) and size >= 0
    task.solve(text)  # a question the task accepts it can also answer


@FUZZ
@given(st.binary(max_size=400))
def test_a_questions_file_of_random_bytes_gives_entries_or_a_config_error(tmp_path, data):
    path = tmp_path / "q.txt"
    path.write_bytes(data)
    try:
        entries = read_questions(path, TASK_OBJECTS["sum"], 256, 16)
    except ConfigError:
        return
    for e in entries:  # every entry is a question the task takes, or names its problem
        if e.problem is None:
            TASK_OBJECTS["sum"].size(e.question)
        else:
            assert isinstance(e.problem, str) and e.problem


@FUZZ
@given(st.one_of(st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=300),
                 near.map(str.encode)))
def test_a_config_file_of_random_bytes_loads_or_gives_a_config_error(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    try:
        cfg = load_config(str(path))
    except ConfigError:
        return
    assert isinstance(cfg, IDAConfig)


# Random YAML mappings over the real keys: wrong types and values in the right places.
values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                                st.text(max_size=12)),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
SECTIONS = {k: v for k, v in config_values("default").items() if isinstance(v, dict)}
keys = st.sampled_from(sorted(config_values("default")) + [f"{s}.{k}" for s, d in SECTIONS.items() for k in d] + ["nope"])


@FUZZ
@given(st.dictionaries(keys, values, max_size=4))
def test_random_values_for_real_keys_give_a_config_error_or_a_valid_config(overrides):
    try:
        cfg = load_config("default", overrides)
    except ConfigError as exc:
        assert str(exc)  # says what is wrong
        return
    assert isinstance(cfg.validate(), IDAConfig)


@FUZZ
@given(any_text)
def test_dotted_overrides_parse_or_give_a_config_error(text):
    try:
        key, value = parse_override(text)
    except ConfigError:
        return
    assert "=" in text and key == text.split("=", 1)[0]
    try:
        load_config("default", {key: value})
    except ConfigError:
        pass


@FUZZ
@given(any_text)
def test_yaml_reader_gives_data_or_a_yaml_error(text):
    import yaml

    try:
        load_yaml(text)
    except yaml.YAMLError:
        pass


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    from test_viewer import make_trees, write_run

    with TestClient(create_app(write_run(tmp_path_factory.mktemp("run"), make_trees())),
                    raise_server_exceptions=False) as client:
        yield client


params = st.dictionaries(st.sampled_from(["task", "size", "iteration", "mode", "source", "correct", "error", "q",
                                          "offset", "limit", "token"]), any_text, max_size=4)
paths = st.sampled_from(["/api/trees", "/api/info", "/api/metrics", "/api/question", "/", "/question", "/tree/x"])


@FUZZ
@given(paths, params)
def test_viewer_get_endpoints_answer_4xx_never_5xx(viewer, path, query):
    r = viewer.get(path, params=query)
    assert r.status_code < 500, (path, query, r.text[:300])


@FUZZ
@given(st.text(max_size=40).filter(lambda t: "/" not in t and t not in ("", ".", "..")), any_text)
def test_viewer_tree_ids_and_bodies_answer_4xx_never_5xx(viewer, tree_id, body):
    from urllib.parse import quote

    tree_id = quote(tree_id, safe="")
    assert viewer.get(f"/api/trees/{tree_id}").status_code < 500
    for url in (f"/api/human/requests/{tree_id}", "/api/human/runs"):
        for content in (body.encode("utf-8", "surrogatepass"), json.dumps({"text": body}).encode(),
                        json.dumps({"question": body}).encode()):
            r = viewer.post(url, content=content, headers={"Content-Type": "application/json"})
            assert r.status_code < 500, (url, body, r.text[:300])
