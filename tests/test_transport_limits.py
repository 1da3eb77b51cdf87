"""What a client cannot do to the transport: hold the serving threads with calls that never
send their request message, grow memory with health Watch calls, or send messages larger than
the API needs. Real server, real stubs, real redis-server.

An idle call is opened the way a careless or hostile client would: its headers go out, its
request message never does (a request iterator that blocks)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client import REGISTRY
from test_auth import DECIDE_KEY, bearer, secured
from test_deadlines import SlowReadStore
from test_serve import free_port

from tactful import validation
from tactful.settings import ServerSettings, Settings
from tactful.store.redis_store import RedisStore
from tactful.transport.server import Running, build_server
from tactful.v1 import catalog_pb2 as c
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import profiles_pb2 as p

from conftest import make_settings, make_store, offer, redis_url

DECIDE = "/tactful.v1.Decisioning/Decide"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
IDLE_CALLS = 16  # four times the threads (TACTFUL_GRPC_MAX_WORKERS), twice the RPC limit


def production_like(settings: Settings, **server: Any) -> Settings:
    """The default thread pool and RPC limit (make_settings() lifts the limit for bursts)."""
    defaults = ServerSettings()
    return dataclasses.replace(
        settings,
        server=dataclasses.replace(
            settings.server,
            max_workers=defaults.max_workers,
            max_concurrent_rpcs=defaults.max_concurrent_rpcs,
            **server,
        ),
    )


@contextlib.contextmanager
def serving(store: RedisStore, settings: Settings) -> Iterator[Running]:
    running = build_server(settings, store, port=0)
    try:
        yield running
    finally:
        running.stop(0)


class IdleCalls:
    """Calls whose headers are sent and whose request message never is."""

    def __init__(self, channel: grpc.Channel, method: str, count: int, **kwargs: Any) -> None:
        self._release = threading.Event()
        call = channel.stream_stream(method)
        self.calls = [call(self._nothing(), timeout=30, **kwargs) for _ in range(count)]

    def _nothing(self) -> Iterator[bytes]:
        self._release.wait()
        yield from ()

    def codes(self, timeout: float) -> list[grpc.StatusCode | None]:
        """Each call's status code once it has ended (None: still open after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(c.done() for c in self.calls):
            time.sleep(0.02)
        return [c.code() if c.done() else None for c in self.calls]

    def close(self) -> None:
        for call in self.calls:
            call.cancel()
        self._release.set()


@contextlib.contextmanager
def idle_calls(channel: grpc.Channel, method: str, **kwargs: Any) -> Iterator[IdleCalls]:
    idle = IdleCalls(channel, method, IDLE_CALLS, **kwargs)
    try:
        time.sleep(0.5)  # the server has seen them all
        yield idle
    finally:
        idle.close()


def assert_still_served(channel: grpc.Channel, **kwargs: Any) -> None:
    """A well-behaved client's Decide and the health probe are answered."""
    health = health_pb2_grpc.HealthStub(channel)
    probe = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert probe.status == health_pb2.HealthCheckResponse.SERVING
    decide = decisioning_pb2_grpc.DecisioningStub(channel).Decide
    answer = decide(d.DecideRequest(user_id="u", channel="web"), timeout=5, **kwargs)
    assert answer.arm == d.ARM_PERSONALIZED


# --- idle calls -------------------------------------------------------------------------------


