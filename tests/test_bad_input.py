"""Bad input, through real gRPC stubs on a real redis-server: every case is INVALID_ARGUMENT
with google.rpc.BadRequest field violations naming the right field (or NOT_FOUND where the
request is well-formed but names nothing), never UNKNOWN or INTERNAL, and writes nothing."""

from __future__ import annotations

import math
import time
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from tactful import metrics
from tactful.v1 import catalog_pb2 as c
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import offer

NAN, INF = math.nan, math.inf
LIKE = p.STANCE_LIKE
TIMEOUT = 10


def violations(call: Any, request: Any) -> set[str]:
    """Call an RPC that must fail with INVALID_ARGUMENT; return the violated field names."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=TIMEOUT)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status in the trailing metadata"
    assert status.code == code_pb2.INVALID_ARGUMENT and status.message
    fields: set[str] = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            assert detail.Unpack(bad)
            for v in bad.field_violations:
                assert v.field and v.description, v
                fields.add(v.field)
    assert fields, f"INVALID_ARGUMENT without BadRequest field violations: {status}"
    return fields


def code_of(call: Any, request: Any) -> grpc.StatusCode:
    try:
        call(request, timeout=TIMEOUT)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def decide_req(**kw: Any) -> d.DecideRequest:
    kw.setdefault("user_id", "alice")
    kw.setdefault("channel", "web")
    return d.DecideRequest(**kw)


def outcome_req(**kw: Any) -> d.ReportOutcomeRequest:
    kw.setdefault("decision_id", "0123456789abcdef0123456789abcdef")
    kw.setdefault("offer_id", "a")
    kw.setdefault("event", d.OUTCOME_EVENT_CLICK)
    kw.setdefault("outcome_id", "out-1")
    return d.ReportOutcomeRequest(**kw)


def prefs_req(**kw: Any) -> p.SetPreferencesRequest:
    kw.setdefault("user_id", "alice")
    return p.SetPreferencesRequest(**kw)


def signals_req(*signals: p.Signal, user_id: str = "alice") -> p.RecordSignalsRequest:
    return p.RecordSignalsRequest(user_id=user_id, signals=list(signals))


def attrs_req(attributes: dict[str, str] | None = None, **kw: Any) -> p.SetAttributesRequest:
    kw.setdefault("user_id", "alice")
    kw.setdefault("source", p.ATTRIBUTE_SOURCE_STATED)
    return p.SetAttributesRequest(attributes=attributes or {"country": "fr"}, **kw)


def put_req(**fields: Any) -> c.PutOfferRequest:
    offer_id = fields.pop("offer_id", "o1")
    topics = fields.pop("topics", ("general",))
    return c.PutOfferRequest(offer=offer(offer_id, tuple(topics), **fields))


def ctx(name: str, key: str) -> str:
    """The field a context entry's violation names: the map and its (truncated) key."""
    return f"{name}[{key[:40]!r}]"


def topic(name: str, stance: int = LIKE) -> p.TopicPreference:
    return p.TopicPreference(topic=name, stance=stance)


def quiet(start: int = 22, end: int = 7, tz: str = "UTC") -> p.QuietHours:
    return p.QuietHours(start_hour=start, end_hour=end, time_zone=tz)


def ts(seconds: float) -> Timestamp:
    return Timestamp(seconds=int(seconds))


# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
TS_MIN, TS_MAX = -62_135_596_800, 253_402_300_799


# Decide -------------------------------------------------------------------------------------

