"""Prompt formats: how the three model roles are shown to M, and how its output is read back.

A format turns a question into the prompt of each role, a step into the completion M is trained
to emit (always followed by the tokenizer's EOS), and a completion back into a step. Two exist:

`CompactFormat` ("compact"), for the built-in tiny models and the symbolic tasks:

    answer   "A" q "="                                  -> answer
    fan-out  "O" q "="                                  -> "!" answer  |  "?" q1 "&" q2
    fan-in   "I" q "[" q1 ":" a1 "][" q2 ":" a2 "]="    -> "!" answer  |  "?" q1 "&" q2

  The characters `AOI=!?&[]:` are reserved: the built-in tasks' questions and answers never
  contain them (they use `ida_ray.tasks.QUESTION_CHARS`).

`ChatFormat` ("chat"), for language models and questions in natural language: each prompt is
one user message, rendered with the tokenizer's chat template when it has one, and the replies
are plain lines an instruction-tuned model can follow from one example:

    Answer: <answer>                    an answer (answer role, or a fan-out/fan-in that answers)
    Subquestion 1: <q1>                 a split into two subquestions
    Subquestion 2: <q2>

  Reading a reply tolerates case, whitespace and chatter around those lines; anything else is
  a ParseError. Questions, answers and subquestions are single lines.

In both formats a fan-in prompt lists the two subquestions in canonical (sorted) order, so it
is symmetric under swapping them by construction.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod

from ida_ray.errors import ParseError
from ida_ray.steps import Answer, Split, Step

SubAnswers = tuple[tuple[str, str], tuple[str, str]]


class PromptFormat(ABC):
    name: str

    @abstractmethod
    def answer_prompt(self, q: str) -> str:
        """The prompt of M(q): answer directly."""

    @abstractmethod
    def fan_out_prompt(self, q: str) -> str:
        """The prompt of M_fan_out(q): answer, or split into two subquestions."""

    @abstractmethod
    def fan_in_prompt(self, q: str, sub: SubAnswers) -> str:
        """The prompt of M_fan_in(q, (q1, a1), (q2, a2)): combine, or split again."""

    @abstractmethod
    def format_answer(self, answer: str) -> str:
        """The completion of an answer prompt that says `answer`."""

    @abstractmethod
    def format_step(self, step: Step) -> str:
        """The completion of a fan-out or fan-in prompt that takes `step`."""

    @abstractmethod
    def read_answer(self, text: str) -> str:
        """The answer a completion of an answer prompt says; ParseError if it says none."""

    @abstractmethod
    def read_step(self, text: str) -> Step:
        """The step a fan-out or fan-in completion takes; ParseError if it takes none."""

    def parse_answer(self, text: str, task=None, question: str | None = None) -> str:
        """The answer of a completion, checked well-formed for `question` by the task."""
        answer = self.read_answer(text)
        if task is not None and not task.is_valid_answer(question, answer):
            raise ParseError(f"{task.name}: answer {answer!r} is not well-formed for {question!r}")
        return answer

    def parse_step(self, text: str, task=None, question: str | None = None) -> Step:
        """The step of a completion; with a task, subquestions must be questions it parses and
        an answer must be well-formed."""
        step = self.read_step(text)
        if task is None:
            return step
        if isinstance(step, Answer):
            if not task.is_valid_answer(question, step.text):
                raise ParseError(f"{task.name}: answer {step.text!r} is not well-formed for {question!r}")
            return step
        for part in step.questions:
            try:
                task.parse(part)
            except ValueError as exc:
                raise ParseError(f"split has a malformed subquestion: {exc}") from exc
        return step

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash(type(self))


# ---------------------------------------------------------------------------------------
# The compact format of the built-in tiny models
# ---------------------------------------------------------------------------------------
RESERVED = "AOI=!?&[]:"  # ":" separates a subquestion from its answer in fan-in prompts


class CompactFormat(PromptFormat):
    name = "compact"

    def answer_prompt(self, q: str) -> str:
        return f"A{q}="

    def question_of_answer_prompt(self, prompt: str) -> str:
        """The question of an answer prompt (inverse of `answer_prompt`); ParseError otherwise."""
        if len(prompt) < 3 or prompt[0] != "A" or prompt[-1] != "=" or any(c in RESERVED for c in prompt[1:-1]):
            raise ParseError(f"not an answer prompt: {prompt!r}")
        return prompt[1:-1]

    def fan_out_prompt(self, q: str) -> str:
        return f"O{q}="

    def fan_in_prompt(self, q: str, sub: SubAnswers) -> str:
        (q1, a1), (q2, a2) = sorted(sub)
        return f"I{q}[{q1}:{a1}][{q2}:{a2}]="

    def format_answer(self, answer: str) -> str:
        return answer

    def format_step(self, step: Step) -> str:
        if isinstance(step, Answer):
            return "!" + step.text
        return f"?{step.q1}&{step.q2}"

    def read_answer(self, text: str) -> str:
        if not text or any(c in RESERVED for c in text):
            raise ParseError(f"malformed answer {text!r}")
        return text

    def read_step(self, text: str) -> Step:
        if not text:
            raise ParseError("empty output")
        head, body = text[0], text[1:]
        if head == "!":
            return Answer(self.read_answer(body))
        if head == "?":
            parts = body.split("&")
            if len(parts) != 2 or not all(parts) or any(c in RESERVED for c in body.replace("&", "")):
                raise ParseError(f"malformed split {text!r}: expected ?q1&q2")
            return Split(parts[0], parts[1])
        raise ParseError(f"output must start with '!' (answer) or '?' (split): {text!r}")


COMPACT = CompactFormat()


# ---------------------------------------------------------------------------------------
# The natural-language chat format
# ---------------------------------------------------------------------------------------
_ANSWER_LINE = re.compile(r"\banswer[ \t]*:[ \t]*([^\n]*)", re.IGNORECASE)
_SUBQUESTION_LINE = re.compile(r"\bsub-?questions?[ \t]*([12])[ \t]*[:.)][ \t]*([^\n]*)", re.IGNORECASE)

ASK_ANSWER = "Give the answer."
ASK_STEP = "Give the answer, or split the question into two subquestions."
ASK_COMBINE = "Give the answer, or ask two more subquestions."


def _one_line(text: str, what: str) -> str:
    text = text.strip()
    if not text or "\n" in text or "\r" in text:
        raise ValueError(f"a {what} in the chat format is one non-empty line, got {text!r}")
    return text


def _clean(value: str) -> str:
    # A reply's value: surrounding spaces, quotes and markdown emphasis are chatter.
    return value.strip().strip("*_`\"'").strip()


class ChatFormat(PromptFormat):
    """Each prompt is one user message (rendered by `chat_template`, the tokenizer's Jinja
    template, when there is one; else the message text and a newline). Only the template is
    kept, not the tokenizer, so the format is small to ship to actors."""

    name = "chat"

    def __init__(self, tokenizer=None, system: str | None = None):
        self.chat_template: str | None = getattr(tokenizer, "chat_template", None) if tokenizer else None
        # The template may name the tokenizer's special tokens (bos_token, eos_token, ...).
        self.special_tokens: dict[str, str] = dict(tokenizer.special_tokens_map) if tokenizer else {}
        self.system = system

    def render(self, messages: list[dict]) -> str:
        """A conversation as prompt text: the chat template's, ending where the assistant
        speaks next (without a template: the messages' text, a blank line between them)."""
        if self.chat_template is None:
            return "\n\n".join(m["content"] for m in messages) + "\n"
        # transformers' own renderer (what apply_chat_template runs, compiled once and cached).
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template([messages], chat_template=self.chat_template,
                                            add_generation_prompt=True, **self.special_tokens)
        return rendered[0]

    def _render(self, user: str) -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system else [])
        return self.render(messages + [{"role": "user", "content": user}])

    # The user message of each role: what M sees, and what an LM expert is asked.
    def answer_message(self, q: str) -> str:
        return f"{_one_line(q, 'question')}\n{ASK_ANSWER}"

    def fan_out_message(self, q: str) -> str:
        return f"{_one_line(q, 'question')}\n{ASK_STEP}"

    def fan_in_message(self, q: str, sub: SubAnswers) -> str:
        (q1, a1), (q2, a2) = sorted(sub)
        return (f"{_one_line(q, 'question')}\nSubquestion 1: {q1}\nAnswer 1: {a1}\n"
                f"Subquestion 2: {q2}\nAnswer 2: {a2}\n{ASK_COMBINE}")

    def answer_prompt(self, q: str) -> str:
        return self._render(self.answer_message(q))

    def fan_out_prompt(self, q: str) -> str:
        return self._render(self.fan_out_message(q))

    def fan_in_prompt(self, q: str, sub: SubAnswers) -> str:
        return self._render(self.fan_in_message(q, sub))

    def format_answer(self, answer: str) -> str:
        return f"Answer: {_one_line(answer, 'answer')}"

    def format_step(self, step: Step) -> str:
        if isinstance(step, Answer):
            return self.format_answer(step.text)
        return f"Subquestion 1: {_one_line(step.q1, 'subquestion')}\nSubquestion 2: {_one_line(step.q2, 'subquestion')}"

    def read_answer(self, text: str) -> str:
        found = [_clean(m.group(1)) for m in _ANSWER_LINE.finditer(text or "")]
        found = [a for a in found if a]
        if not found:
            raise ParseError(f"no 'Answer: ...' line in {str(text)[:80]!r}")
        if len(set(found)) > 1:
            raise ParseError(f"more than one answer in {str(text)[:80]!r}")
        return found[0]

    def read_step(self, text: str) -> Step:
        text = text or ""
        subs: dict[str, set[str]] = {"1": set(), "2": set()}
        for m in _SUBQUESTION_LINE.finditer(text):
            if _clean(m.group(2)):
                subs[m.group(1)].add(_clean(m.group(2)))
        has_answer = any(_clean(m.group(1)) for m in _ANSWER_LINE.finditer(text))
        if subs["1"] or subs["2"]:
            if has_answer:
                raise ParseError(f"both an answer and subquestions in {text[:80]!r}")
            if len(subs["1"]) != 1 or len(subs["2"]) != 1:
                raise ParseError(f"a split needs exactly one 'Subquestion 1:' and one 'Subquestion 2:' line: "
                                 f"{text[:80]!r}")
            return Split(subs["1"].pop(), subs["2"].pop())
        return Answer(self.read_answer(text))


FORMATS = ("compact", "chat")


def prompt_format(name: str, tokenizer=None) -> PromptFormat:
    """The format a config names; "chat" renders with `tokenizer`'s chat template."""
    if name == "compact":
        return COMPACT
    if name == "chat":
        return ChatFormat(tokenizer)
    raise ValueError(f"prompt_format must be one of {FORMATS}, got {name!r}")
