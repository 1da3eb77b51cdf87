"""Reading a rule's text (``parse``): tokens, then recursive descent over the grammar of
the package doc, then the limits of the whole tree (``RuleLimits``)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from tactful.segments.tree import (
    NAME_RE,
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
    walk,
)
from tactful.validation import CHANNEL_RE, TOPIC_RE

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
            m = NAME_RE.match(text, i)
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
    for count, (node, depth) in enumerate(walk(rule), start=1):
        if depth > limits.max_depth:
            raise RuleError(f"rule is nested deeper than {limits.max_depth}", node.pos)
        if count > limits.max_nodes:
            raise RuleError(
                f"rule has more than {limits.max_nodes} conditions and operators", node.pos
            )