LONG_KEY = "k" * 65
DECIDE_BAD = [
    pytest.param(decide_req(user_id=""), {"user_id"}, id="user_id-empty"),
    pytest.param(decide_req(user_id="u" * 257), {"user_id"}, id="user_id-257-bytes"),
    # 129 characters, 258 bytes: the limit is on bytes, not characters.
    pytest.param(decide_req(user_id="é" * 129), {"user_id"}, id="user_id-258-bytes-utf8"),
    pytest.param(decide_req(user_id="😀" * 65), {"user_id"}, id="user_id-260-bytes-emoji"),
    pytest.param(decide_req(channel=""), {"channel"}, id="channel-empty"),
    pytest.param(decide_req(channel="Web"), {"channel"}, id="channel-upper-case"),
    pytest.param(decide_req(channel="we b"), {"channel"}, id="channel-space"),
    pytest.param(decide_req(channel=" web"), {"channel"}, id="channel-leading-space"),
    pytest.param(decide_req(channel="a" * 33), {"channel"}, id="channel-33-chars"),
    pytest.param(decide_req(channel="1web"), {"channel"}, id="channel-starts-with-digit"),
    pytest.param(decide_req(channel="_web"), {"channel"}, id="channel-starts-with-underscore"),
    pytest.param(decide_req(channel="wéb"), {"channel"}, id="channel-non-ascii"),
    pytest.param(decide_req(slots=-1), {"slots"}, id="slots-negative"),
    pytest.param(decide_req(slots=11), {"slots"}, id="slots-11"),
    pytest.param(
        decide_req(candidate_offer_ids=[f"o{i}" for i in range(1001)]),
        {"candidate_offer_ids"},
        id="candidates-1001",
    ),
    pytest.param(
        decide_req(candidate_offer_ids=["ok", "has space"]),
        {"candidate_offer_ids[1]"},
        id="candidate-with-space",
    ),
    pytest.param(
        decide_req(candidate_offer_ids=[""]), {"candidate_offer_ids[0]"}, id="candidate-empty"
    ),
    pytest.param(
        decide_req(candidate_offer_ids=["ok", "two\nids"]),
        {"candidate_offer_ids[1]"},
        id="candidate-with-newline",
    ),
    pytest.param(
        decide_req(candidate_offer_ids=["-dash-first"]),
        {"candidate_offer_ids[0]"},
        id="candidate-starts-with-dash",
    ),
    pytest.param(
        decide_req(candidate_offer_ids=["x" * 129]),
        {"candidate_offer_ids[0]"},
        id="candidate-129-chars",
    ),
    pytest.param(
        decide_req(numeric_context={"cart": NAN}), {ctx("numeric_context", "cart")}, id="nan"
    ),
    pytest.param(
        decide_req(numeric_context={"cart": INF}), {ctx("numeric_context", "cart")}, id="+inf"
    ),
    pytest.param(
        decide_req(numeric_context={"cart": -INF}), {ctx("numeric_context", "cart")}, id="-inf"
    ),
    pytest.param(
        decide_req(numeric_context={LONG_KEY: 1.0}),
        {ctx("numeric_context", LONG_KEY)},
        id="numeric-key-65-bytes",
    ),
    pytest.param(
        decide_req(numeric_context={"": 1.0}), {ctx("numeric_context", "")}, id="numeric-key-empty"
    ),
    pytest.param(
        decide_req(categorical_context={LONG_KEY: "x"}),
        {ctx("categorical_context", LONG_KEY)},
        id="categorical-key-65-bytes",
    ),
    pytest.param(
        decide_req(categorical_context={"device": "v" * 257}),
        {ctx("categorical_context", "device")},
        id="categorical-value-257-bytes",
    ),
    pytest.param(
        decide_req(categorical_context={"device": "é" * 129}),
        {ctx("categorical_context", "device")},
        id="categorical-value-258-bytes-utf8",
    ),
    pytest.param(
        decide_req(numeric_context={f"k{i}": 1.0 for i in range(129)}),
        {"numeric_context"},
        id="numeric-129-entries",
    ),
    pytest.param(
        decide_req(categorical_context={f"k{i}": "v" for i in range(65)}),
        {"categorical_context"},
        id="categorical-65-entries",
    ),
    pytest.param(decide_req(placement="p" * 129), {"placement"}, id="placement-129-bytes"),
    pytest.param(decide_req(request_id="r" * 129), {"request_id"}, id="request_id-129-bytes"),
    pytest.param(
        decide_req(
            user_id="",
            channel="Web",
            slots=11,
            numeric_context={"cart": NAN},
            candidate_offer_ids=["bad id"],
            placement="p" * 129,
            request_id="r" * 129,
        ),
        {
            "user_id",
            "channel",
            "slots",
            ctx("numeric_context", "cart"),
            "candidate_offer_ids[0]",
            "placement",
            "request_id",
        },
        id="several-at-once",
    ),
]

DECIDE_OK = [
    pytest.param(decide_req(user_id="u" * 256), id="user_id-256-bytes"),
    pytest.param(decide_req(user_id="é" * 128), id="user_id-256-bytes-utf8"),
    pytest.param(decide_req(user_id="😀" * 64), id="user_id-256-bytes-emoji"),
    pytest.param(decide_req(channel="a" * 32), id="channel-32-chars"),
    pytest.param(decide_req(channel="web-2_x"), id="channel-digits-dash-underscore"),
    pytest.param(decide_req(slots=0), id="slots-0"),
    pytest.param(decide_req(slots=10), id="slots-10"),
    pytest.param(
        decide_req(candidate_offer_ids=[f"o{i}" for i in range(1000)]), id="candidates-1000"
    ),
    pytest.param(decide_req(candidate_offer_ids=["A.b_c:d-9"]), id="candidate-punctuation"),
    pytest.param(
        decide_req(
            numeric_context={f"k{i}": float(i) for i in range(63)} | {"k" * 64: -1e300},
            categorical_context={f"k{i}": "v" for i in range(63)} | {"device": "v" * 256},
        ),
        id="context-at-limits",
    ),
    pytest.param(
        decide_req(placement="p" * 128, request_id="r" * 128), id="placement-request_id-128"
    ),
]


@pytest.mark.parametrize(("request_", "fields"), DECIDE_BAD)
def test_decide_rejects(decisioning, request_, fields):
    assert violations(decisioning.Decide, request_) == fields


@pytest.mark.parametrize("request_", DECIDE_OK)
def test_decide_accepts_the_limits(decisioning, request_):
    response = decisioning.Decide(request_, timeout=TIMEOUT)
    assert response.decision_id and response.hold_reason == d.HOLD_REASON_NO_ELIGIBLE_OFFER


# ReportOutcome ------------------------------------------------------------------------------

