"""Store budgets by purpose, bounded by the caller's deadline, on a real redis-server that
stalls (``CLIENT PAUSE``, what a fork, an fsync or a throttled CPU does to Redis): a write
waits out a stall the render path would not, a render-time read never waits past the call's
deadline, and a write never waits past it either."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
import pytest
import redis

from tactful import deadline
from tactful.breaker import CLOSED
from tactful.domain import PreferencesUpdate, Stance, TopicPreference
from tactful.embedded_redis import EmbeddedRedis
from tactful.errors import Unavailable
from tactful.settings import Settings
from tactful.store.redis_store import RedisStore
from tactful.transport.server import Running, build_server
from tactful.v1 import catalog_pb2, catalog_pb2_grpc, decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import make_settings, make_store, offer


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("bud", numbered=True)).start()
    yield server
    server.stop()


@pytest.fixture
def admin(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis(unix_socket_path=str(redis_server.socket))
    yield client
    client.execute_command("CLIENT", "UNPAUSE")
    client.close()


def budget_settings(*, render_ms: float, write_ms: float) -> Settings:
    """The defaults' shape: a tight render budget, a patient write budget, the breaker on."""
    settings = make_settings(redis_timeout_ms=render_ms)
    return dataclasses.replace(
        settings,
        redis=dataclasses.replace(
            settings.redis,
            write_timeout_ms=write_ms,
            breaker_failure_rate=0.5,
            breaker_min_calls=20,
        ),
    )


@pytest.fixture
def serving(redis_server: EmbeddedRedis) -> Iterator[tuple[Running, RedisStore]]:
    settings = budget_settings(render_ms=10, write_ms=2000)
    store = make_store(redis_server.url, settings)
    running = build_server(settings, store, port=0)
    yield running, store
    running.stop(None)  # type: ignore[arg-type]
    store.client.close()


def pause(admin: redis.Redis, ms: int) -> None:
    """Redis stops serving other clients for ``ms`` (this connection's command returns)."""
    admin.execute_command("CLIENT", "PAUSE", ms, "ALL")


def liking(user_id: str, topic: str) -> p.SetPreferencesRequest:
    return p.SetPreferencesRequest(
        user_id=user_id, topic_preferences=[p.TopicPreference(topic=topic, stance=p.STANCE_LIKE)]
    )


def test_a_write_waits_out_a_stall_longer_than_the_render_budget(serving, admin):
    """A customer's stated wish is not refused because Redis paused for 150 ms: the render
    path's 10 ms is for pages, not for the preference centre."""
    running, store = serving
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        profiles = profiles_pb2_grpc.ProfilesStub(channel)
        profiles.SetPreferences(liking("carol", "yoga"), timeout=5)  # connections warm
        pause(admin, 150)
        written = profiles.SetPreferences(liking("carol", "tea"), timeout=5)
        assert {t.topic for t in written.topic_preferences} == {"yoga", "tea"}
        stored = profiles.GetProfile(p.GetProfileRequest(user_id="carol"), timeout=5)
        assert {t.topic for t in stored.topic_preferences} == {"yoga", "tea"}
    assert store.breaker.state == CLOSED


def test_a_render_time_read_never_waits_past_the_calls_deadline(redis_server, admin):
    """Even with a generous render budget (1 s here), a Decide whose caller waits 200 ms
    answers without the store in time rather than running out its caller's deadline."""
    settings = budget_settings(render_ms=1000, write_ms=2000)
    store = make_store(redis_server.url, settings)
    running = build_server(settings, store, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            catalog_pb2_grpc.CatalogStub(channel).PutOffer(
                catalog_pb2.PutOfferRequest(offer=offer("top")), timeout=5
            )
            decisioning = decisioning_pb2_grpc.DecisioningStub(channel)
            request = d.DecideRequest(user_id="dave", channel="web")
            assert decisioning.Decide(request, timeout=5).arm == d.ARM_PERSONALIZED
            pause(admin, 1500)
            answer = decisioning.Decide(request, timeout=0.2)
            assert answer.arm == d.ARM_FALLBACK
            assert [c.offer_id for c in answer.choices] == ["top"]
    finally:
        running.stop(None)  # type: ignore[arg-type]
        store.client.close()


def test_a_write_never_waits_past_the_calls_deadline(redis_server, admin):
    """With a 5 s write budget, a write whose caller waits 100 ms gives up when the caller
    does: it does not hold a serving thread for a caller that has gone (the write itself,
    sent before, may still be applied: UNAVAILABLE says so)."""
    settings = budget_settings(render_ms=10, write_ms=5000)
    store = make_store(redis_server.url, settings)
    update = PreferencesUpdate(
        user_id="erin", topic_preferences=(TopicPreference("yoga", Stance.LIKE, 0.0),)
    )
    store.set_preferences(update=update, now=1.0)  # connections warm
    pause(admin, 2000)
    with deadline.call_deadline(0.1), pytest.raises(Unavailable):
        # Ignoring the deadline, it would wait out the pause and succeed.
        store.set_preferences(update=update, now=2.0)
    store.client.close()


@pytest.mark.both_stores
def test_a_resent_log_write_counts_nothing_twice_even_after_other_decides(store_backend, store):
    """A log write whose reply was lost is sent again (it is idempotent): by then other
    Decides for the same user may have consumed; the resent write still counts nothing
    again, and answers what it counted the first time."""
    from tactful.store import ContactSpend, LoggedDecision

    day = "1700000000"

    def log(decision_id: str, now: float) -> list[str] | None:
        spend = ContactSpend(
            day=day,
            now=now,
            channel="web",
            caps=(0, 0),
            interruptive=False,
            gap_seconds=0.0,
            slots=1,
            stale=(),
            ranked=[("offer-a", 0)],
            decision_id=decision_id,
        )
        return store.log_decision(
            user_id="dora",
            decision=LoggedDecision(decision_id, {"ts": now, "offer_ids": ["offer-a"]}),
            request_id="",
            learn_after=None,
            spend=spend,
        )

    now = 1_700_000_100.0
    assert log("A", now) == ["offer-a"]
    assert log("B", now + 1) == ["offer-a"]
    assert log("C", now + 2) == ["offer-a"]
    assert log("A", now) == ["offer-a"]  # resent: answered as before
    counters = store.get_profile(user_id="dora").contact_counters
    assert {(c.channel, c.offer_id): c.count for c in counters}[("web", "offer-a")] == 3
