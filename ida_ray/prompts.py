"""Prompt formats for the three model roles, and parsing of model output.

    answer   "A" q "="                        -> answer text
    fan-out  "O" q "="                        -> "!" answer  |  "?" q1 "&" q2
    fan-in   "I" q "[" q1 ":" a1 "][" q2 ":" a2 "]="  -> "!" answer  |  "?" q1 "&" q2

Every completion ends with the tokenizer's end-of-sequence token. The characters
`AOI=!?&[]:` are reserved: task questions and answers never contain them (they use
`ida_ray.tasks.QUESTION_CHARS`). Fan-in prompts list the subquestions in canonical order, so
they are symmetric under swapping the two subquestions by construction.
"""
from __future__ import annotations

from ida_ray.errors import ParseError
from ida_ray.steps import Answer, Split, Step

RESERVED = "AOI=!?&[]:"  # ":" separates a subquestion from its answer in fan-in prompts


def answer_prompt(q: str) -> str:
    return f"A{q}="


def question_of_answer_prompt(prompt: str) -> str:
    """The question of an answer prompt (inverse of `answer_prompt`); ParseError otherwise."""
    if len(prompt) < 3 or prompt[0] != "A" or prompt[-1] != "=" or any(c in RESERVED for c in prompt[1:-1]):
        raise ParseError(f"not an answer prompt: {prompt!r}")
    return prompt[1:-1]


def fan_out_prompt(q: str) -> str:
    return f"O{q}="


def fan_in_prompt(q: str, sub: tuple[tuple[str, str], tuple[str, str]]) -> str:
    (q1, a1), (q2, a2) = sorted(sub)
    return f"I{q}[{q1}:{a1}][{q2}:{a2}]="


def format_step(step: Step) -> str:
    """The completion text that encodes a step (what the model is trained to emit)."""
    if isinstance(step, Answer):
        return "!" + step.text
    return f"?{step.q1}&{step.q2}"


def parse_answer(text: str, task=None, question: str | None = None) -> str:
    """Validate a completion of an answer prompt."""
    if not text or any(c in RESERVED for c in text):
        raise ParseError(f"malformed answer {text!r}")
    if task is not None and not task.is_valid_answer(question, text):
        raise ParseError(f"{task.name}: answer {text!r} is not well-formed for {question!r}")
    return text


def parse_step(text: str, task=None, question: str | None = None) -> Step:
    """Parse a fan-out or fan-in completion into Answer | Split; ParseError on anything else.

    With a task, subquestions must be well-formed questions of that task and answers
    well-formed answers.
    """
    if not text:
        raise ParseError("empty output")
    head, body = text[0], text[1:]
    if head == "!":
        return Answer(parse_answer(body, task, question))
    if head == "?":
        parts = body.split("&")
        if len(parts) != 2 or not all(parts) or any(c in RESERVED for c in body.replace("&", "")):
            raise ParseError(f"malformed split {text!r}: expected ?q1&q2")
        if task is not None:
            for part in parts:
                try:
                    task.parse(part)
                except ValueError as exc:
                    raise ParseError(f"split has a malformed subquestion: {exc}") from exc
        return Split(parts[0], parts[1])
    raise ParseError(f"output must start with '!' (answer) or '?' (split): {text!r}")
