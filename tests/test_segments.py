"""The segment rule language (src/tactful/segments/): parsing, errors with positions, limits,
canonical text, evaluation, the sensitive guard. Pure Python: no Redis, no gRPC."""

from __future__ import annotations

from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tactful import segments
from tactful.segments import (
    IMPORTED,
    STATED,
    And,
    Attribute,
    Between,
    Channel,
    Compare,
    Context,
    Dislikes,
    Has,
    Inferred,
    Likes,
    Not,
    Or,
    References,
    Rule,
    RuleError,
    RuleLimits,
    SegmentInput,
    TextIn,
    check_sensitive,
    parse,
    reads_only_stated,
    referenced,
    unparse,
    uses_inferred,
)
from tactful.validation import CHANNEL_RE, TOPIC_RE

V = TypeVar("V")
LIMITS = RuleLimits(max_length=500, max_depth=6, max_nodes=30)
# Generated trees stay within depth 6 (at most 3 operands each: 364 nodes) and any length.
TREE_LIMITS = RuleLimits(max_length=1_000_000, max_depth=6, max_nodes=400)

COUNTRY = Attribute("country", stated_only=False)
PERSONA = Attribute("persona", stated_only=True)


def p(text: str) -> Rule:
    return parse(text, LIMITS)


# --- parsing every construct ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ('attr.country == "FR"', TextIn(COUNTRY, ("FR",))),
        ('attr.country in ["FR", "DE"]', TextIn(COUNTRY, ("FR", "DE"))),
        ('attr.country in ["FR"]', TextIn(COUNTRY, ("FR",))),
        ('stated.persona == "runner"', TextIn(PERSONA, ("runner",))),
        (
            'attr["favourite colour"] == "blue"',
            TextIn(Attribute("favourite colour", False), ("blue",)),
        ),
        ('stated["x.y"] in ["a","b"]', TextIn(Attribute("x.y", True), ("a", "b"))),
        ('attr.not == "x"', TextIn(Attribute("not", False), ("x",))),
        ('channel == "email"', TextIn(Channel(), ("email",))),
        ('channel in ["web", "app"]', TextIn(Channel(), ("web", "app"))),
        ('likes("running")', Likes("running")),
        ('dislikes("fast-food")', Dislikes("fast-food")),
        ('inferred("yoga") > 0.5', Compare(Inferred("yoga"), ">", 0.5)),
        ('inferred("yoga") >= 0', Compare(Inferred("yoga"), ">=", 0.0)),
        ('inferred("yoga") < 1', Compare(Inferred("yoga"), "<", 1.0)),
        ('inferred("yoga") <= 0.5e0', Compare(Inferred("yoga"), "<=", 0.5)),
        ('inferred("yoga") between 0.2 and 0.8', Between(Inferred("yoga"), 0.2, 0.8)),
        ("ctx.cart_value between 10 and 100", Between(Context("cart_value"), 10.0, 100.0)),
        ("ctx.cart_value between -1.5 and -1.5", Between(Context("cart_value"), -1.5, -1.5)),
        ("ctx.cart_value >= 10", Compare(Context("cart_value"), ">=", 10.0)),
        ("ctx.items == 3", Compare(Context("items"), "==", 3.0)),
        ("ctx.t<-2.5E+3", Compare(Context("t"), "<", -2500.0)),
        ('ctx.device == "mobile"', TextIn(Context("device"), ("mobile",))),
        ('ctx["utm-source"] in ["a", "b"]', TextIn(Context("utm-source"), ("a", "b"))),
        ('ctx.utm-source == "a"', TextIn(Context("utm-source"), ("a",))),
        ("has(attr.country)", Has(COUNTRY)),
        ("has(stated.persona)", Has(PERSONA)),
        ('has( ctx["k"] )', Has(Context("k"))),
        ('not likes("a")', Not(Likes("a"))),
        ('not not likes("a")', Not(Not(Likes("a")))),
        ('likes("a") and likes("b")', And((Likes("a"), Likes("b")))),
        ('likes("a") and likes("b") and likes("c")', And((Likes("a"), Likes("b"), Likes("c")))),
        ('likes("a") or likes("b") or likes("c")', Or((Likes("a"), Likes("b"), Likes("c")))),
        ('not likes("a") and likes("b")', And((Not(Likes("a")), Likes("b")))),
        ('not (likes("a") and likes("b"))', Not(And((Likes("a"), Likes("b"))))),
        (
            'likes("a") or (likes("b") and likes("c"))',
            Or((Likes("a"), And((Likes("b"), Likes("c"))))),
        ),
        (
            '(likes("a") or likes("b")) and likes("c")',
            And((Or((Likes("a"), Likes("b"))), Likes("c"))),
        ),
        (
            'likes("a") and (likes("b") and likes("c"))',
            And((Likes("a"), And((Likes("b"), Likes("c"))))),
        ),
        ('((likes("a")))', Likes("a")),
        ('\n\tlikes("a")\r\n and\tlikes("b")  ', And((Likes("a"), Likes("b")))),
        (
            r'attr.x == "q\"b\\s\n\t\r\u00e9\u0001"',
            TextIn(Attribute("x", False), ('q"b\\s\n\t\ré\x01',)),
        ),
        ('attr.x == "élan 🏃"', TextIn(Attribute("x", False), ("élan 🏃",))),
        ('attr.x == ""', TextIn(Attribute("x", False), ("",))),
    ],
)
def test_parses(text: str, tree: Rule) -> None:
    assert p(text) == tree
    assert p(unparse(tree)) == tree


