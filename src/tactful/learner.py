"""The learner: turns rewards into new model versions.

Rewards arrive on a Redis Stream (``tactful:{model}:rewards``), read through a consumer group:
the first outcome of each chosen offer (from ReportOutcome), and reward 0 for chosen offers
whose reward window closed without one (the lease holder closes due windows). Each read is
learned as one batch by ``regression.OnlineRegression``, at O(non-zeros) per reward; a new
version is published at most every ``TACTFUL_MODEL_PUBLISH_INTERVAL_MS`` and every server
loads it in the background.

Several learners. Any number of learner processes share the stream: the consumer group
gives each entry to one of them. One holds the lease (SET NX PX, renewed while it runs): it
merges the others' work, closes windows, publishes and saves the state. The others hand
their work to it as deltas (``learner_state.Delta``) at the publish interval, and take up the
saved state again each time it is saved, so they learn on top of what the whole fleet
learned. The model stays one: the lease holder's.

Exactly once. The saved state goes to Redis together with the XACK of the entries the lease
holder applied itself and the removal of the deltas it merged, in one MULTI/EXEC; another
learner's delta goes on the list together with the XACK of the entries it covers (a script
that refuses if any was claimed away). So every reward is in exactly one place: the saved
state, a delta on the list, or the stream's pending entries. A learner that takes up the
lease loads the state, merges the list, and learns its own pending entries again; entries a
dead learner left pending are claimed once they have been idle ``CLAIM_IDLE_MS``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from operator import itemgetter

import numpy as np

from tactful import metrics
from tactful.bandit import LinearModel, prior_theta, project
from tactful.batches import Batch, Vector, batch_from_arrays, batch_of, select, usable_rows
from tactful.features import FeatureSpace
from tactful.learner_state import Delta, StateError
from tactful.regression import OnlineRegression
from tactful.settings import LearningSettings
from tactful.store import reward_vectors
from tactful.store.model_store import ModelStore, RawEntry

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str]]
SWEEP_INTERVAL_SECONDS = 1.0
# Longer than the learner's Redis timeout (5 s), so a slow call cannot outlive the lease.
LEASE_MS = 15_000
# A learner hands its entries on within a publish interval; entries idle this long belong to
# a learner that died (or stalled so long that its work is redone elsewhere: its push is
# then refused).
CLAIM_IDLE_MS = 10_000
READ_COUNT = 4096  # entries per read: one batch
LAG_SAMPLES = 64  # rewards per published version whose lag is observed


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a read is parsed into a batch: its tens of
    thousands of short-lived lists would set off collections that walk them, again and
    again, for nothing (they are freed by reference counting), which cost about a fifth of
    the learner's time. Collection resumes after, and catches up then."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _readable(read: list[RawEntry]) -> tuple[Batch, list[float]] | None:
    """The batch, and a sample of the event times, of a read whose entries all have the same
    fields in the same order, each a readable vector in one form (``reward_vectors``) and a
    finite reward (what the reward scripts write), taken with a few passes in C over the
    whole read rather than a Python loop over its entries; None if some entry is
    otherwise."""
    if not read:
        return batch_of([], []), []
    fields = [raw for _, raw in read]
    names = fields[0][0::2]
    if b"x" not in names or b"r" not in names or len(set(names)) != len(names):
        return None
    if list(map(itemgetter(slice(0, None, 2)), fields)).count(names) != len(fields):
        return None
    x_at, r_at = 2 * names.index(b"x") + 1, 2 * names.index(b"r") + 1
    try:
        xs = list(map(itemgetter(x_at), fields))
        rewards = list(map(float, map(itemgetter(r_at), fields)))
        if not all(map(math.isfinite, rewards)):
            return None
        json_vectors = sum(map(reward_vectors.is_json, xs))
        if json_vectors == 0:
            batch = batch_from_arrays(*reward_vectors.unpack(xs), rewards)
        elif json_vectors == len(xs):  # written by a server from before the packed form
            batch = batch_of(list(map(reward_vectors.vector_of, xs)), rewards)
        else:
            return None
        # Event times only feed the lag metric's sample: a sample of them is enough.
        sample = fields[:: max(1, len(fields) // LAG_SAMPLES)]
        if b"t" in names:
            t_at = 2 * names.index(b"t") + 1
            times = [float(t or 0.0) for t in map(itemgetter(t_at), sample)]
        else:
            times = [0.0] * len(sample)
    except (KeyError, ValueError, TypeError, IndexError):  # orjson's errors are ValueErrors
        return None
    return batch, times


def _fields(raw: list[bytes]) -> dict[str, str]:
    """An entry's fields by name, as ``Learner._apply`` reads them."""
    pairs = iter(raw)
    return {
        name.decode(errors="replace"): value.decode(errors="replace")
        for name, value in zip(pairs, pairs, strict=False)
    }


