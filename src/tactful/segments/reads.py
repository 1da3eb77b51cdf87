"""What a rule reads (``referenced``, ``uses_inferred``), and whether a sensitive segment
may have it (``check_sensitive``)."""

from __future__ import annotations

from dataclasses import dataclass

from tactful.segments.text import _subject
from tactful.segments.tree import (
    Attribute,
    Between,
    Channel,
    Compare,
    Condition,
    Context,
    Dislikes,
    Has,
    Inferred,
    Likes,
    Rule,
    RuleError,
    TextIn,
    conditions,
)


@dataclass(frozen=True, slots=True)
class References:
    """Everything a rule reads, for documentation and reporting."""

    attributes: frozenset[str]  # attr.K: any source
    stated_attributes: frozenset[str]  # stated.K
    liked_topics: frozenset[str]
    disliked_topics: frozenset[str]
    inferred_topics: frozenset[str]
    numeric_context: frozenset[str]  # ctx.K compared with numbers
    categorical_context: frozenset[str]  # ctx.K compared with strings
    context_present: frozenset[str]  # has(ctx.K): either kind
    channel: bool


def referenced(rule: Rule) -> References:
    sets: dict[str, set[str]] = {name: set() for name in References.__slots__ if name != "channel"}
    channel = False
    for cond in conditions(rule):
        if isinstance(cond, Likes):
            sets["liked_topics"].add(cond.topic)
        elif isinstance(cond, Dislikes):
            sets["disliked_topics"].add(cond.topic)
        else:
            subject = cond.subject
            if isinstance(subject, Channel):
                channel = True
            elif isinstance(subject, Inferred):
                sets["inferred_topics"].add(subject.topic)
            elif isinstance(subject, Attribute):
                kind = "stated_attributes" if subject.stated_only else "attributes"
                sets[kind].add(subject.name)
            elif isinstance(cond, Has):
                sets["context_present"].add(subject.name)
            elif isinstance(cond, TextIn):
                sets["categorical_context"].add(subject.name)
            else:
                sets["numeric_context"].add(subject.name)
    return References(**{k: frozenset(v) for k, v in sets.items()}, channel=channel)


def uses_inferred(rule: Rule) -> bool:
    """True if the rule reads an inferred signal anywhere."""
    return any(
        isinstance(c, Compare | Between) and isinstance(c.subject, Inferred)
        for c in conditions(rule)
    )


def _not_stated(cond: Condition) -> str | None:
    """Why a sensitive segment may not use ``cond``, or None if it may."""
    if isinstance(cond, Likes | Dislikes):
        return None
    subject = cond.subject
    if isinstance(subject, Attribute):
        if subject.stated_only:
            return None
        stated = _subject(Attribute(subject.name, stated_only=True))
        return f"{_subject(subject)} may be an IMPORTED attribute (write {stated})"
    if isinstance(subject, Inferred):
        return f"{_subject(subject)} reads inferred signals"
    if isinstance(subject, Context):
        return f"{_subject(subject)} reads the request's context"
    return "channel is not something the customer stated"


def reads_only_stated(rule: Rule) -> bool:
    """True if the rule reads only stated.* attributes, likes() and dislikes()."""
    return all(_not_stated(c) is None for c in conditions(rule))


def check_sensitive(rule: Rule) -> None:
    """Refuse, at the first offending condition, a rule a sensitive segment may not have."""
    for cond in conditions(rule):
        why = _not_stated(cond)
        if why is not None:
            raise RuleError(
                f"a sensitive segment may only use stated.* attributes, likes() and dislikes(): "
                f"{why}",
                cond.pos,
            )