def test_between_binds_its_own_and() -> None:
    assert p('ctx.v between 1 and 2 and likes("a")') == And(
        (Between(Context("v"), 1.0, 2.0), Likes("a"))
    )


def test_positions_are_kept_but_not_compared() -> None:
    rule = p('  likes("a") and not attr.x == "b"')
    assert isinstance(rule, And)
    assert (rule.pos, rule.operands[0].pos, rule.operands[1].pos) == (2, 2, 17)
    inner = rule.operands[1]
    assert isinstance(inner, Not)
    assert inner.operand.pos == 21
    assert rule == And((Likes("a"), Not(TextIn(Attribute("x", False), ("b",)))))


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ('attr.country in ["FR"]', 'attr.country == "FR"'),
        ('attr["country"]=="FR"', 'attr.country == "FR"'),
        ('attr["a b"] == "x"', 'attr["a b"] == "x"'),
        ('attr["1x"] == "x"', 'attr["1x"] == "x"'),
        ("ctx.v >= 10.0", "ctx.v >= 10"),
        ("ctx.v >= 1e2", "ctx.v >= 100"),
        ("ctx.v >= -0.0", "ctx.v >= 0"),
        ("ctx.v >= 1e20", "ctx.v >= 1e+20"),
        ("ctx.v >= 0.000001", "ctx.v >= 1e-06"),
        ('((likes("a")) and (not (likes("b"))))', 'likes("a") and not likes("b")'),
        ('likes("a") or (likes("b") and likes("c"))', 'likes("a") or (likes("b") and likes("c"))'),
        (r'attr.x == "\u0041\u007f\u2028"', 'attr.x == "A\\u007f\u2028"'),
    ],
)
def test_canonical_text(text: str, canonical: str) -> None:
    assert unparse(p(text)) == canonical
    assert unparse(p(canonical)) == canonical


