"""The learner: turns rewards into new model versions.

Rewards arrive on a Redis Stream (``tactful:{model}:rewards``), read through a consumer group:
the first outcome of each chosen offer (from ReportOutcome), and reward 0 for chosen offers
whose reward window closed without one (the learner closes due windows itself). Each reward
is a rank-one update of the ridge model; a new version is published at most every
``TACTFUL_MODEL_PUBLISH_INTERVAL_MS`` and picked up by every server on its next Decide.

Exactly once. The learner's state (A^-1, b, last applied stream id) is saved together with
the XACK of every entry it covers, in one MULTI/EXEC. After a crash the stream's pending
entries are exactly the rewards the saved state lacks: a restarted learner loads the state,
takes over those entries (XAUTOCLAIM) and applies them, so each reward counts once.

One learner at a time holds a lease (SET NX PX, renewed while it runs); others wait.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable

import numpy as np

from tactful import metrics
from tactful.bandit import LinearModel, RidgeLearner, SnapshotError
from tactful.features import FeatureSpace, SparseVector
from tactful.settings import LearningSettings
from tactful.store.model_store import ModelStore

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str]]
SWEEP_INTERVAL_SECONDS = 1.0
# Longer than the learner's Redis timeout (5 s), so a slow call cannot outlive the lease.
LEASE_MS = 15_000


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Learner:
    def __init__(
        self,
        models: ModelStore,
        space: FeatureSpace,
        settings: LearningSettings,
        *,
        consumer: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.models = models
        self.space = space
        self.settings = settings
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.clock = clock
        self.ridge = RidgeLearner(space, l2=settings.l2, kappa=settings.kappa)
        self.last_id = "0-0"
        self.published_version: int | None = None
        self._unacked: list[str] = []
        self._unpublished_since: list[float] = []  # event times, for the lag metric
        self._last_publish = 0.0
        self._last_checkpoint = time.monotonic()
        self._last_sweep = 0.0

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Load the saved state, then apply what a previous learner left unacknowledged."""
        self.models.ensure_group()
        saved = self.models.load_checkpoint()
        if saved is not None:
            state, last_id = saved
            try:
                self.ridge.restore(state)
                self.last_id = last_id
                log.info("learner resumed: %d updates, last id %s", self.ridge.updates, last_id)
            except (SnapshotError, ValueError, OSError, KeyError) as exc:
                # A state for another feature layout (TACTFUL_FEATURE_HASH_BITS changed) cannot
                # be used; crash-looping on it would stop learning for good.
                log.error("saved learner state unusable (%s): learning again from the prior", exc)
        self._apply(self.models.claim_all(self.consumer))

    def step(self, block_ms: int = 20) -> int:
        """Read and apply what is new, close due reward windows, publish and checkpoint when
        due. Returns how many rewards were applied."""
        applied = self._apply(self.models.read_new(self.consumer, count=512, block_ms=block_ms))
        now = self.clock()
        if now - self._last_sweep >= SWEEP_INTERVAL_SECONDS:
            self._last_sweep = now
            self.models.close_due_windows(now)
        self.publish()
        self.checkpoint()
        return applied

    def stop(self) -> None:
        self.publish(force=True)
        self.checkpoint(force=True)

    def run(self, stop: threading.Event) -> None:
        """Hold the lease and learn until ``stop`` is set (the `tactful learn` loop)."""
        token = self.consumer
        while not stop.is_set():
            if not self.models.hold_lease(token, LEASE_MS):
                stop.wait(1.0)  # another learner is active: stand by
                continue
            self.start()
            try:
                while not stop.is_set() and self.models.hold_lease(token, LEASE_MS):
                    self.step()
            finally:
                # Save and publish only while still the one learner: a learner that lost its
                # lease must not overwrite the state of the one that took over.
                if self.models.hold_lease(token, LEASE_MS):
                    self.stop()
                    self.models.release_lease(token)

    # --- work -----------------------------------------------------------------------------

    def _apply(self, entries: list[Entry]) -> int:
        applied = 0
        last = _stream_id(self.last_id)
        for entry_id, fields in sorted(entries, key=lambda e: _stream_id(e[0])):
            self._unacked.append(entry_id)
            if _stream_id(entry_id) <= last:
                continue  # already in the saved state (defence; the MULTI makes it rare)
            try:
                x = SparseVector.from_json(json.loads(fields["x"]))
                reward = float(fields["r"])
                if not math.isfinite(reward):
                    raise ValueError("reward is not finite")
                if not all(0 <= i < self.space.dim for i in x.indices):
                    raise ValueError("feature index outside this layout")
            except (KeyError, ValueError, TypeError, IndexError) as exc:
                log.error("reward %s skipped: unreadable (%s)", entry_id, exc)
                continue
            self.ridge.update(x, reward)
            self.last_id, last = entry_id, _stream_id(entry_id)
            self._unpublished_since.append(float(fields.get("t", self.clock())))
            applied += 1
        metrics.LEARNER_APPLIED.inc(applied)
        return applied

    def publish(self, *, force: bool = False) -> int | None:
        if not self._unpublished_since:
            return None
        now = self.clock()
        if not force and (now - self._last_publish) * 1000 < self.settings.publish_interval_ms:
            return None
        theta, variance = self.ridge.theta(), self.ridge.variance()
        if not (np.all(np.isfinite(theta)) and np.all(np.isfinite(variance))):
            # Servers would refuse it anyway; say so here, where it can be fixed.
            log.error("learner state went non-finite: not publishing (restore a checkpoint)")
            return None
        version = self.models.publish(
            lambda v: LinearModel(
                f"ridge-{v}", theta, self.space.layout, self.ridge.updates, variance
            ).to_bytes(),
            keep=self.settings.keep_versions,
            now=now,
        )
        self._last_publish = now
        if version is not None:
            self.published_version = version
            for event_time in self._unpublished_since:
                metrics.LEARNER_LAG_SECONDS.observe(max(0.0, now - event_time))
        self._unpublished_since = []
        return version

    def checkpoint(self, *, force: bool = False) -> None:
        if not self._unacked:
            return
        elapsed = time.monotonic() - self._last_checkpoint
        if not force and elapsed < self.settings.checkpoint_interval_seconds:
            return
        self.models.checkpoint(self.ridge.to_bytes(), self.last_id, self._unacked)
        self._unacked = []
        self._last_checkpoint = time.monotonic()
        metrics.LEARNER_BACKLOG.set(self.models.backlog())
