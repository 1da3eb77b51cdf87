"""What the learner and the model CLI need of Redis: the reward stream, the learner's
checkpoint and lease, and the versioned model snapshots (all in the {model} slot)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions

from tactful import keys
from tactful.store import scripts
from tactful.store.codecs import unlearned_vectors
from tactful.store.wire import Client, undecoded


class ModelStore:
    """What the learner and the model CLI need: the reward stream, the learner's checkpoint,
    and the versioned model snapshots (all in the {model} slot)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._close_windows = client.register_script(scripts.source("close_windows"))
        self._renew_lease = client.register_script(scripts.source("renew_lease"))
        self._publish_model = client.register_script(scripts.source("publish_model"))
        self._rollback_model = client.register_script(scripts.source("rollback_model"))

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
                    args += [decision_id, *unlearned_vectors(record)]
                sent += int(
                    self._close_windows(
                        keys=[keys.AWAITING, keys.LEARNED, keys.OUTCOME_STREAM], args=args
                    )
                )
            if len(due) < batch:
                break
        return sent

    def load_checkpoint(self) -> tuple[bytes, str] | None:
        raw: Any = undecoded(self.client, "HMGET", keys.LEARNER_STATE, "state", "last_id")
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