OUTCOME_BAD = [
    pytest.param(outcome_req(decision_id=""), {"decision_id"}, id="decision_id-empty"),
    pytest.param(outcome_req(decision_id="d" * 129), {"decision_id"}, id="decision_id-129"),
    pytest.param(outcome_req(outcome_id=""), {"outcome_id"}, id="outcome_id-empty"),
    pytest.param(outcome_req(outcome_id="o" * 129), {"outcome_id"}, id="outcome_id-129"),
    pytest.param(outcome_req(offer_id=""), {"offer_id"}, id="offer_id-empty"),
    pytest.param(outcome_req(offer_id="bad id"), {"offer_id"}, id="offer_id-space"),
    pytest.param(outcome_req(event=d.OUTCOME_EVENT_UNSPECIFIED), {"event"}, id="event-0"),
    pytest.param(outcome_req(event=99), {"event"}, id="event-unknown-99"),
    pytest.param(outcome_req(value=NAN), {"value"}, id="value-nan"),
    pytest.param(outcome_req(value=INF), {"value"}, id="value-inf"),
    pytest.param(outcome_req(value=-INF), {"value"}, id="value-minus-inf"),
    pytest.param(
        d.ReportOutcomeRequest(event=99, value=NAN),
        {"decision_id", "offer_id", "event", "outcome_id", "value"},
        id="all-at-once",
    ),
]


@pytest.mark.parametrize(("request_", "fields"), OUTCOME_BAD)
def test_report_outcome_rejects(decisioning, request_, fields):
    assert violations(decisioning.ReportOutcome, request_) == fields


def test_outcome_for_an_offer_not_chosen_names_offer_id(catalog, decisioning):
    catalog.PutOffer(c.PutOfferRequest(offer=offer("a", priority=0.9)))
    catalog.PutOffer(c.PutOfferRequest(offer=offer("b", priority=0.1)))
    decision = decisioning.Decide(decide_req(slots=1), timeout=TIMEOUT)
    # Usually "a" (its priority is higher), but exploration or the control arm may show
    # "b": what matters is that the other one was not chosen.
    [chosen] = [ch.offer_id for ch in decision.choices]
    other = {"a": "b", "b": "a"}[chosen]
    report = outcome_req(decision_id=decision.decision_id, offer_id=other, outcome_id="x")
    assert violations(decisioning.ReportOutcome, report) == {"offer_id"}
    # A rejected outcome is not recorded: the same outcome_id still counts once, for it.
    report = outcome_req(decision_id=decision.decision_id, offer_id=chosen, outcome_id="x")
    assert decisioning.ReportOutcome(report, timeout=TIMEOUT).recorded is True


def test_rejected_outcome_records_nothing(catalog, decisioning):
    catalog.PutOffer(c.PutOfferRequest(offer=offer("a")))
    decision = decisioning.Decide(decide_req(), timeout=TIMEOUT)
    bad = outcome_req(decision_id=decision.decision_id, value=NAN, outcome_id="once")
    assert violations(decisioning.ReportOutcome, bad) == {"value"}
    good = outcome_req(decision_id=decision.decision_id, value=2.0, outcome_id="once")
    assert decisioning.ReportOutcome(good, timeout=TIMEOUT).recorded is True
    assert decisioning.ReportOutcome(good, timeout=TIMEOUT).recorded is False


# SetPreferences -----------------------------------------------------------------------------

