"""Evaluating a rule: what it reads about one user and one request (``SegmentInput``), and
the predicate ``compile`` builds from its tree, once, out of closures (no eval, no exec)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tactful.features import squash
from tactful.segments.tree import (
    And,
    Attribute,
    Between,
    Channel,
    CmpOp,
    Compare,
    Context,
    Has,
    Inferred,
    Likes,
    Not,
    Or,
    Rule,
    TextIn,
)

STATED = "STATED"
IMPORTED = "IMPORTED"


@dataclass(frozen=True, slots=True)
class SegmentInput:
    """What a compiled rule reads about one user and one request."""

    attributes: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # (value, source)
    liked: frozenset[str] = frozenset()  # topics with an explicit LIKE
    disliked: frozenset[str] = frozenset()  # topics with an explicit DISLIKE
    inferred: Mapping[str, float] = field(default_factory=dict)  # see ``squashed``; {} w/o consent
    numeric_context: Mapping[str, float] = field(default_factory=dict)
    categorical_context: Mapping[str, str] = field(default_factory=dict)
    channel: str = ""


def squashed(decayed: Mapping[str, float]) -> dict[str, float]:
    """``SegmentInput.inferred`` from the decayed weight per topic (``Decider._inferred``): the
    strength in [0, 1) the model sees. Pass nothing (``{}``) for a user without consent."""
    return {topic: squash(weight) for topic, weight in decayed.items()}


Predicate = Callable[[SegmentInput], bool]


def compile(rule: Rule) -> Predicate:
    """A predicate equal to the rule, built once from closures (no eval, no exec)."""
    if isinstance(rule, Not):
        inner = compile(rule.operand)
        return lambda i: not inner(i)
    if isinstance(rule, And | Or):
        return _compile_chain(rule)
    if isinstance(rule, TextIn):
        return _compile_text(rule.subject, rule.values)
    if isinstance(rule, Compare):
        return _compile_compare(rule.subject, rule.op, rule.value)
    if isinstance(rule, Between):
        return _compile_between(rule.subject, rule.low, rule.high)
    if isinstance(rule, Has):
        return _compile_has(rule.subject)
    topic = rule.topic
    if isinstance(rule, Likes):
        return lambda i: topic in i.liked
    return lambda i: topic in i.disliked


def _compile_chain(rule: And | Or) -> Predicate:
    parts = tuple(compile(operand) for operand in rule.operands)
    if len(parts) == 2:
        a, b = parts
        if isinstance(rule, And):
            return lambda i: a(i) and b(i)
        return lambda i: a(i) or b(i)
    if isinstance(rule, And):

        def every(i: SegmentInput) -> bool:
            return all(part(i) for part in parts)

        return every

    def some(i: SegmentInput) -> bool:
        return any(part(i) for part in parts)

    return some


def _compile_text(subject: Attribute | Context | Channel, values: tuple[str, ...]) -> Predicate:
    if isinstance(subject, Channel):
        if len(values) == 1:
            value = values[0]
            return lambda i: i.channel == value
        choices = frozenset(values)
        return lambda i: i.channel in choices
    name = subject.name
    if isinstance(subject, Context):
        # A missing key gives None, which equals no string and is in no set of strings.
        if len(values) == 1:
            value = values[0]
            return lambda i: i.categorical_context.get(name) == value
        choices = frozenset(values)
        return lambda i: i.categorical_context.get(name) in choices
    choices = frozenset(values)
    if subject.stated_only:

        def stated_in(i: SegmentInput) -> bool:
            found = i.attributes.get(name)
            return found is not None and found[1] == STATED and found[0] in choices

        return stated_in

    def any_in(i: SegmentInput) -> bool:
        found = i.attributes.get(name)
        return found is not None and found[0] in choices

    return any_in


def _number_reader(subject: Context | Inferred) -> Callable[[SegmentInput], float | None]:
    if isinstance(subject, Inferred):
        topic = subject.topic
        return lambda i: i.inferred.get(topic)
    name = subject.name
    return lambda i: i.numeric_context.get(name)


_OPERATORS: dict[CmpOp, Callable[[float, float], bool]] = {
    "==": operator.eq,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _compile_compare(subject: Context | Inferred, op: CmpOp, value: float) -> Predicate:
    read = _number_reader(subject)
    test = _OPERATORS[op]

    def check(i: SegmentInput) -> bool:
        x = read(i)
        return x is not None and test(x, value)

    return check


def _compile_between(subject: Context | Inferred, low: float, high: float) -> Predicate:
    read = _number_reader(subject)

    def check(i: SegmentInput) -> bool:
        x = read(i)
        return x is not None and low <= x <= high

    return check


def _compile_has(subject: Attribute | Context) -> Predicate:
    name = subject.name
    if isinstance(subject, Context):
        return lambda i: name in i.numeric_context or name in i.categorical_context
    if subject.stated_only:

        def has_stated(i: SegmentInput) -> bool:
            found = i.attributes.get(name)
            return found is not None and found[1] == STATED

        return has_stated
    return lambda i: name in i.attributes
