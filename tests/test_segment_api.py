"""Segments through real gRPC stubs on a real redis-server (and, where marked, a Redis
Cluster): CRUD and canonical rules, bad rules, limits from settings, the offer/segment
checks, targeting as a hard rule, reasons, hot reload across processes, membership features,
the decision log and the fallback."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tactful.bandit import LinearModel, prior_theta, project
from tactful.domain import Offer
from tactful.embedded_redis import EmbeddedRedis
from tactful.features import N_DENSE, FeatureSpace, RequestContext
from tactful.store.model_store import ModelStore
from tactful.transport.server import build_server
from tactful.v1 import catalog_pb2 as c
from tactful.v1 import catalog_pb2_grpc, decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import (
    RoundTrips,
    decide_with_model,
    make_settings,
    make_store,
    offer,
    redis_url,
)

STATED, IMPORTED = p.ATTRIBUTE_SOURCE_STATED, p.ATTRIBUTE_SOURCE_IMPORTED


def segment(segment_id: str, rule: str, **kw: Any) -> c.Segment:
    return c.Segment(segment_id=segment_id, rule=rule, **kw)


def put_segment(catalog, segment_id: str, rule: str, **kw: Any) -> c.Segment:
    return catalog.PutSegment(c.PutSegmentRequest(segment=segment(segment_id, rule, **kw)))


def put(catalog, *offers: c.Offer) -> None:
    for o in offers:
        catalog.PutOffer(c.PutOfferRequest(offer=o))


def decide(decisioning, user: str = "alice", channel: str = "web", **kw: Any) -> d.DecideResponse:
    kw.setdefault("slots", 10)
    return decisioning.Decide(d.DecideRequest(user_id=user, channel=channel, **kw))


def ids(response: d.DecideResponse) -> list[str]:
    return [choice.offer_id for choice in response.choices]


def attrs(profiles, user: str = "alice", source: int = STATED, **values: str) -> None:
    profiles.SetAttributes(p.SetAttributesRequest(user_id=user, attributes=values, source=source))


def error_of(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    return info.value


def bad_request(call: Any, request: Any) -> dict[str, str]:
    """Field -> description of an INVALID_ARGUMENT's BadRequest."""
    err = error_of(call, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    status = rpc_status.from_call(err)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return {v.field: v.description for v in bad.field_violations}


# --- CRUD -------------------------------------------------------------------------------------


@pytest.mark.both_stores
def test_put_returns_the_canonical_rule_and_get_list_delete_work(catalog):
    put = put_segment(
        catalog,
        "runners",
        '  stated.persona=="runner"   or likes( "running" )',
        description="people who run",
    )
    assert put == segment(
        "runners",
        'stated.persona == "runner" or likes("running")',
        description="people who run",
    )
    assert catalog.GetSegment(c.GetSegmentRequest(segment_id="runners")) == put
    # The canonical form is accepted again, unchanged.
    assert put_segment(catalog, "runners", put.rule, description="people who run") == put
    for i in range(4):
        put_segment(catalog, f"s{i}", f'attr.n == "{i}"', sensitive=False)
    seen, token = [], ""
    while True:
        page = catalog.ListSegments(c.ListSegmentsRequest(page_size=2, page_token=token))
        seen += [s.segment_id for s in page.segments]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["runners", "s0", "s1", "s2", "s3"]
    catalog.DeleteSegment(c.DeleteSegmentRequest(segment_id="s0"))
    for call, request in (
        (catalog.GetSegment, c.GetSegmentRequest(segment_id="s0")),
        (catalog.DeleteSegment, c.DeleteSegmentRequest(segment_id="s0")),
    ):
        assert error_of(call, request).code() == grpc.StatusCode.NOT_FOUND


def test_a_syntax_error_is_invalid_argument_naming_the_position(catalog):
    fields = bad_request(
        catalog.PutSegment, c.PutSegmentRequest(segment=segment("x", 'attr.country == "FR" and ('))
    )
    assert fields.keys() == {"segment.rule"}
    assert "at position 26" in fields["segment.rule"], fields
    fields = bad_request(
        catalog.PutSegment, c.PutSegmentRequest(segment=segment("x", "attr.a == 1 or"))
    )
    assert "at position" in fields["segment.rule"]
    # Mixed and/or without parentheses: refused where the second operator starts.
    fields = bad_request(
        catalog.PutSegment,
        c.PutSegmentRequest(segment=segment("x", 'likes("a") or likes("b") and likes("c")')),
    )
    assert "at position 25" in fields["segment.rule"], fields
    assert error_of(catalog.GetSegment, c.GetSegmentRequest(segment_id="x")).code() == (
        grpc.StatusCode.NOT_FOUND
    )


def test_a_sensitive_rule_may_read_only_what_the_customer_stated(catalog):
    for rule in ('inferred("yoga") > 0.5', 'attr.religion == "x"', 'ctx.page == "faith"'):
        fields = bad_request(
            catalog.PutSegment, c.PutSegmentRequest(segment=segment("s", rule, sensitive=True))
        )
        assert "sensitive" in fields["segment.rule"] and "at position 0" in fields["segment.rule"]
    # The same rules are fine in a segment that is not sensitive...
    put_segment(catalog, "s", 'inferred("yoga") > 0.5')
    # ...and a sensitive one reads stated attributes and stances.
    put_segment(catalog, "t", 'stated.religion == "x" or likes("faith")', sensitive=True)


def test_unknown_attributes_are_false_not_errors(catalog, decisioning):
    put_segment(catalog, "nobody-knows", 'attr.never_set == "x" or ctx.never_sent > 1')
    put_segment(catalog, "not-unknown", 'not attr.never_set == "x"')
    put(
        catalog,
        offer("in", segments=["nobody-knows"], priority=0.9),
        offer("out", segments=["not-unknown"], priority=0.1),
    )
    assert ids(decide(decisioning)) == ["out"]


def limited_server(store, **segments: int):
    settings = make_settings()
    settings = dataclasses.replace(
        settings, segments=dataclasses.replace(settings.segments, **segments)
    )
    return build_server(settings, store, port=0)


def test_rule_limits_come_from_settings(store):
    running = limited_server(store, max_rule_length=40, max_rule_depth=2, max_rule_nodes=3)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            catalog = catalog_pb2_grpc.CatalogStub(ch)
            put = catalog.PutSegment
            cases = {
                'likes("a") or likes("b") or likes("ccccccccccc")': "longer than 40",
                'not (likes("a") and likes("b"))': "deeper than 2",
                'likes("a") or likes("b") or likes("c")': "more than 3",
            }
            for rule, why in cases.items():
                fields = bad_request(put, c.PutSegmentRequest(segment=segment("x", rule)))
                assert why in fields["segment.rule"], fields
            put_segment(catalog, "ok", 'likes("a") or likes("b")')
    finally:
        running.stop(None)  # type: ignore[arg-type]


@pytest.mark.both_stores
def test_the_catalog_holds_at_most_max_segments(store):
    running = limited_server(store, max_segments=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            catalog = catalog_pb2_grpc.CatalogStub(ch)
            put_segment(catalog, "a", 'likes("a")')
            put_segment(catalog, "b", 'likes("b")')
            put_segment(catalog, "b", 'likes("bb")')  # replacing one is fine
            request = c.PutSegmentRequest(segment=segment("c", 'likes("c")'))
            err = error_of(catalog.PutSegment, request)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "TACTFUL_MAX_SEGMENTS" in err.details()
            catalog.DeleteSegment(c.DeleteSegmentRequest(segment_id="a"))
            put_segment(catalog, "c", 'likes("c")')
    finally:
        running.stop(None)  # type: ignore[arg-type]


# --- offers and segments ----------------------------------------------------------------------


@pytest.mark.both_stores
def test_an_offer_naming_an_unknown_segment_is_refused(catalog):
    put_segment(catalog, "known", 'attr.country == "FR"')
    request = c.PutOfferRequest(
        offer=offer("o", segments=["known", "nope"], excluded_segments=["gone"])
    )
    fields = bad_request(catalog.PutOffer, request)
    assert fields.keys() == {"offer.segments[1]", "offer.excluded_segments[0]"}
    assert "'nope'" in fields["offer.segments[1]"]
    assert error_of(catalog.GetOffer, c.GetOfferRequest(offer_id="o")).code() == (
        grpc.StatusCode.NOT_FOUND
    )
    both = c.PutOfferRequest(offer=offer("o", segments=["known"], excluded_segments=["known"]))
    assert bad_request(catalog.PutOffer, both).keys() == {"offer.excluded_segments[0]"}
    full = offer("o", segments=["known"])
    assert catalog.PutOffer(c.PutOfferRequest(offer=full)) == full
    assert catalog.GetOffer(c.GetOfferRequest(offer_id="o")) == full


@pytest.mark.both_stores
def test_a_segment_an_offer_names_cannot_be_deleted(catalog):
    put_segment(catalog, "fr", 'attr.country == "FR"')
    put_segment(catalog, "kids", 'stated.age_band == "under_18"')
    put(
        catalog,
        offer("wine", excluded_segments=["kids"]),
        offer("croissant", segments=["fr"]),
        offer("baguette", segments=["fr"], excluded_segments=["kids"]),
    )
    err = error_of(catalog.DeleteSegment, c.DeleteSegmentRequest(segment_id="kids"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'baguette', 'wine'" in err.details()
    assert catalog.GetSegment(c.GetSegmentRequest(segment_id="kids")).rule
    put(catalog, offer("wine"), offer("baguette", segments=["fr"]))
    catalog.DeleteSegment(c.DeleteSegmentRequest(segment_id="kids"))
    err = error_of(catalog.DeleteSegment, c.DeleteSegmentRequest(segment_id="fr"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    catalog.DeleteOffer(c.DeleteOfferRequest(offer_id="croissant"))
    catalog.DeleteOffer(c.DeleteOfferRequest(offer_id="baguette"))
    catalog.DeleteSegment(c.DeleteSegmentRequest(segment_id="fr"))


# --- targeting --------------------------------------------------------------------------------


@pytest.mark.both_stores
def test_targeting_by_attributes(catalog, decisioning, profiles):
    put_segment(catalog, "fr", 'attr.country == "FR"')
    put_segment(catalog, "runners", 'stated.persona == "runner"')
    put_segment(catalog, "kids", 'attr.age_band == "under_18"')
    put(
        catalog,
        offer("croissant", segments=["fr"], priority=0.9),
        offer("shoes", ("running",), segments=["fr", "runners"], priority=0.8),
        offer("wine", excluded_segments=["kids"], priority=0.7),
        offer("plain", priority=0.1),
    )
    assert ids(decide(decisioning)) == ["wine", "plain"]  # in no segment
    attrs(profiles, country="FR")
    assert ids(decide(decisioning)) == ["croissant", "shoes", "wine", "plain"]
    attrs(profiles, "bob", IMPORTED, persona="runner")  # a runner only if they said so
    assert ids(decide(decisioning, "bob")) == ["wine", "plain"]
    attrs(profiles, "bob", STATED, persona="runner")
    assert ids(decide(decisioning, "bob")) == ["shoes", "wine", "plain"]
    attrs(profiles, "bob", IMPORTED, age_band="under_18")  # excluded wins over everything
    assert ids(decide(decisioning, "bob")) == ["shoes", "plain"]
    assert ids(decide(decisioning, "bob", candidate_offer_ids=["wine"])) == []


def test_targeting_by_context_channel_and_stances(catalog, decisioning, profiles):
    put_segment(catalog, "big-cart", "ctx.cart_value > 50")
    put_segment(catalog, "mobile-app", 'ctx.device == "mobile" and channel == "app"')
    put_segment(catalog, "yogis", 'likes("yoga")')
    put(
        catalog,
        offer("free-shipping", segments=["big-cart"], priority=0.9),
        offer("app-deal", segments=["mobile-app"], priority=0.8),
        offer("mat", ("yoga",), segments=["yogis"], priority=0.7),
    )
    assert ids(decide(decisioning, numeric_context={"cart_value": 10})) == []
    assert ids(decide(decisioning, numeric_context={"cart_value": 60})) == ["free-shipping"]
    mobile = {"device": "mobile"}
    assert ids(decide(decisioning, channel="web", categorical_context=mobile)) == []
    assert ids(decide(decisioning, channel="app", categorical_context=mobile)) == ["app-deal"]
    profiles.SetPreferences(
        p.SetPreferencesRequest(
            user_id="alice", topic_preferences=[p.TopicPreference(topic="yoga", stance=1)]
        )
    )
    assert ids(decide(decisioning)) == ["mat"]


def test_inferred_segments_need_consent(catalog, decisioning, profiles):
    put_segment(catalog, "into-yoga", 'inferred("yoga") > 0.5')
    put(catalog, offer("mat", ("yoga",), segments=["into-yoga"]))
    assert ids(decide(decisioning)) == []
    profiles.SetPreferences(
        p.SetPreferencesRequest(user_id="alice", consent=p.Consent(inferred_personalization=True))
    )
    signals = [p.Signal(topic="yoga", weight=5.0)]
    profiles.RecordSignals(p.RecordSignalsRequest(user_id="alice", signals=signals))
    assert ids(decide(decisioning)) == ["mat"]  # 5 squashes to 0.83
    profiles.SetPreferences(
        p.SetPreferencesRequest(user_id="alice", consent=p.Consent(inferred_personalization=False))
    )
    assert ids(decide(decisioning)) == []


def test_reasons_name_the_segment_but_never_a_sensitive_one(catalog, decisioning, profiles):
    put_segment(catalog, "fr", 'attr.country == "FR"')
    put_segment(catalog, "faithful", 'stated.religion == "x"', sensitive=True)
    put(
        catalog,
        offer("croissant", segments=["fr"], priority=0.9),
        offer("retreat", segments=["faithful"], priority=0.8),
        offer("plain", priority=0.1),
    )
    attrs(profiles, country="FR", religion="x")
    reasons = {c.offer_id: list(c.reasons) for c in decide(decisioning).choices}
    segment_reasons = {
        offer_id: [r.detail for r in rs if r.code == d.REASON_CODE_SEGMENT]
        for offer_id, rs in reasons.items()
    }
    assert segment_reasons["croissant"] == ["offered to segment fr"]
    (detail,) = segment_reasons["retreat"]
    assert "faithful" not in detail and "religion" not in detail and "told us" in detail
    assert segment_reasons["plain"] == []
    assert reasons["croissant"][0].code == d.REASON_CODE_SEGMENT  # the eligibility reason first


def test_memberships_are_logged_without_sensitive_ones(store, catalog, decisioning, profiles):
    put_segment(catalog, "fr", 'attr.country == "FR"')
    put_segment(catalog, "eu", 'attr.country in ["FR", "DE"]')
    put_segment(catalog, "faithful", 'stated.religion == "x"', sensitive=True)
    put(catalog, offer("plain"))
    attrs(profiles, country="FR", religion="x")
    response = decide(decisioning)
    logged = store.get_logged_decision(decision_id=response.decision_id)
    assert logged is not None and logged.payload["segments"] == ["eu", "fr"]


# --- processes, features, round trips, fallback -----------------------------------------------


def test_segment_changes_reach_every_process(redis_proc, redisdb, store, settings, catalog):
    """A segment put through one server targets on the other at its next request, and a
    changed rule too: offers and segments reload together on the catalog version."""
    other_store = make_store(redis_url(redis_proc), settings)
    other = build_server(settings, other_store, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{other.port}") as ch:
            stub = decisioning_pb2_grpc.DecisioningStub(ch)
            put_segment(catalog, "big", "ctx.cart > 10")
            put(catalog, offer("deal", segments=["big"]))
            assert ids(decide(stub, numeric_context={"cart": 20})) == ["deal"]
            put_segment(catalog, "big", "ctx.cart > 30")
            assert ids(decide(stub, numeric_context={"cart": 20})) == []
            assert ids(decide(stub, numeric_context={"cart": 40})) == ["deal"]
    finally:
        other.stop(None)  # type: ignore[arg-type]
        other_store.client.close()


def _persona_index(space: FeatureSpace, segment_id: str) -> int:
    return space.index(f"t:running|s:{segment_id}")


def test_a_persona_taught_model_favours_its_topics_for_a_new_member(
    store, settings, catalog, decisioning, profiles
):
    """A model that learned that runners (a persona) click running offers ranks them first for
    a user the day they become a runner, and not for anyone else; a sensitive segment or one
    that reads stances, with the same rule, is never a feature."""
    space = FeatureSpace(settings.learning.hashed_bits, settings.learning.feature_set)
    offers = [
        Offer("shoes", "t", ("running",), ("web",), 0.5),
        Offer("books", "t", ("reading",), ("web",), 0.6),
    ]
    used = set()
    for hour in range(0, 24, 3):  # whatever time of day the test runs
        plain = space.featurize_many(RequestContext("web", "", hour), offers, [0, 0], [0, 0], 1)
        used |= {i for k in range(len(plain)) for i in plain.vector(k).indices}
    # A segment id whose persona features collide with no feature of the plain vectors.
    persona = next(
        f"runners{n}"
        for n in range(100)
        if _persona_index(space, f"runners{n}") not in used
        and space.index(f"s:runners{n}") not in used
    )
    theta = project(prior_theta(space.dim), settings.learning.kappa)
    theta[_persona_index(space, persona)] += 2.0
    version = ModelStore(store.client).publish(
        lambda v: LinearModel(f"ridge-{v}", theta, space.layout, 500).to_bytes(),
        keep=5,
        now=time.time(),
    )
    put_segment(catalog, persona, 'stated.persona == "runner"')
    put_segment(catalog, "secret-runners", 'stated.persona == "runner"', sensitive=True)
    put(
        catalog,
        offer("shoes", ("running",), channels=["web"], priority=0.5),
        offer("books", ("reading",), channels=["web"], priority=0.6),
    )
    assert decide_with_model(decisioning, f"ridge-{version}").model_version == f"ridge-{version}"
    before = decide(decisioning, "newbie", slots=2)
    assert before.model_version.startswith("ridge-") and ids(before) == ["books", "shoes"]
    attrs(profiles, "newbie", persona="runner")
    after = decide(decisioning, "newbie", slots=2)
    assert ids(after) == ["shoes", "books"]
    assert after.choices[0].score == pytest.approx(before.choices[1].score + 2.0)
    logged = store.get_logged_decision(decision_id=after.decision_id)
    assert logged is not None
    indices = logged.payload["features"]["shoes"][0]
    assert _persona_index(space, persona) in indices
    # Hashed: o:, o:|c:, t:, t:|c:, t:|h: and the persona's s: and t:|s:, not the sensitive one.
    assert sum(i >= N_DENSE for i in indices) == 5 + 2


def test_segments_keep_decide_to_two_round_trips(redis_proc, redisdb, settings, catalog):
    put_segment(catalog, "fr", 'attr.country == "fr"')
    put_segment(catalog, "big", "ctx.cart > 10")
    put(
        catalog,
        *(offer(f"o{i}", (f"t{i % 7}",), segments=["fr"] if i % 2 else []) for i in range(40)),
    )
    trips = RoundTrips()
    counted = make_store(redis_url(redis_proc), settings, connection_class=trips.connection_class())
    running = build_server(settings, counted, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = decisioning_pb2_grpc.DecisioningStub(ch)
            decide(stub, user="warmup")
            attrs(profiles_pb2_grpc.ProfilesStub(ch), "bob", country="fr")
            trips.count = 0
            response = decide(stub, user="bob", slots=3, numeric_context={"cart": 20})
            assert len(response.choices) == 3
            assert trips.count == 2
    finally:
        running.stop(None)  # type: ignore[arg-type]
        counted.client.close()


def test_a_fallback_never_shows_a_targeted_offer():
    data_dir = tempfile.mkdtemp(prefix="tactful-", dir="/tmp")
    redis_server = EmbeddedRedis(data_dir).start()
    settings = make_settings(redis_timeout_ms=25)
    store = make_store(redis_server.url, settings)
    running = build_server(settings, store, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            catalog = catalog_pb2_grpc.CatalogStub(ch)
            decisioning = decisioning_pb2_grpc.DecisioningStub(ch)
            put_segment(catalog, "everyone", "not has(attr.nothing)")
            put(
                catalog,
                offer("targeted", segments=["everyone"], priority=0.9),
                offer("guarded", excluded_segments=["everyone"], priority=0.8),
                offer("open", priority=0.1),
            )
            assert ids(decide(decisioning)) == ["targeted", "open"]
            redis_server.kill()
            fallback = decide(decisioning)
            assert fallback.arm == d.ARM_FALLBACK and ids(fallback) == ["open"]
    finally:
        running.stop(None)  # type: ignore[arg-type]
        store.client.close()
        redis_server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