# --- errors name the position --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ("", 0, "empty"),
        ("   ", 3, "empty"),
        ('(attr.x == "a"', 14, "expected ')', found end of rule"),
        ('(likes("a") and likes("b"', 25, "expected ')'"),
        ('likes("a"))', 10, "unexpected ')'"),
        ('attr.x == "a" foo', 14, "unexpected 'foo'"),
        ('attr.x == "a" likes("b")', 14, "unexpected 'likes'"),
        ('attr.x == "abc', 10, "unterminated string"),
        ('likes("a) and likes("b")', 6, "not a valid topic"),  # the string closes at likes(
        ('attr.x == "a\\q"', 12, "bad escape"),
        ('attr.x == "\\u12"', 11, "bad escape"),
        ('attr.x == "\\ud800"', 11, "surrogate"),
        ('attr.x == "a\nb"', 12, "control character"),
        ('attr.x != "a"', 7, "'!=' is not supported"),
        ('attr.x = "a"', 7, "'=='"),
        ("attr.x == 'a'", 10, "double quotes"),
        ('attr.x == "a" && likes("b")', 14, "'and'"),
        ('attr.x == "a" || likes("b")', 14, "'or'"),
        ('!likes("a")', 0, "'not'"),
        ('attr.x > "a"', 7, "expected '==' or 'in'"),
        ("attr.x == 3", 10, "expected a string"),
        ('attr.x in "a"', 10, "expected '['"),
        ("attr.x in []", 11, "empty"),
        ('attr.x in ["a",]', 15, "expected a string"),
        ('attr.x in ["a" "b"]', 15, "expected ']'"),
        ('attr == "a"', 5, "expected '.' or '['"),
        ('attr.  == "a"', 7, "expected a name"),
        ('attr[""] == "a"', 5, "must not be empty"),
        ('attr[x] == "a"', 5, "expected a string"),
        ('attr.x == "a" or attr.y == "b" and likes("c")', 31, "needs parentheses"),
        ('likes("a") and likes("b") or likes("c")', 26, "needs parentheses"),
        ('country == "FR"', 0, "expected a condition"),
        ('AND likes("a")', 0, "lowercase"),
        ('likes("a") AND likes("b")', 11, "unexpected 'AND'"),
        ("likes(running)", 6, "topic in double quotes"),
        ('likes("Running")', 6, "not a valid topic"),
        ('inferred("yoga sessions") > 0.5', 9, "not a valid topic"),
        ('likes "a"', 6, "expected '('"),
        ('channel == "E-mail"', 11, "not a valid channel"),
        ('inferred("yoga") > 1.5', 19, "between 0 and 1"),
        ('inferred("yoga") between -0.1 and 0.5', 25, "between 0 and 1"),
        ('inferred("yoga") == 0.5', 17, "not '=='"),
        ('inferred("yoga") > "high"', 19, "expected a number"),
        ('inferred("yoga")', 16, "expected '<'"),
        ("ctx.v > nan", 8, "expected a number"),
        ("ctx.v > NaN", 8, "expected a number"),
        ("ctx.v > inf", 8, "expected a number"),
        ("ctx.v > -inf", 8, "unexpected character '-'"),
        ("ctx.v > 1e999", 8, "out of range"),
        ("ctx.v > -1e400", 8, "out of range"),
        ("ctx.v > 0x10", 8, "malformed number"),
        ("ctx.v > 1.2.3", 8, "malformed number"),
        ("ctx.v > 1_000", 8, "malformed number"),
        ("ctx.v > 1.", 8, "malformed number"),
        ("ctx.v > .5", 8, "expected a number, found '.'"),
        ("ctx.v between 5 and 1", 14, "empty range"),
        ("ctx.v between 1 or 5", 16, "expected 'and'"),
        ("ctx.v", 5, "expected '=='"),
        ("has(channel)", 4, "has( takes"),
        ('has(attr.x == "a")', 11, "expected ')'"),
        ('likes("a") and', 14, "expected a condition, found end of rule"),
        ("()", 1, "expected a condition, found ')'"),
        ('likes("a") § likes("b")', 11, "unexpected character"),
    ],
)
def test_errors_name_the_position(text: str, position: int, message: str) -> None:
    with pytest.raises(RuleError) as caught:
        p(text)
    assert caught.value.position == position, caught.value
    assert message in caught.value.message
    assert str(caught.value).endswith(f" at {position}")
    assert isinstance(caught.value, ValueError)


def test_first_problem_is_reported() -> None:
    # Tokens are read as the parser goes: a bad character later does not hide an early error.
    with pytest.raises(RuleError) as caught:
        p('attr.x ! = "a" § ')
    assert caught.value.position == 7


# --- limits --------------------------------------------------------------------------------


def test_too_long() -> None:
    text = " or ".join(f'likes("t{i}")' for i in range(100))
    assert len(text) > LIMITS.max_length
    with pytest.raises(RuleError, match=r"longer than 500 characters at 500"):
        p(text)
    assert p('likes("a")' + " " * (500 - 10)) == Likes("a")  # exactly the limit


def test_too_many_nodes() -> None:
    at_limit = " or ".join(f'likes("t{i}")' for i in range(29))  # 29 conditions + 1 "or"
    assert len(p(at_limit).operands) == 29  # type: ignore[union-attr]
    over = " or ".join(f'likes("t{i}")' for i in range(30))
    with pytest.raises(RuleError, match="more than 30 conditions and operators") as caught:
        p(over)
    assert caught.value.position == over.index('likes("t29")')  # the 31st node: "or" is 1st


