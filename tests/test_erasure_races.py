"""Erasure wins every race: a call that was in flight while DeleteProfile ran (it started
before, and writes after) cannot re-create a key of the erased user nor leave a decision
outside erasure's reach. Each test holds one real call at the point where today's code would
write late, runs the erasure, then lets the call go on; on one redis-server and on a real
Redis Cluster."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from tactful import keys
from tactful.domain import Consent, PreferencesUpdate, Profile, Signal
from tactful.settings import Settings
from tactful.store import DecisionInputs, LoggedDecision
from tactful.store.redis_store import RedisStore
from tactful.transport.server import build_server
from tactful.v1 import catalog_pb2, catalog_pb2_grpc, decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import offer

pytestmark = pytest.mark.both_stores

USER = "erin"


class HeldStore(RedisStore):
    """The real store; the operation named in ``hold`` stops at the point where it is about
    to write (after what it read, or after its call began), until ``go`` is set."""

    hold = ""
    reached = threading.Event()
    go = threading.Event()

    def _pause(self, operation: str) -> None:
        if self.hold == operation:
            self.reached.set()
            assert self.go.wait(10)

    def read_for_decision(self, *, user_id: str, request_id: str) -> DecisionInputs:
        inputs = super().read_for_decision(user_id=user_id, request_id=request_id)
        self._pause("decide")
        return inputs

    def set_preferences(self, *, update: PreferencesUpdate, now: float) -> Profile:
        self._pause("set_preferences")
        return super().set_preferences(update=update, now=now)

    def record_signals(self, *, user_id: str, signals: Any, now: float | None = None) -> bool:
        self._pause("record_signals")
        return super().record_signals(user_id=user_id, signals=signals, now=now)

    def get_logged_decision(
        self, *, decision_id: str, render: bool = False
    ) -> LoggedDecision | None:
        logged = super().get_logged_decision(decision_id=decision_id, render=render)
        self._pause("dismiss")
        return logged


@pytest.fixture
def held(store: RedisStore, settings: Settings) -> Iterator[tuple[HeldStore, Any, Any, Any]]:
    HeldStore.hold = ""
    HeldStore.reached = threading.Event()
    HeldStore.go = threading.Event()
    held_store = HeldStore.for_settings(store.client, settings)
    running = build_server(settings, held_store, port=0)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        catalog_pb2_grpc.CatalogStub(channel).PutOffer(
            catalog_pb2.PutOfferRequest(offer=offer("news", channels=["web", "email"]))
        )
        yield (
            held_store,
            decisioning_pb2_grpc.DecisioningStub(channel),
            profiles_pb2_grpc.ProfilesStub(channel),
            channel,
        )
    HeldStore.go.set()
    running.stop(None)  # type: ignore[arg-type]


def erase_during(store: HeldStore, operation: str, profiles: Any, call: Callable[[], Any]) -> Any:
    """Start ``call``, hold ``operation`` where it would write, erase the user, let it go on;
    its result (or the RpcError it raised)."""
    store.hold = operation
    with ThreadPoolExecutor(1) as pool:
        future: Future[Any] = pool.submit(call)
        assert store.reached.wait(10), "the call never reached the point it is held at"
        profiles.DeleteProfile(p.DeleteProfileRequest(user_id=USER), timeout=10)
        store.go.set()
        try:
            return future.result(timeout=10)
        except grpc.RpcError as error:
            return error


def assert_erased(store: RedisStore, *decision_ids: str) -> None:
    digest = keys.user_digest(USER)
    assert list(store.client.scan_iter(match=f"*{digest}*")) == []
    for decision_id in decision_ids:
        dk = keys.DecisionKeys.of(decision_id)
        assert store.client.exists(dk.record, dk.outcomes, dk.owner) == 0
        assert store.client.zscore(keys.AWAITING, decision_id) is None


def like(topic: str) -> p.SetPreferencesRequest:
    return p.SetPreferencesRequest(
        user_id=USER,
        topic_preferences=[p.TopicPreference(topic=topic, stance=p.STANCE_LIKE)],
        consent=p.Consent(inferred_personalization=True),
    )


@pytest.mark.parametrize("channel", ["web", "email"])
def test_a_decide_that_read_before_the_erasure_writes_nothing_after_it(held, channel):
    store, decisioning, profiles, _ = held
    profiles.SetPreferences(like("news"))
    answer = erase_during(
        store,
        "decide",
        profiles,
        lambda: decisioning.Decide(d.DecideRequest(user_id=USER, channel=channel, request_id="r")),
    )
    assert isinstance(answer, d.DecideResponse)
    assert not answer.choices  # nothing made from an erased profile is shown
    assert_erased(store, answer.decision_id)
    assert not list(store.client.scan_iter(match=f"{keys.PREFIX}:{{d:*}}:decision"))


def test_a_preference_write_in_flight_during_the_erasure_is_aborted(held):
    store, _, profiles, _ = held
    profiles.SetPreferences(like("news"))
    result = erase_during(
        store, "set_preferences", profiles, lambda: profiles.SetPreferences(like("tea"))
    )
    assert isinstance(result, grpc.RpcError)
    assert result.code() == grpc.StatusCode.ABORTED
    assert_erased(store)
    # Sent again, it is a new write, after the erasure: a new profile.
    again = profiles.SetPreferences(like("tea"))
    assert [t.topic for t in again.topic_preferences] == ["tea"]


def test_signals_in_flight_during_the_erasure_are_aborted(held):
    store, _, profiles, _ = held
    profiles.SetPreferences(like("news"))

    def record() -> Any:
        return profiles.RecordSignals(
            p.RecordSignalsRequest(user_id=USER, signals=[p.Signal(topic="tea", weight=1.0)])
        )

    result = erase_during(store, "record_signals", profiles, record)
    assert isinstance(result, grpc.RpcError)
    assert result.code() == grpc.StatusCode.ABORTED
    assert_erased(store)


def test_a_dismiss_in_flight_during_the_erasure_puts_no_cooldown_back(held):
    store, decisioning, profiles, _ = held
    profiles.SetPreferences(like("news"))
    shown = decisioning.Decide(d.DecideRequest(user_id=USER, channel="web"))
    assert [c.offer_id for c in shown.choices] == ["news"]

    def dismiss() -> Any:
        return decisioning.ReportOutcome(
            d.ReportOutcomeRequest(
                decision_id=shown.decision_id,
                offer_id="news",
                event=d.OUTCOME_EVENT_DISMISS,
                outcome_id="x",
            )
        )

    erase_during(store, "dismiss", profiles, dismiss)
    assert_erased(store, shown.decision_id)


def test_an_outcome_after_the_erasure_finds_no_decision(held):
    store, decisioning, profiles, _ = held
    profiles.SetPreferences(like("news"))
    shown = decisioning.Decide(d.DecideRequest(user_id=USER, channel="web"))
    profiles.DeleteProfile(p.DeleteProfileRequest(user_id=USER))
    with pytest.raises(grpc.RpcError) as gone:
        decisioning.ReportOutcome(
            d.ReportOutcomeRequest(
                decision_id=shown.decision_id,
                offer_id="news",
                event=d.OUTCOME_EVENT_CLICK,
                outcome_id="late",
            )
        )
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert_erased(store, shown.decision_id)


def test_the_user_index_stays_bounded_and_erasure_reaches_every_decision_it_keeps(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
):
    """A user id shared by many (``guest``): the index keeps the newest decisions, the ones
    it drops are deleted, so one erasure reaches every decision of the user there is."""
    import tactful.store.decisions as store_module
    from tactful.store import LoggedDecision as Logged

    monkeypatch.setattr(store_module, "MAX_DECISIONS_PER_USER", 5)
    monkeypatch.setattr(store_module, "MAX_REQUEST_IDS_PER_USER", 3)
    ids = [f"dec{i}" for i in range(8)]
    for i, decision_id in enumerate(ids):
        store.log_decision(
            user_id=USER,
            decision=Logged(decision_id, {"ts": 1000.0 + i, "offer_ids": []}),
            request_id=f"req{i}",
            learn_after=None,
        )
    k = keys.UserKeys.of(USER)
    assert store.client.zrange(k.decided, 0, -1) == ids[3:]
    assert store.client.hlen(k.requests) == 3
    for dropped in ids[:3]:
        assert not store.client.exists(keys.DecisionKeys.of(dropped).record)
    store.delete_profile(user_id=USER)
    assert_erased(store, *ids)


def test_signals_of_a_consenting_user_are_still_kept(store: RedisStore):
    """The fence only stops calls that began before an erasure."""
    store.set_preferences(
        update=PreferencesUpdate(USER, consent=Consent(True, 0.0)),
        now=1.0,
    )
    assert store.record_signals(user_id=USER, signals=[Signal("tea", 1.0, 2.0)])


def test_the_decision_log_names_its_user_by_a_keyed_pseudonym_only(held):
    """Whoever holds the log (a report, an export) cannot test candidate user ids against
    it: the unkeyed digest the key names use is not in the record."""
    store, decisioning, _, _ = held
    shown = decisioning.Decide(d.DecideRequest(user_id=USER, channel="web"))
    record = store.client.get(keys.DecisionKeys.of(shown.decision_id).record)
    assert keys.user_digest(USER) not in record
    assert "user_key" not in record


def test_an_import_that_began_before_an_erasure_brings_nothing_back(store: RedisStore):
    """A bulk import reads its file for minutes: a line of a user erased meanwhile is not
    written (it would bring back the profile, user id in clear), and is reported."""
    import time

    from tactful import bulk

    began = time.time()
    store.set_preferences(update=PreferencesUpdate(USER, max_messages_per_day=3), now=began)
    store.delete_profile(user_id=USER, now=began + 1)
    bad: list[tuple[int, Any]] = []
    line = b'{"user_id": "erin", "max_messages_per_day": 2}\n'
    summary = bulk.import_lines(store, [line], bad_line=lambda n, v: bad.append((n, v)), now=began)
    assert (summary.imported, summary.bad) == (0, 1)
    assert "erased" in bad[0][1][0].description
    assert_erased(store)
    # An import that begins after the erasure writes the profile anew.
    later = bulk.import_lines(store, [line], bad_line=lambda n, v: None, now=began + 2)
    assert later.imported == 1
