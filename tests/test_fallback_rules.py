"""An answer made without the store honours the freshest account of what the user said: the
profile a Decide read before the store failed it, else this process's memory of the user,
which SetPreferences keeps current and DeleteProfile clears. Real redis-server, real server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tactful.domain import Offer, PreferencesUpdate, Segment, Stance, TopicPreference
from tactful.embedded_redis import EmbeddedRedis
from tactful.errors import Unavailable
from tactful.store.redis_store import RedisStore
from tactful.transport.server import Running, build_server
from tactful.v1 import catalog_pb2, catalog_pb2_grpc, decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import make_settings, make_store, offer


class CatalogDownStore(RedisStore):
    """The real store, whose catalog read fails while ``catalog_down`` is set: the profile
    read of a Decide succeeds, then the catalog it must reload cannot be had."""

    catalog_down = False

    def load_catalog(self) -> tuple[int, list[Offer], list[Segment]]:
        if self.catalog_down:
            raise Unavailable("store unavailable: catalog read failed (test)")
        return super().load_catalog()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("fbk", numbered=True)).start()
    yield server
    server.stop()


@pytest.fixture
def serving(redis_server: EmbeddedRedis) -> Iterator[tuple[CatalogDownStore, Any, Any, Any]]:
    settings = make_settings(redis_timeout_ms=200)
    real = make_store(redis_server.url, settings)
    store = CatalogDownStore.for_settings(real.client, settings)
    running: Running = build_server(settings, store, port=0)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        catalog = catalog_pb2_grpc.CatalogStub(channel)
        catalog.PutOffer(
            catalog_pb2.PutOfferRequest(offer=offer("golf-day", ("golf",), priority=0.9))
        )
        catalog.PutOffer(
            catalog_pb2.PutOfferRequest(offer=offer("tea-time", ("tea",), priority=0.5))
        )
        yield (
            store,
            catalog,
            decisioning_pb2_grpc.DecisioningStub(channel),
            profiles_pb2_grpc.ProfilesStub(channel),
        )
    running.stop(None)  # type: ignore[arg-type]
    store.client.close()


def dislike(user_id: str, topic: str) -> p.SetPreferencesRequest:
    return p.SetPreferencesRequest(
        user_id=user_id,
        topic_preferences=[p.TopicPreference(topic=topic, stance=p.STANCE_DISLIKE)],
    )


def web(user_id: str) -> d.DecideRequest:
    return d.DecideRequest(user_id=user_id, channel="web")


def test_a_fallback_after_a_catalog_read_failure_honours_the_profile_it_read(serving):
    store, catalog, decisioning, _ = serving
    assert decisioning.Decide(web("bob")).arm == d.ARM_PERSONALIZED  # remembered: no dislike
    # Written through another process (this one's memory does not hear of it): only the
    # profile the Decide reads knows of the dislike.
    store.set_preferences(
        update=PreferencesUpdate("bob", (TopicPreference("golf", Stance.DISLIKE, 0.0),)),
        now=time.time(),
    )
    # A catalog change the next Decide must load, and its load fails after the profile read.
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("new", ("news",), priority=0.1)))
    store.catalog_down = True
    answer = decisioning.Decide(web("bob"))
    assert answer.arm == d.ARM_FALLBACK
    assert [c.offer_id for c in answer.choices] == ["tea-time"]


def test_a_fallback_without_any_read_honours_a_dislike_set_through_this_process(
    serving, redis_server
):
    _, _, decisioning, profiles = serving
    assert decisioning.Decide(web("bob")).arm == d.ARM_PERSONALIZED  # remembered: no dislike
    profiles.SetPreferences(dislike("bob", "golf"))
    redis_server.kill()
    answer = decisioning.Decide(web("bob"))
    assert answer.arm == d.ARM_FALLBACK
    assert [c.offer_id for c in answer.choices] == ["tea-time"]


def test_an_erased_user_is_forgotten_by_the_fallback_too(serving, redis_server):
    _, _, decisioning, profiles = serving
    profiles.SetPreferences(dislike("bob", "golf"))
    assert [c.offer_id for c in decisioning.Decide(web("bob")).choices] == ["tea-time"]
    profiles.DeleteProfile(p.DeleteProfileRequest(user_id="bob"))
    redis_server.kill()
    answer = decisioning.Decide(web("bob"))
    assert answer.arm == d.ARM_FALLBACK
    # Nothing of what bob said is kept anywhere: he is a user this process does not know.
    assert [c.offer_id for c in answer.choices] == ["golf-day"]
