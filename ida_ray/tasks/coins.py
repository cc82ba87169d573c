"""Word problems in English: two people's coins after a story of events.

    "Ann has 3 coins and Bob has 5. Ann gives Bob 2. Bob loses 4. Ann finds 1.
     How many coins does Ann have?"                                              -> "2"

An event is "<X> gives <Y> <n>.", "<X> finds <n>." or "<X> loses <n>.". Size = number of
events. The expert follows at most `base_size` events itself; a longer story P;S (P its first
half) takes two rounds, the second depending on the first answers:

    round 1   Split(P asked for the first person, P asked for the second)  -> counts a', b' after P
    fan-in 1  Split(S from a', b' asked for each)                          the rest, from that state
    fan-in 2  the answer for the person asked about

The fan-in is stateless, so it tells the rounds apart by the subquestions: round 1 tells P from
the question's own start. Where round 2 would repeat round 1 (S == P, and P leaves the counts
as they were) the counts after the whole story are already known and fan-in 1 answers.

Questions are shown to M in the chat prompt format (`natural_language`). Answers are whole
numbers; they are graded by value, so " 2" and "02" count as 2 (`is_correct`).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ida_ray.errors import ConfigError, ExpertFailure, MalformedQuestion
from ida_ray.steps import Answer, Split, Step
from ida_ray.tasks.base import Task

NAMES = ("Ann", "Bob", "Cy", "Di", "Eve", "Fay", "Gus", "Hal")
_NAME = r"[A-Z][a-z]+"
_INT = r"-?(?:0|[1-9][0-9]*)"
_START = re.compile(rf"^({_NAME}) has ({_INT}) coins? and ({_NAME}) has ({_INT})\.$")
_EVENT = re.compile(rf"^({_NAME}) (?:gives ({_NAME}) ([1-9])|finds ([1-9])|loses ([1-9]))\.$")
_ASK = re.compile(rf"^How many coins does ({_NAME}) have\?$")
_ANSWER = re.compile(rf"^{_INT}$")


@dataclass(frozen=True)
class Event:
    who: str
    kind: str  # "gives" | "finds" | "loses"
    amount: int
    to: str | None = None

    def text(self) -> str:
        if self.kind == "gives":
            return f"{self.who} gives {self.to} {self.amount}."
        return f"{self.who} {self.kind} {self.amount}."


@dataclass(frozen=True)
class Story:
    people: tuple[str, str]
    counts: tuple[int, int]
    events: tuple[Event, ...]
    asked: str

    def text(self) -> str:
        (p, q), (a, b) = self.people, self.counts
        start = f"{p} has {a} coin{'' if a == 1 else 's'} and {q} has {b}."
        return " ".join([start, *(e.text() for e in self.events), f"How many coins does {self.asked} have?"])

    def after(self, events) -> tuple[int, int]:
        """The two counts after `events`, from this story's start."""
        count = dict(zip(self.people, self.counts))
        for e in events:
            if e.kind == "gives":
                count[e.who] -= e.amount
                count[e.to] += e.amount
            else:
                count[e.who] += e.amount if e.kind == "finds" else -e.amount
        return count[self.people[0]], count[self.people[1]]

    def with_(self, counts=None, events=None, asked=None) -> Story:
        return Story(self.people, self.counts if counts is None else counts,
                     self.events if events is None else tuple(events), asked or self.asked)