@pytest.mark.parametrize(
    "text",
    [
        "not " * 6 + 'likes("a")',  # 7 levels
        "(" * 6 + 'likes("a")' + ")" * 6,  # redundant parentheses count while reading
        'likes("a") or (likes("b") and (likes("c") or (likes("d") and (likes("e") or '
        '(likes("f") and likes("g"))))))',
        "not " * 5000 + 'likes("a")',  # refused early, not by running out of stack
        "(" * 5000,
    ],
)
def test_too_deep(text: str) -> None:
    limits = RuleLimits(max_length=100_000, max_depth=6, max_nodes=10_000)
    with pytest.raises(RuleError, match="nested deeper than 6"):
        parse(text, limits)


def test_depth_at_the_limit() -> None:
    assert p("not " * 5 + 'likes("a")') is not None  # 6 levels
    assert p("(" * 5 + 'likes("a")' + ")" * 5) == Likes("a")


def test_depth_error_position() -> None:
    with pytest.raises(RuleError) as caught:
        p("not " * 7 + 'likes("a")')
    assert caught.value.position == 20  # the 6th "not": with the condition, a 7th level


@pytest.mark.parametrize(
    "fields",
    [{"max_length": 0}, {"max_nodes": 0}, {"max_depth": 0}, {"max_depth": 101}],
)
def test_limits_are_checked(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="rule limits"):
        RuleLimits(**fields)


# --- evaluation ----------------------------------------------------------------------------

USER = SegmentInput(
    attributes={"country": ("FR", IMPORTED), "persona": ("runner", STATED), "lang": ("fr", STATED)},
    liked=frozenset({"running"}),
    disliked=frozenset({"golf"}),
    inferred={"yoga": 0.6, "cycling": 0.1},
    numeric_context={"cart_value": 50.0, "items": 3.0},
    categorical_context={"device": "mobile"},
    channel="email",
)
NOBODY = SegmentInput()


@pytest.mark.parametrize(
    ("text", "user", "nobody"),
    [
        ('attr.country == "FR"', True, False),
        ('attr.country == "fr"', False, False),  # values compare exactly
        ('attr.country in ["DE", "FR"]', True, False),
        ('attr.country in ["DE", "IT"]', False, False),
        ('stated.country == "FR"', False, False),  # imported, not stated
        ('stated.persona == "runner"', True, False),
        ('attr.persona == "runner"', True, False),  # attr reads any source
        ('stated.lang in ["fr", "de"]', True, False),
        ('attr.unknown == "x"', False, False),
        ('not attr.unknown == "x"', True, True),  # two-valued: not of missing is true
        ('not attr.country == "FR"', False, True),
        ("has(attr.country)", True, False),
        ("has(stated.country)", False, False),
        ("has(stated.persona)", True, False),
        ("has(ctx.cart_value)", True, False),
        ("has(ctx.device)", True, False),
        ("has(ctx.other)", False, False),
        ('has(attr.country) and not attr.country == "DE"', True, False),
        ('likes("running")', True, False),
        ('likes("golf")', False, False),
        ('dislikes("golf")', True, False),
        ('dislikes("running")', False, False),
        ('inferred("yoga") > 0.5', True, False),
        ('inferred("yoga") > 0.6', False, False),
        ('inferred("yoga") >= 0.6', True, False),
        ('inferred("cycling") < 0.2', True, False),
        ('inferred("running") < 0.2', False, False),  # no signal: no value, not 0
        ('not inferred("running") >= 0.2', True, True),
        ('inferred("yoga") between 0.5 and 0.6', True, False),
        ('inferred("yoga") between 0 and 0.59', False, False),
        ("ctx.cart_value between 10 and 100", True, False),
        ("ctx.cart_value between 50 and 50", True, False),
        ("ctx.cart_value between 51 and 100", False, False),
        ("ctx.cart_value >= 50", True, False),
        ("ctx.cart_value > 50", False, False),
        ("ctx.cart_value <= 50", True, False),
        ("ctx.cart_value < 50", False, False),
        ("ctx.items == 3", True, False),
        ("ctx.items == 3.5", False, False),
        ('ctx.items == "3"', False, False),  # a string reads the categorical context
        ("ctx.device > 1", False, False),  # a number reads the numeric context
        ('ctx.device == "mobile"', True, False),
        ('ctx.device in ["web", "mobile"]', True, False),
        ('ctx.device in ["web", "tv"]', False, False),
        ('channel == "email"', True, False),
        ('channel in ["web", "app"]', False, False),
        ('likes("running") and attr.country == "FR"', True, False),
        ('likes("running") and attr.country == "DE"', False, False),
        ('likes("golf") or attr.country == "FR"', True, False),
        ('likes("golf") or attr.country == "DE"', False, False),
        ('likes("a") or likes("b") or likes("running")', True, False),
        ('likes("running") and likes("running") and dislikes("running")', False, False),
        ('not (likes("golf") or dislikes("running"))', True, True),
        ('not not likes("running")', True, False),
    ],
)
def test_truth_table(text: str, user: bool, nobody: bool) -> None:
    predicate = segments.compile(p(text))
    assert predicate(USER) is user
    assert predicate(NOBODY) is nobody
    assert reference(p(text), USER) is user
    assert reference(p(text), NOBODY) is nobody


