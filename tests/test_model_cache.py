"""Model versions are loaded in the background, on the real redis-server: a Decide never
waits for a load, whatever the store does meanwhile, and a version that cannot be used,
a rollback or a fork does not keep the process from the version it should serve."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from tactful import metrics
from tactful.bandit import LinearModel, prior_theta
from tactful.caches import CatalogCache, ModelCache
from tactful.decider import Decider
from tactful.domain import DecideRequest, Offer
from tactful.features import FeatureSpace
from tactful.store.model_store import ModelStore
from tactful.store.redis_store import RedisStore

from conftest import make_settings, until

SETTINGS = make_settings()
SPACE = FeatureSpace(SETTINGS.learning.hashed_bits, SETTINGS.learning.feature_set)


class WatchedStore:
    """The test's RedisStore, with each model load recorded and, while ``gate`` is closed,
    held before it reads (a slow Redis, a large snapshot on a slow link)."""

    def __init__(self, store: RedisStore, *, fail_first: int = 0) -> None:
        self.store = store
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()  # a load is held at the gate
        self.loads: list[int] = []
        self.finished: list[int] = []
        self.fail_first = fail_first

    def load_model(self, *, version: int) -> bytes | None:
        self.loads.append(version)
        self.waiting.set()
        try:
            assert self.gate.wait(30), "the test never opened the gate"
            if len(self.loads) <= self.fail_first:
                raise ConnectionError("Redis went away")
            return self.store.load_model(version=version)
        finally:
            self.finished.append(version)
            self.waiting.clear()


def snapshot(theta_shift: float = 0.0):
    def build(version: int) -> bytes:
        theta = prior_theta(SPACE.dim) + theta_shift
        return LinearModel(f"ridge-{version}", theta, SPACE.layout).to_bytes()

    return build


def publish(store: RedisStore, build=None) -> int:
    version = ModelStore(store.client).publish(build or snapshot(), keep=10, now=time.time())
    assert version is not None
    return version


def make_decider(store: RedisStore, watched: WatchedStore) -> Decider:
    store.put_offer(offer=Offer("a", "Offer a", ("misc",), ("web",), 0.5))
    models = ModelCache(watched, SPACE, SETTINGS.learning.kappa)
    return Decider(store, CatalogCache(store), models, SETTINGS)


def served(decider: Decider) -> str:
    request = DecideRequest(user_id="u", channel="web", dry_run=True)
    return decider.decide(request).model_version


def serves(decider: Decider, version: int) -> bool:
    return until(lambda: served(decider), lambda v: v == f"ridge-{version}") == f"ridge-{version}"


def test_a_decide_never_waits_for_a_load(store):
    watched = WatchedStore(store)
    decider = make_decider(store, watched)
    assert serves(decider, publish(store))
    watched.gate.clear()  # from here on, loads are held
    second = publish(store)
    assert served(decider) == "ridge-1"  # sees version 2: asks for it, answers with 1
    assert watched.waiting.wait(10)  # the load of 2 is under way, and held
    answers = [served(decider) for _ in range(20)]
    assert answers == ["ridge-1"] * 20  # answered while the load is held
    assert watched.loads == [1, second] and watched.finished == [1]  # one load at a time
    third, fourth = publish(store), publish(store)
    assert served(decider) == "ridge-1"  # 4 is the version the latest read saw
    watched.gate.set()
    assert serves(decider, fourth)
    assert watched.loads == [1, second, fourth] and third not in watched.loads
    assert metrics.MODEL_VERSION._value.get() == fourth


def test_a_rejected_version_does_not_stop_later_ones(store):
    watched = WatchedStore(store)
    decider = make_decider(store, watched)
    assert serves(decider, publish(store))
    rejected = metrics.MODEL_REJECTED._value.get()
    corrupt = publish(store, lambda v: b"\0\0\0\2{}" + bytes(10))
    assert served(decider) == "ridge-1"
    assert until(metrics.MODEL_REJECTED._value.get, lambda n: n == rejected + 1) == rejected + 1
    assert [served(decider) for _ in range(5)] == ["ridge-1"] * 5
    later = publish(store)
    assert serves(decider, later)
    assert watched.loads == [1, corrupt, later]  # the rejected one was read once


def test_a_rollback_to_a_lower_version_is_loaded(store):
    watched = WatchedStore(store)
    decider = make_decider(store, watched)
    first = publish(store)
    assert serves(decider, first)
    newer = publish(store, snapshot(0.25))
    assert serves(decider, newer)
    ModelStore(store.client).rollback(first)
    assert serves(decider, first)
    assert decider.decide(DecideRequest(user_id="u", channel="web", dry_run=True)).choices
    assert watched.loads == [first, newer, first]


def test_a_load_the_store_fails_is_tried_again(store):
    watched = WatchedStore(store, fail_first=1)
    decider = make_decider(store, watched)
    version = publish(store)
    assert served(decider) == "prior"
    assert serves(decider, version)  # the next Decides ask again
    assert watched.loads == [version, version]


def _serve_in_child(cache: ModelCache, version: int, out: multiprocessing.Queue) -> None:
    out.put(
        until(
            lambda: cache.model(version, read_at=time.monotonic()).version,
            lambda v: v == f"ridge-{version}",
        )
    )


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_a_forked_process_loads_versions_itself(store):
    """Workers fork after start-up: the loading thread of the parent is not in the child,
    which starts its own when it first sees a new version."""
    cache = ModelCache(store, SPACE, SETTINGS.learning.kappa)
    first = publish(store)
    assert (
        until(
            lambda: cache.model(first, read_at=time.monotonic()).version,
            lambda v: v == f"ridge-{first}",
        )
        == f"ridge-{first}"
    )
    second = publish(store, snapshot(0.1))
    fork = multiprocessing.get_context("fork")
    out = fork.Queue()
    child = fork.Process(target=_serve_in_child, args=(cache, second, out))
    child.start()
    try:
        assert out.get(timeout=30) == f"ridge-{second}"
    finally:
        child.join(10)
    assert child.exitcode == 0
    assert cache.model(first, read_at=0.0).version == f"ridge-{first}"  # the parent's own