PREFS_BAD = [
    pytest.param(prefs_req(user_id=""), {"user_id"}, id="user_id-empty"),
    pytest.param(prefs_req(user_id="u" * 257), {"user_id"}, id="user_id-257-bytes"),
    pytest.param(prefs_req(user_id="é" * 129), {"user_id"}, id="user_id-258-bytes-utf8"),
    pytest.param(
        prefs_req(topic_preferences=[topic("Running")]),
        {"topic_preferences[0].topic"},
        id="topic-upper-case",
    ),
    pytest.param(
        prefs_req(topic_preferences=[topic("")]), {"topic_preferences[0].topic"}, id="topic-empty"
    ),
    pytest.param(
        prefs_req(topic_preferences=[topic("trail running")]),
        {"topic_preferences[0].topic"},
        id="topic-space",
    ),
    pytest.param(
        prefs_req(topic_preferences=[topic("t" * 65)]),
        {"topic_preferences[0].topic"},
        id="topic-65-chars",
    ),
    pytest.param(
        prefs_req(topic_preferences=[topic("running", p.STANCE_UNSPECIFIED)]),
        {"topic_preferences[0].stance"},
        id="stance-0",
    ),
    pytest.param(
        prefs_req(topic_preferences=[topic("running", 42)]),
        {"topic_preferences[0].stance"},
        id="stance-unknown-42",
    ),
    pytest.param(
        prefs_req(topic_preferences=[topic("running"), topic("running", p.STANCE_DISLIKE)]),
        {"topic_preferences[1].topic"},
        id="topic-twice",
    ),
    pytest.param(
        prefs_req(topic_preferences=[topic(f"t{i}") for i in range(257)]),
        {"topic_preferences"},
        id="257-topics",
    ),
    pytest.param(
        prefs_req(channel_preferences=[p.ChannelPreference(channel="E-mail")]),
        {"channel_preferences[0].channel"},
        id="channel-upper-case",
    ),
    pytest.param(
        prefs_req(channel_preferences=[p.ChannelPreference(channel="")]),
        {"channel_preferences[0].channel"},
        id="channel-empty",
    ),
    pytest.param(
        prefs_req(
            channel_preferences=[
                p.ChannelPreference(channel="email", opted_in=True),
                p.ChannelPreference(channel="email", opted_in=False),
            ]
        ),
        {"channel_preferences[1].channel"},
        id="channel-twice",
    ),
    pytest.param(
        prefs_req(max_messages_per_day=-1), {"max_messages_per_day"}, id="max-per-day-negative"
    ),
    pytest.param(
        prefs_req(max_messages_per_day=1001), {"max_messages_per_day"}, id="max-per-day-1001"
    ),
    pytest.param(
        prefs_req(quiet_hours=quiet(start=24)), {"quiet_hours.start_hour"}, id="quiet-start-24"
    ),
    pytest.param(
        prefs_req(quiet_hours=quiet(end=-1)), {"quiet_hours.end_hour"}, id="quiet-end-minus-1"
    ),
    pytest.param(
        prefs_req(quiet_hours=quiet(start=-1, end=24)),
        {"quiet_hours.start_hour", "quiet_hours.end_hour"},
        id="quiet-both-hours",
    ),
    pytest.param(
        prefs_req(quiet_hours=quiet(tz="Mars/Olympus")),
        {"quiet_hours.time_zone"},
        id="tz-unknown",
    ),
    pytest.param(
        prefs_req(quiet_hours=quiet(tz="../etc/passwd")),
        {"quiet_hours.time_zone"},
        id="tz-path-traversal",
    ),
    pytest.param(
        prefs_req(quiet_hours=quiet(tz="zone.tab")), {"quiet_hours.time_zone"}, id="tz-not-tzif"
    ),
    pytest.param(prefs_req(quiet_hours=quiet(tz="")), {"quiet_hours.time_zone"}, id="tz-empty"),
    # Found by tests/test_fuzz.py: names the zoneinfo lookup met with an OSError (INTERNAL).
    pytest.param(
        prefs_req(quiet_hours=quiet(tz="America")), {"quiet_hours.time_zone"}, id="tz-a-directory"
    ),
    pytest.param(
        prefs_req(quiet_hours=quiet(tz="no" * 200)),
        {"quiet_hours.time_zone"},
        id="tz-name-too-long-for-a-file",
    ),
    pytest.param(
        prefs_req(quiet_hours=quiet(tz="posixrules")), {"quiet_hours.time_zone"}, id="tz-not-a-zone"
    ),
]


@pytest.mark.parametrize(("request_", "fields"), PREFS_BAD)
def test_set_preferences_rejects(profiles, request_, fields):
    assert violations(profiles.SetPreferences, request_) == fields


def test_invalid_preferences_write_nothing(profiles):
    """One good topic next to a bad one: the whole update is refused, none of it applied."""
    bad = prefs_req(
        topic_preferences=[topic("running"), topic("Bad Topic")],
        channel_preferences=[p.ChannelPreference(channel="email", opted_in=False)],
        max_messages_per_day=3,
        quiet_hours=quiet(),
        consent=p.Consent(inferred_personalization=True),
    )
    assert violations(profiles.SetPreferences, bad) == {"topic_preferences[1].topic"}
    profile = profiles.GetProfile(p.GetProfileRequest(user_id="alice"), timeout=TIMEOUT)
    assert list(profile.topic_preferences) == []
    assert list(profile.channel_preferences) == []
    assert profile.max_messages_per_day == 0
    assert not profile.HasField("quiet_hours")
    assert profile.consent.inferred_personalization is False


# RecordSignals ------------------------------------------------------------------------------

FUTURE = time.time() + 86400  # a day ahead; the allowed clock skew is minutes
SIGNALS_BAD = [
    pytest.param(signals_req(), {"signals"}, id="empty"),
    pytest.param(
        signals_req(p.Signal(topic="running", weight=1), user_id=""), {"user_id"}, id="user_id"
    ),
    pytest.param(
        signals_req(p.Signal(topic="running", weight=NAN)), {"signals[0].weight"}, id="nan"
    ),
    pytest.param(
        signals_req(p.Signal(topic="running", weight=-1)), {"signals[0].weight"}, id="negative"
    ),
    pytest.param(
        signals_req(p.Signal(topic="running", weight=INF)), {"signals[0].weight"}, id="+inf"
    ),
    pytest.param(
        signals_req(p.Signal(topic="running", weight=-INF)), {"signals[0].weight"}, id="-inf"
    ),
    pytest.param(
        signals_req(p.Signal(topic="running", weight=1e7)), {"signals[0].weight"}, id="too-big"
    ),
    pytest.param(
        signals_req(p.Signal(topic="running", weight=1), p.Signal(topic="Yoga!", weight=1)),
        {"signals[1].topic"},
        id="bad-topic",
    ),
    pytest.param(signals_req(p.Signal(topic="", weight=1)), {"signals[0].topic"}, id="empty-topic"),
    pytest.param(
        signals_req(p.Signal(topic="running", weight=1, observed_at=ts(FUTURE))),
        {"signals[0].observed_at"},
        id="observed-a-day-ahead",
    ),
    pytest.param(
        signals_req(p.Signal(topic="running", weight=1, observed_at=ts(TS_MIN - 1))),
        {"signals[0].observed_at"},
        id="observed-before-year-1",
    ),
    pytest.param(
        signals_req(*(p.Signal(topic="running", weight=1) for _ in range(257))),
        {"signals"},
        id="257-signals",
    ),
]


