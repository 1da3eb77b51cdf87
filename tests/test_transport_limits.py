"""What a client cannot do to the transport: hold the serving threads with calls that never
send their request message, or grow memory with health Watch calls. Real server, real stubs,
real redis-server.

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
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from test_auth import DECIDE_KEY, bearer, secured
from test_deadlines import SlowReadStore

from tactful.settings import ServerSettings, Settings
from tactful.store import RedisStore
from tactful.transport.server import Running, build_server
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import decisioning_pb2_grpc

from conftest import make_settings, make_store, redis_url

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


def test_an_idle_call_is_ended_once_the_receive_time_limit_passes(store):
    settings = production_like(make_settings(), receive_timeout_ms=300.0)
    with (
        serving(store, settings) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        idle = IdleCalls(channel, DECIDE, 4)
        try:
            codes = idle.codes(timeout=5)
        finally:
            idle.close()
        assert codes == [grpc.StatusCode.CANCELLED] * 4
        assert_still_served(channel)


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
            with pytest.raises(grpc.RpcError) as busy:
                decide(request, timeout=5)
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            SlowReadStore.slow.clear()
        time.sleep(0.4)  # the thread is done with the cancelled call
        assert decide(request, timeout=5).arm == d.ARM_PERSONALIZED
