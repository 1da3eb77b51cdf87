"""The catalog (offers and compiled segments) and the model a process decides with, cached
in process and reloaded when a Decide's one read shows a version not loaded yet (the
catalog in that Decide, the model in the background)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from tactful import metrics
from tactful.bandit import LinearModel, SnapshotError, prior_theta, project
from tactful.domain import Offer
from tactful.features import FeatureSpace
from tactful.offer_table import EMPTY, OfferTable
from tactful.segment_book import SegmentBook
from tactful.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    """Offers and segments of one catalog version, swapped in together, with the offers as
    arrays for eligibility (built here, when the version loads, not per request)."""

    offers: Mapping[str, Offer] = field(default_factory=dict)
    segments: SegmentBook = field(default_factory=lambda: SegmentBook(()))
    table: OfferTable = EMPTY


class CatalogCache:
    """The offer catalog and its segments (compiled once per version), cached in process.
    Every Decide reads the catalog's version in its one round trip; a version this process
    has not loaded yet triggers a reload (offers and segments in one read), so a change made
    through any process is seen by all of them on their next request.

    Only a read that started after the last reload can trigger one (``read_at``, from
    ``time.monotonic``, taken before the read). Versions only grow, so a read that started
    earlier and saw another version is a request that was in flight during the reload: what
    is loaded is at least as new, and reloading for it would make every stale request of a
    burst reload again. A fresher read that sees a *lower* version is no stale read but the
    store going back (a flush or a restore restarts the count from 0): it reloads too."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._version = -1
        self._loaded_at = -math.inf  # monotonic time the last reload's read started
        self._snapshot = CatalogSnapshot()

    def snapshot(self, version: int, *, read_at: float) -> CatalogSnapshot:
        if version != self._version and read_at > self._loaded_at:
            with self._lock:
                if version != self._version and read_at > self._loaded_at:
                    self._reload_locked()
        return self._snapshot

    def offers(self, version: int, *, read_at: float) -> Mapping[str, Offer]:
        return self.snapshot(version, read_at=read_at).offers

    def refresh(self) -> Mapping[str, Offer]:
        with self._lock:
            self._reload_locked()
        return self._snapshot.offers

    def last_known(self) -> Mapping[str, Offer]:
        """Whatever was loaded last, possibly stale: what a fallback answer is made of."""
        return self._snapshot.offers

    def last_snapshot(self) -> CatalogSnapshot:
        return self._snapshot

    def _reload_locked(self) -> None:
        started = time.monotonic()
        version, offers, segments = self._store.load_catalog()
        # One object, one assignment: a request sees offers and segments of one version.
        by_id = {o.offer_id: o for o in offers}
        self._snapshot = CatalogSnapshot(by_id, SegmentBook(segments), OfferTable(by_id))
        self._version = version
        self._loaded_at = started
        metrics.CATALOG_RELOADS.inc()


class ModelCache:
    """The model this process decides with. Like the catalog, its version comes with every
    Decide's one read; a snapshot that cannot be used is rejected with a log line while the
    previous model stays in service.

    A Decide never loads a model: one that sees a version not loaded yet asks for it and
    decides with the model it has. One thread of this process loads (one GET and a decode,
    a few MB at 2^18 features), one version at a time; if more versions are asked for
    meanwhile, the one the latest read saw is loaded next, and the model is swapped in one
    assignment. The thread starts when a version is asked for and ends when none was for a
    minute, so it runs in the process that serves (after a fork, too: a thread does not
    survive one).

    As for the catalog, only a read that started after the last load can switch models, so
    a request that was in flight while a rollback or a new version was loaded does not
    switch the process back. Any other version a fresher read sees is loaded, lower ones
    included: a rollback lowers the version on purpose."""

    def __init__(self, store: Store, space: FeatureSpace, kappa: float) -> None:
        self._store = store
        self._space = space
        self._kappa = kappa
        self._version = 0
        self._loaded_at = -math.inf  # monotonic time the last load's read started
        self._model = LinearModel("prior", project(prior_theta(space.dim), kappa), space.layout)
        self._rejected: set[int] = set()
        self._asked = threading.Condition()
        self._wanted: tuple[int, float] | None = None  # (version, read_at) to load next
        self._loader: threading.Thread | None = None

    @property
    def space(self) -> FeatureSpace:
        return self._space

    def model(self, version: int, *, read_at: float) -> LinearModel:
        """The model to decide with now; ``version`` (read at ``read_at``) is loaded in the
        background if it is one to switch to."""
        model = self._model
        if self._wants(version, read_at):
            self._ask(version, read_at)
        return model

    def _wants(self, version: int, read_at: float) -> bool:
        return (
            version != self._version
            and version != 0
            and version not in self._rejected
            and read_at > self._loaded_at
        )

    def _ask(self, version: int, read_at: float) -> None:
        with self._asked:
            if self._wanted is None or read_at > self._wanted[1]:
                self._wanted = (version, read_at)
            if self._loader is None or not self._loader.is_alive():
                self._loader = threading.Thread(
                    target=self._run_loader, name="tactful-model-loader", daemon=True
                )
                self._loader.start()
            self._asked.notify()

    def _run_loader(self) -> None:
        while True:
            with self._asked:
                if self._wanted is None:
                    self._asked.wait(_LOADER_IDLE)
                if self._wanted is None:
                    self._loader = None  # nothing asked for a while: the next ask starts one
                    return
                (version, read_at), self._wanted = self._wanted, None
            if not self._wants(version, read_at):
                continue  # loaded meanwhile, or a load since started after that read
            try:
                self._load(version)
            except Exception:
                # The store could not be read (the breaker is open, Redis is away): the
                # next Decide that sees the version asks again; pause so as not to spin.
                log.warning("model version %d not loaded, retrying", version, exc_info=True)
                time.sleep(_LOAD_RETRY_PAUSE)

    def _load(self, version: int) -> None:
        started = time.monotonic()
        raw = self._store.load_model(version=version)
        try:
            if raw is None:
                raise SnapshotError("snapshot missing")
            model = LinearModel.from_bytes(raw, self._space)
            # Whoever wrote it (another release, another kappa, a rollback), the rule that
            # explicit outranks inferred is this server's to keep: project again.
            model = replace(model, theta=project(model.theta, self._kappa))
        except SnapshotError as exc:
            self._rejected.add(version)
            metrics.MODEL_REJECTED.inc()
            log.error(
                "model version %d rejected, keeping %s: %s", version, self._model.version, exc
            )
            return
        self._model, self._version, self._loaded_at = model, version, started
        metrics.MODEL_VERSION.set(version)


_LOAD_RETRY_PAUSE = 0.2  # seconds between failed reads of a snapshot
_LOADER_IDLE = 60.0  # seconds the loading thread waits for a version before it ends
