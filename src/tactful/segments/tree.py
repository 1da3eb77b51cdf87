"""The tree a rule is read into: immutable nodes (frozen dataclasses), the limits a rule must
keep to, the error a rule that cannot be accepted raises, and walks over the nodes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

HARD_MAX_DEPTH = 100  # the parser, compiler and evaluator recurse once per level

CmpOp = Literal["==", "<", "<=", ">", ">="]


class RuleError(ValueError):
    """A rule that cannot be accepted; ``position`` is a 0-based offset in the text (0 for
    a tree built by hand, whose nodes carry no position)."""

    def __init__(self, message: str, position: int) -> None:
        self.message = message
        self.position = position
        super().__init__(f"{message} at {position}")


@dataclass(frozen=True, slots=True)
class RuleLimits:
    max_length: int = 2000  # characters of text
    max_depth: int = 10  # levels of the tree (see the package doc)
    max_nodes: int = 100  # conditions plus not/and/or

    def __post_init__(self) -> None:
        if self.max_length < 1 or self.max_nodes < 1:
            raise ValueError("rule limits: max_length and max_nodes must be at least 1")
        if not 1 <= self.max_depth <= HARD_MAX_DEPTH:
            raise ValueError(f"rule limits: max_depth must be between 1 and {HARD_MAX_DEPTH}")


#: A name that ``attr.K``, ``stated.K`` and ``ctx.K`` can write dotted (others take ``["K"]``).
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _position() -> Any:
    """The ``pos`` field of a node: where it starts in the text (0 for a tree built by hand),
    left out of equality so that a rule and its canonical text parse to equal trees."""
    return field(default=0, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Attribute:
    name: str
    stated_only: bool  # stated.K rather than attr.K


@dataclass(frozen=True, slots=True)
class Context:
    name: str


@dataclass(frozen=True, slots=True)
class Channel:
    pass


@dataclass(frozen=True, slots=True)
class Inferred:
    topic: str


@dataclass(frozen=True, slots=True)
class TextIn:
    """``subject == "v"`` (one value) or ``subject in ["v", ...]``."""

    subject: Attribute | Context | Channel
    values: tuple[str, ...]
    pos: int = _position()


@dataclass(frozen=True, slots=True)
class Compare:
    subject: Context | Inferred
    op: CmpOp
    value: float
    pos: int = _position()


@dataclass(frozen=True, slots=True)
class Between:
    subject: Context | Inferred
    low: float
    high: float
    pos: int = _position()


@dataclass(frozen=True, slots=True)
class Has:
    subject: Attribute | Context
    pos: int = _position()


@dataclass(frozen=True, slots=True)
class Likes:
    topic: str
    pos: int = _position()


@dataclass(frozen=True, slots=True)
class Dislikes:
    topic: str
    pos: int = _position()


@dataclass(frozen=True, slots=True)
class Not:
    operand: Rule
    pos: int = _position()


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Rule, ...]  # at least two
    pos: int = _position()


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Rule, ...]  # at least two
    pos: int = _position()


Condition = TextIn | Compare | Between | Has | Likes | Dislikes
Rule = Condition | Not | And | Or


def walk(rule: Rule, depth: int = 1) -> Iterator[tuple[Rule, int]]:
    """Every node with its level (the root is 1), in the order of the text."""
    yield rule, depth
    if isinstance(rule, Not):
        yield from walk(rule.operand, depth + 1)
    elif isinstance(rule, And | Or):
        for operand in rule.operands:
            yield from walk(operand, depth + 1)


def conditions(rule: Rule) -> Iterator[Condition]:
    """Every condition of the rule, in the order of the text."""
    for node, _ in walk(rule):
        if not isinstance(node, Not | And | Or):
            yield node
