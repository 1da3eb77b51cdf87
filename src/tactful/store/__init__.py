"""Storage: the interface the core depends on (``Store``) and the data it takes and gives.

Importing this package imports no Redis client: the Redis implementation and everything that
needs the client is imported from its own module:

- ``redis_store``: ``RedisStore``, the ``Store`` on Redis, put together from its kinds of
  operations (``decisions``, ``profiles``, ``catalog``) on ``base``;
- ``model_store``: ``ModelStore``, what the learner and the model CLI need;
- ``wire``: ``connect``, the budgets and ``round_trip``, how the store reaches Redis;
- ``codecs``: how profiles, decisions, offers and segments are laid out in Redis;
- ``scripts``: the Lua scripts of ``lua/``.
"""

from tactful.store.types import (
    ContactSpend,
    DecisionInputs,
    LoggedDecision,
    OutcomeStatus,
    ProfileWrite,
    RecordedOutcome,
    RequestTaken,
    Store,
)

__all__ = [
    "ContactSpend",
    "DecisionInputs",
    "LoggedDecision",
    "OutcomeStatus",
    "ProfileWrite",
    "RecordedOutcome",
    "RequestTaken",
    "Store",
]
