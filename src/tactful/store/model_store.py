"""What the learner and the model CLI need of Redis: the reward stream, the learner's
checkpoint and lease, and the versioned model snapshots (all in the {model} slot)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions
from redis.cluster import RedisCluster

from tactful import keys
from tactful.domain import Offer
from tactful.store import scripts
from tactful.store.codecs import decode_offer, unlearned_vectors
from tactful.store.wire import Client, LaterReply, undecoded

#: A stream entry as Redis sends it: its id, then its fields' names and values in turn.
RawEntry = tuple[bytes, list[bytes]]


class ModelStore:
    """What the learner and the model CLI need: the reward stream, the learner's checkpoint,
    and the versioned model snapshots (all in the {model} slot)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._close_windows = client.register_script(scripts.source("close_windows"))
        self._renew_lease = client.register_script(scripts.source("renew_lease"))
        self._publish_model = client.register_script(scripts.source("publish_model"))
        self._rollback_model = client.register_script(scripts.source("rollback_model"))
        self._push_delta = client.register_script(scripts.source("push_delta"))
        self._ahead: tuple[str, LaterReply] | None = None  # (consumer, read sent ahead)

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

    def claim_idle(self, consumer: str, *, min_idle_ms: int) -> list[tuple[str, dict[str, str]]]:
        """Take over every entry delivered to a learner and left unacknowledged for
        ``min_idle_ms``: a live learner hands its entries on within a second, so these are a
        dead learner's. Entries the stream no longer holds come back with no fields."""
        claimed: list[tuple[str, dict[str, str]]] = []
        start = "0-0"
        while True:
            reply: Any = self.client.xautoclaim(
                keys.OUTCOME_STREAM, keys.LEARNER_GROUP, consumer, min_idle_ms, start, count=500
            )
            start, entries = reply[0], reply[1]
            claimed += [(entry_id, fields or {}) for entry_id, fields in entries]
            if start == "0-0":
                return claimed

    def read_own_pending(self, consumer: str) -> list[tuple[str, dict[str, str]]]:
        """The entries delivered to ``consumer`` and not acknowledged yet (what a learner
        that reloads its state must learn again)."""
        entries: list[tuple[str, dict[str, str]]] = []
        after = "0-0"
        while True:
            reply: Any = self.client.xreadgroup(
                keys.LEARNER_GROUP, consumer, {keys.OUTCOME_STREAM: after}, count=1000
            )
            page = [(entry_id, fields or {}) for _, got in reply or [] for entry_id, fields in got]
            if not page:
                return entries
            entries += page
            after = page[-1][0]

    def catalog_version(self) -> int:
        return int(self.client.get(keys.CATALOG_VERSION) or 0)

    def catalog(self) -> tuple[int, list[Offer], list[str]]:
        """The catalog's version, offers and segment ids, for the learner to tell which
        offers are gone (read together; a write in between shows in the next version)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(keys.CATALOG_VERSION)
        pipe.hvals(keys.CATALOG_OFFERS)
        pipe.hkeys(keys.CATALOG_SEGMENTS)
        version, offers, segments = pipe.execute()
        return int(version or 0), [decode_offer(raw) for raw in offers], list(segments)

    def read_new(
        self, consumer: str, *, count: int, block_ms: int, read_ahead: bool = False
    ) -> list[RawEntry]:
        """New entries for ``consumer``, as Redis sends them (``RawEntry``): the learner reads
        tens of thousands a second, and redis-py's reply parsing (a dict per entry, every
        string decoded) cost it more than learning them.

        ``read_ahead``: after a full read (a backlog), send the next read before returning,
        so Redis prepares it (about 4 us an entry, as long as parsing them here) while the
        caller learns these; the next call takes its reply. Its entries are delivered to
        ``consumer`` once Redis runs it: a caller that stops or reloads first takes them
        with ``take_read_ahead``.

        On a Redis Cluster: redis-py's parsed reply, turned into the same shape, and no
        read ahead."""
        if isinstance(self.client, RedisCluster):
            parsed: Any = self.client.xreadgroup(
                keys.LEARNER_GROUP,
                consumer,
                {keys.OUTCOME_STREAM: ">"},
                count=count,
                block=block_ms or None,
            )
            return [
                (entry_id.encode(), [s.encode() for pair in fields.items() for s in pair])
                for _, entries in parsed or []
                for entry_id, fields in entries
            ]
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == consumer:
            entries = _stream_entries(ahead[1].read())
        else:
            if ahead is not None:
                ahead[1].read()  # another consumer's: its entries stay pending to it
            read = LaterReply(self.client, *_read_group(consumer, count, block_ms))
            entries = _stream_entries(read.read())
        if read_ahead and len(entries) >= count:
            self._ahead = (consumer, LaterReply(self.client, *_read_group(consumer, count, 0)))
        return entries

    def take_read_ahead(self) -> list[RawEntry]:
        """The entries of the read ``read_new`` sent ahead, if any (delivered: pending to
        its consumer until acknowledged)."""
        ahead, self._ahead = self._ahead, None
        return [] if ahead is None else _stream_entries(ahead[1].read())

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

    def load_checkpoint(self) -> tuple[bytes, int] | None:
        """The saved learner state and its epoch (how many times it was saved)."""
        raw: Any = undecoded(self.client, "HMGET", keys.LEARNER_STATE, "state", "epoch")
        if raw[0] is None:
            return None
        return bytes(raw[0]), int(raw[1] or 0)

    def checkpoint_epoch(self) -> int:
        return int(self.client.hget(keys.LEARNER_STATE, "epoch") or 0)

    def checkpoint(self, state: bytes, acked: Sequence[str], merged_deltas: int) -> None:
        """Save the learner's state, acknowledge the entries it applied itself and drop the
        deltas it merged, together: after a crash the stream's pending entries and the list
        of deltas hold exactly the rewards the saved state lacks."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(keys.LEARNER_STATE, "state", state)
        pipe.hincrby(keys.LEARNER_STATE, "epoch", 1)
        pipe.hdel(keys.LEARNER_STATE, "last_id")  # written by the earlier learner
        for first in range(0, len(acked), 10_000):
            pipe.xack(keys.OUTCOME_STREAM, keys.LEARNER_GROUP, *acked[first : first + 10_000])
        if merged_deltas:
            pipe.ltrim(keys.LEARNER_DELTAS, merged_deltas, -1)
        pipe.execute()
        self._trim_stream()

    def _trim_stream(self) -> None:
        """Drop the entries every learner is done with: those before the oldest still pending,
        or, with none pending, all the group has been given."""
        summary: Any = self.client.xpending(keys.OUTCOME_STREAM, keys.LEARNER_GROUP)
        oldest = summary.get("min") if summary.get("pending") else None
        if oldest is None:
            groups: Any = self.client.xinfo_groups(keys.OUTCOME_STREAM)
            given = [g["last-delivered-id"] for g in groups if g["name"] == keys.LEARNER_GROUP]
            if not given:
                return
            ms, _, seq = str(given[0]).partition("-")
            oldest = f"{ms}-{int(seq or 0) + 1}"
        self.client.xtrim(keys.OUTCOME_STREAM, minid=oldest, approximate=True)

    def push_delta(self, consumer: str, delta: bytes, covered: Sequence[str]) -> bool:
        """Hand a delta to the lease holder and acknowledge the entries it covers (all this
        consumer has pending), atomically; False if some were claimed away (then nothing is
        written). See ``lua/push_delta.lua``."""
        pushed = self._push_delta(
            keys=[keys.OUTCOME_STREAM, keys.LEARNER_DELTAS],
            args=[keys.LEARNER_GROUP, consumer, delta, *covered],
        )
        return bool(int(pushed))

    def read_deltas(self, start: int) -> list[bytes]:
        """The deltas on the list from position ``start`` on."""
        raw: Any = undecoded(self.client, "LRANGE", keys.LEARNER_DELTAS, start, -1)
        return [bytes(item) for item in raw]

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


def _read_group(consumer: str, count: int, block_ms: int) -> list[Any]:
    """The learner group's XREADGROUP of new entries for ``consumer``."""
    command: list[Any] = ["XREADGROUP", "GROUP", keys.LEARNER_GROUP, consumer, "COUNT", count]
    if block_ms:
        command += ["BLOCK", block_ms]
    return [*command, "STREAMS", keys.OUTCOME_STREAM, ">"]


def _stream_entries(reply: Any) -> list[RawEntry]:
    """The entries of a raw XREADGROUP reply on one stream (RESP2 lists, or a RESP3 map)."""
    if isinstance(reply, dict):
        reply = list(reply.items())
    return [(entry[0], entry[1] or []) for _, entries in reply or [] for entry in entries]
