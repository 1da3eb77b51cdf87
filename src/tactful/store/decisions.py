"""The store's Decide and outcome operations: the one read a Decide makes, the decision log
(with the contacts it consumes), cooldowns, and outcomes with their rewards."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import redis.exceptions

from tactful import keys
from tactful.errors import Abandoned, Aborted, Unavailable
from tactful.store import codecs
from tactful.store.base import RedisBase
from tactful.store.scripts import ERASED
from tactful.store.types import (
    ContactSpend,
    DecisionInputs,
    LoggedDecision,
    RecordedOutcome,
    RequestTaken,
)

#: What one user's decision index holds at most: a user id shared by many visitors (say
#: ``guest``) keeps its newest decisions joinable and erasable within one call, and drops the
#: oldest. Likewise the request ids that replay a Decide.
MAX_DECISIONS_PER_USER = 10_000
MAX_REQUEST_IDS_PER_USER = 10_000

Command = tuple[Any, ...]


class DecisionOperations(RedisBase):
    def read_for_decision(self, *, user_id: str, request_id: str) -> DecisionInputs:
        k = keys.UserKeys.of(user_id)
        commands: list[Command] = [
            *codecs.profile_reads(k),
            ("GET", keys.CATALOG_VERSION),
            ("GET", keys.MODEL_CURRENT),
        ]
        if request_id:
            commands.append(("HGET", k.requests, request_id))
        replies = self._run(
            "read_for_decision", lambda: self._decide_round_trip(commands), budget=self.render
        )
        claim = replies[7] if request_id else None
        replay_decision_id, replay_made_at = codecs.decode_claim(claim) if claim else (None, None)
        return DecisionInputs(
            profile=codecs.decode_profile_replies(user_id, replies[:5]),
            catalog_version=int(replies[5] or 0),
            model_version=int(replies[6] or 0),
            replay_decision_id=replay_decision_id,
            replay_made_at=replay_made_at,
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
        records = self._record_commands(k, decision, learn_after)
        user = self._user_commands(k, decision, request_id, spend)
        # On the write budget, not the render one: a decision that is not logged can never
        # be joined with its outcome nor learned from, and the page waiting for it gave the
        # time with its deadline (a short Redis stall must not leave decisions answered but
        # unlogged). Idempotent: the record, owner and window are sets; the caps script
        # counts a decision once however often it is sent (its ``spent`` mark), the log
        # script indexes it once.
        try:
            replies = self._run(
                "log_decision", partial(self._send_log, records, user), budget=self.write
            )
            dropped, consumed = _read_log_replies(replies, spend)
        except (Aborted, RequestTaken, Unavailable, Abandoned):
            # Take back what went out with it (all of it, or none, or its record alone: a
            # failed write cannot tell), or the learner would learn a reward 0 for a decision
            # never served, or a record would outlive the index an erasure reads. If Redis
            # cannot be asked now either, the record expires with its TTL.
            self._forget_quietly(user_id, [decision.decision_id])
            raise
        if dropped:  # the user's index was full: its oldest decisions go
            self._forget_quietly(user_id, dropped)
        return consumed

    def _record_commands(
        self, k: keys.UserKeys, decision: LoggedDecision, learn_after: float | None
    ) -> list[Command]:
        """The decision's own keys: its record, its owner, and its reward window."""
        d = keys.DecisionKeys.of(decision.decision_id)
        ttl = self._decision_ttl
        records: list[Command] = [
            ("SET", d.record, codecs.record_json(decision.payload), "EX", ttl),
            ("SET", d.owner, k.digest, "EX", ttl),
        ]
        if learn_after is not None:
            records.append(("ZADD", keys.AWAITING, learn_after, decision.decision_id))
        return records

    def _user_commands(
        self,
        k: keys.UserKeys,
        decision: LoggedDecision,
        request_id: str,
        spend: ContactSpend | None,
    ) -> list[Command]:
        """The user's fenced scripts, by SHA (they go in one round trip with the record):
        the caps script with ``spend``, then the log script, which claims the request id
        itself when no caps script does."""
        made_at = repr(float(decision.payload.get("ts", 0.0)))
        fence = (k.digest, made_at)
        user: list[Command] = []
        if spend is not None:
            user.append(
                ("EVALSHA", self._consume_contacts.sha, 4, k.contacts, k.profile, k.requests,
                 k.erased, *fence, *codecs.consume_args(spend))
            )  # fmt: skip
        user.append(
            ("EVALSHA", self._log_decision.sha, 4, k.decided, k.requests, k.requested, k.erased,
             *fence, decision.decision_id, made_at, self._decision_ttl, MAX_DECISIONS_PER_USER,
             request_id, "0" if spend is not None else "1", self._request_ttl,
             MAX_REQUEST_IDS_PER_USER)
        )  # fmt: skip
        return user

    def _send_log(self, records: list[Command], user: list[Command]) -> list[Any]:
        """One attempt of the log write; the replies of the user's scripts."""
        try:
            return self._send_in_order(records, user)
        except redis.exceptions.NoScriptError:
            # Redis restarted or was flushed since the scripts were loaded: everything
            # sent is idempotent, so load them and send it all again.
            for script in (self._consume_contacts, self._log_decision):
                self.client.script_load(script.script)
            return self._send_in_order(records, user)

    def _send_in_order(self, records: list[Command], user: list[Command]) -> list[Any]:
        if not self._cluster:
            return self._decide_round_trip([*records, *user])[len(records) :]
        self._round_trip(records)
        return self._round_trip(user)

    def get_logged_decision(
        self, *, decision_id: str, render: bool = False
    ) -> LoggedDecision | None:
        """The logged decision, with its owner; ``render``: for a Decide (a replay), on the
        render budget."""
        d = keys.DecisionKeys.of(decision_id)
        commands: list[Command] = [("GET", d.record), ("GET", d.owner)]
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
        one in the stream's (``lua/send_reward.lua``). A duplicate outcome_id sends again
        too: a no-op, unless the first attempt failed between the two.

        An outcome and its reward touch two slots, the decision's ({d:<id>}) and the reward
        stream's ({model}): no script may span both on Redis Cluster, so it takes two, each
        atomic in its slot, and the second is idempotent: a client that retries after a
        failure between them (the same outcome_id) sends what the first attempt did not,
        never twice."""
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


def _read_log_replies(
    replies: list[Any], spend: ContactSpend | None
) -> tuple[list[str], list[str] | None]:
    """What the log write's user scripts answered: the decisions the full index dropped, and
    the offers the caps script counted (None without ``spend``). ``Aborted`` if the user was
    erased meanwhile, ``RequestTaken`` if another decision holds the request id."""
    logged = replies[-1]
    if ERASED in (logged, replies[0]):
        raise Aborted("the user was erased while this decision was made")
    if logged[0] == "!":
        raise RequestTaken(str(logged[1]))
    consumed = None if spend is None else codecs.consumed_offers(replies[0])
    return [str(old) for old in logged[1:]], consumed
