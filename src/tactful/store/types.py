"""The store's interface and the data it takes and gives: what the core depends on.

Nothing here imports redis (nor anything that does), so the domain can name a ``Store`` and
its data without the client coming along; the Redis implementation is ``redis_store``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tactful.domain import (
    AttributesUpdate,
    Offer,
    PreferencesUpdate,
    Profile,
    Segment,
    Signal,
)


@dataclass(frozen=True, slots=True)
class DecisionInputs:
    """Everything Decide reads from the store, fetched in one round trip."""

    profile: Profile
    catalog_version: int
    model_version: int  # 0: no model published yet (the prior)
    replay_decision_id: str | None  # set when this request_id was already decided
    replay_made_at: float | None = None  # when that decision was made (None: not known)


@dataclass(frozen=True, slots=True)
class ContactSpend:
    """What the caps script needs to consume a decision's contacts (see
    ``lua/consume_contacts.lua`` for the meaning of each; ``codecs.consume_args`` sends them)."""

    day: str
    now: float
    channel: str
    caps: tuple[int, int]  # daily, channel; the customer's own is read by the script
    interruptive: bool
    gap_seconds: float
    slots: int
    stale: Sequence[str]  # channels whose last contact is too old to keep
    ranked: Sequence[tuple[str, int]]  # (offer_id, offer's own cap), best first
    decision_id: str = ""  # what the spend is for: a resent write counts nothing twice
    request_id: str = ""  # claimed by the script: "" for none
    request_id_ttl_seconds: int = 0


class RequestTaken(Exception):
    """A concurrent Decide with the same request id was logged first: ``decision_id`` is the
    decision that request id now stands for (this one was not logged and counted nothing)."""

    def __init__(self, decision_id: str) -> None:
        super().__init__(f"request id taken by decision {decision_id}")
        self.decision_id = decision_id


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
