"""The store on Redis (``RedisStore``): the ``Store`` the core depends on.

The hot path touches Redis at most twice per Decide: ``read_for_decision`` (profile, signals,
contact counters, cooldowns, attributes, catalog and model versions, request-id replay: one
pipelined round trip) and ``log_decision`` (decision log, contact counters, request id: one
more). Writes that touch several keys of a user run in MULTI/EXEC or in one Lua script, so
they are all or nothing.

The same code runs on one Redis server or on a Redis Cluster (``wire.connect``): every script
and every MULTI/EXEC touches one hash tag, so one slot (``keys``); only non-transactional
pipelines span slots, and ``wire.round_trip`` picks how the Decide path sends them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, TypeVar

import redis.exceptions
from redis.cluster import RedisCluster

from tactful import deadline, keys, metrics, validation
from tactful.breaker import CircuitBreaker, CircuitOpen
from tactful.domain import (
    AttributesUpdate,
    Offer,
    PreferencesUpdate,
    Profile,
    ProfileRecord,
    Segment,
    Signal,
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
from tactful.store import codecs
from tactful.store.codecs import (
    as_dict,
    consume_args,
    consumed_offers,
    decode_offer,
    decode_profile,
    decode_segment,
    record_json,
)
from tactful.store.scripts import ERASED, source
from tactful.store.types import (
    ContactSpend,
    DecisionInputs,
    LoggedDecision,
    ProfileWrite,
    RecordedOutcome,
    RequestTaken,
)
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
    round_trip,
    undecoded,
    write_refused,
)

_T = TypeVar("_T")

CATALOG_READ_ATTEMPTS = 5  # reads of the catalog before giving up on a stream of writes
#: What one user's decision index holds at most: a user id shared by many visitors (say
#: ``guest``) keeps its newest decisions joinable and erasable within one call, and drops the
#: oldest. Likewise the request ids that replay a Decide.
MAX_DECISIONS_PER_USER = 10_000
MAX_REQUEST_IDS_PER_USER = 10_000
#: How long an erased user stays on the erasure fence (``lua/includes/fence.lua``): longer than
#: any call that was in flight during the erasure can still be writing.
ERASURE_FENCE_SECONDS = 300.0


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
                token = ATTEMPT_DEADLINE.set(until)
                sent = time.perf_counter()
                try:
                    result = attempt()
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
        profile = decode_profile(user_id, *(as_dict(reply) for reply in replies[:5]))
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
            ("SET", d.record, record_json(decision.payload), "EX", ttl),
            ("SET", d.owner, k.digest, "EX", ttl),
        ]
        if learn_after is not None:
            records.append(("ZADD", keys.AWAITING, learn_after, decision.decision_id))
        fence = (k.digest, repr(made_at))
        user: list[tuple[Any, ...]] = []
        if spend is not None:
            user.append(
                ("EVALSHA", self._consume_contacts.sha, 4, k.contacts, k.profile, k.requests,
                 k.erased, *fence, *consume_args(spend))
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
            consumed = None if spend is None else consumed_offers(replies[0])
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
        return LoggedDecision(decision_id, codecs.decode_record(raw), owner=owner)

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
                args=[offer_id, outcome_id, codecs.compact_json(outcome)],
            ),
            budget=self.write,
        )
        status, record = reply[0], reply[1]
        arm = reply[2] if len(reply) > 2 else ""
        if record is not None and int(status) >= 0:
            args = [
                decision_id,
                offer_id,
                repr(float(outcome["reward"])),
                codecs.offer_vector(record, offer_id),
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
        return decode_profile(user_id, *replies)

    def set_preferences(self, *, update: PreferencesUpdate, now: float) -> Profile:
        """Merge the preferences and return the profile right after, atomically (one script:
        all or nothing, and no concurrent writer in between). A call that would leave the
        user more topic stances or channel choices than ``validation`` allows writes nothing
        and raises ``InvalidArgument`` naming the bound."""
        k = keys.UserKeys.of(update.user_id)
        args = [k.digest, repr(now), *codecs.preferences_args(update, now)]
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
        return decode_profile(update.user_id, *(as_dict(hash_) for hash_ in reply[1:]))

    def _merge_into_profile(
        self, operation: str, script: Callable[..., Any], user_keys: list[str], args: list[Any]
    ) -> Any:
        """Run a fenced script that merges into a user's profile and answers ``[ok, hashes of
        the profile right after ...]`` (or the bound it would pass): on the write budget,
        retried (the merges are idempotent); ``Aborted`` if the user was erased meanwhile."""
        reply = self._run(operation, lambda: script(keys=user_keys, args=args), budget=self.write)
        return check_not_erased(reply)

    def set_attributes(self, *, update: AttributesUpdate, now: float, limit: int) -> Profile:
        """Merge the attributes (STATED outranks IMPORTED, an empty value removes; see
        ``lua/set_attributes.lua``) and return the profile right after, atomically. A merge that
        would leave the user more than ``limit`` attributes writes nothing and raises
        ``InvalidArgument``."""
        k = keys.UserKeys.of(update.user_id)
        args = [k.digest, repr(now), *codecs.attributes_args(update, now, limit)]
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
        return decode_profile(update.user_id, *(as_dict(hash_) for hash_ in reply[1:]))

    def record_signals(
        self, *, user_id: str, signals: Sequence[Signal], now: float | None = None
    ) -> bool:
        """Keep the signals if the user consented; False (and nothing kept) otherwise.
        ``now``: when the call began (for the erasure fence)."""
        k = keys.UserKeys.of(user_id)
        started = time.time() if now is None else now
        args = [k.digest, repr(started), *codecs.signals_args(signals, self._half_life)]
        # Not idempotent: observations add up, so a second attempt after a timeout could
        # count them twice. Tried again only when the first was never sent.
        kept = int(
            self._run(
                "record_signals",
                lambda: check_not_erased(
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
        sha = self._import_profile.sha
        fence_at = repr(time.time() if started is None else started)  # the erasure fence
        commands: list[tuple[Any, ...]] = []
        for record in records:
            digest = keys.user_digest(record.user_id)
            profile, attributes, signals, fence = keys.import_keys(digest)
            commands.append(
                ("EVALSHA", sha, 4, profile, attributes, signals, fence, digest, fence_at,
                 *codecs.import_args(record, limit))
            )  # fmt: skip

        def write() -> list[Any]:
            try:
                return self._round_trip(commands)
            except redis.exceptions.NoScriptError:
                # A Redis that never ran the script (or restarted): load it and write the
                # batch again, which sets the same state.
                self.client.script_load(self._import_profile.script)
                return self._round_trip(commands)

        replies = self._run("write_profiles", write, budget=self.write)
        return [codecs.profile_write(reply) for reply in replies]

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
            fields = as_dict(replies[i])
            if not fields:  # deleted since the SCAN found it
                continue
            user_id = fields.get("user_id")
            signals, attributes = as_dict(replies[i + 1]), as_dict(replies[i + 2])
            yield user_id, decode_profile(user_id or "", fields, signals, {}, {}, attributes)

    # --- catalog --------------------------------------------------------------------------

    def catalog_version(self) -> int:
        version = self._run(
            "catalog_version", lambda: self.client.get(keys.CATALOG_VERSION), budget=self.write
        )
        return int(version or 0)

    def load_model(self, *, version: int) -> bytes | None:
        raw: Any = self._run(
            "load_model",
            lambda: undecoded(self.client, "GET", keys.model_snapshot(version)),
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
        offers = [decode_offer(v) for v in as_dict(raw_offers).values()]
        segments = [decode_segment(v) for v in as_dict(raw_segments).values()]
        return int(version or 0), offers, segments

    def put_offer(self, *, offer: Offer) -> None:
        """Put the offer if every segment it names exists (checked in the same script);
        ``InvalidArgument`` naming each missing one otherwise, and nothing written."""
        named = list(dict.fromkeys((*offer.segments, *offer.excluded_segments)))
        missing: Any = self._run(
            "put_offer",
            lambda: self._put_offer(
                keys=[keys.CATALOG_OFFERS, keys.CATALOG_SEGMENTS, keys.CATALOG_VERSION],
                args=[offer.offer_id, codecs.offer_json(offer), *named],
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
        return None if raw is None else decode_offer(str(raw))

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
                args=[segment.segment_id, codecs.segment_json(segment), limit],
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
        return None if raw is None else decode_segment(str(raw))

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


def check_not_erased(reply: _T) -> _T:
    """A fenced script's reply, unless it says the user was erased while the call was in
    flight (nothing was written): then ``Aborted``."""
    if reply == ERASED:
        raise Aborted(
            "the profile was erased while this call was in flight: nothing was written "
            "(sent again, it writes a new profile)"
        )
    return reply