def test_no_consent_means_no_inferred_match() -> None:
    rule = p('inferred("yoga") > 0.1 or inferred("yoga") <= 0.1')
    consented = SegmentInput(inferred=segments.squashed({"yoga": 3.0}))
    assert consented.inferred == {"yoga": 0.75}  # features.squash: w / (1 + w)
    assert segments.compile(rule)(consented)
    assert not segments.compile(rule)(SegmentInput(inferred=segments.squashed({})))


def test_squashed_matches_the_model() -> None:
    from tactful.features import squash

    decayed = {"yoga": 0.0, "running": 1.0, "golf": 99.0}
    assert segments.squashed(decayed) == {t: squash(w) for t, w in decayed.items()}


# --- what a rule reads; the sensitive guard -------------------------------------------------


def test_referenced() -> None:
    rule = p(
        'attr.country == "FR" and stated.persona == "r" and (likes("a") or dislikes("b")) and '
        '(inferred("c") > 0.5 or ctx.v between 1 and 2 or ctx.d == "m" or has(ctx.k) or '
        'channel == "web" or has(stated.birth) or has(attr.x))'
    )
    assert referenced(rule) == References(
        attributes=frozenset({"country", "x"}),
        stated_attributes=frozenset({"persona", "birth"}),
        liked_topics=frozenset({"a"}),
        disliked_topics=frozenset({"b"}),
        inferred_topics=frozenset({"c"}),
        numeric_context=frozenset({"v"}),
        categorical_context=frozenset({"d"}),
        context_present=frozenset({"k"}),
        channel=True,
    )
    assert referenced(p('likes("a")')).channel is False


@pytest.mark.parametrize(
    "text",
    [
        'stated.persona == "runner"',
        'stated.persona in ["a", "b"] and not stated.country == "FR"',
        'likes("running") or (dislikes("golf") and has(stated.age))',
        'not likes("health")',
    ],
)
def test_sensitive_may_use_what_was_stated(text: str) -> None:
    rule = p(text)
    check_sensitive(rule)
    assert reads_only_stated(rule)
    assert not uses_inferred(rule)


@pytest.mark.parametrize(
    ("text", "position", "why"),
    [
        ('stated.x == "a" and inferred("yoga") >= 0.2', 20, "reads inferred signals"),
        ('likes("a") or not inferred("yoga") between 0 and 1', 18, "reads inferred signals"),
        ('attr.country == "FR"', 0, "may be an IMPORTED attribute (write stated.country)"),
        ('likes("a") and has(attr["a b"])', 15, 'write stated["a b"]'),
        ('likes("a") and ctx.page == "diabetes"', 15, "ctx.page reads the request's context"),
        ("has(ctx.page)", 0, "context"),
        ('channel == "email" and likes("a")', 0, "channel"),
    ],
)
def test_sensitive_refuses_the_rest(text: str, position: int, why: str) -> None:
    rule = p(text)
    assert not reads_only_stated(rule)
    with pytest.raises(RuleError) as caught:
        check_sensitive(rule)
    assert caught.value.position == position
    assert "a sensitive segment may only use stated.* attributes, likes() and dislikes()" in str(
        caught.value
    )
    assert why in caught.value.message


def test_uses_inferred() -> None:
    assert uses_inferred(p('likes("a") and not inferred("b") > 0.1'))
    assert uses_inferred(p('inferred("b") between 0 and 1'))
    assert not uses_inferred(p('attr.inferred == "yes" and ctx.inferred > 1'))


# --- a reference interpreter, and generated trees ------------------------------------------