@pytest.mark.parametrize(("request_", "fields"), SIGNALS_BAD)
def test_record_signals_rejects(profiles, request_, fields):
    assert violations(profiles.RecordSignals, request_) == fields


def test_invalid_signals_write_nothing(profiles):
    bad = signals_req(p.Signal(topic="running", weight=5), p.Signal(topic="yoga", weight=NAN))
    assert violations(profiles.RecordSignals, bad) == {"signals[1].weight"}
    profile = profiles.GetProfile(p.GetProfileRequest(user_id="alice"), timeout=TIMEOUT)
    assert list(profile.signals) == []


# Catalog ------------------------------------------------------------------------------------

T0 = 1_900_000_000
PUT_BAD = [
    pytest.param(put_req(offer_id=""), {"offer.offer_id"}, id="no-id"),
    pytest.param(put_req(offer_id="bad id"), {"offer.offer_id"}, id="id-with-space"),
    pytest.param(put_req(title=""), {"offer.title"}, id="no-title"),
    pytest.param(put_req(title="   "), {"offer.title"}, id="blank-title"),
    pytest.param(put_req(title="t" * 201), {"offer.title"}, id="title-201-chars"),
    pytest.param(put_req(topics=()), {"offer.topics"}, id="no-topics"),
    pytest.param(put_req(topics=("ok", "Not OK")), {"offer.topics[1]"}, id="bad-topic"),
    pytest.param(put_req(channels=[]), {"offer.channels"}, id="no-channels"),
    pytest.param(put_req(channels=["web", "E mail"]), {"offer.channels[1]"}, id="bad-channel"),
    pytest.param(
        put_req(topics=tuple(f"t{i}" for i in range(33))), {"offer.topics"}, id="33-topics"
    ),
    pytest.param(
        put_req(channels=[f"c{i}" for i in range(33)]), {"offer.channels"}, id="33-channels"
    ),
    pytest.param(put_req(priority=NAN), {"offer.priority"}, id="priority-nan"),
    pytest.param(put_req(priority=-0.1), {"offer.priority"}, id="priority-negative"),
    pytest.param(put_req(priority=INF), {"offer.priority"}, id="priority-inf"),
    pytest.param(
        put_req(start_time=ts(T0), end_time=ts(T0 - 1)), {"offer.end_time"}, id="end-before-start"
    ),
    pytest.param(
        put_req(start_time=ts(T0), end_time=ts(T0)), {"offer.end_time"}, id="end-equals-start"
    ),
    pytest.param(
        put_req(max_per_user_per_day=-1),
        {"offer.max_per_user_per_day"},
        id="max-per-user-negative",
    ),
    pytest.param(
        c.PutOfferRequest(),
        {"offer.offer_id", "offer.title", "offer.topics", "offer.channels"},
        id="no-offer-at-all",
    ),
    pytest.param(
        put_req(end_time=ts(TS_MAX + 1)),
        {"offer.end_time"},
        id="end-time-year-10000",
    ),
    pytest.param(
        put_req(start_time=ts(2**63 - 1)),
        {"offer.start_time"},
        id="start-time-max-int64",
    ),
    pytest.param(
        put_req(segments=["ok", "not ok"], excluded_segments=[""]),
        {"offer.segments[1]", "offer.excluded_segments[0]"},
        id="bad-segment-ids",
    ),
    pytest.param(put_req(segments=["a", "a"]), {"offer.segments[1]"}, id="segment-given-twice"),
    pytest.param(
        put_req(segments=[f"s{i}" for i in range(33)]), {"offer.segments"}, id="33-segments"
    ),
    pytest.param(
        put_req(segments=["a"], excluded_segments=["b", "a"]),
        {"offer.excluded_segments[1]"},
        id="segment-targeted-and-excluded",
    ),
    # Well formed, but no such segment exists: checked by the store, in the write's script.
    pytest.param(
        put_req(segments=["nope"], excluded_segments=["nope-either"]),
        {"offer.segments[0]", "offer.excluded_segments[0]"},
        id="unknown-segments",
    ),
]


def seg_req(
    segment_id: str = "s1", rule: str = 'likes("running")', **kw: Any
) -> c.PutSegmentRequest:
    return c.PutSegmentRequest(segment=c.Segment(segment_id=segment_id, rule=rule, **kw))


