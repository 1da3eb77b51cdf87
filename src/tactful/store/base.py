"""What every operation of ``RedisStore`` shares: the client and its scripts, the budgets, and
``_run``, the way each operation reaches Redis (behind the circuit breaker, within its
budget, retried while that lasts if it may be sent again).

``RedisStore`` is put together from one class per kind of operation (``decisions``,
``profiles``, ``catalog``), each a subclass of ``RedisBase``, so every one of them runs
through the same ``_run``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import redis.exceptions
from redis.cluster import RedisCluster

from tactful import deadline, keys, metrics
from tactful.breaker import CircuitBreaker, CircuitOpen
from tactful.errors import Abandoned, Aborted, Unavailable
from tactful.store.scripts import ERASED, source
from tactful.store.wire import (
    ATTEMPT_DEADLINE,
    MIN_ATTEMPT_SECONDS,
    RETRY_FIRST_WAIT_SECONDS,
    RETRY_MAX_WAIT_SECONDS,
    RETRYABLE_ERRORS,
    STORE_DOWN_ERRORS,
    Budget,
    Client,
    NotSent,
    RenderBudget,
    connection_refused,
    decide_round_trip,
    round_trip,
    write_refused,
)

_T = TypeVar("_T")


class RedisBase:
    """The client, its scripts and budgets, and ``_run``. Every operation runs through
    ``_run``: behind the circuit breaker, within its budget (``render`` for what a page waits
    for, ``write`` for the rest; both bounded by the call's deadline), tried again on a
    timeout or a dropped connection while its budget lasts if it is idempotent, and turned
    into ``Unavailable`` when Redis cannot be reached."""

    def __init__(
        self,
        client: Client,
        *,
        signal_half_life_seconds: float,
        decision_ttl_seconds: int,
        request_id_ttl_seconds: int,
        breaker: CircuitBreaker | None = None,
        render_budget_seconds: float = 0.01,
        render_budget_max_seconds: float = 0.05,
        write_budget_seconds: float = 1.0,
    ) -> None:
        self.client = client
        # No breaker given: one that never opens (tools and tests that want every error).
        self.breaker = breaker or CircuitBreaker.never()
        self.render: Budget | RenderBudget = RenderBudget(
            render_budget_seconds, render_budget_max_seconds
        )
        self.write = Budget(write_budget_seconds)
        self._half_life = signal_half_life_seconds
        self._decision_ttl = decision_ttl_seconds
        self._request_ttl = request_id_ttl_seconds
        register = client.register_script
        self._record_signals = register(source("record_signals"))
        self._set_preferences = register(source("set_preferences"))
        self._set_attributes = register(source("set_attributes"))
        self._log_decision = register(source("log_decision"))
        self._add_cooldowns = register(source("add_cooldowns"))
        self._erase_user = register(source("erase_user"))
        self._import_profile = register(source("import_profile"))
        self._record_outcome = register(source("record_outcome"))
        self._send_reward = register(source("send_reward"))
        self._consume_contacts = register(source("consume_contacts"))
        self._take_token = register(source("take_token"))
        self._put_offer = register(source("put_offer"))
        self._put_segment = register(source("put_segment"))
        self._delete_segment = register(source("delete_segment"))
        self._round_trip = round_trip(client)
        self._decide_round_trip = decide_round_trip(client)
        self._cluster = isinstance(client, RedisCluster)

    def _run(
        self,
        operation: str,
        attempt: Callable[[], _T],
        *,
        budget: Budget | RenderBudget,
        idempotent: bool = True,
    ) -> _T:
        """``attempt()`` behind the circuit breaker and within ``budget``: while the circuit
        is open the store is not asked at all. A timeout or a dropped connection is tried
        again while the budget lasts if the operation is idempotent (whatever it is, if the
        connection could not even be made: nothing was sent). What is still failing then is
        ``Unavailable`` (counted); a bug or a script error goes through as it is."""
        probe = self._admit(operation)
        start = time.perf_counter()
        until = budget.deadline()
        wait = RETRY_FIRST_WAIT_SECONDS
        try:
            while True:
                sent = time.perf_counter()
                try:
                    result = self._attempt(operation, attempt, until, probe)
                except STORE_DOWN_ERRORS as exc:
                    if write_refused(exc):
                        raise self._refused(operation, probe) from exc
                    retry = isinstance(exc, NotSent) or (
                        idempotent and isinstance(exc, RETRYABLE_ERRORS)
                    )
                    if retry and time.monotonic() + wait + MIN_ATTEMPT_SECONDS < until:
                        metrics.redis_retries(operation).inc()
                        time.sleep(wait)
                        wait = min(wait * 2, RETRY_MAX_WAIT_SECONDS)
                        continue
                    self.breaker.failed(probe=probe, conclusive=connection_refused(exc))
                    metrics.redis_errors(operation).inc()
                    raise Unavailable(f"store unavailable: {type(exc).__name__}") from exc
                self.breaker.succeeded(probe=probe)
                budget.observe(time.perf_counter() - sent)
                return result
        finally:
            metrics.redis_seconds(operation).observe(time.perf_counter() - start)

    def _admit(self, operation: str) -> bool:
        """Whether the store may be asked for this call: not for a caller that is gone, nor
        while the circuit is open. Returns whether this call is the breaker's probe."""
        left = deadline.seconds_left()
        if left is not None and left <= 0:
            # The caller is gone: nothing is sent for it (a write now would be one it cannot
            # know about, and one that may run after what it does next).
            raise Abandoned("the caller's deadline passed: nothing was sent to the store")
        try:
            return self.breaker.before_call()
        except CircuitOpen:
            metrics.redis_errors(operation).inc()
            raise Unavailable("store unavailable: circuit open") from None

    def _attempt(self, operation: str, attempt: Callable[[], _T], until: float, probe: bool) -> _T:
        """One attempt, its replies due by ``until``. The errors that say the store is down
        go through for ``_run`` to judge; any other error means the store answered, so the
        breaker counts a success."""
        token = ATTEMPT_DEADLINE.set(until)
        try:
            return attempt()
        except STORE_DOWN_ERRORS:
            raise
        except redis.exceptions.ResponseError as exc:
            if write_refused(exc):
                raise self._refused(operation, probe) from exc
            # The store answered; the error is not its health.
            self.breaker.succeeded(probe=probe)
            raise
        except BaseException:
            self.breaker.succeeded(probe=probe)
            raise
        finally:
            ATTEMPT_DEADLINE.reset(token)

    def _refused(self, operation: str, probe: bool) -> Unavailable:
        """Redis answered, refusing the write (full, or read-only): a full or read-only Redis
        still serves every read, so this is no reason to open the circuit (Decide keeps
        personalising, its log write counted as lost, instead of falling back for everyone)."""
        self.breaker.succeeded(probe=probe)
        metrics.redis_errors(operation).inc()
        return Unavailable("store unavailable: the write was refused")

    def _forget_quietly(self, user_id: str, decision_ids: Sequence[str]) -> None:
        """``_forget_decisions`` as a clean-up: on the store's own time (the caller's
        deadline is the caller's), and a store that cannot be asked is no error."""
        with deadline.call_deadline(None), contextlib.suppress(Unavailable):
            self._forget_decisions(user_id, decision_ids)

    def _forget_decisions(self, user_id: str, decision_ids: Sequence[str]) -> None:
        """Delete decisions (records, outcomes, owners, reward windows) and then take them off
        the user's indexes; on a cluster, the user's slot last, so an index never names a
        decision that is gone while one it does not name is still there. Both a logged
        decision taken back and an erasure need it."""
        k = keys.UserKeys.of(user_id)
        for start in range(0, len(decision_ids), 500):
            chunk = decision_ids[start : start + 500]
            decisions: list[tuple[Any, ...]] = []
            for decision_id in chunk:
                d = keys.DecisionKeys.of(decision_id)
                decisions.append(("DEL", d.record, d.outcomes, d.owner))
            decisions += [("ZREM", keys.AWAITING, *chunk), ("HDEL", keys.LEARNED, *chunk)]
            index = [("ZREM", k.decided, *chunk), ("SREM", k.decisions, *chunk)]
            for commands in (decisions, index):
                self._run(
                    "forget_decisions", partial(self._round_trip, commands), budget=self.write
                )


def check_not_erased(reply: _T) -> _T:
    """A fenced script's reply, unless it says the user was erased while the call was in
    flight (nothing was written): then ``Aborted``."""
    if reply == ERASED:
        raise Aborted(
            "the profile was erased while this call was in flight: nothing was written "
            "(sent again, it writes a new profile)"
        )
    return reply