def _text_value(subject: Attribute | Context | Channel, user: SegmentInput) -> str | None:
    if isinstance(subject, Channel):
        return user.channel
    if isinstance(subject, Context):
        return user.categorical_context.get(subject.name)
    found = user.attributes.get(subject.name)
    if found is None or (subject.stated_only and found[1] != STATED):
        return None
    return found[0]


def _number_value(subject: Context | Inferred, user: SegmentInput) -> float | None:
    if isinstance(subject, Inferred):
        return user.inferred.get(subject.topic)
    return user.numeric_context.get(subject.name)


def reference(rule: Rule, user: SegmentInput) -> bool:
    """The rule's meaning, written as plainly as possible, to check ``compile`` against."""
    match rule:
        case Not(operand):
            return not reference(operand, user)
        case And(operands):
            return all([reference(o, user) for o in operands])
        case Or(operands):
            return any([reference(o, user) for o in operands])
        case Likes(topic):
            return topic in user.liked
        case Dislikes(topic):
            return topic in user.disliked
        case Has(Context(name)):
            return name in user.numeric_context or name in user.categorical_context
        case Has(subject):
            return _text_value(subject, user) is not None
        case TextIn(subject, values):
            return _text_value(subject, user) in values
        case Compare(subject, op, value):
            x = _number_value(subject, user)
            if x is None:
                return False
            return {
                "==": x == value,
                "<": x < value,
                "<=": x <= value,
                ">": x > value,
                ">=": x >= value,
            }[op]
        case Between(subject, low, high):
            x = _number_value(subject, user)
            return x is not None and low <= x <= high
    raise AssertionError(rule)


def _trees(leaves: st.SearchStrategy[Rule], depth: int) -> st.SearchStrategy[Rule]:
    if depth == 1:
        return leaves
    sub = _trees(leaves, depth - 1)
    operands = st.lists(sub, min_size=2, max_size=3).map(tuple)
    return st.one_of(
        leaves,
        st.builds(Not, sub),
        st.builds(And, operands),
        st.builds(Or, operands),
    )


def _leaves(
    names: st.SearchStrategy[str],
    values: st.SearchStrategy[str],
    topics: st.SearchStrategy[str],
    channels: st.SearchStrategy[str],
    numbers: st.SearchStrategy[float],
) -> st.SearchStrategy[Rule]:
    attribute = st.builds(Attribute, names, st.booleans())
    context = st.builds(Context, names)
    strengths = st.floats(0.0, 1.0)
    number_subject: st.SearchStrategy[tuple[Context | Inferred, st.SearchStrategy[float]]] = (
        st.one_of(
            context.map(lambda c: (c, numbers)),
            st.builds(Inferred, topics).map(lambda i: (i, strengths)),
        )
    )

    @st.composite
    def compare(draw: st.DrawFn) -> Rule:
        subject, bound = draw(number_subject)
        ops = ["<", "<=", ">", ">="] + (["=="] if isinstance(subject, Context) else [])
        return Compare(subject, draw(st.sampled_from(ops)), draw(bound))

    @st.composite
    def between(draw: st.DrawFn) -> Rule:
        subject, bound = draw(number_subject)
        low, high = sorted((draw(bound), draw(bound)))
        return Between(subject, low, high)

    return st.one_of(
        st.builds(
            TextIn,
            st.one_of(attribute, context),
            st.lists(values, min_size=1, max_size=3).map(tuple),
        ),
        st.builds(
            TextIn, st.just(Channel()), st.lists(channels, min_size=1, max_size=3).map(tuple)
        ),
        st.builds(Has, st.one_of(attribute, context)),
        st.builds(Likes, topics),
        st.builds(Dislikes, topics),
        compare(),
        between(),
    )


# Any names, values and numbers: for the text round trips.
any_trees = _trees(
    _leaves(
        names=st.text(min_size=1, max_size=12),
        values=st.text(max_size=12),
        topics=st.from_regex(TOPIC_RE, fullmatch=True),
        channels=st.from_regex(CHANNEL_RE, fullmatch=True),
        numbers=st.floats(allow_nan=False, allow_infinity=False),
    ),
    TREE_LIMITS.max_depth,
)

# Few names and values, so that generated users and rules meet: for evaluation.
NAMES = ("country", "persona", "cart value", "device")
VALUES = ("FR", "runner", "", "mobile")
TOPICS = ("yoga", "running", "golf")
CHANNELS = ("email", "web")
NUMBERS = (-1.0, 0.0, 0.25, 0.5, 1.0, 10.0)
small_trees = _trees(
    _leaves(
        names=st.sampled_from(NAMES),
        values=st.sampled_from(VALUES),
        topics=st.sampled_from(TOPICS),
        channels=st.sampled_from(CHANNELS),
        numbers=st.sampled_from(NUMBERS),
    ),
    TREE_LIMITS.max_depth,
)


