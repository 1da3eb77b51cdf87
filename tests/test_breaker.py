"""The store circuit breaker: the state machine on a fake clock, then a real redis-server
frozen with SIGSTOP under a real gRPC server."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from tactful.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitOpen
from tactful.embedded_redis import EmbeddedRedis
from tactful.store.redis_store import RedisStore
from tactful.transport.server import Running, build_server
from tactful.v1 import catalog_pb2, catalog_pb2_grpc, decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import make_settings, make_store, offer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rate_breaker(clock: Clock, **overrides: float) -> CircuitBreaker:
    options = {"failure_rate": 0.5, "min_calls": 10, "window_seconds": 2.0, "open_seconds": 1.0}
    options.update(overrides)
    return CircuitBreaker(**options, clock=clock)  # type: ignore[arg-type]


def test_a_few_failures_together_among_many_successes_do_not_open_the_circuit():
    """One slow moment of a busy machine times out the calls in flight at once: the old
    breaker (three failures in a row) opened on it and failed every call for a second."""
    clock = Clock()
    breaker = rate_breaker(clock)
    for _ in range(40):
        breaker.succeeded()
        clock.now += 0.01
    for _ in range(8):  # a stall: every call in flight times out
        breaker.before_call()
        breaker.failed()
    assert breaker.state == CLOSED
    breaker.before_call()


def test_the_circuit_opens_once_the_failure_rate_over_the_window_crosses_the_threshold():
    clock = Clock()
    breaker = rate_breaker(clock)
    for _ in range(10):
        breaker.succeeded()
    for _ in range(9):
        breaker.failed()
    assert breaker.state == CLOSED  # 9 of 19: under half
    breaker.failed()
    assert breaker.state == OPEN  # 10 of 20
    with pytest.raises(CircuitOpen):
        breaker.before_call()


def test_failures_need_the_minimum_number_of_calls_and_old_calls_leave_the_window():
    clock = Clock()
    breaker = rate_breaker(clock)
    for _ in range(9):
        breaker.failed()
    assert breaker.state == CLOSED  # every call failed, but only 9 calls: no evidence yet
    clock.now += 2.5  # the window moved on: those failures are forgotten
    for _ in range(9):
        breaker.failed()
    assert breaker.state == CLOSED
    breaker.failed()
    assert breaker.state == OPEN


def test_a_refused_connection_opens_the_circuit_at_once():
    clock = Clock()
    breaker = rate_breaker(clock)
    for _ in range(100):
        breaker.succeeded()
    breaker.failed(conclusive=True)
    assert breaker.state == OPEN


def test_after_the_open_period_one_probe_decides_whether_service_is_back():
    clock = Clock()
    breaker = rate_breaker(clock, min_calls=1)
    breaker.failed()
    clock.now += 0.99
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.now += 0.02
    assert breaker.before_call()  # the probe
    assert breaker.state == HALF_OPEN
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # one probe at a time: the others still fail fast
    breaker.failed(probe=True)  # the probe failed: open for another period
    assert breaker.state == OPEN
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.now += 1.01
    assert breaker.before_call()
    breaker.succeeded(probe=True)
    assert breaker.state == CLOSED
    breaker.before_call()
    breaker.before_call()  # closed: everyone through


def test_a_breaker_with_a_zero_rate_never_opens():
    breaker = CircuitBreaker.never()
    for _ in range(100):
        breaker.failed(conclusive=True)
        breaker.before_call()
    assert breaker.state == CLOSED


# --- against a real, frozen redis-server ---------------------------------------------------


@pytest.fixture
def redis_server(tmp_path_factory) -> Iterator[EmbeddedRedis]:
    # A short path: it holds a Unix socket.
    server = EmbeddedRedis(tmp_path_factory.mktemp("brk", numbered=True)).start()
    yield server
    server.stop()


@pytest.fixture
def guarded(redis_server: EmbeddedRedis) -> Iterator[tuple[Running, RedisStore]]:
    settings = make_settings(redis_timeout_ms=25)  # the render path's timeout
    settings = dataclasses.replace(
        settings,
        redis=dataclasses.replace(
            settings.redis,
            breaker_failure_rate=0.5,
            breaker_min_calls=10,
            breaker_open_seconds=0.3,
        ),
    )
    store = make_store(redis_server.url, settings)
    server = build_server(settings, store, port=0)
    yield server, store
    server.stop(None)  # type: ignore[arg-type]
    store.client.close()


def test_a_frozen_store_opens_the_circuit_and_service_returns_when_it_does(redis_server, guarded):
    running, store = guarded
    pid = int((redis_server.data_dir / "redis.pid").read_text())
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        decisioning = decisioning_pb2_grpc.DecisioningStub(channel)
        profiles = profiles_pb2_grpc.ProfilesStub(channel)
        catalog_pb2_grpc.CatalogStub(channel).PutOffer(
            catalog_pb2.PutOfferRequest(offer=offer("top", priority=0.9))
        )
        request = d.DecideRequest(user_id="alice", channel="web")
        assert decisioning.Decide(request).arm == d.ARM_PERSONALIZED
        os.kill(pid, signal.SIGSTOP)
        try:
            answers = [decisioning.Decide(request, timeout=1.0) for _ in range(20)]
            assert {a.arm for a in answers} == {d.ARM_FALLBACK}
            assert store.breaker.state == OPEN  # the last calls never waited on the store
            email = decisioning.Decide(d.DecideRequest(user_id="alice", channel="email"))
            assert email.hold_reason == d.HOLD_REASON_STORE_UNAVAILABLE
            with pytest.raises(grpc.RpcError) as failed:
                profiles.SetPreferences(
                    p.SetPreferencesRequest(
                        user_id="alice",
                        topic_preferences=[p.TopicPreference(topic="yoga", stance=p.STANCE_LIKE)],
                    )
                )
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            os.kill(pid, signal.SIGCONT)
        # Full service within 5 s of the store returning (the bound): here one open
        # period (0.3 s) and one probe.
        deadline = time.monotonic() + 5.0
        arm = d.ARM_FALLBACK
        while arm != d.ARM_PERSONALIZED and time.monotonic() < deadline:
            arm = decisioning.Decide(request).arm
            time.sleep(0.02)
        assert arm == d.ARM_PERSONALIZED
        assert store.breaker.state == CLOSED


def test_only_the_probe_closes_an_open_circuit():
    """A call let through before the circuit opened may still come back with an answer: one
    late success is no proof that Redis is back (the probe is)."""
    clock = Clock()
    breaker = rate_breaker(clock)
    breaker.failed(conclusive=True)
    breaker.succeeded()  # a call that was in flight when it opened
    assert breaker.state == OPEN
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.now += 1.01
    assert breaker.before_call()  # the probe
    breaker.succeeded()  # another call let through before it opened answers late
    breaker.failed()  # and another fails late: neither decides, nor lets a second probe in
    assert breaker.state == HALF_OPEN
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    breaker.succeeded(probe=True)
    assert breaker.state == CLOSED
