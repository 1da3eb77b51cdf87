"""The store's catalog operations: offers, segments, and the model snapshots every process
loads.

The catalog's writes that check offers against segments are each one script in the
{catalog} slot, so no check can be overtaken by a concurrent write (a PutOffer naming a
segment while a DeleteSegment removes it: one of them sees the other's result). Scripts
rather than WATCH/MULTI: a WATCH on the offers hash would make a DeleteSegment retry whenever
any offer changes, and each script is short. Every catalog write bumps the catalog's version
in the same atomic step.
"""

from __future__ import annotations

from typing import Any

from tactful import keys
from tactful.domain import Offer, Segment
from tactful.errors import FailedPrecondition, FieldViolation, InvalidArgument, Unavailable
from tactful.store import codecs
from tactful.store.base import RedisBase
from tactful.store.wire import undecoded

CATALOG_READ_ATTEMPTS = 5  # reads of the catalog before giving up on a stream of writes


class CatalogOperations(RedisBase):
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
        Redis must still serve the catalog (reads work; see ``wire.WRITE_REFUSED_ERRORS``)."""
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
        offers = [codecs.decode_offer(v) for v in codecs.as_dict(raw_offers).values()]
        segments = [codecs.decode_segment(v) for v in codecs.as_dict(raw_segments).values()]
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
        return None if raw is None else codecs.decode_offer(str(raw))

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
        return None if raw is None else codecs.decode_segment(str(raw))

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
