"""A circuit breaker in front of the store: when Redis is down or frozen, stop asking it.

Without one, every request waits out the Redis socket timeout before falling back, and a dead
Redis gets hammered by reconnect attempts from every thread. With one, after
``failures`` errors in a row the circuit *opens*: store calls fail at once (``Unavailable``,
so a render-time Decide gets its fallback answer in well under a millisecond) for
``open_seconds``. Then it is *half-open*: one call at a time is let through as a probe; its
success closes the circuit (full service again), its failure opens it for another period.
Recovery after Redis returns therefore takes at most ``open_seconds`` plus one probe.

The breaker counts only "the store is unreachable" errors (what ``store_errors`` turns into
``Unavailable``); a bug or a script error is not the store's health.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tactful import metrics

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_STATE_VALUE = {CLOSED: 0.0, HALF_OPEN: 0.5, OPEN: 1.0}


class CircuitOpen(Exception):
    """The circuit is open: the call was not attempted."""


class CircuitBreaker:
    def __init__(
        self,
        *,
        failures: int,
        open_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failures
        self._open_seconds = open_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        metrics.REDIS_CIRCUIT_STATE.set(_STATE_VALUE[CLOSED])

    @property
    def state(self) -> str:
        return self._state

    @property
    def enabled(self) -> bool:
        return self._threshold > 0

    def before_call(self) -> None:
        """Raise CircuitOpen if the call must not reach the store; else let it through
        (as the one probe, when half-open)."""
        if self._state == CLOSED or not self.enabled:
            return  # the common case, without the lock
        with self._lock:
            if self._state == OPEN:
                if self._clock() < self._open_until:
                    raise CircuitOpen
                self._move(HALF_OPEN)
            if self._state == HALF_OPEN:
                if self._probing:
                    raise CircuitOpen
                self._probing = True

    def succeeded(self) -> None:
        if self._state == CLOSED and not self._failures:
            return
        with self._lock:
            self._failures = 0
            self._probing = False
            if self._state != CLOSED:
                self._move(CLOSED)

    def failed(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._state == HALF_OPEN or self._failures >= self._threshold:
                self._open_until = self._clock() + self._open_seconds
                if self._state != OPEN:
                    self._move(OPEN)

    def _move(self, state: str) -> None:
        self._state = state
        metrics.REDIS_CIRCUIT_STATE.set(_STATE_VALUE[state])
        metrics.REDIS_CIRCUIT_TRANSITIONS.labels(state).inc()
