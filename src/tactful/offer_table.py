"""The catalog of one version as arrays, built once when it loads: what eligibility reads of
every offer, so a Decide filters its candidates with a few vector operations rather than a
Python test per offer (a Decide may name up to 1,000 candidates).

``OfferTable.eligible`` gives exactly what ``hard_rules.eligible(candidates(...))`` gives for
the same request, offers and order included: that pair stays the reference (the answer made
without the store uses it) and tests/test_offer_table.py holds the two together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from itertools import repeat
from operator import itemgetter

import numpy as np
import numpy.typing as npt

from tactful.domain import Offer
from tactful.features import COMPILED, evidence_reference
from tactful.hard_rules import HardRules
from tactful.segment_book import SegmentBook

if COMPILED:
    from tactful import _features

Positions = npt.NDArray[np.intp]
Mask = npt.NDArray[np.bool_]

_NONE: Positions = np.zeros(0, dtype=np.intp)


class OfferTable:
    """Offers in catalog order, each at a position; per position the offer's time window,
    whether it is sensitive, targeted or capped; per channel a mask of the offers on it; per
    topic the positions of the offers about it."""

    def __init__(self, offers: Mapping[str, Offer]) -> None:
        self.offers: list[Offer] = list(offers.values())
        self.position: dict[str, int] = {o.offer_id: i for i, o in enumerate(self.offers)}
        n = len(self.offers)
        self.size = n
        self._start = np.array(
            [-math.inf if o.start_time is None else o.start_time for o in self.offers], float
        )
        self._end = np.array(
            [math.inf if o.end_time is None else o.end_time for o in self.offers], float
        )
        self._timed = bool(np.isfinite(self._start).any() or np.isfinite(self._end).any())
        self._sensitive = np.array([o.sensitive for o in self.offers], dtype=bool)
        self._any_sensitive = bool(self._sensitive.any())
        self._targeted = np.array(
            [bool(o.segments or o.excluded_segments) for o in self.offers], dtype=bool
        )
        self._any_targeted = bool(self._targeted.any())
        self.any_capped = any(o.max_per_user_per_day for o in self.offers)
        on_channel: dict[str, list[int]] = {}
        about_topic: dict[str, list[int]] = {}
        for i, offer in enumerate(self.offers):
            for channel in offer.channels:
                on_channel.setdefault(channel, []).append(i)
            for topic in offer.topics:
                about_topic.setdefault(topic, []).append(i)
        self._on_channel: dict[str, Mask] = {}
        for channel, at in on_channel.items():
            mask = np.zeros(n, dtype=bool)
            mask[at] = True
            self._on_channel[channel] = mask
        self._about_topic = {t: np.array(at, dtype=np.intp) for t, at in about_topic.items()}
        # Each offer's topics as numbers, for the user's evidence on it (``evidence``).
        self._topic_number = {topic: k for k, topic in enumerate(about_topic)}
        self._topic_start = np.zeros(n + 1, dtype=np.int64)
        self._topic_start[1:] = np.cumsum([len(o.topics) for o in self.offers])
        self._topic_ids = np.array(
            [self._topic_number[t] for o in self.offers for t in o.topics], dtype=np.int32
        )

    def candidates(self, candidate_ids: Sequence[str]) -> Positions:
        """``hard_rules.candidates`` as positions: every offer in catalog order when no ids
        are named, else the named ones the catalog knows, in the order named, each once."""
        if not candidate_ids:
            return np.arange(self.size, dtype=np.intp)
        found = np.fromiter(
            map(self.position.get, candidate_ids, repeat(-1)),
            dtype=np.intp,
            count=len(candidate_ids),
        )
        found = found[found >= 0]
        if len(found) > 1:
            named = np.zeros(self.size, dtype=bool)
            named[found] = True
            if np.count_nonzero(named) < len(found):
                # Named more than once: the first time counts (rare, so the slow way).
                found = np.array(list(dict.fromkeys(found.tolist())), dtype=np.intp)
        return found

    def eligible(
        self,
        candidate_ids: Sequence[str],
        channel: str,
        now: float,
        rules: HardRules,
        book: SegmentBook,
        members: frozenset[str],
    ) -> list[Offer]:
        """``hard_rules.eligible(candidates(req, offers), channel, now, rules, book, members)``:
        the candidates that are active, on ``channel``, allowed by the user's hard rules and
        by targeting, in candidate order."""
        at = self.eligible_at(candidate_ids, channel, now, rules, book, members)
        return self.offers_at(at)

    def eligible_at(
        self,
        candidate_ids: Sequence[str],
        channel: str,
        now: float,
        rules: HardRules,
        book: SegmentBook,
        members: frozenset[str],
    ) -> Positions:
        """``eligible``, as the positions of those offers."""
        at = self.candidates(candidate_ids)
        on_channel = self._on_channel.get(channel)
        if on_channel is None or not len(at):
            return _NONE
        keep = on_channel[at]
        if self._timed:
            keep &= (self._start[at] <= now) & (now < self._end[at])
        if rules.disliked:
            keep &= ~self._about(rules.disliked)[at]
        if self._any_sensitive:
            # A sensitive offer needs an explicit like of one of its topics.
            sensitive = self._sensitive[at]
            if np.count_nonzero(sensitive):
                keep &= ~sensitive | self._about(rules.liked)[at]
        if rules.cooling:
            keep &= ~self._cooling(rules.cooling)[at]
        at = at[keep]
        if self._any_targeted and len(at):
            targeted = self._targeted[at]
            if np.count_nonzero(targeted):
                offers = self.offers
                allowed = [
                    not t or book.allows(offers[i], members)
                    for i, t in zip(at.tolist(), targeted.tolist(), strict=True)
                ]
                at = at[np.array(allowed, dtype=bool)]
        return at

    def evidence(
        self, at: Positions, liked_topics: AbstractSet[str], inferred: Mapping[str, float]
    ) -> tuple[list[bool], list[float]]:
        """``features.evidence`` of the offers at ``at``: the user's explicit like and
        strongest inferred strength on each, squashed, from the offers' topic numbers."""
        if not COMPILED:  # pragma: no cover - every CI machine has a compiler
            return evidence_reference(self.offers_at(at), liked_topics, inferred)
        number = self._topic_number
        liked = np.zeros(len(number), dtype=np.uint8)
        strength = np.zeros(len(number), dtype=float)
        for topic in liked_topics:
            k = number.get(topic)
            if k is not None:
                liked[k] = 1
        for topic, value in inferred.items():
            k = number.get(topic)
            if k is not None:
                strength[k] = value
        return _features.evidence_at(at, self._topic_start, self._topic_ids, liked, strength)

    def _about(self, topics: Iterable[str]) -> Mask:
        """Whether each offer is about one of ``topics`` (by position, whole catalog)."""
        mask = np.zeros(self.size, dtype=bool)
        about = self._about_topic
        for topic in topics:
            at = about.get(topic)
            if at is not None:
                mask[at] = True
        return mask

    def _cooling(self, cooling: frozenset[str]) -> Mask:
        """Whether each offer is cooling down: itself ("o:<id>") or one of its topics
        ("t:<topic>"), as ``HardRules`` names them."""
        mask = self._about(entry[2:] for entry in cooling if entry.startswith("t:"))
        for entry in cooling:
            if entry.startswith("o:"):
                i = self.position.get(entry[2:])
                if i is not None:
                    mask[i] = True
        return mask

    def offers_at(self, at: Positions) -> list[Offer]:
        """The offers at positions ``at``, in that order."""
        if len(at) == 0:
            return []
        if len(at) == 1:
            return [self.offers[int(at[0])]]
        return list(itemgetter(*at.tolist())(self.offers))


EMPTY = OfferTable({})
