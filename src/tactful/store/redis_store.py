"""Storage: a small interface the core depends on, and its Redis implementation.

The hot path touches Redis at most twice per Decide: ``read_for_decision`` (profile, signals,
contact counters, cooldowns, attributes, catalog and model versions, request-id replay: one
pipelined round trip) and
``log_decision`` (decision log, contact counters, request id: one more). Writes that touch
several keys of a user run in MULTI/EXEC or in one Lua script, so they are all or nothing.

The same code runs on one Redis server or on a Redis Cluster (``connect``): every script and
every MULTI/EXEC touches one hash tag, so one slot (``keys``); only non-transactional
pipelines span slots, and ``round_trip`` picks how the Decide path sends them.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import hiredis
import orjson
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.client import NEVER_DECODE
from redis.cluster import RedisCluster
from redis.retry import Retry

from tactful import deadline, keys, metrics, validation
from tactful.breaker import CircuitBreaker, CircuitOpen
from tactful.contact_policy import CARRY_SECONDS, COUNTERS_TTL_SECONDS, DAY_MARK
from tactful.domain import (
    Attribute,
    AttributeSource,
    AttributesUpdate,
    ChannelPreference,
    Consent,
    ContactCounter,
    Cooldown,
    Offer,
    PreferencesUpdate,
    Profile,
    ProfileRecord,
    QuietHours,
    Segment,
    Signal,
    Stance,
    TopicPreference,
)
from tactful.errors import (
    Abandoned,
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    Unavailable,
)
from tactful.settings import Settings
from tactful.store.scripts import ERASED, source

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: A client of one Redis server, or of a Redis Cluster (TACTFUL_REDIS_URL redis+cluster://).
Client = redis.Redis | RedisCluster

#: The "+cluster" URL scheme that names a Redis Cluster (redis-py is given the rest).
CLUSTER_SUFFIX = "+cluster"


# Errors that mean "the store is unreachable or too slow", as opposed to a bug.
STORE_DOWN_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,  # maxmemory reached: writes refused, reads still fine
    redis.exceptions.ClusterDownError,  # a cluster without a master for some slot
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.TryAgainError,  # a multi-key command during a slot migration
    OSError,
)
CATALOG_READ_ATTEMPTS = 5  # reads of the catalog before giving up on a stream of writes

# Of those, the ones that say Redis is up and answering but refuses writes (maxmemory reached,
# a replica that was promoted away): reads still work, so they must not open the breaker.
WRITE_REFUSED_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
)


def write_refused(error: BaseException | None) -> bool:
    """Redis refused a write (full, or read-only), directly or inside a Lua script, where it
    comes back as a plain "Error running script ... -OOM ..." ResponseError."""
    if isinstance(error, WRITE_REFUSED_ERRORS):
        return True
    text = str(error) if isinstance(error, redis.exceptions.ResponseError) else ""
    return "OOM command not allowed" in text or "READONLY You can't write" in text


@dataclass(frozen=True, slots=True)
class DecisionInputs:
    """Everything Decide reads from the store, fetched in one round trip."""

    profile: Profile
    catalog_version: int
    model_version: int  # 0: no model published yet (the prior)
    replay_decision_id: str | None  # set when this request_id was already decided


@dataclass(frozen=True, slots=True)
class ContactSpend:
    """What the caps script needs to consume a decision's contacts (see
    ``lua/consume_contacts.lua`` for the meaning of each)."""

    day: str
    now: float
    channel: str
    caps: tuple[int, int]  # daily, channel; the customer's own is read by the script
    interruptive: bool
    gap_seconds: float
    slots: int
    stale: Sequence[str]  # other fields to drop ("last|<channel>" of long ago)
    ranked: Sequence[tuple[str, int]]  # (offer_id, offer's own cap), best first
    decision_id: str = ""  # what the spend is for: a resent write counts nothing twice
    request_id: str = ""  # claimed by the script: "" for none
    request_id_ttl_seconds: int = 0

    def args(self) -> list[Any]:
        out: list[Any] = [self.day, repr(self.now), self.channel, *self.caps]
        out += [int(self.interruptive), self.gap_seconds, COUNTERS_TTL_SECONDS, self.slots]
        out += [self.decision_id, self.request_id, self.request_id_ttl_seconds]
        out += [CARRY_SECONDS, DAY_MARK, len(self.stale), *self.stale]
        for offer_id, cap in self.ranked:
            out += [offer_id, cap]
        return out


class RequestTaken(Exception):
    """A concurrent Decide with the same request id was logged first: ``decision_id`` is the
    decision that request id now stands for (this one was not logged and counted nothing)."""

    def __init__(self, decision_id: str) -> None:
        super().__init__(f"request id taken by decision {decision_id}")
        self.decision_id = decision_id


def _consumed(reply: Sequence[Any]) -> list[str]:
    """The caps script's answer: the offers it counted, or RequestTaken."""
    tag, *rest = (str(part) for part in reply)
    if tag == "!":
        raise RequestTaken(rest[0])
    return rest


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """A decision as the decision log keeps it (the x, a, p of an (x, a, r, p) tuple)."""

    decision_id: str
    payload: dict[str, Any]  # JSON-ready: the response, context, pseudonymous user, time
    # The digest of the user's keys (``keys.UserKeys.of_digest``), kept beside the record,
    # not in it: the log names its user by a keyed pseudonym only. None: not known.
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class ProfileWrite:
    """What the store did with one imported profile."""

    signals_kept: bool | None  # None: the record had none; False: no consent, none kept
    attributes_refused: int  # 0, or how many attributes the user would have had (over the cap)
    # The per-user bound the line would have passed (nothing of it written): its field and
    # the bound, e.g. ("topic_preferences", 1000); None: none.
    over_bound: tuple[str, int] | None = None
    # The user was erased after the import began: nothing of the line was written (it would
    # have brought back a profile erased meanwhile).
    erased: bool = False


#: What the import script's negative answers mean: the field and its per-user bound.
_IMPORT_BOUNDS = {
    1: ("topic_preferences", validation.MAX_TOPIC_PREFERENCES_PER_USER),
    2: ("channel_preferences", validation.MAX_CHANNEL_PREFERENCES_PER_USER),
    3: ("signals", validation.MAX_SIGNAL_TOPICS_PER_USER),
}


class OutcomeStatus:
    RECORDED = 1
    DUPLICATE = 0
    UNKNOWN_DECISION = -1
    OFFER_NOT_IN_DECISION = -2


@dataclass(frozen=True, slots=True)
class RecordedOutcome:
    status: int  # an OutcomeStatus
    arm: str = ""  # the arm of the decision, as logged ("" when it is unknown)


class Store(Protocol):
    def read_for_decision(self, *, user_id: str, request_id: str) -> DecisionInputs: ...

    def log_decision(
        self,
        *,
        user_id: str,
        decision: LoggedDecision,
        request_id: str,
        learn_after: float | None,
        spend: ContactSpend | None = None,
    ) -> list[str] | None: ...

    def add_cooldowns(
        self, *, user_key: str, fields: Sequence[str], until: float, started: float | None = None
    ) -> None: ...

    def get_logged_decision(
        self, *, decision_id: str, render: bool = False
    ) -> LoggedDecision | None: ...

    def record_outcome(
        self, *, decision_id: str, offer_id: str, outcome_id: str, outcome: dict[str, Any]
    ) -> RecordedOutcome: ...

    def get_profile(self, *, user_id: str) -> Profile: ...

    def set_preferences(self, *, update: PreferencesUpdate, now: float) -> Profile: ...

    def set_attributes(self, *, update: AttributesUpdate, now: float, limit: int) -> Profile: ...

    def record_signals(
        self, *, user_id: str, signals: Sequence[Signal], now: float | None = None
    ) -> bool: ...

    def delete_profile(self, *, user_id: str, now: float | None = None) -> None: ...

    def catalog_version(self) -> int: ...

    def load_model(self, *, version: int) -> bytes | None: ...

    def load_catalog(self) -> tuple[int, list[Offer], list[Segment]]: ...

    def put_offer(self, *, offer: Offer) -> None: ...

    def get_offer(self, *, offer_id: str) -> Offer | None: ...

    def delete_offer(self, *, offer_id: str) -> bool: ...

    def put_segment(self, *, segment: Segment, limit: int) -> None: ...

    def get_segment(self, *, segment_id: str) -> Segment | None: ...

    def delete_segment(self, *, segment_id: str) -> bool: ...

    def take_token(self, *, bucket: str, rate: float, burst: float) -> float: ...


