"""Sequential assignments on two registers a and b, digits mod 10.

    "37|a+b;b*3;a<5|a"   start a=3 b=7; a=a+b; b=b*3; a=5; what is a?  -> "5"

A statement is register, operator, operand: `+ - *` update the register mod 10 and `<` assigns
(the prompt format reserves '=', so assignment is '<'). The operand is a digit or a register.
Size = number of statements. The expert runs at most `base_size` statements itself; a longer
program P;S (P the first half) takes two rounds, the second depending on the first answers:

    round 1   Split(s|P|a, s|P|b)          -> the state a'b' after P
    fan-in 1  Split(a'b'|S|a, a'b'|S|b)    the suffix, started from that state
    fan-in 2  the answer for the asked register

The fan-in is stateless, so it tells the rounds apart by the subquestions: round 1 runs P from
the question's own state. Where round 2 would repeat round 1 (S == P and P leaves the state
unchanged) the state after the whole program is already known and fan-in 1 answers.
"""
from __future__ import annotations

import random
import re

from ida_ray.errors import ConfigError, ExpertFailure, MalformedQuestion
from ida_ray.steps import Answer, Split, Step
from ida_ray.tasks.base import Task

REGISTERS = "ab"
_STATEMENT = r"[ab][-+*<][ab0-9]"
_QUESTION = re.compile(rf"^([0-9])([0-9])\|({_STATEMENT}(?:;{_STATEMENT})*)\|([ab])$")
_DIGIT = re.compile(r"^[0-9]$")


def _format(state: tuple[int, int], program: list[str], register: str) -> str:
    return f"{state[0]}{state[1]}|{';'.join(program)}|{register}"


def run_program(state: tuple[int, int], program: list[str]) -> tuple[int, int]:
    """The registers (a, b) after running `program` from `state`."""
    regs = dict(zip(REGISTERS, state))
    for target, op, operand in program:
        value = regs[operand] if operand in REGISTERS else int(operand)
        if op == "<":
            regs[target] = value
        elif op == "+":
            regs[target] = (regs[target] + value) % 10
        elif op == "-":
            regs[target] = (regs[target] - value) % 10
        else:
            regs[target] = (regs[target] * value) % 10
    return regs["a"], regs["b"]


class Assignments(Task):
    name = "assign"

    def __init__(self, base_size: int = 2):
        if base_size < 1:
            raise ConfigError("assign: base_size must be >= 1")
        self.base_size = base_size
        self.default_sizes = tuple(range(1, 4 * base_size + 1))

    def generate(self, size: int, rng: random.Random) -> str:
        if size < 1:
            raise ValueError("size must be >= 1")
        program = []
        for _ in range(size):
            target = rng.choice(REGISTERS)
            # Half the operands are the other register, so statements depend on each other
            # (never the target itself: "a-a" would only be a cheap way to 0).
            operand = REGISTERS.replace(target, "") if rng.random() < 0.5 else str(rng.randrange(10))
            op = rng.choice("++--*<")
            if op == "*" and operand.isdigit():
                # Multiply by a unit mod 10: by 0, 2, 4, 5, ... values collapse toward 0, which
                # would make 0 a cheap guess.
                operand = rng.choice("379")
            program.append(target + op + operand)
        return _format((rng.randrange(10), rng.randrange(10)), program, rng.choice(REGISTERS))

    def parse(self, question: str) -> tuple[tuple[int, int], list[str], str]:
        """(start state (a, b), statements, asked register)."""
        m = _QUESTION.match(question or "")
        if not m:
            raise MalformedQuestion(
                f"assign: expected <a><b>|<statements>|<register> like 37|a+b;b*3;a<5|a, got {question!r}")
        return (int(m.group(1)), int(m.group(2))), m.group(3).split(";"), m.group(4)

    def size(self, question: str) -> int:
        return len(self.parse(question)[1])

    def solve(self, question: str) -> str:
        state, program, register = self.parse(question)
        return str(run_program(state, program)[REGISTERS.index(register)])

    def is_valid_answer(self, question: str, answer: str) -> bool:
        return bool(_DIGIT.match(answer or ""))

    # -- expert ----------------------------------------------------------------------
    def _direct_answer(self, question: str) -> str:
        state, program, register = self.parse(question)
        return str(run_program(state, program)[REGISTERS.index(register)])

    @staticmethod
    def _halves(program: list[str]) -> tuple[list[str], list[str]]:
        half = (len(program) + 1) // 2
        return program[:half], program[half:]

    def _split(self, question: str) -> Split:
        state, program, _ = self.parse(question)
        prefix, _ = self._halves(program)
        return Split(*(_format(state, prefix, r) for r in REGISTERS))

    def _combine(self, question, sub) -> Step:
        state, program, register = self.parse(question)
        prefix, suffix = self._halves(program)
        parsed = []
        for q_i, a_i in sub:
            try:
                parsed.append(self.parse(q_i))
            except MalformedQuestion as exc:
                raise ExpertFailure(f"assign: fan-in got a malformed subquestion: {exc}") from exc
            if not self.is_valid_answer(q_i, a_i):
                raise ExpertFailure(f"assign: fan-in got a malformed subanswer {a_i!r} for {q_i!r}")
        (state1, prog1, reg1), (state2, prog2, reg2) = parsed
        if state1 != state2 or prog1 != prog2 or {reg1, reg2} != set(REGISTERS):
            raise ExpertFailure(f"assign: expected one program asked for both registers, got {[q for q, _ in sub]}")
        values = {reg1: int(sub[0][1]), reg2: int(sub[1][1])}
        after = (values["a"], values["b"])
        if (state1, prog1) == (state, prefix):  # round 1: `after` is the state after the prefix
            if prefix == suffix and after == state:
                return Answer(str(after[REGISTERS.index(register)]))
            return Split(*(_format(after, suffix, r) for r in REGISTERS))
        if prog1 == suffix:  # round 2: `after` is the state after the whole program
            return Answer(str(values[register]))
        raise ExpertFailure(f"assign: subquestions {[q for q, _ in sub]} are neither round of {question!r}")
