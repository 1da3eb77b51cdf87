"""The catalog's segments of one version, compiled once: memberships, targeting and the
segment reason of a choice, all evaluated in process."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tactful import segments as segment_rules
from tactful.domain import DecideRequest, Offer, Profile, Reason, ReasonCode, Segment

log = logging.getLogger(__name__)


# Stored rules were accepted under the limits of their day; a later, stricter setting must not
# make the catalog unloadable, so rules are read back under the parser's own hard limits.
_STORED_RULE_LIMITS = segment_rules.RuleLimits(
    max_length=1 << 20, max_depth=segment_rules.HARD_MAX_DEPTH, max_nodes=1 << 20
)


@dataclass(frozen=True, slots=True)
class CompiledSegment:
    segment: Segment
    # None: the stored rule no longer parses (a bug or a hand-edited store): fail closed,
    # see ``SegmentBook.allows``.
    predicate: segment_rules.Predicate | None
    # A bandit feature (see ``tactful.features``): not sensitive, and reads neither explicit
    # stances nor inferred signals, so neither kind of evidence enters the score through it.
    feature: bool


class SegmentBook:
    """The catalog's segments of one version, each compiled once (closures, no Redis): what
    a Decide evaluates in process, once per request."""

    def __init__(self, segments: Iterable[Segment]) -> None:
        compiled: dict[str, CompiledSegment] = {}
        for segment in segments:
            try:
                rule = segment_rules.parse(segment.rule, _STORED_RULE_LIMITS)
            except segment_rules.RuleError as exc:
                log.error("segment %r: stored rule refused: %s", segment.segment_id, exc)
                compiled[segment.segment_id] = CompiledSegment(segment, None, False)
                continue
            reads_evidence = segment_rules.uses_inferred(rule) or bool(
                (refs := segment_rules.referenced(rule)).liked_topics or refs.disliked_topics
            )
            feature = not segment.sensitive and not reads_evidence
            compiled[segment.segment_id] = CompiledSegment(
                segment, segment_rules.compile(rule), feature
            )
        self.by_id: dict[str, CompiledSegment] = dict(sorted(compiled.items()))
        self._evaluated = tuple(
            (segment_id, c.predicate)
            for segment_id, c in self.by_id.items()
            if c.predicate is not None
        )

    def __bool__(self) -> bool:
        return bool(self.by_id)

    def members_of(
        self,
        req: DecideRequest,
        profile: Profile,
        liked: frozenset[str],
        disliked: frozenset[str],
        inferred: Mapping[str, float],
    ) -> tuple[str, ...]:
        """The segments this user is in for this request, in id order: every segment of the
        catalog evaluated once, in process. ``inferred`` is empty without consent."""
        if not self.by_id:
            return ()
        given = segment_rules.SegmentInput(
            attributes={a.name: (a.value, a.source.name) for a in profile.attributes},
            liked=liked,
            disliked=disliked,
            inferred=segment_rules.squashed(inferred),
            numeric_context=dict(req.numeric_context),
            categorical_context=dict(req.categorical_context),
            channel=req.channel,
        )
        return tuple(segment_id for segment_id, predicate in self._evaluated if predicate(given))

    def allows(self, offer: Offer, members: frozenset[str]) -> bool:
        """Targeting: in one of the offer's segments (when it names any) and in none of its
        excluded ones. A segment that cannot be evaluated (unknown, or a stored rule that no
        longer parses) counts as not in for ``segments`` and as in for ``excluded_segments``:
        a targeting rule we cannot check never widens who sees an offer."""
        if offer.segments and members.isdisjoint(offer.segments):
            return False
        if offer.excluded_segments:
            if not members.isdisjoint(offer.excluded_segments):
                return False
            for segment_id in offer.excluded_segments:
                known = self.by_id.get(segment_id)
                if known is None or known.predicate is None:
                    return False
        return True

    def reason(self, offer: Offer, members: frozenset[str]) -> Reason | None:
        """Why a targeted offer was eligible: the first of its segments the user is in."""
        for segment_id in offer.segments:
            if segment_id in members:
                if self.by_id[segment_id].segment.sensitive:
                    return SENSITIVE_SEGMENT_REASON
                return Reason(ReasonCode.SEGMENT, f"offered to segment {segment_id}")
        return None

    def logged(self, members: Iterable[str]) -> list[str]:
        """The memberships a decision log records: sensitive ones never leave the profile."""
        return [m for m in members if not self.by_id[m].segment.sensitive]

    def features(self, members: Iterable[str], limit: int) -> tuple[str, ...]:
        return tuple(m for m in members if self.by_id[m].feature)[:limit]


SENSITIVE_SEGMENT_REASON = Reason(ReasonCode.SEGMENT, "offered because of something you told us")


def with_segment(
    book: SegmentBook, offer: Offer, members: frozenset[str], reasons: tuple[Reason, ...]
) -> tuple[Reason, ...]:
    """A targeted offer's reasons start with the segment that made it eligible."""
    if not offer.segments:
        return reasons
    segment = book.reason(offer, members)
    return reasons if segment is None else (segment, *reasons)