class NotSent(redis.exceptions.ConnectionError):
    """No connection to Redis could be made: the command was never sent, so even a call
    that must not run twice can be tried again."""


#: ``time.monotonic()`` by which the store attempt in progress must have its reply (a
#: ``ContextVar``: each serving thread has its own); None: the client's own socket timeout.
_ATTEMPT_DEADLINE: ContextVar[float | None] = ContextVar("tactful_attempt_deadline", default=None)
#: The least time an attempt is given: a socket timeout of 0 would mean "non-blocking".
_MIN_ATTEMPT_SECONDS = 0.0005


class _Budgeted:
    """Mixed into a redis-py connection class: its socket timeout is the current attempt's
    budget (what is left until ``_ATTEMPT_DEADLINE``), set on every send, so one pool serves
    calls with different budgets: a render-time read, a write that may wait a second. A
    failure to connect is ``NotSent``."""

    _sock: Any
    socket_timeout: float | None

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise NotSent(str(exc)) from exc

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            self.connect_check_health(check_health=False)
        if self._sock is not None:
            deadline = _ATTEMPT_DEADLINE.get()
            if deadline is None:
                self._sock.settimeout(self.socket_timeout)
            else:
                self._sock.settimeout(max(_MIN_ATTEMPT_SECONDS, deadline - time.monotonic()))
        super().send_packed_command(command, check_health)  # type: ignore[misc]


class _BudgetedConnection(_Budgeted, redis.Connection):
    pass


class _BudgetedUnixConnection(_Budgeted, redis.UnixDomainSocketConnection):
    pass


class _BudgetedSSLConnection(_Budgeted, redis.SSLConnection):
    pass


_CONNECTION_CLASSES = {
    "unix": _BudgetedUnixConnection,
    "rediss": _BudgetedSSLConnection,
    "redis": _BudgetedConnection,
}


@dataclass(frozen=True, slots=True)
class Budget:
    """How long one store operation may wait for Redis, retries included: ``seconds``, or
    what is left of the call's deadline, less a margin to answer without the store (a
    fallback, an error), if that is sooner."""

    seconds: float

    def deadline(self) -> float:
        return _within_call(time.monotonic(), self.seconds)

    def observe(self, seconds: float) -> None:
        """An attempt succeeded in ``seconds`` (only an adaptive budget learns from it)."""


def _within_call(now: float, seconds: float, share: float = 1.0) -> float:
    """``now + seconds``, or sooner: ``share`` of what is left of the call's deadline, less
    a margin to answer without the store (a fallback, an error)."""
    at = now + seconds
    left = deadline.seconds_left()
    if left is not None:
        margin = max(DEADLINE_MARGIN_SECONDS, DEADLINE_MARGIN_SHARE * left)
        at = min(at, now + min(share * left, left - margin))
    return max(at, now + _MIN_ATTEMPT_SECONDS)


class RenderBudget:
    """The budget of Decide's read: tight, so a store that does not answer still leaves time
    for a fast fallback, yet not tighter than this machine's Redis round trips are now.

    At least ``floor`` (TACTFUL_REDIS_SOCKET_TIMEOUT_MS). Like TCP's retransmission timeout,
    it follows the round trips it sees: ``RENDER_P99_FACTOR`` times the 99th percentile of the
    last ``RENDER_SAMPLES`` successful reads, up to ``ceiling``
    (TACTFUL_REDIS_RENDER_TIMEOUT_MAX_MS) and to half of what is left of the call's deadline.
    On a quiet machine (round trips well under a millisecond) it is the floor, and a frozen
    Redis costs a Decide that much; on a machine so loaded that Redis itself waits for a CPU,
    a read that would have answered in 20 ms is waited for rather than turned into a
    fallback. Only successes are sampled: a Redis that stopped answering does not stretch it."""

    def __init__(self, floor: float, ceiling: float) -> None:
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self.seconds = floor
        self._samples: list[float] = []
        self._next = 0
        self._lock = threading.Lock()

    def deadline(self) -> float:
        return _within_call(time.monotonic(), self.seconds, share=RENDER_DEADLINE_SHARE)

    def observe(self, seconds: float) -> None:
        with self._lock:
            if len(self._samples) < RENDER_SAMPLES:
                self._samples.append(seconds)
            else:
                self._samples[self._next] = seconds
            self._next = (self._next + 1) % RENDER_SAMPLES
            if self._next % RENDER_REFRESH_EVERY:
                return
            ordered = sorted(self._samples)
        p99 = ordered[int(0.99 * (len(ordered) - 1))]
        self.seconds = min(self.ceiling, max(self.floor, RENDER_P99_FACTOR * p99))


#: The render budget (``RenderBudget``): how many recent reads it follows, how often it looks
#: again, how many times their 99th percentile it allows, and at most what share of the call's
#: deadline.
RENDER_SAMPLES = 512
RENDER_REFRESH_EVERY = 32
RENDER_P99_FACTOR = 4.0
RENDER_DEADLINE_SHARE = 0.5
#: What a call keeps of its deadline to answer once the store has failed it: this share of what
#: is left, and at least this long (an answer still has to be built, and the machine may be busy).
DEADLINE_MARGIN_SHARE = 0.1
DEADLINE_MARGIN_SECONDS = 0.002
#: What one user's decision index holds at most: a user id shared by many visitors (say
#: ``guest``) keeps its newest decisions joinable and erasable within one call, and drops the
#: oldest. Likewise the request ids that replay a Decide.
MAX_DECISIONS_PER_USER = 10_000
MAX_REQUEST_IDS_PER_USER = 10_000
#: How long an erased user stays on the erasure fence (``lua/includes/fence.lua``): longer than
#: any call that was in flight during the erasure can still be writing.
ERASURE_FENCE_SECONDS = 300.0

#: Waits between attempts of an idempotent operation: the first, doubled each time.
RETRY_FIRST_WAIT_SECONDS = 0.002
RETRY_MAX_WAIT_SECONDS = 0.05
#: Errors after which an idempotent operation is tried again (within its budget).
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # NotSent and BusyLoadingError among them
    redis.exceptions.TimeoutError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    OSError,
)