SEGMENT_BAD = [
    pytest.param(seg_req(segment_id=""), {"segment.segment_id"}, id="no-id"),
    pytest.param(seg_req(segment_id="bad id"), {"segment.segment_id"}, id="id-with-space"),
    pytest.param(seg_req(segment_id="s" * 65), {"segment.segment_id"}, id="id-65-chars"),
    pytest.param(seg_req(rule=""), {"segment.rule"}, id="no-rule"),
    pytest.param(seg_req(rule="  \n "), {"segment.rule"}, id="blank-rule"),
    pytest.param(seg_req(rule='attr.x = "a"'), {"segment.rule"}, id="single-equals"),
    pytest.param(seg_req(rule='attr.x != "a"'), {"segment.rule"}, id="not-equals"),
    pytest.param(seg_req(rule='likes("Running")'), {"segment.rule"}, id="bad-topic"),
    pytest.param(seg_req(rule='inferred("a") > 2'), {"segment.rule"}, id="strength-over-1"),
    pytest.param(seg_req(rule="ctx.a between 5 and 1"), {"segment.rule"}, id="empty-range"),
    pytest.param(seg_req(rule="ctx.a > nan"), {"segment.rule"}, id="nan"),
    pytest.param(seg_req(rule="(" * 5000 + 'likes("a")'), {"segment.rule"}, id="deep-text"),
    pytest.param(seg_req(rule="x" * 2001), {"segment.rule"}, id="rule-2001-chars"),
    pytest.param(
        seg_req(rule=" or ".join(f'likes("t{i}")' for i in range(101))),
        {"segment.rule"},
        id="101-conditions",
    ),
    pytest.param(
        seg_req(rule='inferred("a") > 0.5', sensitive=True), {"segment.rule"}, id="sensitive"
    ),
    pytest.param(seg_req(description="d" * 1001), {"segment.description"}, id="long-description"),
    pytest.param(seg_req(description="a\x00b"), {"segment.description"}, id="nul-description"),
    pytest.param(
        c.PutSegmentRequest(), {"segment.segment_id", "segment.rule"}, id="no-segment-at-all"
    ),
]

LIST_SEGMENTS_BAD = [
    pytest.param(c.ListSegmentsRequest(page_size=-1), {"page_size"}, id="page-size-negative"),
    pytest.param(c.ListSegmentsRequest(page_size=1001), {"page_size"}, id="page-size-1001"),
    pytest.param(c.ListSegmentsRequest(page_token="!!!!"), {"page_token"}, id="token-garbage"),
]

LIST_BAD = [
    pytest.param(c.ListOffersRequest(page_size=-1), {"page_size"}, id="page-size-negative"),
    pytest.param(c.ListOffersRequest(page_size=1001), {"page_size"}, id="page-size-1001"),
    pytest.param(c.ListOffersRequest(page_token="not-a-token"), {"page_token"}, id="token-garbage"),
    pytest.param(c.ListOffersRequest(page_token="_w=="), {"page_token"}, id="token-not-utf8"),
    *(
        pytest.param(
            c.ListOffersRequest(page_token=token),
            {"page_token"},
            id=f"token-{name}",
        )
        for name, token in (("no-base64-chars", "!!!!"), ("non-ascii", "é"), ("nul-bytes", "AAAA"))
    ),
    pytest.param(
        c.ListOffersRequest(page_size=-1, page_token="not-a-token"),
        {"page_size", "page_token"},
        id="both",
    ),
]


@pytest.mark.parametrize(("request_", "fields"), PUT_BAD)
def test_put_offer_rejects(catalog, request_, fields):
    assert violations(catalog.PutOffer, request_) == fields


def test_put_offer_takes_the_most_topics_and_channels(catalog):
    """The bounds themselves are allowed: 32 topics, 32 channels."""
    request_ = put_req(
        topics=tuple(f"t{i}" for i in range(32)), channels=[f"c{i}" for i in range(32)]
    )
    catalog.PutOffer(request_)
    assert len(catalog.GetOffer(c.GetOfferRequest(offer_id="o1")).topics) == 32


@pytest.mark.parametrize(("request_", "fields"), LIST_BAD)
def test_list_offers_rejects(catalog, request_, fields):
    assert violations(catalog.ListOffers, request_) == fields


@pytest.mark.parametrize(("request_", "fields"), SEGMENT_BAD)
def test_put_segment_rejects(catalog, request_, fields):
    assert violations(catalog.PutSegment, request_) == fields


@pytest.mark.parametrize(("request_", "fields"), LIST_SEGMENTS_BAD)
def test_list_segments_rejects(catalog, request_, fields):
    assert violations(catalog.ListSegments, request_) == fields


def test_get_and_delete_of_a_bad_segment_id_name_segment_id(catalog):
    bad_id = c.GetSegmentRequest(segment_id="bad id")
    assert violations(catalog.GetSegment, bad_id) == {"segment_id"}
    no_id = c.DeleteSegmentRequest(segment_id="")
    assert violations(catalog.DeleteSegment, no_id) == {"segment_id"}


def test_get_and_delete_of_a_bad_offer_id_name_offer_id(catalog):
    assert violations(catalog.GetOffer, c.GetOfferRequest(offer_id="bad id")) == {"offer_id"}
    assert violations(catalog.DeleteOffer, c.DeleteOfferRequest(offer_id="")) == {"offer_id"}


