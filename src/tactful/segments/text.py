"""Writing a rule's canonical text (``unparse``)."""

from __future__ import annotations

from tactful.segments.tree import (
    NAME_RE,
    And,
    Attribute,
    Between,
    Channel,
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


def unparse(rule: Rule) -> str:
    """The canonical text of ``rule``: ``parse(unparse(r)) == r``. One blank between tokens,
    parentheses around every ``and``/``or`` inside another operator, integers without
    ``.0``, names dotted when they can be."""
    if isinstance(rule, Not):
        return f"not {_operand(rule.operand)}"
    if isinstance(rule, And | Or):
        joiner = " and " if isinstance(rule, And) else " or "
        return joiner.join(_operand(operand) for operand in rule.operands)
    if isinstance(rule, TextIn):
        subject = _subject(rule.subject)
        if len(rule.values) == 1:
            return f"{subject} == {_quote(rule.values[0])}"
        return f"{subject} in [{', '.join(map(_quote, rule.values))}]"
    if isinstance(rule, Compare):
        return f"{_subject(rule.subject)} {rule.op} {_number(rule.value)}"
    if isinstance(rule, Between):
        low, high = _number(rule.low), _number(rule.high)
        return f"{_subject(rule.subject)} between {low} and {high}"
    if isinstance(rule, Has):
        return f"has({_subject(rule.subject)})"
    if isinstance(rule, Likes):
        return f"likes({_quote(rule.topic)})"
    return f"dislikes({_quote(rule.topic)})"


def _operand(rule: Rule) -> str:
    return f"({unparse(rule)})" if isinstance(rule, And | Or) else unparse(rule)


def _subject(subject: Attribute | Context | Channel | Inferred) -> str:
    if isinstance(subject, Channel):
        return "channel"
    if isinstance(subject, Inferred):
        return f"inferred({_quote(subject.topic)})"
    prefix = "ctx" if isinstance(subject, Context) else "stated" if subject.stated_only else "attr"
    if NAME_RE.fullmatch(subject.name):
        return f"{prefix}.{subject.name}"
    return f"{prefix}[{_quote(subject.name)}]"


def _quote(value: str) -> str:
    out = ['"']
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif c < " " or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def _number(value: float) -> str:
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