def connect(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int,
    retries: int = 1,
    **options: Any,
) -> Client:
    """A client whose commands time out after ``socket_timeout``, or after the budget a
    ``RedisStore`` operation sets for its attempt (``_BudgetedConnection``). redis-py itself
    retries a command ``retries`` times on a broken connection (a timeout is never retried
    by it); the server's store passes 0 and retries by itself, knowing which operations are
    idempotent and how long each may wait.

    ``redis+cluster://host:port`` (or ``rediss+cluster://``) names a Redis Cluster by any
    one of its nodes: redis-py's ``RedisCluster`` finds the others and routes each command
    by its key's slot (following MOVED and ASK), with the same timeouts, ``max_connections``
    per node, and ``retries`` retries of its own (after refreshing its slot map), which cover
    timeouts too: the server's store passes 0, so nothing that must not run twice is sent
    again behind its back."""
    scheme, _, rest = url.partition("://")
    base_scheme = scheme.removesuffix(CLUSTER_SUFFIX)
    connection_class = options.pop("connection_class", None)
    if connection_class is None:
        connection_class = _CONNECTION_CLASSES.get(base_scheme, _BudgetedConnection)
    elif not issubclass(connection_class, _Budgeted):  # a caller's own (tests observe trips)
        connection_class = type(connection_class.__name__, (_Budgeted, connection_class), {})
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "max_connections": max_connections,
        "health_check_interval": 0,
        "connection_class": connection_class,
    }
    if scheme.endswith(CLUSTER_SUFFIX):
        return RedisCluster.from_url(
            f"{base_scheme}://{rest}",
            retry=Retry(NoBackoff(), retries),
            **common,
            **options,
        )
    return redis.Redis.from_url(
        url,
        retry=Retry(NoBackoff(), retries, supported_errors=(redis.exceptions.ConnectionError,)),
        retry_on_error=[redis.exceptions.ConnectionError] if retries else [],
        **common,
        **options,
    )


