"""Redis Cluster: what only a cluster shows. The API suites marked ``both_stores`` (catalog,
profiles and erasure, outcomes, the learner's exactly-once delivery and rollback) run on the
same three-master cluster as well; tests/test_serve.py runs `tactful serve` on it."""

from __future__ import annotations

import dataclasses
import time

import pytest
import redis
from redis.cluster import RedisCluster

from tactful import keys, report
from tactful.features import FeatureSpace
from tactful.learner import Learner
from tactful.store.model_store import ModelStore
from tactful.store.wire import connect, round_trip
from tactful.v1 import catalog_pb2
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import decide_with_model, make_settings, offer

pytestmark = pytest.mark.parametrize("store_backend", ["cluster"], indirect=True)


def put(catalog, *offers) -> None:
    for o in offers:
        catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=o))


def test_connect_builds_a_cluster_client_with_the_render_path_settings(store, redis_cluster):
    client = connect(redis_cluster.url, socket_timeout=0.5, connect_timeout=0.25, max_connections=7)
    try:
        assert isinstance(client, RedisCluster)
        assert len(client.get_primaries()) == 3  # found from the one node the URL names
        pool = client.get_default_node().redis_connection.connection_pool
        assert pool.connection_kwargs["socket_timeout"] == 0.5
        assert pool.connection_kwargs["socket_connect_timeout"] == 0.25
        assert pool.max_connections == 7  # per node
        assert client.retry.get_retries() == 1
        assert round_trip(client).func.__name__ == "_cluster_round_trip"
    finally:
        client.close()
    single = redis.Redis()  # not connected: only its type matters
    assert round_trip(single).func.__name__ == "_single_node_round_trip"


def test_the_cluster_refuses_what_spans_slots(store):
    """What makes the suites on the cluster a check that every script and transaction stays
    in one slot: redis-py refuses anything else before it reaches Redis."""
    user = keys.UserKeys.of("u")
    script = store.client.register_script("return 1")
    with pytest.raises(redis.exceptions.RedisClusterException, match="same key slot"):
        script(keys=[user.contacts, keys.OUTCOME_STREAM])
    pipe = store.client.pipeline(transaction=True)
    pipe.get(user.profile)
    pipe.get(keys.CATALOG_VERSION)
    with pytest.raises(redis.exceptions.CrossSlotTransactionError):
        pipe.execute()


def test_users_spread_over_every_master(store, catalog, decisioning):
    put(catalog, offer("a"))
    for i in range(30):
        decisioning.Decide(d.DecideRequest(user_id=f"user-{i}", channel="web"))
    primaries = store.client.get_primaries()
    assert len(primaries) == 3
    assert all(store.client.dbsize(target_nodes=node) > 0 for node in primaries)


def test_the_caps_script_is_reloaded_after_the_nodes_lose_it(store, catalog, decisioning):
    """Decide runs the caps script by its SHA in the cluster pipeline; a node that lost it
    (restart, SCRIPT FLUSH) answers NOSCRIPT, and the store loads it and counts anyway."""
    put(catalog, offer("a"), offer("b"), offer("c"))
    email = d.DecideRequest(user_id="capped", channel="email")  # TACTFUL_CHANNEL_CAPS email=2
    assert len(decisioning.Decide(email).choices) == 1
    store.client.script_flush()  # on every primary
    assert store.client.script_exists(store._consume_contacts.sha) == [False]
    assert len(decisioning.Decide(email).choices) == 1  # counted: the second of two
    held = decisioning.Decide(email)
    assert not held.choices and held.hold_reason == d.HOLD_REASON_FATIGUE_CAP


def test_preferences_decide_outcome_learning_and_erasure(store, catalog, decisioning, profiles):
    """One user's whole story through the in-process gRPC server on the cluster."""
    put(catalog, offer("yoga", ("yoga",), priority=0.4), offer("golf", ("golf",), priority=0.5))
    profiles.SetPreferences(
        p.SetPreferencesRequest(
            user_id="ann",
            topic_preferences=[p.TopicPreference(topic="golf", stance=p.STANCE_DISLIKE)],
        )
    )
    shown = decisioning.Decide(d.DecideRequest(user_id="ann", channel="web", slots=2))
    assert [c.offer_id for c in shown.choices] == ["yoga"]  # a disliked topic is never shown
    assert shown.model_version == "prior"
    decisioning.ReportOutcome(
        d.ReportOutcomeRequest(
            decision_id=shown.decision_id,
            offer_id="yoga",
            event=d.OUTCOME_EVENT_CLICK,
            outcome_id="o1",
        )
    )
    learning = dataclasses.replace(
        make_settings().learning, publish_interval_ms=0, checkpoint_interval_seconds=0
    )
    space = FeatureSpace(learning.hashed_bits)
    learner = Learner(ModelStore(store.client), space, learning, consumer="t")
    learner.start()
    learner.step(block_ms=0)
    assert learner.regression.updates == 1
    again = decide_with_model(decisioning, f"ridge-{learner.published_version}", user_id="ann")
    assert again.model_version == f"ridge-{learner.published_version}"
    learner.stop()

    digest = keys.user_digest("ann")
    assert list(store.client.scan_iter(match=f"*{digest}*"))  # on one node of three
    profiles.DeleteProfile(p.DeleteProfileRequest(user_id="ann"))
    assert list(store.client.scan_iter(match=f"*{digest}*")) == []
    assert store.client.get(keys.DecisionKeys.of(shown.decision_id).record) is None


def test_the_report_reads_the_decision_log_of_every_node(store, catalog, decisioning):
    put(catalog, offer("a"))
    started = time.time()
    for i in range(12):
        decisioning.Decide(d.DecideRequest(user_id=f"r{i}", channel="web"))
    records = report.read_log(store.client, started - 1, time.time() + 1)
    assert len(records) == 12


def test_an_import_writes_each_user_with_one_script_in_its_slot(store):
    """``tactful import`` sends one script call per user, every key in the user's slot, to
    the nodes that hold them, and loads the script again on nodes that lost it."""
    from tactful import bulk

    lines = [
        (
            f'{{"user_id": "user-{i}", "attributes": {{"country": "FR"}},'
            ' "consent": {"inferred_personalization": true},'
            ' "topic_preferences": [{"topic": "yoga", "stance": "LIKE"}],'
            ' "signals": [{"topic": "golf", "weight": 1.5}]}'
        )
        for i in range(30)
    ]
    store.client.script_flush()
    bad = []
    summary = bulk.import_lines(
        store, lines, bad_line=lambda n, v: bad.append((n, v)), now=time.time(), batch=7
    )
    assert not bad and summary.imported == 30 and summary.signals_not_kept == 0
    for i in (0, 17, 29):
        profile = store.get_profile(user_id=f"user-{i}")
        assert [(a.name, a.value) for a in profile.attributes] == [("country", "FR")]
        assert [(s.topic, s.weight) for s in profile.signals] == [("golf", 1.5)]
        assert [t.topic for t in profile.topic_preferences] == ["yoga"]