class Learner:
    def __init__(
        self,
        models: ModelStore,
        space: FeatureSpace,
        settings: LearningSettings,
        *,
        consumer: str | None = None,
        clock: Callable[[], float] = time.time,
        leader: bool = True,
    ) -> None:
        self.models = models
        self.space = space
        self.settings = settings
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.clock = clock
        self.leader = leader  # holds the lease (``run`` decides; a learner made alone does)
        self.claim_idle_ms = CLAIM_IDLE_MS
        self._catalog_version = -1
        self._next_expiry = math.inf
        self._forgot = False  # something to save though no reward came
        self._prior = prior_theta(space.dim)
        self.regression = self._new_regression()
        self.published_version: int | None = None
        self._epoch = -1  # of the saved state this learner stands on
        self._merged = 0  # deltas of the list merged since the last save
        self._unacked: list[str] = []
        self._unpublished_since: list[float] = []  # event times, for the lag metric
        self._last_publish = 0.0
        self._last_hand_on = time.monotonic()
        self._last_checkpoint = time.monotonic()
        self._last_sweep = 0.0

    def _new_regression(self) -> OnlineRegression:
        memory = self.settings.memory or math.inf
        return OnlineRegression(
            self.space,
            l2=self.settings.l2,
            rate=1.0,
            prior=self._prior,
            memory=memory,
            drift_threshold=self.settings.drift_threshold,
        )

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Stand on the saved state (merging the list of deltas when holding the lease), then
        learn again what this consumer has pending, and (holding the lease) what dead
        learners left."""
        self.models.ensure_group()
        self._reload()
        if self.leader:
            self._claim()

    def _reload(self) -> None:
        # A read sent ahead is delivered once taken: then its entries are among the
        # pending ones learned again below.
        self.models.take_read_ahead()
        self.regression = self._new_regression()
        saved = self.models.load_checkpoint()
        if saved is not None:
            state, self._epoch = saved
            try:
                self.regression.restore(state)
            except StateError as exc:
                # A state for another feature layout (TACTFUL_FEATURE_HASH_BITS changed), or
                # from a release with another learner: crash-looping on it would stop learning.
                log.error("saved learner state unusable (%s): learning again from the prior", exc)
                self.regression = self._new_regression()
        else:
            self._epoch = 0
        self._merged = 0
        if self.leader:
            self._merge_deltas()
        self.regression.take_delta()  # what follows is this learner's own work
        self._unacked = []
        self._apply(self.models.read_own_pending(self.consumer))
        log.info("learner at %d updates (%s)", self.regression.updates, self._role())

    def _role(self) -> str:
        return "holding the lease" if self.leader else "handing deltas to the lease holder"

    def step(self, block_ms: int = 20) -> int:
        """Read and apply what is new; holding the lease, merge the others' deltas, close due
        reward windows, publish and save when due; else hand the work on when due. Returns
        how many rewards were applied."""
        with _collector_paused():  # the read is freed inside: not walked when it resumes
            read = self.models.read_new
            applied = self._apply_read(
                read(self.consumer, count=READ_COUNT, block_ms=block_ms, read_ahead=True)
            )
        if self.leader:
            self._merge_deltas()
            now = self.clock()
            if now - self._last_sweep >= SWEEP_INTERVAL_SECONDS:
                self._last_sweep = now
                self.models.close_due_windows(now)
                self.forget_gone_offers(now)
                self._claim()
            self.publish()
            self.checkpoint()
        else:
            self.hand_on()
        return applied

    def stop(self) -> None:
        self._apply_read(self.models.take_read_ahead())  # saved or handed on with the rest
        if self.leader:
            self.publish(force=True)
            self.checkpoint(force=True)
        else:
            self.hand_on(force=True)

    def run(self, stop: threading.Event) -> None:
        """Learn until ``stop`` is set (the `tactful learn` loop): holding the lease when it is
        free, handing deltas to its holder otherwise."""
        token = self.consumer
        self.leader = self.models.hold_lease(token, LEASE_MS)
        self.start()
        renewed = time.monotonic()
        while not stop.is_set():
            if time.monotonic() - renewed >= 1.0:
                renewed = time.monotonic()
                holds = self.models.hold_lease(token, LEASE_MS)
                if holds != self.leader:
                    # A role change: what this learner holds is re-read from what is saved.
                    if self.leader:
                        log.warning("learner lost its lease: handing on from now")
                    self.leader = holds
                    self._reload()
            self.step()
        if self.leader and self.models.hold_lease(token, LEASE_MS):
            # Save and publish only while still the lease holder: one that lost its lease
            # must not overwrite the state of the one that took over.
            self.stop()
            self.models.release_lease(token)
        elif not self.leader:
            self.stop()

    # --- work -----------------------------------------------------------------------------

    def _apply(self, entries: list[Entry]) -> int:
        """Learn these entries as one batch (an unreadable one is logged and acknowledged
        with the rest)."""
        vectors: list[Vector] = []
        rewards: list[float] = []
        times: list[float] = []
        ids: list[str] = []
        for entry_id, fields in entries:
            try:
                vector = reward_vectors.vector_of(fields["x"])
                reward = float(fields["r"])
                if not math.isfinite(reward):
                    raise ValueError("reward not finite")
            except (KeyError, ValueError, TypeError, IndexError) as exc:
                log.error("reward %s skipped: unreadable (%s)", entry_id, exc)
                continue
            vectors.append(vector)
            rewards.append(reward)
            times.append(float(fields.get("t") or 0.0))
            ids.append(entry_id)
        self._unacked += [entry_id for entry_id, _ in entries]
        return self._learn_batch(self._batch(vectors, rewards, ids, times), times, ids)

    def _apply_read(self, read: list[RawEntry]) -> int:
        """``_apply`` for a stream read as Redis sent it: when every entry is as the reward
        scripts write them, read in a few passes over the whole read (``_readable``); else
        one entry at a time by ``_apply``, which says which it skips and why."""
        ids = [entry_id.decode() for entry_id, _ in read]
        readable = _readable(read)
        if readable is None:
            return self._apply([(i, _fields(raw)) for i, (_, raw) in zip(ids, read, strict=True)])
        self._unacked += ids
        return self._learn_batch(*readable, ids)

    def _learn_batch(self, batch: Batch, times: list[float], ids: list[str]) -> int:
        """Learn the batch's usable rewards (one it cannot use is logged and skipped)."""
        keep = usable_rows(batch, self.space.dim)
        for k in np.flatnonzero(~keep).tolist():
            log.error("reward %s skipped: outside this feature layout", ids[k])
        batch = select(batch, keep)
        if len(batch):
            self.learn(batch)
            now = self.clock()
            self._unpublished_since += [t or now for t in times] or [now]
        metrics.LEARNER_APPLIED.inc(len(batch))
        return len(batch)

    def _claim(self) -> int:
        """Learn what dead learners left pending (claimed back from this learner itself
        after a long stall, an entry is not learned twice)."""
        held = set(self._unacked)
        claimed = self.models.claim_idle(self.consumer, min_idle_ms=self.claim_idle_ms)
        return self._apply([e for e in claimed if e[0] not in held])

    def _batch(
        self, vectors: list[Vector], rewards: list[float], ids: list[str], times: list[float]
    ) -> Batch:
        """The vectors as a batch; one with a number that is not a number is logged and left
        out (and from ``ids`` and ``times``)."""
        try:
            batch = batch_of(vectors, rewards)
        except (TypeError, ValueError):
            # Some number is not a number: find which, one vector at a time (rare).
            usable = []
            for k, vector in enumerate(vectors):
                try:
                    batch_of([vector], [rewards[k]])
                    usable.append(k)
                except (TypeError, ValueError) as exc:
                    log.error("reward %s skipped: unreadable (%s)", ids[k], exc)
            batch = batch_of([vectors[k] for k in usable], [rewards[k] for k in usable])
            ids[:] = [ids[k] for k in usable]
            times[:] = [times[k] for k in usable]
        return batch

    def learn(self, batch: Batch) -> None:
        changes, restarts = self.regression.changes_detected, self.regression.restarts
        self.regression.learn(batch)
        if changes := self.regression.changes_detected - changes:
            metrics.LEARNER_CHANGES.inc(changes)
        if restarts := self.regression.restarts - restarts:
            metrics.LEARNER_RESTARTS.inc(restarts)

    def _merge_deltas(self) -> None:
        for raw in self.models.read_deltas(self._merged):
            self._merged += 1
            try:
                delta = Delta.from_bytes(raw, self.space.dim)
            except StateError as exc:
                log.error("learner delta skipped: %s", exc)
                continue
            self.regression.merge(delta)
            self._unpublished_since.append(self.clock())

    def forget_gone_offers(self, now: float) -> list[str]:
        """Put the own features of every offer gone from the catalog (deleted, or past its
        end) back as never seen, so a new offer starts from what its topics, segments and
        context teach and not from a dead offer's residue (at 2^18 buckets their hashed
        indices rarely meet, but they would stay in the published model for good). Returns
        the offers forgotten."""
        if self.models.catalog_version() == self._catalog_version and now < self._next_expiry:
            return []
        version, offers, segments = self.models.catalog()
        self._catalog_version = version
        live = {o.offer_id: o for o in offers if o.end_time is None or now < o.end_time}
        ends = [o.end_time for o in live.values() if o.end_time is not None]
        self._next_expiry = min(ends, default=math.inf)
        known = self.regression.offers
        gone = [offer_id for offer_id in known if offer_id not in live]
        for offer_id in gone:
            indices = self.space.offer_own_indices(offer_id, known.pop(offer_id), segments)
            self.regression.forget(indices)
        for offer_id, offer in live.items():
            known[offer_id] = sorted(set(known.get(offer_id, [])) | set(offer.channels))
        if gone:
            log.info("forgot the own features of %d offers gone from the catalog", len(gone))
            self._unpublished_since.append(now)
            self._forgot = True
        return gone

    def theta(self) -> np.ndarray:
        """The weights as published: projected so explicit >= kappa x inferred."""
        return project(self.regression.weights, self.settings.kappa)

    def publish(self, *, force: bool = False) -> int | None:
        if not self._unpublished_since:
            return None
        now = self.clock()
        if not force and (now - self._last_publish) * 1000 < self.settings.publish_interval_ms:
            return None
        theta, variance = self.theta(), self.regression.variance()
        if not (np.all(np.isfinite(theta)) and np.all(np.isfinite(variance))):
            # Servers would refuse it anyway; say so here, where it can be fixed.
            log.error("learner state went non-finite: not publishing (restore a checkpoint)")
            return None
        updates = self.regression.updates
        version = self.models.publish(
            lambda v: LinearModel(
                f"ridge-{v}", theta, self.space.layout, updates, variance
            ).to_bytes(),
            keep=self.settings.keep_versions,
            now=now,
        )
        self._last_publish = now
        if version is not None:
            self.published_version = version
            # A sample: one observe per reward would cost more than learning it.
            since = self._unpublished_since
            for event_time in since[:: max(1, len(since) // LAG_SAMPLES)]:
                metrics.LEARNER_LAG_SECONDS.observe(max(0.0, now - event_time))
        self._unpublished_since = []
        return version

    def checkpoint(self, *, force: bool = False) -> None:
        if not (self._unacked or self._merged or self._forgot):
            return
        elapsed = time.monotonic() - self._last_checkpoint
        if not force and elapsed < self.settings.checkpoint_interval_seconds:
            return
        self.models.checkpoint(self.regression.to_bytes(), self._unacked, self._merged)
        self._epoch += 1
        self._unacked, self._merged = [], 0
        self._forgot = False
        self._last_checkpoint = time.monotonic()
        metrics.LEARNER_BACKLOG.set(self.models.backlog())

    def hand_on(self, *, force: bool = False) -> None:
        """Not holding the lease: push what was learned since the last push as a delta, with
        the XACK of its entries; then stand on the newest saved state."""
        elapsed_ms = (time.monotonic() - self._last_hand_on) * 1000
        if not force and elapsed_ms < self.settings.publish_interval_ms:
            return
        self._last_hand_on = time.monotonic()
        # The push must cover every entry pending to this learner: a read sent ahead too.
        self._apply_read(self.models.take_read_ahead())
        if self._unacked:
            delta = self.regression.take_delta()
            if not self.models.push_delta(self.consumer, delta.to_bytes(), self._unacked):
                log.warning("some rewards were claimed by the lease holder: reloading")
                self._reload()
                return
            self._unacked = []
            self._unpublished_since = []
        if self.models.checkpoint_epoch() != self._epoch:
            self._rebase()

    def _rebase(self) -> None:
        """Stand on the newest saved state (called with nothing left to hand on)."""
        saved = self.models.load_checkpoint()
        if saved is None:
            return
        state, epoch = saved
        try:
            self.regression.restore(state)  # marks it: the next delta starts from here
        except StateError as exc:
            log.error("saved learner state unusable (%s): keeping mine", exc)
            return
        self._epoch = epoch