class RedisStore:
    """The store on Redis. Every operation runs through ``_run``: behind the circuit breaker,
    within its budget (``render`` for what a page waits for, ``write`` for the rest; both
    bounded by the call's deadline), tried again on a timeout or a dropped connection while
    its budget lasts if it is idempotent, and turned into ``Unavailable`` when Redis cannot
    be reached."""

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
        self._cluster = isinstance(client, RedisCluster)

    @classmethod
    def for_settings(
        cls,
        client: Client,
        settings: Settings,
        *,
        breaker: bool = True,
        write_budget_seconds: float | None = None,
    ) -> RedisStore:
        """The store as the settings describe it; ``breaker=False`` for tools that want to
        see every error (bulk commands), not a circuit that opened, and may wait longer
        (``write_budget_seconds``)."""
        redis_settings = settings.redis
        return cls(
            client,
            signal_half_life_seconds=settings.policy.signal_half_life_hours * 3600,
            decision_ttl_seconds=settings.policy.decision_ttl_seconds,
            request_id_ttl_seconds=settings.policy.request_id_ttl_seconds,
            breaker=CircuitBreaker(
                failure_rate=redis_settings.breaker_failure_rate,
                min_calls=redis_settings.breaker_min_calls,
                window_seconds=redis_settings.breaker_window_seconds,
                open_seconds=redis_settings.breaker_open_seconds,
            )
            if breaker
            else None,
            render_budget_seconds=redis_settings.socket_timeout_ms / 1000,
            render_budget_max_seconds=redis_settings.render_timeout_max_ms / 1000,
            write_budget_seconds=write_budget_seconds or redis_settings.write_timeout_ms / 1000,
        )

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
        left = deadline.seconds_left()
        if left is not None and left <= 0:
            # The caller is gone: nothing is sent for it (a write now would be one it cannot
            # know about, and one that may run after what it does next).
            raise Abandoned("the caller's deadline passed: nothing was sent to the store")
        try:
            probe = self.breaker.before_call()
        except CircuitOpen:
            metrics.redis_errors(operation).inc()
            raise Unavailable("store unavailable: circuit open") from None
        start = time.perf_counter()
        until = budget.deadline()
        wait = RETRY_FIRST_WAIT_SECONDS
        try:
            while True:
                token = _ATTEMPT_DEADLINE.set(until)
                sent = time.perf_counter()
                try:
                    result = attempt()
                except STORE_DOWN_ERRORS as exc:
                    if write_refused(exc):
                        raise self._refused(operation, probe) from exc
                    retry = isinstance(exc, NotSent) or (
                        idempotent and isinstance(exc, RETRYABLE_ERRORS)
                    )
                    if retry and time.monotonic() + wait + _MIN_ATTEMPT_SECONDS < until:
                        metrics.redis_retries(operation).inc()
                        time.sleep(wait)
                        wait = min(wait * 2, RETRY_MAX_WAIT_SECONDS)
                        continue
                    self.breaker.failed(probe=probe, conclusive=_refused(exc))
                    metrics.redis_errors(operation).inc()
                    raise Unavailable(f"store unavailable: {type(exc).__name__}") from exc
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
                    _ATTEMPT_DEADLINE.reset(token)
                self.breaker.succeeded(probe=probe)
                budget.observe(time.perf_counter() - sent)
                return result
        finally:
            metrics.redis_seconds(operation).observe(time.perf_counter() - start)

    def _refused(self, operation: str, probe: bool) -> Unavailable:
        """Redis answered, refusing the write (full, or read-only): a full or read-only Redis
        still serves every read, so this is no reason to open the circuit (Decide keeps
        personalising, its log write counted as lost, instead of falling back for everyone)."""
        self.breaker.succeeded(probe=probe)
        metrics.redis_errors(operation).inc()
        return Unavailable("store unavailable: the write was refused")

    def ping(self) -> bool:
        return self._run("ping", lambda: bool(self.client.ping()), budget=self.write)

    # --- decisions ------------------------------------------------------------------------

    def read_for_decision(self, *, user_id: str, request_id: str) -> DecisionInputs:
        k = keys.UserKeys.of(user_id)
        commands: list[tuple[Any, ...]] = [
            ("HGETALL", k.profile),
            ("HGETALL", k.signals),
            ("HGETALL", k.contacts),
            ("HGETALL", k.cooldowns),
            ("HGETALL", k.attributes),
            ("GET", keys.CATALOG_VERSION),
            ("GET", keys.MODEL_CURRENT),
        ]
        if request_id:
            commands.append(("HGET", k.requests, request_id))
        replies = self._run(
            "read_for_decision", lambda: self._round_trip(commands), budget=self.render
        )
        profile = _decode_profile(user_id, *(_as_dict(reply) for reply in replies[:5]))
        return DecisionInputs(
            profile=profile,
            catalog_version=int(replies[5] or 0),
            model_version=int(replies[6] or 0),
            replay_decision_id=replies[7] if request_id else None,
        )

    def add_cooldowns(
        self, *, user_key: str, fields: Sequence[str], until: float, started: float | None = None
    ) -> None:
        """Put offers or topics on the user's cooldown until ``until``, unless the user was
        erased since ``started`` (the time the call began: then nothing is written)."""
        k = keys.UserKeys.of_digest(user_key)
        at = time.time() if started is None else started
        self._run(
            "add_cooldowns",
            lambda: self._add_cooldowns(
                keys=[k.cooldowns, k.erased], args=[k.digest, repr(at), repr(until), *fields]
            ),
            budget=self.write,
        )

    def log_decision(
        self,
        *,
        user_id: str,
        decision: LoggedDecision,
        request_id: str,
        learn_after: float | None,
        spend: ContactSpend | None = None,
    ) -> list[str] | None:
        """Log the decision and, with ``spend``, consume its contacts; return the offers the
        caps script counted (None without ``spend``). If a concurrent Decide took the last
        unit, the caller logs again with what was kept.

        The decision's own keys (record, owner, reward window) are written first, then the
        user's scripts: the caps script (which also claims the request id, atomically with the
        counting) and the log script (the user's decision index, and the request id's). On one
        Redis that is one round trip, run in that order; on a cluster, two (the user's slot is
        on another node). So when the user's index names a decision, its record is there for
        an erasure to delete. Both user scripts are fenced: a Decide that was in flight while
        the user was erased writes nothing of the user (``Aborted``), and its record is taken
        back. If a concurrent Decide with the same request id claimed it first, the record is
        taken back too and RequestTaken names the winner (whose answer the caller replays), so
        one request id is one decision, counted once."""
        k = keys.UserKeys.of(user_id)
        d = keys.DecisionKeys.of(decision.decision_id)
        made_at = float(decision.payload.get("ts", 0.0))
        ttl = self._decision_ttl
        records: list[tuple[Any, ...]] = [
            ("SET", d.record, _record_json(decision.payload), "EX", ttl),
            ("SET", d.owner, k.digest, "EX", ttl),
        ]
        if learn_after is not None:
            records.append(("ZADD", keys.AWAITING, learn_after, decision.decision_id))
        fence = (k.digest, repr(made_at))
        user: list[tuple[Any, ...]] = []
        if spend is not None:
            user.append(
                ("EVALSHA", self._consume_contacts.sha, 4, k.contacts, k.profile, k.requests,
                 k.erased, *fence, *spend.args())
            )  # fmt: skip
        user.append(
            ("EVALSHA", self._log_decision.sha, 4, k.decided, k.requests, k.requested, k.erased,
             *fence, decision.decision_id, repr(made_at), ttl, MAX_DECISIONS_PER_USER,
             request_id, "0" if spend is not None else "1", self._request_ttl,
             MAX_REQUEST_IDS_PER_USER)
        )  # fmt: skip

        def send() -> list[Any]:
            if not self._cluster:
                return self._round_trip([*records, *user])[len(records) :]
            self._round_trip(records)
            return self._round_trip(user)

        def attempt() -> list[Any]:
            try:
                return send()
            except redis.exceptions.NoScriptError:
                # Redis restarted or was flushed since the scripts were loaded: everything
                # sent is idempotent, so load them and send it all again.
                for script in (self._consume_contacts, self._log_decision):
                    self.client.script_load(script.script)
                return send()

        # On the write budget, not the render one: a decision that is not logged can never
        # be joined with its outcome nor learned from, and the page waiting for it gave the
        # time with its deadline (on the render budget, 25 ms Redis stalls left decisions
        # answered but unlogged: bench/soak.py). Idempotent: the record, owner and window
        # are sets; the caps script counts a decision once however often it is sent (its
        # ``spent`` mark), the log script indexes it once.
        try:
            replies = self._run("log_decision", attempt, budget=self.write)
            logged = replies[-1]
            if ERASED in (logged, replies[0]):
                raise Aborted("the user was erased while this decision was made")
            if logged[0] == "!":
                raise RequestTaken(str(logged[1]))
            consumed = None if spend is None else _consumed(replies[0])
        except (Aborted, RequestTaken, Unavailable, Abandoned):
            # Take back what went out with it (all of it, or none, or its record alone: a
            # failed write cannot tell), or the learner would learn a reward 0 for a decision
            # never served, or a record would outlive the index an erasure reads. If Redis
            # cannot be asked now either, the record expires with its TTL.
            self._forget_quietly(user_id, [decision.decision_id])
            raise
        if len(logged) > 1:  # the user's index was full: its oldest decisions go
            self._forget_quietly(user_id, [str(old) for old in logged[1:]])
        return consumed

    def _forget_quietly(self, user_id: str, decision_ids: Sequence[str]) -> None:
        """``_forget_decisions`` as a clean-up: on the store's own time (the caller's
        deadline is the caller's), and a store that cannot be asked is no error."""
        with deadline.call_deadline(None), contextlib.suppress(Unavailable):
            self._forget_decisions(user_id, decision_ids)

    def _forget_decisions(self, user_id: str, decision_ids: Sequence[str]) -> None:
        """Delete decisions (records, outcomes, owners, reward windows) and then take them off
        the user's indexes; on a cluster, the user's slot last, so an index never names a
        decision that is gone while one it does not name is still there."""
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

    def get_logged_decision(
        self, *, decision_id: str, render: bool = False
    ) -> LoggedDecision | None:
        """The logged decision, with its owner; ``render``: for a Decide (a replay), on the
        render budget."""
        d = keys.DecisionKeys.of(decision_id)
        commands: list[tuple[Any, ...]] = [("GET", d.record), ("GET", d.owner)]
        raw, owner = self._run(
            "get_logged_decision",
            lambda: self._round_trip(commands),
            budget=self.render if render else self.write,
        )
        if raw is None:
            return None
        return LoggedDecision(decision_id=decision_id, payload=json.loads(raw), owner=owner)

    def record_outcome(
        self, *, decision_id: str, offer_id: str, outcome_id: str, outcome: dict[str, Any]
    ) -> RecordedOutcome:
        """Store the outcome (once per outcome_id) and send the offer's first reward to the
        learner while its reward window is open: one script in the decision's slot, then
        one in the stream's (see ``lua/send_reward.lua``). A duplicate outcome_id sends again
        too: a no-op, unless the first attempt failed between the two."""
        k = keys.DecisionKeys.of(decision_id)
        # Both scripts are idempotent, so both are retried: the first answers "recorded"
        # again when it finds this very outcome (same JSON, same time) already stored.
        reply: Any = self._run(
            "record_outcome",
            lambda: self._record_outcome(
                keys=[k.record, k.outcomes],
                args=[offer_id, outcome_id, json.dumps(outcome, separators=(",", ":"))],
            ),
            budget=self.write,
        )
        status, record = reply[0], reply[1]
        arm = reply[2] if len(reply) > 2 else ""
        if record is not None and int(status) >= 0:
            vector = json.loads(record)["features"][offer_id]
            args = [
                decision_id,
                offer_id,
                repr(float(outcome["reward"])),
                json.dumps(vector, separators=(",", ":")),
                repr(float(outcome["ts"])),
            ]
            self._run(
                "record_outcome",
                lambda: self._send_reward(
                    keys=[keys.AWAITING, keys.LEARNED, keys.OUTCOME_STREAM], args=args
                ),
                budget=self.write,
            )
        return RecordedOutcome(int(status), arm if isinstance(arm, str) else "")

    # --- profiles -------------------------------------------------------------------------

    def get_profile(self, *, user_id: str) -> Profile:
        k = keys.UserKeys.of(user_id)

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(k.profile)
            pipe.hgetall(k.signals)
            pipe.hgetall(k.contacts)
            pipe.hgetall(k.cooldowns)
            pipe.hgetall(k.attributes)
            return pipe.execute()

        replies = self._run("get_profile", read, budget=self.write)
        return _decode_profile(user_id, *replies)

    def set_preferences(self, *, update: PreferencesUpdate, now: float) -> Profile:
        """Merge the preferences and return the profile right after, atomically (one script:
        all or nothing, and no concurrent writer in between). A call that would leave the
        user more topic stances or channel choices than ``validation`` allows writes nothing
        and raises ``InvalidArgument`` naming the bound."""
        k = keys.UserKeys.of(update.user_id)
        to_set, to_clear, withdrawn = _preference_fields(update, now)
        args: list[Any] = [
            k.digest,
            repr(now),
            validation.MAX_TOPIC_PREFERENCES_PER_USER,
            validation.MAX_CHANNEL_PREFERENCES_PER_USER,
            1 if withdrawn else 0,
            len(to_clear),
            *to_clear,
            *itertools.chain.from_iterable(to_set.items()),
        ]
        # Idempotent: every field is set to a value stamped with ``now``, taken once.
        reply = self._merge_into_profile(
            "set_preferences",
            self._set_preferences,
            [k.profile, k.signals, k.contacts, k.cooldowns, k.attributes, k.erased],
            args,
        )
        if not int(reply[0]):
            field, what, limit = (
                ("topic_preferences", "topic stances", validation.MAX_TOPIC_PREFERENCES_PER_USER)
                if reply[1] == "t"
                else (
                    "channel_preferences",
                    "channel choices",
                    validation.MAX_CHANNEL_PREFERENCES_PER_USER,
                )
            )
            raise InvalidArgument(
                [
                    FieldViolation(
                        field,
                        f"a user holds at most {limit} {what}; this would leave {reply[2]} "
                        "(set some to NEUTRAL first)",
                    )
                ]
            )
        return _decode_profile(update.user_id, *(_as_dict(hash_) for hash_ in reply[1:]))

    def _merge_into_profile(
        self, operation: str, script: Callable[..., Any], user_keys: list[str], args: list[Any]
    ) -> Any:
        """Run a fenced script that merges into a user's profile and answers ``[ok, hashes of
        the profile right after ...]`` (or the bound it would pass): on the write budget,
        retried (the merges are idempotent); ``Aborted`` if the user was erased meanwhile."""
        reply = self._run(operation, lambda: script(keys=user_keys, args=args), budget=self.write)
        return _check_not_erased(reply)

    def set_attributes(self, *, update: AttributesUpdate, now: float, limit: int) -> Profile:
        """Merge the attributes (STATED outranks IMPORTED, an empty value removes; see
        ``lua/set_attributes.lua``) and return the profile right after, atomically. A merge that
        would leave the user more than ``limit`` attributes writes nothing and raises
        ``InvalidArgument``."""
        k = keys.UserKeys.of(update.user_id)
        args: list[Any] = [k.digest, repr(now), int(update.source or 0), f"{now:.6f}", limit]
        args.append(update.user_id)
        for name, value in update.attributes:
            args += [name, value]
        # Idempotent: the same values with the same stamp, and the cap counts what they leave.
        reply = self._merge_into_profile(
            "set_attributes",
            self._set_attributes,
            [k.attributes, k.profile, k.signals, k.contacts, k.cooldowns, k.erased],
            args,
        )
        if not int(reply[0]):
            raise InvalidArgument(
                [
                    FieldViolation(
                        "attributes",
                        f"a user holds at most {limit} attributes; this would leave {reply[1]}",
                    )
                ]
            )
        return _decode_profile(update.user_id, *(_as_dict(hash_) for hash_ in reply[1:]))

    def record_signals(
        self, *, user_id: str, signals: Sequence[Signal], now: float | None = None
    ) -> bool:
        """Keep the signals if the user consented; False (and nothing kept) otherwise.
        ``now``: when the call began (for the erasure fence)."""
        k = keys.UserKeys.of(user_id)
        started = time.time() if now is None else now
        args: list[Any] = [k.digest, repr(started), self._half_life]
        args.append(validation.MAX_SIGNAL_TOPICS_PER_USER)
        for signal in signals:
            args += [signal.topic, repr(float(signal.weight)), f"{signal.observed_at:.6f}"]
        # Not idempotent: observations add up, so a second attempt after a timeout could
        # count them twice. Tried again only when the first was never sent.
        kept = int(
            self._run(
                "record_signals",
                lambda: _check_not_erased(
                    self._record_signals(keys=[k.signals, k.profile, k.erased], args=args)
                ),
                budget=self.write,
                idempotent=False,
            )
        )
        if kept < 0:
            limit = validation.MAX_SIGNAL_TOPICS_PER_USER
            raise InvalidArgument(
                [
                    FieldViolation(
                        "signals",
                        f"a user holds signals of at most {limit} topics; this would leave {-kept}",
                    )
                ]
            )
        return bool(kept)

    def delete_profile(self, *, user_id: str, now: float | None = None) -> None:
        """Erasure: the user's keys, and every decision logged for them with its outcomes
        (they hold a pseudonym and the request context). First, atomically in the user's
        slot, the user goes on the erasure fence and their keys go; then the decisions their
        index names, in their own slots; then the index. A call that was in flight meanwhile
        (started before ``now``) cannot write anything of the user again: every script that
        writes a user's keys checks the fence. Idempotent: retried, it finds what is left."""
        k = keys.UserKeys.of(user_id)
        at = time.time() if now is None else now

        # Its decision indexes last: the script returns what they name, then deletes the rest.
        user_keys = [k.erased, k.profile, k.signals, k.contacts, k.requests, k.cooldowns]
        user_keys += [k.attributes, k.requested, k.decisions, k.decided]
        fence: list[Any] = [k.digest, repr(at), ERASURE_FENCE_SECONDS]
        ids: Any = self._run(
            "delete_profile",
            lambda: self._erase_user(keys=user_keys, args=fence),
            budget=self.write,
        )
        if ids:
            self._forget_decisions(user_id, [str(i) for i in ids])

    # --- bulk import and export ---------------------------------------------------------

    def write_profiles(
        self, records: Sequence[ProfileRecord], *, limit: int, started: float | None = None
    ) -> list[ProfileWrite]:
        """Write validated profile records (``tactful import``) in ONE round trip: one
        ``lua/import_profile.lua`` call per user, all its keys in the user's slot, sent as a
        non-transactional pipeline (on a cluster, each node gets its users' calls). Per user,
        atomically: the profile hash as SetPreferences writes it (with the user id), the
        signals deleted if consent is withdrawn, the attributes through SetAttributes' own
        merge (one per source and time, so STATED outranks IMPORTED and the per-user cap
        holds as in the API), then the signals as RecordSignals' script writes them in its
        replacing mode (kept only with consent, read after the profile was written). Not all
        or nothing per batch: every write sets a state, so a failed batch is repaired by
        writing it again."""
        commands: list[tuple[Any, ...]] = []
        sha = self._import_profile.sha
        fence_at = repr(time.time() if started is None else started)  # the erasure fence
        for record in records:
            user_digest = keys.user_digest(record.user_id)
            profile_key, attributes_key, signals_key, fence = keys.import_keys(user_digest)
            to_set, to_clear, withdrawn = _preference_fields(record.preferences, None)
            args: list[Any] = [
                "EVALSHA", sha, 4, profile_key, attributes_key, signals_key, fence,
                user_digest, fence_at,
                limit, 1 if withdrawn else 0, len(to_clear), len(to_set),
                validation.MAX_TOPIC_PREFERENCES_PER_USER,
                validation.MAX_CHANNEL_PREFERENCES_PER_USER,
                validation.MAX_SIGNAL_TOPICS_PER_USER,
                *to_clear, *itertools.chain.from_iterable(to_set.items()),
            ]  # fmt: skip
            if record.attributes:
                # One merge per (source, time): usually one per line.
                groups: dict[tuple[int, float], list[str]] = {}
                for a in record.attributes:
                    group = groups.get((a.source, a.updated_at))
                    if group is None:
                        group = groups[a.source, a.updated_at] = []
                    group += (a.name, a.value)
                args.append(len(groups))
                for (source, at), pairs in groups.items():
                    args += (int(source), f"{at:.6f}", len(pairs) // 2, *pairs)
            else:
                args.append(0)
            for signal in record.signals:
                args += (signal.topic, repr(signal.weight), f"{signal.observed_at:.6f}")
            commands.append(tuple(args))

        def write() -> list[Any]:
            try:
                return self._round_trip(commands)
            except redis.exceptions.NoScriptError:
                # A Redis that never ran the script (or restarted): load it and write the
                # batch again, which sets the same state.
                self.client.script_load(self._import_profile.script)
                return self._round_trip(commands)

        replies = self._run("write_profiles", write, budget=self.write)
        results = []
        for reply in replies:
            if reply == ERASED:
                results.append(ProfileWrite(None, 0, erased=True))
                continue
            if int(reply) < 0:
                results.append(ProfileWrite(None, 0, over_bound=_IMPORT_BOUNDS[-int(reply)]))
                continue
            refused, signals = divmod(int(reply), 3)
            kept = None if signals == 0 else signals == 2
            results.append(ProfileWrite(signals_kept=kept, attributes_refused=refused))
        return results

    def scan_profiles(self, *, batch: int = 500) -> Iterator[tuple[str | None, Profile]]:
        """Every stored profile (preferences, consent, attributes, signals as stored: weight
        at observed_at) with the user id kept in its profile hash: None for a profile last
        written before user ids were kept (keys only hold a digest). Found with SCAN (on a
        cluster, redis-py scans every primary), read ``batch`` users per round trip; SCAN
        may return a user twice while Redis resizes its table (harmless to an import)."""
        found: list[str] = []
        for key in self.client.scan_iter(match=keys.USER_PROFILES, count=1000):
            found.append(key)
            if len(found) >= batch:
                yield from self._read_profiles(found)
                found = []
        if found:
            yield from self._read_profiles(found)

    def _read_profiles(self, profile_keys: Sequence[str]) -> Iterator[tuple[str | None, Profile]]:
        users = [keys.UserKeys.of_digest(keys.digest_of(key)) for key in profile_keys]
        commands: list[tuple[Any, ...]] = []
        for k in users:
            commands += (("HGETALL", k.profile), ("HGETALL", k.signals), ("HGETALL", k.attributes))
        replies = self._run("scan_profiles", lambda: self._round_trip(commands), budget=self.write)
        for i in range(0, len(replies), 3):
            fields = _as_dict(replies[i])
            if not fields:  # deleted since the SCAN found it
                continue
            user_id = fields.get("user_id")
            signals, attributes = _as_dict(replies[i + 1]), _as_dict(replies[i + 2])
            yield user_id, _decode_profile(user_id or "", fields, signals, {}, {}, attributes)

    # --- catalog --------------------------------------------------------------------------

    def catalog_version(self) -> int:
        version = self._run(
            "catalog_version", lambda: self.client.get(keys.CATALOG_VERSION), budget=self.write
        )
        return int(version or 0)

    def load_model(self, *, version: int) -> bytes | None:
        raw: Any = self._run(
            "load_model",
            lambda: _undecoded(self.client, "GET", keys.model_snapshot(version)),
            budget=self.write,
        )
        return None if raw is None else bytes(raw)

    def load_catalog(self) -> tuple[int, list[Offer], list[Segment]]:
        """The catalog's version, offers and segments, read together: a process never holds
        offers of one version with segments of another. Every catalog write bumps the
        version in the same atomic step, so the version read before and after the offers and
        segments (one round trip) tells whether a write came in between; then it is read
        again. Not MULTI/EXEC: Redis 6 refuses MULTI once maxmemory is reached, and a full
        Redis must still serve the catalog (reads work; see WRITE_REFUSED_ERRORS)."""
        commands = [
            ("GET", keys.CATALOG_VERSION),
            ("HGETALL", keys.CATALOG_OFFERS),
            ("HGETALL", keys.CATALOG_SEGMENTS),
            ("GET", keys.CATALOG_VERSION),
        ]
        for _ in range(CATALOG_READ_ATTEMPTS):
            version, raw_offers, raw_segments, version_after = self._run(
                "load_catalog", lambda: self._round_trip(commands), budget=self.write
            )
            if version == version_after:
                break
        else:
            raise Unavailable("the catalog kept changing while it was read")
        offers = [_decode_offer(v) for v in _as_dict(raw_offers).values()]
        segments = [_decode_segment(v) for v in _as_dict(raw_segments).values()]
        return int(version or 0), offers, segments

    def put_offer(self, *, offer: Offer) -> None:
        """Put the offer if every segment it names exists (checked in the same script);
        ``InvalidArgument`` naming each missing one otherwise, and nothing written."""
        named = list(dict.fromkeys((*offer.segments, *offer.excluded_segments)))
        missing: Any = self._run(
            "put_offer",
            lambda: self._put_offer(
                keys=[keys.CATALOG_OFFERS, keys.CATALOG_SEGMENTS, keys.CATALOG_VERSION],
                args=[offer.offer_id, json.dumps(asdict(offer)), *named],
            ),
            budget=self.write,
        )
        if missing:
            unknown = set(missing)
            raise InvalidArgument(
                [
                    FieldViolation(f"offer.{name}[{i}]", f"segment {segment_id!r} does not exist")
                    for name, ids in (
                        ("segments", offer.segments),
                        ("excluded_segments", offer.excluded_segments),
                    )
                    for i, segment_id in enumerate(ids)
                    if segment_id in unknown
                ]
            )

    def get_offer(self, *, offer_id: str) -> Offer | None:
        raw = self._run(
            "get_offer", lambda: self.client.hget(keys.CATALOG_OFFERS, offer_id), budget=self.write
        )
        return None if raw is None else _decode_offer(str(raw))

    def delete_offer(self, *, offer_id: str) -> bool:

        def delete() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.hdel(keys.CATALOG_OFFERS, offer_id)
            pipe.incr(keys.CATALOG_VERSION)
            return pipe.execute()

        # Not retried after a timeout: a second attempt would find nothing and say so.
        deleted, _ = self._run("delete_offer", delete, budget=self.write, idempotent=False)
        return bool(deleted)

    def put_segment(self, *, segment: Segment, limit: int) -> None:
        """Create or replace the segment; a new one when the catalog holds ``limit`` already
        is ``FailedPrecondition`` (checked in the same script)."""
        put = self._run(
            "put_segment",
            lambda: self._put_segment(
                keys=[keys.CATALOG_SEGMENTS, keys.CATALOG_VERSION],
                args=[segment.segment_id, json.dumps(asdict(segment)), limit],
            ),
            budget=self.write,
        )
        if not int(put):
            raise FailedPrecondition(
                f"the catalog holds {limit} segments, the most TACTFUL_MAX_SEGMENTS allows: "
                "delete one first"
            )

    def get_segment(self, *, segment_id: str) -> Segment | None:
        raw = self._run(
            "get_segment",
            lambda: self.client.hget(keys.CATALOG_SEGMENTS, segment_id),
            budget=self.write,
        )
        return None if raw is None else _decode_segment(str(raw))

    def delete_segment(self, *, segment_id: str) -> bool:
        """Delete the segment; False if there is none. ``FailedPrecondition`` naming the
        offers when offers still name it (nothing deleted)."""
        # Not retried after a timeout: a second attempt would find nothing and say so.
        reply: Any = self._run(
            "delete_segment",
            lambda: self._delete_segment(
                keys=[keys.CATALOG_SEGMENTS, keys.CATALOG_OFFERS, keys.CATALOG_VERSION],
                args=[segment_id],
            ),
            budget=self.write,
            idempotent=False,
        )
        status = int(reply[0])
        if status < 0:
            offers = sorted(str(o) for o in reply[1:])
            shown = ", ".join(repr(o) for o in offers[:10])
            more = f" and {len(offers) - 10} more" if len(offers) > 10 else ""
            raise FailedPrecondition(
                f"segment {segment_id!r} is named by {len(offers)} offer(s): {shown}{more}; "
                "remove it from their segments and excluded_segments first"
            )
        return status == 1

    # --- rate limits ----------------------------------------------------------------------

    def take_token(self, *, bucket: str, rate: float, burst: float) -> float:
        """Take a token from ``bucket``: 0.0 if taken, else the seconds to wait for one."""
        # On the render budget (it delays every call), and not retried: a second attempt
        # could take a second token.
        wait = self._run(
            "rate_limit",
            lambda: self._take_token(keys=[bucket], args=[rate, burst]),
            budget=self.render,
            idempotent=False,
        )
        return float(wait)


def _undecoded(client: Client, *command: Any) -> Any:
    """A command's reply left as bytes (model snapshots and the learner's state are bytes),
    on the decoding client: one pool serves both, and a cluster needs no second client."""
    return client.execute_command(*command, **{NEVER_DECODE: []})  # type: ignore[no-untyped-call]


class ModelStore:
    """What the learner and the model CLI need: the reward stream, the learner's checkpoint,
    and the versioned model snapshots (all in the {model} slot)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._close_windows = client.register_script(source("close_windows"))
        self._renew_lease = client.register_script(source("renew_lease"))
        self._publish_model = client.register_script(source("publish_model"))
        self._rollback_model = client.register_script(source("rollback_model"))

    def hold_lease(self, token: str, ttl_ms: int) -> bool:
        """Take the learner lease, or renew it if this token holds it."""
        if self.client.set(keys.LEARNER_LEASE, token, nx=True, px=ttl_ms):
            return True
        return bool(self._renew_lease(keys=[keys.LEARNER_LEASE], args=[token, ttl_ms]))

    def release_lease(self, token: str) -> None:
        self._renew_lease(keys=[keys.LEARNER_LEASE], args=[token, 1])

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(
                keys.OUTCOME_STREAM, keys.LEARNER_GROUP, id="0", mkstream=True
            )
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def claim_all(self, consumer: str) -> list[tuple[str, dict[str, str]]]:
        """Take over every entry delivered to a consumer that never acknowledged it (a learner
        that died); only one learner runs at a time, so nothing idle is still being worked on."""
        claimed: list[tuple[str, dict[str, str]]] = []
        start = "0-0"
        while True:
            reply: Any = self.client.xautoclaim(
                keys.OUTCOME_STREAM, keys.LEARNER_GROUP, consumer, 0, start, count=500
            )
            start, entries = reply[0], reply[1]
            claimed += [(entry_id, fields) for entry_id, fields in entries if fields]
            if start == "0-0":
                return claimed

    def read_new(
        self, consumer: str, *, count: int, block_ms: int
    ) -> list[tuple[str, dict[str, str]]]:
        reply: Any = self.client.xreadgroup(
            keys.LEARNER_GROUP,
            consumer,
            {keys.OUTCOME_STREAM: ">"},
            count=count,
            block=block_ms or None,
        )
        return [(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]

    def close_due_windows(
        self, now: float, *, batch: int = 500, max_batches: int = 20, per_script: int = 100
    ) -> int:
        """Send reward 0 for every chosen offer whose reward window ended without an outcome.
        Works through the due decisions in batches: one pipelined read of their logged
        decisions (in their own slots), then the closing script in the {model} slot, on
        ``per_script`` decisions at a time (it runs atomically: kept short); up to
        ``max_batches`` per call so a large backlog cannot stall the learner's loop."""
        sent = 0
        for _ in range(max_batches):
            due: Any = self.client.zrangebyscore(keys.AWAITING, "-inf", now, start=0, num=batch)
            if not due:
                break
            pipe = self.client.pipeline(transaction=False)
            for decision_id in due:
                pipe.get(keys.DecisionKeys.of(decision_id).record)
            pending = list(zip(due, pipe.execute(), strict=True))
            for start in range(0, len(pending), per_script):
                args: list[Any] = [repr(now)]
                for decision_id, record in pending[start : start + per_script]:
                    args += [decision_id, *_unlearned_vectors(record)]
                sent += int(
                    self._close_windows(
                        keys=[keys.AWAITING, keys.LEARNED, keys.OUTCOME_STREAM], args=args
                    )
                )
            if len(due) < batch:
                break
        return sent

    def load_checkpoint(self) -> tuple[bytes, str] | None:
        raw: Any = _undecoded(self.client, "HMGET", keys.LEARNER_STATE, "state", "last_id")
        if raw[0] is None:
            return None
        return bytes(raw[0]), raw[1].decode()

    def checkpoint(self, state: bytes, last_id: str, acked: Sequence[str]) -> None:
        """Save the learner's state and acknowledge what it holds, together: after a crash
        the stream's pending entries are exactly those the saved state has not applied."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(keys.LEARNER_STATE, mapping={"state": state, "last_id": last_id})
        if acked:
            pipe.xack(keys.OUTCOME_STREAM, keys.LEARNER_GROUP, *acked)
            # Entries before the last applied one are in the state: the stream can drop them.
            pipe.xtrim(keys.OUTCOME_STREAM, minid=last_id, approximate=False)
        pipe.execute()

    def publish(self, snapshot: Callable[[int], bytes], *, keep: int, now: float) -> int | None:
        """Publish a new model version unless a rollback pinned an older one (checked in
        the same atomic step as the publish: a rollback racing it always wins)."""
        if self.client.exists(keys.MODEL_PINNED):
            return None  # the common case, without building a snapshot for nothing
        version = int(self.client.incr(keys.MODEL_SEQ))
        published = self._publish_model(
            keys=[
                keys.MODEL_PINNED,
                keys.MODEL_VERSIONS,
                keys.MODEL_CURRENT,
                keys.model_snapshot(version),
            ],
            args=[version, snapshot(version), now, keep, keys.MODEL_SNAPSHOTS],
        )
        return version if int(published) else None

    def versions(self) -> tuple[int, list[tuple[int, float]]]:
        current = int(self.client.get(keys.MODEL_CURRENT) or 0)
        listed: Any = self.client.zrange(keys.MODEL_VERSIONS, 0, -1, withscores=True)
        return current, [(int(v), float(ts)) for v, ts in listed]

    def rollback(self, version: int) -> None:
        """Serve ``version`` again and pin it: the learner keeps learning but publishes
        nothing until ``unpin``."""
        pinned = self._rollback_model(
            keys=[keys.model_snapshot(version), keys.MODEL_CURRENT, keys.MODEL_PINNED],
            args=[version],
        )
        if not int(pinned):
            raise KeyError(version)

    def unpin(self) -> None:
        self.client.delete(keys.MODEL_PINNED)

    def backlog(self) -> int:
        groups: Any = self.client.xinfo_groups(keys.OUTCOME_STREAM)
        return sum(int(g.get("lag") or 0) + int(g.get("pending") or 0) for g in groups)


#: What the operating system says when nothing listens where Redis should be: evidence that no
#: slow moment explains. (A reset is not: one dropped connection is counted in the rate.)
_REFUSALS = (ConnectionRefusedError, FileNotFoundError)


def _refused(error: BaseException) -> bool:
    """The connection was refused (redis-py wraps the OSError; a timeout, even one
    connecting, is not a refusal: a busy machine is slow to accept too)."""
    seen: BaseException | None = error
    for _ in range(5):  # redis-py's wrappers, the OSError under them
        if seen is None:
            return False
        if isinstance(seen, _REFUSALS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _check_not_erased(reply: _T) -> _T:
    """A fenced script's reply, unless it says the user was erased while the call was in
    flight (nothing was written): then ``Aborted``."""
    if reply == ERASED:
        raise Aborted(
            "the profile was erased while this call was in flight: nothing was written "
            "(sent again, it writes a new profile)"
        )
    return reply


def _unlearned_vectors(record: str | None) -> list[Any]:
    """A logged decision's chosen offers that have a feature vector, as the closing script
    takes them: n, then n (offer_id, vector JSON) pairs."""
    if record is None:  # expired or erased: the window just closes
        return [0]
    decision = json.loads(record)
    features = decision.get("features") or {}
    pairs: list[Any] = []
    for offer_id in decision["offer_ids"]:
        if offer_id in features:
            pairs += [offer_id, json.dumps(features[offer_id], separators=(",", ":"))]
    return [len(pairs) // 2, *pairs]


RoundTrip = Callable[[Sequence[tuple[Any, ...]]], list[Any]]


def round_trip(client: Client) -> RoundTrip:
    """How the Decide path sends its commands in one round trip, chosen here, once, by the
    client: on one Redis server, a hand-packed write on one pooled connection (measured
    faster than a pipeline); on a Redis Cluster, redis-py's ClusterPipeline, which sends
    each node its commands together and follows MOVED/ASK. Either way, error replies are
    raised only after every reply is read, and HGETALL replies may be raw (``_as_dict``)."""
    if isinstance(client, RedisCluster):
        return functools.partial(_cluster_round_trip, client)
    return functools.partial(_single_node_round_trip, client.connection_pool)


def _cluster_round_trip(client: RedisCluster, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    pipe = client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
    for command in commands:
        pipe.execute_command(*command)
    replies: list[Any] = pipe.execute()
    return replies


def _single_node_round_trip(
    pool: redis.ConnectionPool, commands: Sequence[tuple[Any, ...]]
) -> list[Any]:
    """The commands in one write, then their replies: one round trip on one pooled
    connection, what a non-transactional pipeline sends, minus a pipeline's per-command
    bookkeeping (command stack, options, response callbacks, observability hooks), which
    costs more client time than Redis spends on the commands. Not retried here: the
    store's ``_run`` knows whether the commands may be sent again, and for how long."""
    conn = pool.get_connection()
    try:
        return _exchange(conn, commands)
    finally:
        pool.release(conn)


def _exchange(conn: redis.Connection, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    # Packed by hiredis (a dependency: redis[hiredis]), as redis-py packs them, minus its
    # per-command Python layer, which only matters for commands written as one string.
    packed = b"".join([hiredis.pack_command(command) for command in commands])
    conn.send_packed_command([packed])  # type: ignore[no-untyped-call]
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except redis.exceptions.ResponseError as error:
            replies.append(error)
    for reply in replies:
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply
    return replies


def _record_json(payload: Mapping[str, Any]) -> bytes:
    """The decision record as JSON, written by orjson: a tenth of ``json.dumps``'s time on a
    record with its candidates and feature vectors (5 against 53 µs), on every Decide. Any
    JSON reader gets the same values back (floats are written shortest-round-trip)."""
    return orjson.dumps(payload)


def _as_dict(reply: Any) -> dict[str, str]:
    """An HGETALL reply as a dict: RESP2 gives a flat [field, value, ...] list, RESP3 a map."""
    if isinstance(reply, dict):
        return reply
    fields = iter(reply)
    return dict(zip(fields, fields, strict=False))


def _preference_fields(
    update: PreferencesUpdate, now: float | None
) -> tuple[dict[str, str], list[str], bool]:
    """What SetPreferences (and a bulk import) writes in the profile hash: the fields to set
    (the user id among them: the keys only hold its digest, and an export needs it), the
    fields to clear (NEUTRAL stances), and whether consent was withdrawn (the signals then
    go). Each stance, opt-in and consent is stamped with ``now``, or with its own
    ``updated_at`` when ``now`` is None (an import carrying the times it was given)."""
    to_set: dict[str, str] = {"user_id": update.user_id}
    to_clear: list[str] = []
    for pref in update.topic_preferences:
        field = f"t:{pref.topic}"
        if pref.stance is Stance.NEUTRAL:
            to_clear.append(field)
        else:
            at = pref.updated_at if now is None else now
            to_set[field] = f"{int(pref.stance or 0)}|{at:.6f}"
    for channel_pref in update.channel_preferences:
        at = channel_pref.updated_at if now is None else now
        to_set[f"c:{channel_pref.channel}"] = f"{int(channel_pref.opted_in)}|{at:.6f}"
    if update.max_messages_per_day is not None:
        to_set["max_per_day"] = str(update.max_messages_per_day)
    if update.quiet_hours is not None:
        quiet = update.quiet_hours
        to_set["quiet"] = f"{quiet.start_hour}|{quiet.end_hour}|{quiet.time_zone}"
    withdrawn = update.consent is not None and not update.consent.inferred_personalization
    if update.consent is not None:
        at = update.consent.updated_at if now is None else now
        to_set["consent"] = f"{int(update.consent.inferred_personalization)}|{at:.6f}"
    return to_set, to_clear, withdrawn


def _decode_offer(raw: str) -> Offer:
    data = json.loads(raw)
    data["topics"] = tuple(data["topics"])
    data["channels"] = tuple(data["channels"])
    # Offers stored before targeting existed have neither list: open to everyone.
    data["segments"] = tuple(data.get("segments", ()))
    data["excluded_segments"] = tuple(data.get("excluded_segments", ()))
    return Offer(**data)


def _decode_segment(raw: str) -> Segment:
    return Segment(**json.loads(raw))


def _split_ts(value: str) -> tuple[str, float]:
    head, _, ts = value.partition("|")
    return head, float(ts or 0)


def _decode_profile(
    user_id: str,
    fields: dict[str, str],
    signals: dict[str, str],
    contacts: dict[str, str],
    cooldowns: dict[str, str],
    attributes: dict[str, str],
) -> Profile:
    """The profile as stored, in no particular order: Decide reads it on every request and
    needs no order; ``ProfileService`` sorts what it presents."""
    topics: list[TopicPreference] = []
    channels: list[ChannelPreference] = []
    max_per_day = 0
    quiet: QuietHours | None = None
    consent = Consent()
    for name, value in fields.items():
        kind, _, key = name.partition(":")
        if kind == "t":
            stance, ts = _split_ts(value)
            topics.append(TopicPreference(key, Stance(int(stance)), ts))
        elif kind == "c":
            opted_in, ts = _split_ts(value)
            channels.append(ChannelPreference(key, opted_in == "1", ts))
        elif name == "max_per_day":
            max_per_day = int(value)
        elif name == "quiet":
            start, end, tz = value.split("|", 2)
            quiet = QuietHours(int(start), int(end), tz)
        elif name == "consent":
            given, ts = _split_ts(value)
            consent = Consent(given == "1", ts)
    decoded_signals = []
    for topic, value in signals.items():
        weight, _, observed = value.partition("|")
        decoded_signals.append(Signal(topic, float(weight), float(observed)))
    counters = []
    last_contacts = []
    for field, count in contacts.items():
        if field in ("spent", DAY_MARK):  # the caps script's notes (its last decision,
            continue  # the day of the counters), not counters
        window, _, rest = field.partition("|")
        if window == "last":  # "last|<channel>" -> when that channel was last used
            last_contacts.append((rest, float(count)))
            continue
        channel, _, offer_id = rest.partition("|")
        counters.append(ContactCounter(channel, offer_id, int(count), float(window)))
    cooling = []
    for field, until in cooldowns.items():
        kind, _, name = field.partition(":")
        cooling.append(
            Cooldown(name if kind == "o" else "", name if kind == "t" else "", float(until))
        )
    facts = []
    for name, stored in attributes.items():
        source, updated_at, value = stored.split("|", 2)
        facts.append(Attribute(name, value, AttributeSource(int(source)), float(updated_at)))
    return Profile(
        user_id=user_id,
        topic_preferences=tuple(topics),
        channel_preferences=tuple(channels),
        max_messages_per_day=max_per_day,
        quiet_hours=quiet,
        consent=consent,
        signals=tuple(decoded_signals),
        contact_counters=tuple(counters),
        last_contacts=tuple(last_contacts),
        cooldowns=tuple(cooling),
        attributes=tuple(facts),
    )
