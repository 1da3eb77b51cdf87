"""Load shedding: past TACTFUL_MAX_CONCURRENT_RPCS a call is refused at once with
RESOURCE_EXHAUSTED instead of waiting in a queue past its deadline.

The slots are held honestly: the embedded redis-server is frozen (SIGSTOP) while writes with
a 1 s Redis timeout are in flight, so those RPCs stay busy for about a second each. Decides
sent meanwhile must then be shed in milliseconds. The same scenario without a limit is the
control: there the Decides are accepted and wait on the frozen store, so the test would see
it if the limit were not applied."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator

import grpc
import pytest

from tactful.embedded_redis import EmbeddedRedis
from tactful.settings import Settings, SettingsError
from tactful.transport.server import Running, build_server
from tactful.v1 import catalog_pb2, catalog_pb2_grpc, decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import make_settings, make_store, offer

LIMIT = 2
SHED_WITHIN_SECONDS = 0.25  # the busy writes hold their slots for ~1 s (the Redis timeout)


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    data_dir = tempfile.mkdtemp(prefix="tactful-", dir="/tmp")  # short: it holds a Unix socket
    server = EmbeddedRedis(data_dir).start()
    yield server
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def start(redis_server: EmbeddedRedis, max_concurrent_rpcs: int) -> tuple[Running, object]:
    base = make_settings(redis_timeout_ms=1000)
    settings = dataclasses.replace(
        base,
        server=dataclasses.replace(base.server, max_concurrent_rpcs=max_concurrent_rpcs),
    )
    store = make_store(redis_server.url, settings)
    return build_server(settings, store, port=0), store


def occupy_and_probe(
    redis_server: EmbeddedRedis, running: Running, probes: int
) -> tuple[list[grpc.StatusCode], float]:
    """Freeze Redis, put LIMIT slow writes in flight, then send ``probes`` Decides at once.
    Returns the Decides' status codes and how long they all took."""
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        decisioning = decisioning_pb2_grpc.DecisioningStub(channel)
        profiles = profiles_pb2_grpc.ProfilesStub(channel)
        catalog = catalog_pb2_grpc.CatalogStub(channel)
        catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("top")), timeout=5)
        decisioning.Decide(d.DecideRequest(user_id="warm", channel="web"), timeout=5)
        pid = int((redis_server.data_dir / "redis.pid").read_text())
        os.kill(pid, signal.SIGSTOP)
        try:
            writes = [
                profiles.SetPreferences.future(
                    p.SetPreferencesRequest(
                        user_id=f"busy-{i}",
                        topic_preferences=[p.TopicPreference(topic="yoga", stance=p.STANCE_LIKE)],
                    ),
                    timeout=5,
                )
                for i in range(LIMIT)
            ]
            time.sleep(0.2)  # the writes are now blocked on the frozen store, holding slots
            assert not any(w.done() for w in writes), "the writes should still be waiting"
            started = time.monotonic()
            calls = [
                decisioning.Decide.future(
                    d.DecideRequest(user_id=f"probe-{i}", channel="web"), timeout=2
                )
                for i in range(probes)
            ]
            codes = []
            for call in calls:
                try:
                    call.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())
            elapsed = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        for w in writes:  # they end one way or the other once Redis is back or timed out
            try:
                w.result()
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
        # The slots are free again: the server serves normally.
        healthy = decisioning.Decide(d.DecideRequest(user_id="after", channel="web"), timeout=5)
        assert healthy.arm == d.ARM_PERSONALIZED
    return codes, elapsed


def test_past_the_limit_calls_are_shed_fast_with_resource_exhausted(redis_server):
    running, store = start(redis_server, LIMIT)
    try:
        codes, elapsed = occupy_and_probe(redis_server, running, probes=20)
    finally:
        running.stop(None)  # type: ignore[arg-type]
        store.client.close()  # type: ignore[attr-defined]
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 20
    assert elapsed < SHED_WITHIN_SECONDS, f"shedding took {elapsed:.3f}s"


def test_without_a_limit_the_same_calls_queue_on_the_frozen_store(redis_server):
    """The control: with 0 (unlimited) nothing is shed, and the Decides wait on Redis."""
    running, store = start(redis_server, 0)
    try:
        codes, elapsed = occupy_and_probe(redis_server, running, probes=4)
    finally:
        running.stop(None)  # type: ignore[arg-type]
        store.client.close()  # type: ignore[attr-defined]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED not in codes
    assert elapsed >= SHED_WITHIN_SECONDS


def test_the_limit_setting_is_validated_and_zero_means_unlimited():
    assert Settings.from_env({}).server.max_concurrent_rpcs == 8
    assert Settings.from_env({"TACTFUL_MAX_CONCURRENT_RPCS": "0"}).server.max_concurrent_rpcs == 0
    with pytest.raises(SettingsError, match="TACTFUL_MAX_CONCURRENT_RPCS"):
        Settings.from_env({"TACTFUL_MAX_CONCURRENT_RPCS": "-1"})
    with pytest.raises(SettingsError, match="TACTFUL_MAX_CONCURRENT_RPCS"):
        Settings.from_env({"TACTFUL_MAX_CONCURRENT_RPCS": "many"})