def _mapping(
    keys: tuple[str, ...], values: st.SearchStrategy[V]
) -> st.SearchStrategy[dict[str, V]]:
    return st.dictionaries(st.sampled_from(keys), values)


users = st.builds(
    SegmentInput,
    attributes=_mapping(
        NAMES, st.tuples(st.sampled_from(VALUES), st.sampled_from((STATED, IMPORTED)))
    ),
    liked=st.frozensets(st.sampled_from(TOPICS)),
    disliked=st.frozensets(st.sampled_from(TOPICS)),
    inferred=_mapping(TOPICS, st.sampled_from((0.0, 0.25, 0.5, 0.75, 0.999))),
    numeric_context=_mapping(NAMES, st.sampled_from(NUMBERS)),
    categorical_context=_mapping(NAMES, st.sampled_from(VALUES)),
    channel=st.sampled_from(CHANNELS),
)


@given(any_trees)
def test_canonical_text_round_trips(rule: Rule) -> None:
    text = unparse(rule)
    assert parse(text, TREE_LIMITS) == rule
    assert unparse(parse(text, TREE_LIMITS)) == text


@given(any_trees)
def test_every_prefix_parses_or_raises_rule_error(rule: Rule) -> None:
    text = unparse(rule)
    for end in range(0, len(text), max(1, len(text) // 40)):
        try:
            parse(text[:end], TREE_LIMITS)
        except RuleError as e:
            assert 0 <= e.position <= end


def _round_trip(text: str, limits: RuleLimits = LIMITS) -> None:
    """Either a RuleError inside the text, or a rule whose canonical text round-trips."""
    try:
        rule = parse(text, limits)
    except RuleError as e:
        assert 0 <= e.position <= len(text)
        return
    canonical = unparse(rule)
    assert parse(canonical, limits) == rule
    assert unparse(parse(canonical, limits)) == canonical


@given(st.text())
def test_arbitrary_text_parses_or_raises_rule_error(text: str) -> None:
    _round_trip(text)


FRAGMENTS = (
    *"()[],.<>=!&|-\"'\\",
    *("==", "<=", ">=", "!=", " ", "\n", "and", "or", "not", "in", "between", "has"),
    *("attr", "stated", "ctx", "channel", "likes", "dislikes", "inferred", "x", "AND"),
    *('"a"', '"yoga"', '"web"', '"\\u00e9"', '"\\n"', "0", "1", "0.5", "-2", "1e999", "1.", "nan"),
)


@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_token_soup_parses_or_raises_rule_error(text: str) -> None:
    _round_trip(text)


@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(" ".join))
def test_spaced_token_soup_parses_or_raises_rule_error(text: str) -> None:
    _round_trip(text)


@given(any_trees, st.data())
def test_edited_rules_parse_or_raise_rule_error(rule: Rule, data: st.DataObject) -> None:
    """A valid rule with a fragment inserted or a span cut: near misses, the typos people make."""
    text = unparse(rule)
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 5)))
    _round_trip(
        text[:start] + data.draw(st.sampled_from(("", *FRAGMENTS))) + text[end:], TREE_LIMITS
    )


@given(small_trees, st.lists(users, min_size=1, max_size=5))
def test_compiled_equals_reference(rule: Rule, people: list[SegmentInput]) -> None:
    predicate = segments.compile(rule)
    again = segments.compile(parse(unparse(rule), TREE_LIMITS))
    for user in people:
        expected = reference(rule, user)
        assert predicate(user) is expected
        assert again(user) is expected


@given(small_trees)
def test_guards_agree_with_referenced(rule: Rule) -> None:
    refs = referenced(rule)
    assert uses_inferred(rule) == bool(refs.inferred_topics)
    only_stated = not (
        refs.attributes
        or refs.inferred_topics
        or refs.numeric_context
        or refs.categorical_context
        or refs.context_present
        or refs.channel
    )
    assert reads_only_stated(rule) == only_stated
    if only_stated:
        check_sensitive(rule)
    else:
        with pytest.raises(RuleError):
            check_sensitive(rule)