# SetAttributes ------------------------------------------------------------------------------

ATTRS_BAD = [
    pytest.param(attrs_req(user_id=""), {"user_id"}, id="user_id-empty"),
    pytest.param(attrs_req(user_id="u" * 257), {"user_id"}, id="user_id-257-bytes"),
    pytest.param(attrs_req(source=p.ATTRIBUTE_SOURCE_UNSPECIFIED), {"source"}, id="source-0"),
    pytest.param(attrs_req(source=42), {"source"}, id="source-unknown-42"),
    pytest.param(attrs_req({"Country": "fr"}), {'attributes["Country"]'}, id="name-upper-case"),
    pytest.param(attrs_req({"": "fr"}), {'attributes[""]'}, id="name-empty"),
    pytest.param(attrs_req({"1st": "x"}), {'attributes["1st"]'}, id="name-starts-with-digit"),
    pytest.param(
        attrs_req({"home-country": "fr"}), {'attributes["home-country"]'}, id="name-hyphen"
    ),
    pytest.param(attrs_req({"pays_é": "fr"}), {'attributes["pays_\\u00e9"]'}, id="name-non-ascii"),
    pytest.param(
        attrs_req({"a" * 65: "x"}), {f'attributes["{"a" * 40}"]'}, id="name-65-chars-path-cut"
    ),
    pytest.param(
        attrs_req({"country": "fr", "bio": "x" * 257}), {'attributes["bio"]'}, id="value-257"
    ),
    pytest.param(attrs_req({"bio": "a\nb"}), {'attributes["bio"]'}, id="value-newline"),
    pytest.param(attrs_req({"bio": "a\x00b"}), {'attributes["bio"]'}, id="value-nul"),
    pytest.param(attrs_req({"bio": "a\x85b"}), {'attributes["bio"]'}, id="value-c1-control"),
    pytest.param(attrs_req({f"a{i}": "x" for i in range(65)}), {"attributes"}, id="65-attributes"),
    pytest.param(
        attrs_req({"Bad": "x", "ok": "\t"}, user_id="", source=0),
        {"user_id", "source", 'attributes["Bad"]', 'attributes["ok"]'},
        id="every-problem-at-once",
    ),
]


@pytest.mark.parametrize(("request_", "fields"), ATTRS_BAD)
def test_set_attributes_rejects(profiles, request_, fields):
    assert violations(profiles.SetAttributes, request_) == fields


def test_set_attributes_accepts_the_limits(profiles):
    longest = {"a" * 64: "é" * 256, "b": "'|', spaces and unicode ✓ are fine"}
    many = {f"a{i}": "x" for i in range(64)}
    for attributes in (longest, many):
        profile = profiles.SetAttributes(attrs_req(attributes), timeout=TIMEOUT)
        assert {a.name: a.value for a in profile.attributes}.items() >= attributes.items()


def test_invalid_attributes_write_nothing(profiles):
    bad = attrs_req({"country": "fr", "language": "bad\x07"})
    assert violations(profiles.SetAttributes, bad) == {'attributes["language"]'}
    profile = profiles.GetProfile(p.GetProfileRequest(user_id="alice"), timeout=TIMEOUT)
    assert list(profile.attributes) == []


NOT_FOUND = [
    pytest.param("catalog", "GetOffer", c.GetOfferRequest(offer_id="nope"), id="get-offer"),
    pytest.param("catalog", "DeleteOffer", c.DeleteOfferRequest(offer_id="nope"), id="delete"),
    pytest.param("catalog", "GetSegment", c.GetSegmentRequest(segment_id="nope"), id="get-segment"),
    pytest.param(
        "catalog", "DeleteSegment", c.DeleteSegmentRequest(segment_id="nope"), id="del-segment"
    ),
    pytest.param("decisioning", "ReportOutcome", outcome_req(), id="outcome-unknown-decision"),
]


@pytest.mark.parametrize(("service", "method", "request_"), NOT_FOUND)
def test_unknown_ids_are_not_found(decisioning, profiles, catalog, service, method, request_):
    stubs = {"decisioning": decisioning, "profiles": profiles, "catalog": catalog}
    assert code_of(getattr(stubs[service], method), request_) == grpc.StatusCode.NOT_FOUND


def test_invalid_offer_writes_nothing(catalog):
    bad = put_req(offer_id="half", channels=["web", "Bad Channel"])
    assert violations(catalog.PutOffer, bad) == {"offer.channels[1]"}
    assert list(catalog.ListOffers(c.ListOffersRequest(), timeout=TIMEOUT).offers) == []
    assert code_of(catalog.GetOffer, c.GetOfferRequest(offer_id="half")) == (
        grpc.StatusCode.NOT_FOUND
    )


def test_out_of_range_timestamp_does_not_poison_the_catalog(catalog):
    put = code_of(catalog.PutOffer, put_req(offer_id="poison", start_time=ts(2**63 - 1)))
    assert code_of(catalog.ListOffers, c.ListOffersRequest()) == grpc.StatusCode.OK
    assert code_of(catalog.GetOffer, c.GetOfferRequest(offer_id="poison")) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert put == grpc.StatusCode.INVALID_ARGUMENT