class CoinStories(Task):
    name = "coins"
    natural_language = True

    def __init__(self, base_size: int = 1, names: int = 2, max_coins: int = 9, shuffle: bool = True):
        if base_size < 1 or not 2 <= names <= len(NAMES) or max_coins < 1:
            raise ConfigError(f"coins: need base_size >= 1, 2 <= names <= {len(NAMES)} and max_coins >= 1, got "
                              f"{base_size}, {names}, {max_coins}")
        self.base_size = base_size
        self.names = NAMES[:names]  # people are drawn from these (2: always Ann and Bob)
        self.max_coins = max_coins  # counts stay within 0..max_coins in generated stories
        self.shuffle = shuffle  # draw the two people and their order; False: always the first two names
        self.default_sizes = tuple(range(1, 4 * base_size + 1))

    # -- the question distribution -------------------------------------------------
    def generate(self, size: int, rng: random.Random) -> str:
        if size < 1:
            raise ValueError("size must be >= 1")
        people = tuple(rng.sample(self.names, 2)) if self.shuffle else self.names[:2]
        counts = {p: rng.randint(0, self.max_coins) for p in people}
        start = (counts[people[0]], counts[people[1]])
        events = []
        for _ in range(size):
            who = rng.choice(people)
            other = people[1 - people.index(who)]
            options = []  # (kind, largest amount) that keep both counts within 0..max_coins
            room = min(counts[who], self.max_coins - counts[other])
            if room >= 1:
                options.append(("gives", room))
            if self.max_coins - counts[who] >= 1:
                options.append(("finds", self.max_coins - counts[who]))
            if counts[who] >= 1:
                options.append(("loses", counts[who]))
            kind, most = rng.choice(options)
            amount = rng.randint(1, min(most, 9))
            events.append(Event(who, kind, amount, other if kind == "gives" else None))
            if kind == "gives":
                counts[who] -= amount
                counts[other] += amount
            else:
                counts[who] += amount if kind == "finds" else -amount
        return Story(people, start, tuple(events), rng.choice(people)).text()

    def parse(self, question: str) -> Story:
        if not isinstance(question, str) or "\n" in question:
            raise MalformedQuestion(f"coins: expected a one-line story, got {question!r}")
        sentences = re.findall(r"[^.?]+[.?]", question.strip())
        if len(sentences) < 2 or "".join(sentences).replace(" ", "") != question.replace(" ", ""):
            raise MalformedQuestion(f"coins: expected sentences ending in '.' or '?', got {question!r}")
        sentences = [s.strip() for s in sentences]
        start, ask = _START.match(sentences[0]), _ASK.match(sentences[-1])
        if not start or not ask:
            raise MalformedQuestion(f"coins: expected '<X> has <n> coins and <Y> has <m>. ... How many coins does "
                                    f"<X> have?', got {question!r}")
        people = (start.group(1), start.group(3))
        if people[0] == people[1]:
            raise MalformedQuestion(f"coins: two different people, got {question!r}")
        events = []
        for s in sentences[1:-1]:
            m = _EVENT.match(s)
            if not m:
                raise MalformedQuestion(f"coins: {s!r} is not '<X> gives <Y> <n>.', '<X> finds <n>.' or '<X> "
                                        f"loses <n>.'")
            who, to = m.group(1), m.group(2)
            if who not in people or (to is not None and (to not in people or to == who)):
                raise MalformedQuestion(f"coins: {s!r} names someone other than {people[0]} and {people[1]}")
            if to is not None:
                events.append(Event(who, "gives", int(m.group(3)), to))
            else:
                events.append(Event(who, "finds" if m.group(4) else "loses", int(m.group(4) or m.group(5))))
        if ask.group(1) not in people:
            raise MalformedQuestion(f"coins: asks about {ask.group(1)}, who is not in the story")
        return Story(people, (int(start.group(2)), int(start.group(4))), tuple(events), ask.group(1))

    def size(self, question: str) -> int:
        return len(self.parse(question).events)

    def solve(self, question: str) -> str:
        story = self.parse(question)
        return str(story.after(story.events)[story.people.index(story.asked)])

    def is_valid_answer(self, question: str, answer: str) -> bool:
        return bool(_ANSWER.match((answer or "").strip()))

    def is_correct(self, question: str, answer: str | None) -> bool:
        """By value: a whole number equal to the story's."""
        return answer is not None and self.is_valid_answer(question, answer) and int(answer) == int(self.solve(question))

    # -- the coded expert H ----------------------------------------------------------
    def _direct_answer(self, question: str) -> str:
        return self.solve(question)  # at most base_size events: H follows them itself

    def _halves(self, story: Story):
        half = (len(story.events) + 1) // 2
        return story.events[:half], story.events[half:]

    def _pair(self, story: Story) -> Split:
        return Split(*(story.with_(asked=p).text() for p in story.people))

    def _split(self, question: str) -> Split:
        story = self.parse(question)
        prefix, _ = self._halves(story)
        return self._pair(story.with_(events=prefix))

    def _combine(self, question: str, sub) -> Step:
        story = self.parse(question)
        prefix, suffix = self._halves(story)
        (q1, a1), (q2, a2) = sub
        told = {}  # person -> their count, from the two subanswers
        for q, a in ((q1, a1), (q2, a2)):
            if not self.is_valid_answer(q, a):
                raise ExpertFailure(f"coins: fan-in got a malformed count {a!r}")
            told[self.parse(q).asked] = int(a)
        if set(told) != set(story.people):
            raise ExpertFailure(f"coins: fan-in needs one count for each of {story.people}, got {sorted(told)}")
        counts = (told[story.people[0]], told[story.people[1]])
        round_1 = self._pair(story.with_(events=prefix))
        if (q1, q2) == round_1.questions:
            round_2 = self._pair(story.with_(counts=counts, events=suffix))
            if round_2.questions != round_1.questions:
                return round_2
        elif (q1, q2) != self._pair(story.with_(counts=self.parse(q1).counts, events=suffix)).questions:
            raise ExpertFailure(f"coins: fan-in got subquestions it did not ask: {q1!r}, {q2!r}")
        return Answer(str(counts[story.people.index(story.asked)]))
