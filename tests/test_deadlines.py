"""A caller that is gone gets nothing written in its name: a Decide whose deadline passes
while it is being decided logs nothing and counts no contact."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest

from tactful import keys
from tactful.store import DecisionInputs
from tactful.store.redis_store import RedisStore
from tactful.transport.server import build_server
from tactful.v1 import catalog_pb2, catalog_pb2_grpc, decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import make_settings, make_store, offer, redis_url


class SlowReadStore(RedisStore):
    """The real store, with the decision read held back while ``slow`` is set: what a busy
    machine does to a call whose deadline is short."""

    slow = threading.Event()

    def read_for_decision(self, *, user_id: str, request_id: str) -> DecisionInputs:
        inputs = super().read_for_decision(user_id=user_id, request_id=request_id)
        if self.slow.is_set():
            time.sleep(0.3)
        return inputs


@pytest.fixture
def slow_server(redisdb: Any, redis_proc: Any):
    """A server on the slow-read store, with one e-mail offer, and its stubs."""
    settings = make_settings()
    real = make_store(redis_url(redis_proc), settings)
    store = SlowReadStore.for_settings(real.client, settings)
    running = build_server(settings, store, port=0)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        catalog_pb2_grpc.CatalogStub(channel).PutOffer(
            catalog_pb2.PutOfferRequest(offer=offer("news", channels=["email"]))
        )
        yield (
            store,
            decisioning_pb2_grpc.DecisioningStub(channel),
            profiles_pb2_grpc.ProfilesStub(channel),
        )
    running.stop(None)  # type: ignore[arg-type]
    SlowReadStore.slow.clear()


def assert_nothing_written_for(user_id: str, profiles: Any, redisdb: Any) -> None:
    profile = profiles.GetProfile(p.GetProfileRequest(user_id=user_id))
    assert not profile.contact_counters
    assert not redisdb.exists(keys.UserKeys.of(user_id).decided)


def test_a_decide_past_its_deadline_logs_nothing_and_counts_no_contact(slow_server, redisdb):
    store, decisioning, profiles = slow_server
    request = d.DecideRequest(user_id="late-reader", channel="email")

    store.slow.set()
    with pytest.raises(grpc.RpcError) as late:
        decisioning.Decide(request, timeout=0.1)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.4)  # the server has finished its side of the abandoned call
    store.slow.clear()

    assert_nothing_written_for("late-reader", profiles, redisdb)
    # The same request, in time, is decided and counted as usual.
    answer = decisioning.Decide(request, timeout=5)
    assert [c.offer_id for c in answer.choices] == ["news"]
    profile = profiles.GetProfile(p.GetProfileRequest(user_id="late-reader"))
    email = [c.count for c in profile.contact_counters if c.channel == "email"]
    assert email and set(email) == {1}


def test_a_cancelled_decide_logs_nothing_and_counts_no_contact(slow_server, redisdb):
    store, decisioning, profiles = slow_server
    request = d.DecideRequest(user_id="gone-reader", channel="email")

    store.slow.set()
    call = decisioning.Decide.future(request, timeout=10)
    time.sleep(0.1)  # the server is inside the (held back) read
    assert call.cancel()
    time.sleep(0.4)  # the server has finished its side of the cancelled call
    store.slow.clear()

    assert_nothing_written_for("gone-reader", profiles, redisdb)