# Found by tests/test_fuzz.py -------------------------------------------------------------------

UNDECODABLE = [
    pytest.param(b"\x00", id="field-number-0"),
    pytest.param(b"\x08" + b"\xff" * 11, id="varint-never-ends"),
    pytest.param(b"\x0a\x05ali", id="cut-short"),
    pytest.param(b"\x0a\x02\xc3\x28", id="user_id-not-utf8"),
    pytest.param(b"\x0a\xff\xff\xff\xff\x0f", id="length-4-GiB"),
]


@pytest.mark.parametrize("payload", UNDECODABLE)
def test_bytes_that_are_no_request_are_invalid_argument(channel, payload):
    """gRPC itself answers INTERNAL ("Exception deserializing request!") to bytes the request
    type cannot parse; the interceptor decodes them and answers INVALID_ARGUMENT."""
    decide = channel.unary_unary(
        "/tactful.v1.Decisioning/Decide", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as info:
        decide(payload, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    status = rpc_status.from_call(info.value)
    assert status is not None and "tactful.v1.DecideRequest" in status.message


def test_a_thousand_violations_still_reach_the_caller(decisioning):
    """A thousand bad candidate ids are a thousand violations: the status that names them all
    was larger than the trailers a client accepts (8 KiB), and the caller got
    RESOURCE_EXHAUSTED, "Stream removed". The status keeps the first ones, within budget, and
    says how many it left out."""
    request = decide_req(candidate_offer_ids=["bad id é😀" * 5] * 1000)
    with pytest.raises(grpc.RpcError) as info:
        decisioning.Decide(request, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    status = rpc_status.from_call(info.value)
    assert status is not None and status.message.startswith("9")
    assert "more violations not shown" in status.message
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    fields = [v.field for v in bad.field_violations]
    assert fields == [f"candidate_offer_ids[{i}]" for i in range(len(fields))] and fields


# All of it at once --------------------------------------------------------------------------

SWEEP = [
    *(("decisioning", "Decide", case) for case in DECIDE_BAD),
    *(("decisioning", "ReportOutcome", case) for case in OUTCOME_BAD),
    *(("profiles", "SetPreferences", case) for case in PREFS_BAD),
    *(("profiles", "RecordSignals", case) for case in SIGNALS_BAD),
    *(("profiles", "SetAttributes", case) for case in ATTRS_BAD),
    *(("catalog", "PutOffer", case) for case in PUT_BAD),
    *(("catalog", "ListOffers", case) for case in LIST_BAD),
    *(("catalog", "PutSegment", case) for case in SEGMENT_BAD),
    *(("catalog", "ListSegments", case) for case in LIST_SEGMENTS_BAD),
]


def _failures_handled() -> float:
    """grpc_server_handled_total for UNKNOWN and INTERNAL, over every method."""
    return sum(
        sample.value
        for family in metrics.GRPC_HANDLED.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["grpc_code"] in {"UNKNOWN", "INTERNAL"}
    )


def test_no_bad_input_is_unknown_or_internal_and_the_server_survives(
    decisioning, profiles, catalog
):
    """Every case above, one after the other on one server: each gets its expected code, none
    UNKNOWN or INTERNAL, and the server's own count of UNKNOWN and INTERNAL answers does not
    move."""
    stubs = {"decisioning": decisioning, "profiles": profiles, "catalog": catalog}
    cases = [
        (service, method, case.id, case.values[0], grpc.StatusCode.INVALID_ARGUMENT)
        for service, method, case in SWEEP
    ] + [
        (service, method, case.id, request_, grpc.StatusCode.NOT_FOUND)
        for case in NOT_FOUND
        for service, method, request_ in [case.values]
    ]
    failures_before = _failures_handled()
    seen = {
        f"{method}[{case_id}]": code_of(getattr(stubs[service], method), request_)
        for service, method, case_id, request_, _ in cases
    }
    crashes = {
        k: v for k, v in seen.items() if v in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
    }
    assert crashes == {}
    assert len(seen) == len(cases)
    assert seen == {f"{method}[{case_id}]": code for _, method, case_id, _, code in cases}
    assert _failures_handled() == failures_before

    # Nothing any of it sent was written ...
    assert list(catalog.ListOffers(c.ListOffersRequest(), timeout=TIMEOUT).offers) == []
    assert list(catalog.ListSegments(c.ListSegmentsRequest(), timeout=TIMEOUT).segments) == []
    profile = profiles.GetProfile(p.GetProfileRequest(user_id="alice"), timeout=TIMEOUT)
    assert profile == p.Profile(user_id="alice", consent=p.Consent())
    # ... and the server still answers a valid Decide.
    catalog.PutOffer(c.PutOfferRequest(offer=offer("after", priority=0.5)), timeout=TIMEOUT)
    response = decisioning.Decide(decide_req(slots=2), timeout=TIMEOUT)
    assert [ch.offer_id for ch in response.choices] == ["after"]
