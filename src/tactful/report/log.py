"""Reading the decision log (``read_log``).

Decision records (``tactful:{d:<id>}:decision``, JSON, with a TTL) are found with SCAN and
read with their outcomes hash in pipelined batches; records whose ``ts`` is outside
``[since, until)`` are dropped. SCAN walks the whole keyspace (every key of every user, not
just decisions) and every decision is read to learn its time: O(keys) work and O(decisions)
bytes sent, for an offline report that is fine but it should run against a replica or
off-peak, never in a loop. Only decisions still within their TTL exist.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tactful import keys

SCAN_BATCH = 500
SUCCESS_EVENTS = frozenset({"CLICK", "CONVERSION"})


@dataclass(frozen=True)
class Record:
    """One logged decision and the outcomes reported against it."""

    payload: Mapping[str, Any]
    outcomes: tuple[Mapping[str, Any], ...]

    @property
    def ts(self) -> float:
        return float(self.payload.get("ts", 0.0))

    @property
    def arm(self) -> str:
        return str(self.payload.get("arm", ""))

    @property
    def choices(self) -> list[Mapping[str, Any]]:
        return list(self.payload.get("choices", []))

    def outcomes_of(self, offer_id: str) -> list[Mapping[str, Any]]:
        return [o for o in self.outcomes if o.get("offer_id") == offer_id]

    def reward(self, offer_id: str) -> float:
        """The best reward reported for this offer (0 without an outcome: the learner's
        default when a reward window closes)."""
        return max((float(o.get("reward", 0.0)) for o in self.outcomes_of(offer_id)), default=0.0)

    def succeeded(self, offer_id: str) -> bool:
        return any(o.get("event") in SUCCESS_EVENTS for o in self.outcomes_of(offer_id))


def read_log(client: Any, since: float, until: float) -> list[Record]:
    """Every decision logged in ``[since, until)`` with its outcomes (see the module doc for
    what the SCAN costs). ``client`` is a redis-py client that decodes responses."""
    records: list[Record] = []
    batch: list[str] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.get(key)
            pipe.hgetall(keys.DecisionKeys.of_record(key).outcomes)
        replies = pipe.execute()
        for raw, outcomes in zip(replies[::2], replies[1::2], strict=True):
            if raw is None:  # expired between SCAN and GET
                continue
            payload = json.loads(raw)
            ts = float(payload.get("ts", 0.0))
            if since <= ts < until:
                parsed = tuple(json.loads(v) for v in (outcomes or {}).values())
                records.append(Record(payload, parsed))
        batch.clear()

    for key in client.scan_iter(match=keys.decision_records(), count=1000):
        batch.append(key.decode() if isinstance(key, bytes) else key)
        if len(batch) >= SCAN_BATCH:
            flush()
    if batch:
        flush()
    records.sort(key=lambda r: (r.ts, str(r.payload.get("decision_id", ""))))
    return records
