"""User-supplied questions: a file of questions that a run amplifies alongside its own draws.

Two formats, chosen by the file's suffix:
  *.jsonl  one JSON value per line: a string ("3,5,7") or an object {"question": "3,5,7"}
  other    plain text, one question per line; blank lines and lines starting with '#' skipped

The file is checked before any cluster resource is taken: a file that is missing, not UTF-8,
too large or holds no question at all is a ConfigError. A single bad line is not: it becomes
an entry with a `problem` (unreadable JSON, not a string, a question the task's parser
rejects, a question whose tree's prompts would not fit the model's context), and the run
records it as a tree whose error kind is `malformed_question`, so every line of the file is
accounted for.

Each question is amplified once over the run, in file order: iteration i takes the i-th slice
of ceil(n / iterations) entries (`for_iteration`), so a resumed run picks up where it stopped.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ida_ray.errors import ConfigError
from ida_ray.prompts import COMPACT, PromptFormat
from ida_ray.steps import Answer
from ida_ray.tasks.base import Task

MAX_FILE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class UserQuestion:
    index: int  # position among the file's entries (skipped lines not counted); names the job
    line: int  # 1-based line number in the file, for messages
    question: str  # the question, or the raw line when it could not be read as one
    problem: str | None = None  # why it is malformed; None when it is a well-formed question

    def to_dict(self) -> dict:
        return asdict(self)


def characters_and_bos(prompt: str) -> int:
    """Tokens of a prompt under the character tokenizer: one per character, and BOS."""
    return len(prompt) + 1


def longest_prompt(task: Task, question: str, max_depth: int = 64, max_rounds: int = 8, fmt: PromptFormat = COMPACT,
                   length: Callable[[str], int] = characters_and_bos) -> int:
    """Tokens (`length` of a prompt) in the longest prompt of the question's expert tree: the
    answer, fan-out and fan-in prompts a run shows the model once its answers are right. A
    question whose expert tree cannot be built is measured by its own prompts; the run records
    whatever then goes wrong."""
    def walk(q: str, depth: int) -> tuple[str, int]:
        longest = max(length(fmt.answer_prompt(q)), length(fmt.fan_out_prompt(q)))
        if depth > max_depth:
            raise RecursionError(f"expert tree deeper than {max_depth}")
        step = task.expert_fan_out(q)
        for _ in range(max_rounds):
            if isinstance(step, Answer):
                return step.text, longest
            (a1, l1), (a2, l2) = walk(step.q1, depth + 1), walk(step.q2, depth + 1)
            sub = ((step.q1, a1), (step.q2, a2))
            longest = max(longest, l1, l2, length(fmt.fan_in_prompt(q, sub)))
            step = task.expert_fan_in(q, sub)
        raise RecursionError(f"expert fan-in did not finish within {max_rounds} rounds")

    try:
        return walk(question, 0)[1]
    except Exception:  # noqa: BLE001 - see above
        return length(fmt.fan_out_prompt(question))


def context_needed(task: Task, question: str, max_new_tokens: int, fmt: PromptFormat = COMPACT,
                   length: Callable[[str], int] = characters_and_bos) -> int:
    """Positions the question's longest step needs: the prompt (`length` counts its tokens,
    BOS included) and the completion."""
    return longest_prompt(task, question, fmt=fmt, length=length) + max_new_tokens


def _entry(task: Task, index: int, line: int, raw: str, jsonl: bool, max_positions: int,
           max_new_tokens: int, fmt: PromptFormat, length: Callable[[str], int]) -> UserQuestion:
    text = raw
    if jsonl:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            return UserQuestion(index, line, raw, f"not valid JSON ({exc.msg})")
        if isinstance(value, dict):
            value = value.get("question")
        if not isinstance(value, str):
            return UserQuestion(index, line, raw, 'expected a JSON string or {"question": "..."}')
        text = value
    if len(text) > 8 * max_positions:  # far past any context: not worth parsing or measuring
        return UserQuestion(index, line, text[:200], f"{len(text)} characters: too long for the model's context "
                            f"of {max_positions} positions")
    try:
        task.parse(text)
    except Exception as exc:  # noqa: BLE001 - any parser failure on user input is a malformed question
        return UserQuestion(index, line, text, f"{task.name} cannot parse it: {exc}")
    need = context_needed(task, text, max_new_tokens, fmt, length)
    if need > max_positions:
        return UserQuestion(index, line, text, f"its tree's prompts need {need} positions: too long for the model's "
                            f"context of {max_positions}")
    return UserQuestion(index, line, text)


def read_questions(path: str | Path, task: Task, max_positions: int, max_new_tokens: int,
                   fmt: PromptFormat = COMPACT, length: Callable[[str], int] = characters_and_bos) -> list[UserQuestion]:
    """Every entry of the file, well-formed or not; ConfigError when the file itself is unusable.
    `fmt` and `length` (tokens of a prompt) measure whether a question's prompts fit."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"questions file {path} does not exist or is not a file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"questions file {path} is larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"questions file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"questions file {path} cannot be read: {exc}") from None
    jsonl = path.suffix.lower() == ".jsonl"
    entries = []
    for number, raw in enumerate(lines, 1):
        raw = raw.strip()
        if not raw or (not jsonl and raw.startswith("#")):
            continue
        entries.append(_entry(task, len(entries), number, raw, jsonl, max_positions, max_new_tokens, fmt, length))
    if not entries:
        raise ConfigError(f"questions file {path} holds no questions")
    return entries


def for_iteration(entries: list[UserQuestion], iteration: int, iterations: int) -> list[UserQuestion]:
    """The entries amplified in one iteration: consecutive slices, each entry exactly once."""
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    per = math.ceil(len(entries) / iterations)
    return entries[iteration * per:(iteration + 1) * per]
