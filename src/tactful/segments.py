r"""Segment rules: a small, safe expression language over what we know of one user and one request.

A rule is parsed and checked once, when a segment is written, into an immutable tree
(frozen dataclasses); ``compile`` turns that tree into nested closures that Decide calls in
process. Nothing here uses ``eval``, ``exec`` or any parser of Python text.

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
and ``dislikes``: what the customer told us themselves. Inferred signals are refused (issue
8); so are ``attr.*`` (the value may be IMPORTED: a system of record's fact the customer did
not give us to be targeted with), ``ctx.*`` (a page or a search sent as context is behaviour,
i.e. inference by another name) and ``channel`` (nothing about the person, but the offer's
own channel list already says where it may go, so nothing is lost by keeping the rule
strictly about what was stated).

Errors raise ``RuleError`` (a ``ValueError``) with ``position``, the 0-based character
offset in the text, and a message that ends with it: ``expected ')', found end of rule at 17``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from tactful.features import squash
from tactful.validation import CHANNEL_RE, TOPIC_RE

STATED = "STATED"
IMPORTED = "IMPORTED"
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
    max_depth: int = 10  # levels of the tree (see the module doc)
    max_nodes: int = 100  # conditions plus not/and/or

    def __post_init__(self) -> None:
        if self.max_length < 1 or self.max_nodes < 1:
            raise ValueError("rule limits: max_length and max_nodes must be at least 1")
        if not 1 <= self.max_depth <= HARD_MAX_DEPTH:
            raise ValueError(f"rule limits: max_depth must be between 1 and {HARD_MAX_DEPTH}")


# --- the tree ------------------------------------------------------------------------------
# Every node has ``pos`` (where it starts in the text) left out of equality, so a rule and
# its canonical text parse to equal trees.


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
    pos: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Compare:
    subject: Context | Inferred
    op: CmpOp
    value: float
    pos: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Between:
    subject: Context | Inferred
    low: float
    high: float
    pos: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Has:
    subject: Attribute | Context
    pos: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Likes:
    topic: str
    pos: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Dislikes:
    topic: str
    pos: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Not:
    operand: Rule
    pos: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Rule, ...]  # at least two
    pos: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Rule, ...]  # at least two
    pos: int = field(default=0, compare=False, repr=False)


Condition = TextIn | Compare | Between | Has | Likes | Dislikes
Rule = Condition | Not | And | Or


# --- reading text --------------------------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_NUMBER_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_BLANKS = frozenset(" \t\r\n")
_PUNCT = ("==", "<=", ">=", "!=", "<", ">", "(", ")", "[", "]", ",", ".")
_WRONG_PUNCT = {
    "&&": "write 'and', not '&&'",
    "||": "write 'or', not '||'",
    "=": "compare with '==', not '='",
    "!": "write 'not', not '!'",
    "'": 'strings are written in double quotes: "like this"',
}
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}
_KEYWORDS = frozenset(
    {"and", "or", "not", "in", "between", "attr", "stated", "ctx", "channel", "likes"}
    | {"dislikes", "inferred", "has"}
)
_CONDITION_HINT = (
    "a condition starts with attr., stated., ctx., channel, likes(, dislikes(, inferred( or has("
)

TokenKind = Literal["word", "string", "number", "punct", "end"]


@dataclass(frozen=True, slots=True)
class _Token:
    kind: TokenKind
    text: str  # the word, the punctuation, the decoded string, or the number as written
    pos: int
    number: float = 0.0

    def describe(self) -> str:
        if self.kind == "end":
            return "end of rule"
        if self.kind == "string":
            return "a string"
        return f"'{self.text}'"


def _tokens(text: str) -> Iterator[_Token]:
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _BLANKS:
            i += 1
        elif c == '"':
            value, end = _string(text, i)
            yield _Token("string", value, i)
            i = end
        elif c.isascii() and (c.isalpha() or c == "_"):
            m = _NAME_RE.match(text, i)
            assert m is not None
            yield _Token("word", m.group(), i)
            i = m.end()
        elif c.isascii() and (c.isdigit() or (c == "-" and text[i + 1 : i + 2].isdigit())):
            m = _NUMBER_RE.match(text, i)
            if m is None or (m.end() < n and (text[m.end()].isalnum() or text[m.end()] in "._")):
                raise RuleError("malformed number", i)
            number = float(m.group())
            if not math.isfinite(number):
                raise RuleError("number out of range", i)
            yield _Token("number", m.group(), i, number)
            i = m.end()
        else:
            for wrong, hint in _WRONG_PUNCT.items():
                if text.startswith(wrong, i) and not text.startswith(wrong + "=", i):
                    raise RuleError(hint, i)
            for punct in _PUNCT:
                if text.startswith(punct, i):
                    yield _Token("punct", punct, i)
                    i += len(punct)
                    break
            else:
                raise RuleError(f"unexpected character {c!r}", i)
    yield _Token("end", "", n)


def _string(text: str, start: int) -> tuple[str, int]:
    """The string literal opening at ``start``: its value and the offset after it."""
    out: list[str] = []
    i, n = start + 1, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            e = text[i + 1 : i + 2]
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                i += 2
            elif e == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", text[i + 2 : i + 6]):
                code = int(text[i + 2 : i + 6], 16)
                if 0xD800 <= code <= 0xDFFF:
                    raise RuleError("\\u escape of a surrogate is not a character", i)
                out.append(chr(code))
                i += 6
            else:
                raise RuleError(r"bad escape in string (use \" \\ \n \t \r or \uXXXX)", i)
        elif c < " " or c == "\x7f":
            raise RuleError(r"control character in string (write it as \n, \t or \uXXXX)", i)
        else:
            out.append(c)
            i += 1
    raise RuleError("unterminated string", start)


def parse(text: str, limits: RuleLimits) -> Rule:
    """The tree of ``text``, or RuleError naming the position of the first problem."""
    if len(text) > limits.max_length:
        raise RuleError(f"rule is longer than {limits.max_length} characters", limits.max_length)
    parser = _Parser(_tokens(text), limits)
    first = parser.peek
    if first.kind == "end":
        raise RuleError("the rule is empty", first.pos)
    rule = parser.group(1)  # the level of a lone condition
    rest = parser.peek
    if rest.kind != "end":
        raise RuleError(f"unexpected {rest.describe()} after a complete rule", rest.pos)
    _check_size(rule, limits)
    return rule


class _Parser:
    """Recursive descent, one method per rule of the grammar. Tokens are read as needed, so
    the first problem in the text is the one reported."""

    def __init__(self, tokens: Iterator[_Token], limits: RuleLimits) -> None:
        self._source = tokens
        self._tokens: list[_Token] = []
        self._i = 0
        self._limits = limits

    def _at(self, i: int) -> _Token:
        while len(self._tokens) <= i:
            if self._tokens and self._tokens[-1].kind == "end":
                return self._tokens[-1]
            self._tokens.append(next(self._source))
        return self._tokens[i]

    @property
    def peek(self) -> _Token:
        return self._at(self._i)

    def _next(self) -> _Token:
        token = self._at(self._i)
        if token.kind != "end":
            self._i += 1
        return token

    def _is(self, kind: TokenKind, text: str) -> bool:
        token = self._at(self._i)
        return token.kind == kind and token.text == text

    def _expect(self, kind: TokenKind, text: str) -> _Token:
        if not self._is(kind, text):
            raise RuleError(f"expected '{text}', found {self.peek.describe()}", self.peek.pos)
        return self._next()

    def _deeper(self, nesting: int, token: _Token) -> int:
        if nesting + 1 > self._limits.max_depth:
            raise RuleError(f"rule is nested deeper than {self._limits.max_depth}", token.pos)
        return nesting + 1

    def group(self, nesting: int) -> Rule:
        first = self.unary(nesting)
        token = self.peek
        if token.kind != "word" or token.text not in ("and", "or"):
            return first
        op = token.text
        operands = [first]
        while self._is("word", op):
            self._next()
            operands.append(self.unary(nesting))
        if self._is("word", "and") or self._is("word", "or"):
            raise RuleError(
                f"'{self.peek.text}' after '{op}' needs parentheses, "
                "e.g. (a and b) or c, or a and (b or c)",
                self.peek.pos,
            )
        return (And if op == "and" else Or)(tuple(operands), first.pos)

    def unary(self, nesting: int) -> Rule:
        token = self.peek
        if self._is("word", "not"):
            deeper = self._deeper(nesting, token)
            self._next()
            return Not(self.unary(deeper), token.pos)
        if self._is("punct", "("):
            deeper = self._deeper(nesting, token)
            self._next()
            inner = self.group(deeper)
            self._expect("punct", ")")
            return inner
        return self.condition()

    def condition(self) -> Condition:
        token = self._next()
        word = token.text if token.kind == "word" else ""
        pos = token.pos
        if word in ("attr", "stated"):
            return self._text_test(Attribute(self._key(word), word == "stated"), pos)
        if word == "ctx":
            return self._context_test(Context(self._key(word)), pos)
        if word == "channel":
            return self._text_test(Channel(), pos)
        if word in ("likes", "dislikes"):
            topic = self._topic_argument()
            return Likes(topic, pos) if word == "likes" else Dislikes(topic, pos)
        if word == "inferred":
            return self._number_test(Inferred(self._topic_argument()), pos)
        if word == "has":
            self._expect("punct", "(")
            inner = self._next()
            if inner.kind == "word" and inner.text in ("attr", "stated"):
                subject: Attribute | Context = Attribute(
                    self._key(inner.text), inner.text == "stated"
                )
            elif inner.kind == "word" and inner.text == "ctx":
                subject = Context(self._key("ctx"))
            else:
                raise RuleError(
                    f"has( takes attr.K, stated.K or ctx.K, found {inner.describe()}", inner.pos
                )
            self._expect("punct", ")")
            return Has(subject, pos)
        if token.kind == "word" and token.text.lower() in _KEYWORDS:
            raise RuleError(f"keywords are lowercase: write '{token.text.lower()}'", pos)
        raise RuleError(f"expected a condition, found {token.describe()} ({_CONDITION_HINT})", pos)

    def _key(self, what: str) -> str:
        if self._is("punct", "."):
            self._next()
            token = self._next()
            if token.kind != "word":
                raise RuleError(
                    f"expected a name after '{what}.', found {token.describe()}", token.pos
                )
            return token.text
        if self._is("punct", "["):
            self._next()
            token = self._next()
            if token.kind != "string":
                raise RuleError(
                    f"expected a string after '{what}[', found {token.describe()}", token.pos
                )
            if not token.text:
                raise RuleError("a name must not be empty", token.pos)
            self._expect("punct", "]")
            return token.text
        raise RuleError(
            f"expected '.' or '[' after '{what}', found {self.peek.describe()}", self.peek.pos
        )

    def _topic_argument(self) -> str:
        self._expect("punct", "(")
        token = self._next()
        if token.kind != "string":
            raise RuleError(
                f"expected a topic in double quotes, found {token.describe()}", token.pos
            )
        if not TOPIC_RE.fullmatch(token.text):
            raise RuleError(
                f"{token.text[:40]!r} is not a valid topic (a-z, 0-9, '_', '-', <= 64)", token.pos
            )
        self._expect("punct", ")")
        return token.text

    def _string(self, subject: Attribute | Context | Channel) -> str:
        token = self._next()
        if token.kind != "string":
            raise RuleError(
                f"expected a string in double quotes, found {token.describe()}", token.pos
            )
        if isinstance(subject, Channel) and not CHANNEL_RE.fullmatch(token.text):
            raise RuleError(f"{token.text[:40]!r} is not a valid channel", token.pos)
        return token.text

    def _number(self) -> _Token:
        token = self._next()
        if token.kind != "number":
            raise RuleError(f"expected a number, found {token.describe()}", token.pos)
        return token

    def _text_test(self, subject: Attribute | Context | Channel, pos: int) -> TextIn:
        if self._is("punct", "=="):
            self._next()
            return TextIn(subject, (self._string(subject),), pos)
        if self._is("word", "in"):
            self._next()
            return TextIn(subject, self._list(subject), pos)
        self._no_inequality()
        raise RuleError(f"expected '==' or 'in', found {self.peek.describe()}", self.peek.pos)

    def _list(self, subject: Attribute | Context | Channel) -> tuple[str, ...]:
        self._expect("punct", "[")
        if self._is("punct", "]"):
            raise RuleError("the list is empty", self.peek.pos)
        values = [self._string(subject)]
        while self._is("punct", ","):
            self._next()
            values.append(self._string(subject))
        self._expect("punct", "]")
        return tuple(values)

    def _no_inequality(self) -> None:
        if self._is("punct", "!="):
            raise RuleError("'!=' is not supported: write not (x == \"v\")", self.peek.pos)

    def _context_test(self, subject: Context, pos: int) -> Condition:
        if self._is("punct", "==") and self._at(self._i + 1).kind == "number":
            self._next()
            return Compare(subject, "==", self._number().number, pos)
        if self.peek.kind == "punct" and self.peek.text in ("<", "<=", ">", ">="):
            return self._number_test(subject, pos)
        if self._is("word", "between"):
            return self._number_test(subject, pos)
        if self._is("punct", "==") or self._is("word", "in"):
            return self._text_test(subject, pos)
        self._no_inequality()
        raise RuleError(
            f"expected '==', 'in', '<', '<=', '>', '>=' or 'between', found {self.peek.describe()}",
            self.peek.pos,
        )

    def _number_test(self, subject: Context | Inferred, pos: int) -> Compare | Between:
        token = self.peek
        if self._is("word", "between"):
            self._next()
            low = self._number()
            self._expect("word", "and")
            high = self._number()
            if low.number > high.number:
                raise RuleError(f"empty range: {low.text} is above {high.text}", low.pos)
            self._check_strength(subject, low)
            self._check_strength(subject, high)
            return Between(subject, low.number, high.number, pos)
        if token.kind == "punct" and token.text in ("<", "<=", ">", ">="):
            self._next()
            value = self._number()
            self._check_strength(subject, value)
            op: CmpOp = token.text  # type: ignore[assignment]
            return Compare(subject, op, value.number, pos)
        if self._is("punct", "=="):
            raise RuleError(
                "inferred() takes '<', '<=', '>', '>=' or 'between', not '=='", token.pos
            )
        self._no_inequality()
        raise RuleError(
            f"expected '<', '<=', '>', '>=' or 'between', found {token.describe()}", token.pos
        )

    @staticmethod
    def _check_strength(subject: Context | Inferred, token: _Token) -> None:
        if isinstance(subject, Inferred) and not 0.0 <= token.number <= 1.0:
            raise RuleError("inferred strengths lie between 0 and 1", token.pos)


def _check_size(rule: Rule, limits: RuleLimits) -> None:
    for count, (node, depth) in enumerate(_walk(rule, 1), start=1):
        if depth > limits.max_depth:
            raise RuleError(f"rule is nested deeper than {limits.max_depth}", node.pos)
        if count > limits.max_nodes:
            raise RuleError(
                f"rule has more than {limits.max_nodes} conditions and operators", node.pos
            )


def _walk(rule: Rule, depth: int) -> Iterator[tuple[Rule, int]]:
    """Every node with its level (the root is 1), in the order of the text."""
    yield rule, depth
    if isinstance(rule, Not):
        yield from _walk(rule.operand, depth + 1)
    elif isinstance(rule, And | Or):
        for operand in rule.operands:
            yield from _walk(operand, depth + 1)


# --- writing text --------------------------------------------------------------------------


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
    if _NAME_RE.fullmatch(subject.name):
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


# --- what a rule reads ---------------------------------------------------------------------


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


def _conditions(rule: Rule) -> Iterator[Condition]:
    for node, _ in _walk(rule, 1):
        if not isinstance(node, Not | And | Or):
            yield node


def referenced(rule: Rule) -> References:
    sets: dict[str, set[str]] = {name: set() for name in References.__slots__ if name != "channel"}
    channel = False
    for cond in _conditions(rule):
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
        for c in _conditions(rule)
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
    return all(_not_stated(c) is None for c in _conditions(rule))


def check_sensitive(rule: Rule) -> None:
    """Refuse, at the first offending condition, a rule a sensitive segment may not have."""
    for cond in _conditions(rule):
        why = _not_stated(cond)
        if why is not None:
            raise RuleError(
                f"a sensitive segment may only use stated.* attributes, likes() and dislikes(): "
                f"{why}",
                cond.pos,
            )


# --- evaluation ----------------------------------------------------------------------------


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
    """``SegmentInput.inferred`` from the decayed weight per topic (``Decider._decayed``): the
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
