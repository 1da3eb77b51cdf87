"""When Redis goes away: Decide still answers, writes say UNAVAILABLE, nothing acknowledged
is lost. Uses tactful's own embedded redis-server, a real process this test kills."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator

import grpc
import pytest
import redis

from tactful.embedded_redis import EmbeddedRedis
from tactful.transport.server import Running, build_server
from tactful.v1 import catalog_pb2, catalog_pb2_grpc, decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import make_settings, make_store, offer


@pytest.fixture
def data_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="tactful-", dir="/tmp")  # short: it holds a Unix socket
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def redis_server(data_dir: str) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(data_dir).start()
    yield server
    server.stop()


@pytest.fixture
def running(redis_server: EmbeddedRedis) -> Iterator[Running]:
    settings = make_settings(redis_timeout_ms=25)  # the render path's: these tests are about it
    store = make_store(redis_server.url, settings)
    server = build_server(settings, store, port=0)
    yield server
    server.stop(None)  # type: ignore[arg-type]
    store.client.close()


def stubs(running: Running):
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    return (
        channel,
        decisioning_pb2_grpc.DecisioningStub(channel),
        profiles_pb2_grpc.ProfilesStub(channel),
        catalog_pb2_grpc.CatalogStub(channel),
    )


def test_decide_falls_back_and_writes_fail_cleanly(redis_server, running):
    channel, decisioning, profiles, catalog = stubs(running)
    with channel:
        for o in (
            offer("top", priority=0.9, channels=["web", "email"]),
            offer("next", priority=0.5),
            offer("private", ("finance",), priority=5.0, sensitive=True),
        ):
            catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=o))
        profiles.SetPreferences(
            p.SetPreferencesRequest(
                user_id="alice",
                topic_preferences=[p.TopicPreference(topic="finance", stance=p.STANCE_LIKE)],
            )
        )
        healthy = decisioning.Decide(d.DecideRequest(user_id="alice", channel="web", slots=3))
        assert healthy.arm == d.ARM_PERSONALIZED and healthy.choices[0].offer_id == "private"

        redis_server.kill()

        web = decisioning.Decide(d.DecideRequest(user_id="alice", channel="web", slots=3))
        assert web.arm == d.ARM_FALLBACK and web.hold_reason == d.HOLD_REASON_UNSPECIFIED
        assert [c.offer_id for c in web.choices] == ["top", "next"]  # never the sensitive one
        assert all([r.code for r in c.reasons] == [d.REASON_CODE_FALLBACK] for c in web.choices)
        email = decisioning.Decide(d.DecideRequest(user_id="alice", channel="email"))
        assert email.arm == d.ARM_FALLBACK and email.choices == []
        assert email.hold_reason == d.HOLD_REASON_STORE_UNAVAILABLE

        writes = [
            lambda: profiles.SetPreferences(
                p.SetPreferencesRequest(user_id="alice", max_messages_per_day=1)
            ),
            lambda: profiles.RecordSignals(
                p.RecordSignalsRequest(user_id="alice", signals=[p.Signal(topic="x", weight=1)])
            ),
            lambda: profiles.DeleteProfile(p.DeleteProfileRequest(user_id="alice")),
            lambda: decisioning.ReportOutcome(
                d.ReportOutcomeRequest(
                    decision_id=healthy.decision_id,
                    offer_id="private",
                    event=d.OUTCOME_EVENT_CLICK,
                    outcome_id="o1",
                )
            ),
            lambda: catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("late"))),
        ]
        for write in writes:
            with pytest.raises(grpc.RpcError) as err:
                write()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        # Redis comes back: full service on the next request, no restart of tactful.
        redis_server.start()
        back = decisioning.Decide(d.DecideRequest(user_id="alice", channel="web", slots=3))
        assert back.arm == d.ARM_PERSONALIZED and back.choices[0].offer_id == "private"


def test_acknowledged_writes_survive_a_redis_crash(redis_server, running):
    channel, decisioning, profiles, catalog = stubs(running)
    with channel:
        catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a")))
        acknowledged = []
        for i in range(50):
            profiles.SetPreferences(
                p.SetPreferencesRequest(
                    user_id=f"user-{i}",
                    topic_preferences=[p.TopicPreference(topic=f"t{i}", stance=p.STANCE_LIKE)],
                )
            )
            acknowledged.append(i)
        decision = decisioning.Decide(d.DecideRequest(user_id="user-0", channel="web"))
        decisioning.ReportOutcome(
            d.ReportOutcomeRequest(
                decision_id=decision.decision_id,
                offer_id="a",
                event=d.OUTCOME_EVENT_CLICK,
                outcome_id="o1",
            )
        )

        redis_server.kill()  # SIGKILL: no chance to save anything more
        redis_server.start()  # replays its append-only file

        for i in acknowledged:
            profile = profiles.GetProfile(p.GetProfileRequest(user_id=f"user-{i}"))
            assert [t.topic for t in profile.topic_preferences] == [f"t{i}"]
        assert catalog.GetOffer(catalog_pb2.GetOfferRequest(offer_id="a")).offer_id == "a"
        again = decisioning.ReportOutcome(
            d.ReportOutcomeRequest(
                decision_id=decision.decision_id,
                offer_id="a",
                event=d.OUTCOME_EVENT_CLICK,
                outcome_id="o1",
            )
        )
        assert again.recorded is False  # the first report survived too


def test_a_frozen_redis_still_gets_a_fallback_answer_inside_a_render_deadline(
    redis_server, running
):
    channel, decisioning, _, catalog = stubs(running)
    with channel:
        catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("top", priority=0.9)))
        decisioning.Decide(d.DecideRequest(user_id="alice", channel="web"))  # loads the catalog
        pid = int((redis_server.data_dir / "redis.pid").read_text())
        os.kill(pid, signal.SIGSTOP)  # alive, accepting nothing: the worst kind of slow
        try:
            response = decisioning.Decide(
                d.DecideRequest(user_id="alice", channel="web"), timeout=0.2
            )
            assert response.arm == d.ARM_FALLBACK
            assert [c.offer_id for c in response.choices] == ["top"]
        finally:
            os.kill(pid, signal.SIGCONT)
        healthy = decisioning.Decide(d.DecideRequest(user_id="alice", channel="web"))
        assert healthy.arm == d.ARM_PERSONALIZED


def test_a_fallback_still_honours_what_a_recent_user_declined(redis_server, running):
    channel, decisioning, profiles, catalog = stubs(running)
    with channel:
        for o in (
            offer("run", ("running",), priority=0.9, channels=["web", "app"]),
            offer("yoga", ("yoga",), priority=0.5, channels=["web", "app"]),
        ):
            catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=o))
        profiles.SetPreferences(
            p.SetPreferencesRequest(
                user_id="alice",
                topic_preferences=[p.TopicPreference(topic="running", stance=p.STANCE_DISLIKE)],
                channel_preferences=[p.ChannelPreference(channel="app", opted_in=False)],
            )
        )
        decisioning.Decide(d.DecideRequest(user_id="alice", channel="web"))  # seen: remembered

        redis_server.kill()

        web = decisioning.Decide(d.DecideRequest(user_id="alice", channel="web", slots=2))
        assert web.arm == d.ARM_FALLBACK
        assert [c.offer_id for c in web.choices] == ["yoga"]  # never the disliked one
        app = decisioning.Decide(d.DecideRequest(user_id="alice", channel="app"))
        assert app.choices == [] and app.hold_reason == d.HOLD_REASON_CHANNEL_OPTED_OUT
        stranger = decisioning.Decide(d.DecideRequest(user_id="bob", channel="web", slots=2))
        assert [c.offer_id for c in stranger.choices] == ["run", "yoga"]  # by priority


def test_dropped_connections_are_replaced_without_a_fallback(redis_server, running):
    """Redis closes every client connection (a failover, a proxy restart, CLIENT KILL): the
    next calls reconnect and are served from the store, no fallback, no error."""
    channel, decisioning, profiles, catalog = stubs(running)
    with channel:
        catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("top", priority=0.9)))
        request = d.DecideRequest(user_id="alice", channel="web")
        assert decisioning.Decide(request).arm == d.ARM_PERSONALIZED
        admin = redis.Redis(unix_socket_path=str(redis_server.socket))
        try:
            for _ in range(3):
                killed = admin.client_kill_filter(_type="normal", skipme=True)
                assert killed >= 1
                assert decisioning.Decide(request).arm == d.ARM_PERSONALIZED
                profiles.SetPreferences(
                    p.SetPreferencesRequest(
                        user_id="alice",
                        topic_preferences=[p.TopicPreference(topic="x", stance=p.STANCE_LIKE)],
                    )
                )
        finally:
            admin.close()


def test_a_redis_that_refuses_writes_still_serves_reads(redis_server):
    """maxmemory reached (OOM) refuses every write but still answers reads: writes get
    UNAVAILABLE, yet Decide keeps personalising from the profile it reads (the catalog read
    included: Redis 6 refuses MULTI when full), and the circuit breaker (on here, and
    touchy: a tenth of two calls failing would open it) does not take those refusals for an
    unreachable Redis."""
    settings = make_settings(redis_timeout_ms=25)
    settings = dataclasses.replace(
        settings,
        redis=dataclasses.replace(settings.redis, breaker_failure_rate=0.1, breaker_min_calls=2),
        # No exploration: at the default gamma each Decide picks "top" with probability
        # 1/122, and five of them made this test fail about once in 25 runs.
        learning=dataclasses.replace(settings.learning, exploration_gamma=1e12),
    )
    store = make_store(redis_server.url, settings)
    running = build_server(settings, store, port=0)
    channel, decisioning, profiles, catalog = stubs(running)
    admin = redis.Redis(unix_socket_path=str(redis_server.socket))
    with channel:
        catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("top", priority=0.9)))
        catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("liked", ("yoga",))))
        profiles.SetPreferences(
            p.SetPreferencesRequest(
                user_id="alice",
                topic_preferences=[p.TopicPreference(topic="yoga", stance=p.STANCE_LIKE)],
            )
        )
        request = d.DecideRequest(user_id="alice", channel="web")
        try:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
            for _ in range(5):
                with pytest.raises(grpc.RpcError) as err:
                    profiles.SetPreferences(
                        p.SetPreferencesRequest(
                            user_id="alice",
                            topic_preferences=[p.TopicPreference(topic="x", stance=p.STANCE_LIKE)],
                        )
                    )
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            for _ in range(5):  # each one's log write is refused too
                answer = decisioning.Decide(request)
                assert answer.arm == d.ARM_PERSONALIZED
                assert [c.offer_id for c in answer.choices] == ["liked"]
        finally:
            admin.config_set("maxmemory", 0)
            admin.close()
            running.stop(None)  # type: ignore[arg-type]
            store.client.close()