def test_calls_that_never_send_their_request_do_not_hold_the_threads(store):
    with (
        serving(store, production_like(make_settings())) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        assert_still_served(channel)  # connected, and a baseline
        with idle_calls(channel, DECIDE) as idle:
            assert_still_served(channel)
            assert_still_served(channel)
            assert idle.codes(timeout=0) == [None] * IDLE_CALLS  # still open, not refused


def test_a_request_that_comes_late_but_in_time_is_answered(store):
    """The thread is given when the message arrives, however late within the limit."""
    settings = production_like(make_settings(), receive_timeout_ms=2000.0)
    with (
        serving(store, settings) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        decide = channel.stream_unary(
            DECIDE,
            request_serializer=d.DecideRequest.SerializeToString,
            response_deserializer=d.DecideResponse.FromString,
        )

        def late() -> Iterator[d.DecideRequest]:
            time.sleep(0.5)
            yield d.DecideRequest(user_id="u", channel="web")

        with idle_calls(channel, DECIDE):  # the threads are free all the same
            assert decide(late(), timeout=5).arm == d.ARM_PERSONALIZED


def test_idle_reflection_calls_do_not_hold_the_threads(store):
    settings = production_like(make_settings(), reflection=True)
    with (
        serving(store, settings) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        assert_still_served(channel)
        with idle_calls(channel, REFLECTION):
            assert_still_served(channel)
            assert (
                "tactful.v1.Decisioning"
                in ProtoReflectionDescriptorDatabase(channel).get_services()
            )


def unserved(reason: str) -> float:
    """tactful_grpc_calls_unserved_total{reason} in this process (the servers run in it)."""
    value = REGISTRY.get_sample_value("tactful_grpc_calls_unserved_total", {"reason": reason})
    return value or 0.0


def test_an_idle_call_is_ended_once_the_receive_time_limit_passes(store):
    settings = production_like(make_settings(), receive_timeout_ms=300.0)
    with (
        serving(store, settings) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        before = unserved("receive_timeout")
        idle = IdleCalls(channel, DECIDE, 4)
        try:
            codes = idle.codes(timeout=5)
        finally:
            idle.close()
        assert codes == [grpc.StatusCode.CANCELLED] * 4
        assert unserved("receive_timeout") - before == 4
        assert_still_served(channel)


def test_a_reflection_stream_idle_after_its_first_request_is_ended_in_time(store):
    """Reflection streams its requests: past the first, a wait for the next is bounded too."""
    settings = production_like(make_settings(), reflection=True, receive_timeout_ms=300.0)
    release = threading.Event()

    def one_then_nothing() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        release.wait()

    with (
        serving(store, settings) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        info = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        call = info(one_then_nothing(), timeout=30)
        try:
            assert next(call).HasField("list_services_response")
            with pytest.raises(grpc.RpcError) as ended:
                next(call)
            assert ended.value.code() == grpc.StatusCode.CANCELLED
        finally:
            release.set()


def test_idle_calls_without_a_key_are_refused_at_once(store):
    with (
        serving(store, production_like(secured())) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        idle = IdleCalls(channel, DECIDE, IDLE_CALLS)
        try:
            codes = idle.codes(timeout=2)
            assert_still_served(channel, metadata=bearer(DECIDE_KEY))
        finally:
            idle.close()
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * IDLE_CALLS


# --- health Watch ---------------------------------------------------------------------------


def test_watching_unknown_services_is_refused_and_known_ones_are_watched(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for i in range(200):
            name = f"no.such.Service{i}/" + "x" * 1000
            with pytest.raises(grpc.RpcError) as refused:
                next(health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=5))
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            assert refused.value.details() == "unknown service"
        watch = health.Watch(health_pb2.HealthCheckRequest(service="tactful.v1.Decisioning"))
        try:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            server.health.enter_graceful_shutdown()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            watch.cancel()


# --- message sizes --------------------------------------------------------------------------

CHAR4 = "\U0001f600"  # four bytes in UTF-8


def largest_valid_requests() -> dict[str, Any]:
    """The largest request of each kind that validation.py accepts."""
    decide = d.DecideRequest(
        user_id=CHAR4 * 64,  # 256 bytes
        channel="w" * 32,
        placement="p" * 128,
        numeric_context={f"{i:03d}" + "n" * 61: 1.5e300 for i in range(128)},
        categorical_context={f"{i:02d}" + "k" * 62: CHAR4 * 64 for i in range(64)},
        candidate_offer_ids=[f"{i:04d}" + "o" * 124 for i in range(1000)],
        slots=10,
        request_id="r" * 128,
        dry_run=True,
    )
    attributes = p.SetAttributesRequest(
        user_id=CHAR4 * 64,
        attributes={f"a{i:02d}" + "b" * 61: CHAR4 * 256 for i in range(64)},
        source=p.ATTRIBUTE_SOURCE_STATED,
    )
    preferences = p.SetPreferencesRequest(
        user_id=CHAR4 * 64,
        topic_preferences=[
            p.TopicPreference(topic=f"{i:03d}" + "t" * 61, stance=p.STANCE_LIKE) for i in range(256)
        ],
        channel_preferences=[
            p.ChannelPreference(channel=f"c{i:03d}" + "h" * 28, opted_in=True) for i in range(256)
        ],
        max_messages_per_day=1000,
        quiet_hours=p.QuietHours(
            start_hour=22, end_hour=7, time_zone="America/Argentina/ComodRivadavia"
        ),
    )
    signals = p.RecordSignalsRequest(
        user_id=CHAR4 * 64,
        signals=[p.Signal(topic=f"{i:03d}" + "s" * 61, weight=1e6) for i in range(256)],
    )
    segment = c.PutSegmentRequest(
        segment=c.Segment(
            segment_id="s" * 64,
            rule='attr.country == "' + CHAR4 * 1981 + '"',  # 2000 characters
            description=CHAR4 * 1000,
        )
    )
    put_offer = c.PutOfferRequest(
        offer=offer(
            "o" * 128,
            tuple(f"{i:02d}" + "t" * 62 for i in range(validation.MAX_TOPICS_PER_OFFER)),
            title=CHAR4 * 200,
            channels=[f"c{i:02d}" + "h" * 29 for i in range(validation.MAX_CHANNELS_PER_OFFER)],
            segments=[f"{i:02d}" + "g" * 62 for i in range(32)],
            excluded_segments=[f"{i:02d}" + "x" * 62 for i in range(32)],
        )
    )
    return {
        "Decide": decide,
        "SetAttributes": attributes,
        "SetPreferences": preferences,
        "RecordSignals": signals,
        "PutSegment": segment,
        "PutOffer": put_offer,
    }


def test_the_receive_limit_holds_the_largest_valid_request_with_margin():
    limit = ServerSettings().max_receive_message_bytes
    sizes = {name: r.ByteSize() for name, r in largest_valid_requests().items()}
    assert max(sizes.values()) * 1.5 < limit, sizes


def test_the_largest_valid_requests_are_accepted(channel, catalog):
    requests = largest_valid_requests()
    segments = (*requests["PutOffer"].offer.segments, *requests["PutOffer"].offer.excluded_segments)
    for segment_id in segments:
        catalog.PutSegment(
            c.PutSegmentRequest(segment=c.Segment(segment_id=segment_id, rule='likes("a")')),
            timeout=10,
        )
    stubs = {
        "Decide": decisioning_pb2_grpc.DecisioningStub(channel).Decide,
        "SetAttributes": profiles_pb2_grpc.ProfilesStub(channel).SetAttributes,
        "SetPreferences": profiles_pb2_grpc.ProfilesStub(channel).SetPreferences,
        "RecordSignals": profiles_pb2_grpc.ProfilesStub(channel).RecordSignals,
        "PutSegment": catalog.PutSegment,
        "PutOffer": catalog.PutOffer,
    }
    for name, request in requests.items():
        stubs[name](request, timeout=10)  # raises on anything but OK


def test_a_message_past_the_limit_is_resource_exhausted(decisioning):
    limit = ServerSettings().max_receive_message_bytes
    request = d.DecideRequest(user_id="u" * limit, channel="web")
    with pytest.raises(grpc.RpcError) as refused:
        decisioning.Decide(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The server goes on serving.
    assert decisioning.Decide(d.DecideRequest(user_id="u", channel="web"), timeout=10).choices == []


def test_the_health_port_takes_only_small_messages(store):
    base = make_settings()
    settings = dataclasses.replace(
        base, server=dataclasses.replace(base.server, health_port=free_port())
    )
    with (
        serving(store, settings) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as plaintext,
    ):
        check = health_pb2_grpc.HealthStub(plaintext).Check
        assert check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
        with pytest.raises(grpc.RpcError) as refused:
            check(health_pb2.HealthCheckRequest(service="x" * 4096), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- the RPC limit --------------------------------------------------------------------------


def test_a_cancelled_call_keeps_its_slot_until_its_thread_is_done(redisdb, redis_proc):
    """The limit bounds the work queued for the threads: a call whose caller has gone still
    counts while its thread works on it, so cancelling calls cannot pile work up."""
    base = make_settings()
    settings = dataclasses.replace(
        base, server=dataclasses.replace(base.server, max_workers=4, max_concurrent_rpcs=1)
    )
    real = make_store(redis_url(redis_proc), settings)
    store = SlowReadStore.for_settings(real.client, settings)
    with (
        serving(store, settings) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        decide = decisioning_pb2_grpc.DecisioningStub(channel).Decide
        request = d.DecideRequest(user_id="u", channel="web")
        decide(request, timeout=5)
        SlowReadStore.slow.set()
        try:
            slow = decide.future(request, timeout=5)
            time.sleep(0.1)  # its thread is in the (held back) read
            assert slow.cancel()
            before = unserved("busy")
            with pytest.raises(grpc.RpcError) as busy:
                decide(request, timeout=5)
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert unserved("busy") - before == 1
        finally:
            SlowReadStore.slow.clear()
        time.sleep(0.4)  # the thread is done with the cancelled call
        assert decide(request, timeout=5).arm == d.ARM_PERSONALIZED
