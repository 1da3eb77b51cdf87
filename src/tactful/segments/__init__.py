r"""Segment rules: a small, safe expression language over what we know of one user and one request.

A rule is parsed and checked once, when a segment is written, into an immutable tree
(frozen dataclasses); ``compile`` turns that tree into nested closures that Decide calls in
process. Nothing here uses ``eval``, ``exec`` or any parser of Python text.

The tree is ``tree``; ``parser`` reads text into it and ``text`` writes it back; ``reads``
says what a rule reads and whether a sensitive segment may have it; ``evaluate`` compiles
it into a predicate over one user and one request.

Grammar
-------
::

    rule       = group
    group      = unary { "and" unary }          -- a chain of one operator:
               | unary { "or" unary }           -- mixing them needs parentheses
    unary      = "not" unary | "(" group ")" | condition
    condition  = attribute ( "==" STRING | "in" list )
               | "has" "(" ( attribute | context ) ")"
               | "channel" ( "==" STRING | "in" list )
               | "likes" "(" STRING ")" | "dislikes" "(" STRING ")"
               | "inferred" "(" STRING ")" ( cmp NUMBER | "between" NUMBER "and" NUMBER )
               | context ( "==" STRING | "in" list
                         | ( "==" | cmp ) NUMBER | "between" NUMBER "and" NUMBER )
    attribute  = ( "attr" | "stated" ) key
    context    = "ctx" key
    key        = "." NAME | "[" STRING "]"
    list       = "[" STRING { "," STRING } "]"
    cmp        = "<" | "<=" | ">" | ">="
    NAME       = [A-Za-z_][A-Za-z0-9_-]*
    STRING     = '"' ... '"'   escapes: \" \\ \n \t \r \uXXXX; no raw control characters
    NUMBER     = -?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?   finite; no nan, inf, hex or "_"

Keywords are lowercase. Blanks (space, tab, line breaks) separate tokens anywhere.

Examples::

    attr.country == "FR"
    attr.language in ["fr", "de"] and not attr.country == "FR"
    stated.persona == "runner" or likes("running")
    inferred("yoga") > 0.5 and not dislikes("yoga")
    ctx.cart_value between 10 and 100
    ctx.device == "mobile" and channel in ["web", "app"]
    has(stated.birth_year) and (ctx.items >= 3 or ctx["utm-source"] == "newsletter")

What each condition reads (``SegmentInput``)
--------------------------------------------
- ``attr.K`` the user attribute ``K`` whatever its source (STATED by the customer, or
  IMPORTED from a system of record); ``stated.K`` the same attribute only when the customer
  stated it. Attribute values are strings: ``==`` and ``in`` only.
- ``likes("t")`` / ``dislikes("t")``: the customer's explicit LIKE / DISLIKE of topic ``t``.
- ``inferred("t")``: the inferred interest in topic ``t``, squashed into [0, 1) as the model
  sees it (``features.squash`` of the decayed weight); absent without consent. Thresholds
  must lie in [0, 1]; there is no ``==`` on a measured strength.
- ``ctx.K``: the request's context. A string literal (``==``, ``in``) reads the categorical
  context, a number (``==``, ``<``, ``<=``, ``>``, ``>=``, ``between``) the numeric one.
- ``channel``: the channel Decide was asked about.
- ``has(...)``: the attribute (or context key) is there at all.

``between a and b`` includes both ends and needs ``a <= b``. ``x in [...]`` with one value
is written back as ``x == ...``. Topics and channels must be valid names (as everywhere in
tactful), so a typo such as ``likes("Running")`` is caught when the segment is written.

Semantics: two-valued, a missing value makes its comparison false
-------------------------------------------------------------------
A condition on something the user or request does not have (an unknown attribute, a
context key not sent, a topic with no inferred signal, any ``inferred`` without consent) is
**false**, never an error; ``not`` then turns it into **true**. So ``not attr.country ==
"FR"`` matches users whose country is unknown, and "known and not French" is written
``has(attr.country) and not attr.country == "FR"``. We chose this over SQL's three-valued
logic (where ``not`` of unknown stays unknown and does not match) because every rule is
then an ordinary boolean function: ``not r`` is exactly everyone ``r`` leaves out, and
``has`` says the rest. ``!=`` is deliberately absent: it would have to pick one of the two
meanings silently.

``and`` and ``or`` have no precedence over each other: ``a or b and c`` is refused and must
be written ``a or (b and c)`` or ``(a or b) and c``, since a marketer misreading precedence
would target the wrong people. ``not`` applies to the condition (or parenthesis) after it.

Limits (``RuleLimits``, from settings): the text's length in characters; the depth of the
tree (a condition is 1, each ``not``/``and``/``or`` adds a level; while reading, a condition
inside k ``not``s and parentheses is also at level k + 1, so redundant parentheses count too
and a deep text is refused before it can exhaust the stack); the number of nodes (conditions
plus operators). A rule over any of them is refused. Canonical text never nests deeper than
its tree, so whatever was accepted is accepted again from ``unparse``.

Sensitive segments (``check_sensitive``) may only read ``stated.*`` attributes, ``likes``
and ``dislikes``: what the customer told us themselves. Inferred signals are refused; so
are ``attr.*`` (the value may be IMPORTED: a system of record's fact the customer did not
give us to be targeted with), ``ctx.*`` (a page or a search sent as context is behaviour,
i.e. inference by another name) and ``channel`` (nothing about the person, but the offer's
own channel list already says where it may go, so nothing is lost by keeping the rule
strictly about what was stated).

Errors raise ``RuleError`` (a ``ValueError``) with ``position``, the 0-based character
offset in the text, and a message that ends with it: ``expected ')', found end of rule at 17``.
"""

from __future__ import annotations

from tactful.segments.evaluate import (
    IMPORTED,
    STATED,
    Predicate,
    SegmentInput,
    compile,
    squashed,
)
from tactful.segments.parser import (
    parse,
)
from tactful.segments.reads import (
    References,
    check_sensitive,
    reads_only_stated,
    referenced,
    uses_inferred,
)
from tactful.segments.text import (
    unparse,
)
from tactful.segments.tree import (
    HARD_MAX_DEPTH,
    And,
    Attribute,
    Between,
    Channel,
    CmpOp,
    Compare,
    Condition,
    Context,
    Dislikes,
    Has,
    Inferred,
    Likes,
    Not,
    Or,
    Rule,
    RuleError,
    RuleLimits,
    TextIn,
)

__all__ = [
    "HARD_MAX_DEPTH",
    "IMPORTED",
    "STATED",
    "And",
    "Attribute",
    "Between",
    "Channel",
    "CmpOp",
    "Compare",
    "Condition",
    "Context",
    "Dislikes",
    "Has",
    "Inferred",
    "Likes",
    "Not",
    "Or",
    "Predicate",
    "References",
    "Rule",
    "RuleError",
    "RuleLimits",
    "SegmentInput",
    "TextIn",
    "check_sensitive",
    "compile",
    "parse",
    "reads_only_stated",
    "referenced",
    "squashed",
    "unparse",
    "uses_inferred",
]
