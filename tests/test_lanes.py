"""The Decide path's round trips on a connection each thread keeps (``wire.Lanes``), against
a real redis-server: the same replies as the pooled round trip, error replies raised only
once every reply is read, and a lane that failed (Redis closed it, or it timed out) starts
afresh rather than reading a stale reply."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from tactful.embedded_redis import EmbeddedRedis
from tactful.store import wire


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("lanes", numbered=True)).start()
    yield server
    server.stop()


@pytest.fixture
def client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    connected = wire.connect(
        redis_server.url, socket_timeout=1.0, connect_timeout=1.0, max_connections=4
    )
    assert isinstance(connected, redis.Redis)
    yield connected
    connected.execute_command("CLIENT", "UNPAUSE")
    connected.close()


READS = [
    ("HGETALL", "h"),
    ("HGETALL", "missing"),
    ("GET", "missing"),
    ("GET", "s"),
    ("ZSCORE", "z", "m"),
    ("EXISTS", "s"),
]


def test_same_replies_as_the_pooled_round_trip(client: redis.Redis) -> None:
    lanes = wire.decide_round_trip(client)
    pooled = wire.round_trip(client)
    writes = [("HSET", "h", "a", "1", "b", "été"), ("SET", "s", "x"), ("ZADD", "z", "1.5", "m")]
    assert lanes(writes) == [2, "OK", 1]
    assert lanes(READS) == pooled(READS)
    assert lanes(READS)[2:4] == [None, "x"]


def test_an_error_reply_is_raised_after_every_reply_is_read(client: redis.Redis) -> None:
    trip = wire.decide_round_trip(client)
    with pytest.raises(redis.exceptions.NoScriptError):
        trip([("SET", "k", "1"), ("EVALSHA", "0" * 40, 0), ("SET", "k", "2")])
    assert client.get("k") == "2"  # the command after the error ran
    assert trip([("GET", "k"), ("GET", "missing")]) == ["2", None]  # nothing left unread
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        trip([("LPUSH", "k", "x")])
    assert trip([("GET", "k")]) == ["2"]


def test_a_connection_closed_by_redis_fails_once_then_reconnects(client: redis.Redis) -> None:
    trip = wire.decide_round_trip(client)
    assert trip([("CLIENT", "SETNAME", "lane")]) == ["OK"]
    client.execute_command("CLIENT", "KILL", "SKIPME", "no", "TYPE", "normal")
    with pytest.raises(redis.exceptions.ConnectionError):
        trip([("GET", "k")])
    assert trip([("SET", "k", "v"), ("GET", "k")]) == ["OK", "v"]


def test_a_timed_out_lane_does_not_read_the_late_reply(client: redis.Redis) -> None:
    trip = wire.decide_round_trip(client)
    trip([("SET", "a", "first"), ("SET", "b", "second")])
    client.execute_command("CLIENT", "PAUSE", "300", "ALL")
    token = wire.ATTEMPT_DEADLINE.set(time.monotonic() + 0.05)
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            trip([("GET", "a")])
    finally:
        wire.ATTEMPT_DEADLINE.reset(token)
    time.sleep(0.3)  # the pause ends; the reply to GET a would arrive now
    assert trip([("GET", "b")]) == ["second"]


def test_each_thread_keeps_its_own_connection(client: redis.Redis) -> None:
    trip = wire.decide_round_trip(client)
    names: list[str] = []

    def name_and_read(name: str) -> None:
        trip([("CLIENT", "SETNAME", name)])
        names.append(trip([("CLIENT", "GETNAME")])[0])

    threads = [threading.Thread(target=name_and_read, args=(f"lane{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(names) == ["lane0", "lane1", "lane2"]  # not one connection shared
    trip([("CLIENT", "SETNAME", "main")])
    assert trip([("CLIENT", "GETNAME")]) == ["main"]
