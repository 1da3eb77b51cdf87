"""Storage: a small interface the core depends on, and its Redis implementation."""

from tactful.store.redis_store import (
    STORE_DOWN_ERRORS,
    ContactSpend,
    DecisionInputs,
    LoggedDecision,
    ModelStore,
    OutcomeStatus,
    ProfileWrite,
    RecordedOutcome,
    RedisStore,
    RequestTaken,
    Store,
    _record_json,
    connect,
    round_trip,
)

__all__ = [
    "STORE_DOWN_ERRORS",
    "ContactSpend",
    "DecisionInputs",
    "LoggedDecision",
    "ModelStore",
    "OutcomeStatus",
    "ProfileWrite",
    "RecordedOutcome",
    "RedisStore",
    "RequestTaken",
    "Store",
    "_record_json",
    "connect",
    "round_trip",
]
