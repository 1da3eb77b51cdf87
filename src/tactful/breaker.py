"""A circuit breaker in front of the store: when Redis is down, stop asking it.

Without one, every request waits out its Redis budget before falling back, and a dead Redis
gets hammered by reconnect attempts from every thread. With one, once there is *evidence* that
Redis is down the circuit *opens*: store calls fail at once (``Unavailable``, so a
render-time Decide gets its fallback answer in well under a millisecond) for
``open_seconds``. Then it is *half-open*: one call at a time is let through as a probe; its
success closes the circuit (full service again), its failure opens it for another period.
Recovery after Redis returns therefore takes at most ``open_seconds`` plus one probe.

What counts as evidence (the model of resilience4j's ``failureRateThreshold`` /
``minimumNumberOfCalls`` / sliding window, and of Envoy's outlier detection):

* a **failure rate**: at least ``failure_rate`` of the calls that ended in the last
  ``window_seconds`` failed, and at least ``min_calls`` calls ended in that window. One slow
  moment of a busy machine (a CPU-throttled pod, a Redis fork or fsync, a scheduler stall)
  times out the few calls in flight, a small share of the window: the circuit stays closed
  and the next calls simply succeed. A frozen Redis fails every call: the rate crosses the
  threshold within a fraction of the window;
* a **refused connection**, counted at once (``failed(conclusive=True)``): nothing listens
  where Redis should be, or it reset the connection again on the retry. That is not a slow
  moment, and waiting for a rate would only make callers wait.

A call that succeeded slowly is a success: slowness is what budgets are for, not the breaker.
Only "the store is unreachable" errors are failures; a bug or a script error is not the
store's health.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from tactful import metrics

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_STATE_VALUE = {CLOSED: 0.0, HALF_OPEN: 0.5, OPEN: 1.0}
#: The sliding window is kept as this many buckets of window_seconds / BUCKETS each.
BUCKETS = 10


class CircuitOpen(Exception):
    """The circuit is open: the call was not attempted."""


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_rate: float,
        min_calls: int,
        window_seconds: float,
        open_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = failure_rate
        self._min_calls = min_calls
        self._bucket_seconds = window_seconds / BUCKETS
        self._open_seconds = open_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._open_until = 0.0
        self._probing = False
        # Ring of [bucket number, calls, failures]; a bucket whose number is not the one a
        # time maps to is from an earlier round of the ring, so empty.
        self._buckets = [[-1, 0, 0] for _ in range(BUCKETS)]
        metrics.REDIS_CIRCUIT_STATE.set(_STATE_VALUE[CLOSED])

    @classmethod
    def never(cls) -> CircuitBreaker:
        """A breaker that never opens (tools and tests that want to see every error)."""
        return cls(failure_rate=0.0, min_calls=1, window_seconds=1.0, open_seconds=0.0)

    @property
    def state(self) -> str:
        return self._state

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def before_call(self) -> bool:
        """Raise CircuitOpen if the call must not reach the store; else let it through and
        say whether it is the one probe of a half-open circuit (its caller passes that on
        to ``succeeded`` or ``failed``: only the probe's answer closes or reopens it)."""
        if self._state == CLOSED or not self.enabled:
            return False  # the common case, without the lock
        with self._lock:
            if self._state == OPEN:
                if self._clock() < self._open_until:
                    raise CircuitOpen
                self._move(HALF_OPEN)
            if self._state == HALF_OPEN:
                if self._probing:
                    raise CircuitOpen
                self._probing = True
                return True
            return False

    def succeeded(self, *, probe: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._record(failed=False)
            # Only the probe closes an open circuit: a call let through before it opened
            # may still come back, and one late answer is no proof that Redis is back.
            if probe and self._state == HALF_OPEN:
                self._probing = False
                self._move(CLOSED)

    def failed(self, *, probe: bool = False, conclusive: bool = False) -> None:
        """A call found the store unreachable; ``conclusive``: in a way no slow moment
        explains (connection refused), so the circuit opens without waiting for a rate."""
        if not self.enabled:
            return
        with self._lock:
            calls, failures = self._record(failed=True)
            if probe:
                self._probing = False
                if self._state == HALF_OPEN:
                    self._open(OPEN)
                return
            if self._state == CLOSED and (
                conclusive or (calls >= self._min_calls and failures >= self._rate * calls)
            ):
                self._open(OPEN)

    def _open(self, state: str) -> None:
        self._open_until = self._clock() + self._open_seconds
        self._move(state)

    def _record(self, *, failed: bool) -> tuple[int, int]:
        """Count one ended call; return the calls and failures of the whole window."""
        number = math.floor(self._clock() / self._bucket_seconds)
        bucket = self._buckets[number % BUCKETS]
        if bucket[0] != number:
            bucket[0], bucket[1], bucket[2] = number, 0, 0
        bucket[1] += 1
        bucket[2] += failed
        if not failed:
            return 0, 0  # only a failure can open the circuit: no need to add up
        oldest = number - BUCKETS + 1
        calls = failures = 0
        for start, n, f in self._buckets:
            if start >= oldest:
                calls += n
                failures += f
        return calls, failures

    def _move(self, state: str) -> None:
        self._state = state
        if state == CLOSED:  # a fresh start: failures before the outage are no evidence now
            for bucket in self._buckets:
                bucket[0] = -1
        metrics.REDIS_CIRCUIT_STATE.set(_STATE_VALUE[state])
        metrics.REDIS_CIRCUIT_TRANSITIONS.labels(state).inc()
