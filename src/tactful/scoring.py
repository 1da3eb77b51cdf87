"""What a choice says about itself (reasons), and the non-learning rankings.

The personalised arm is scored by the learned model (``tactful.bandit``); the control arm
and the store-unavailable fallback rank by business priority alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tactful.domain import Offer, Reason, ReasonCode


@dataclass(frozen=True, slots=True)
class UserView:
    """What scoring may know about a user: explicit likes, and inferred strengths only
    with consent (empty otherwise)."""

    liked_topics: frozenset[str]
    inferred: Mapping[str, float]

    def liked(self, offer: Offer) -> list[str]:
        return sorted(t for t in offer.topics if t in self.liked_topics)

    def strongest_inferred(self, offer: Offer) -> tuple[str, float]:
        best_topic, best_strength = "", 0.0
        for topic in offer.topics:
            strength = self.inferred.get(topic, 0.0)
            if strength > best_strength:
                best_topic, best_strength = topic, strength
        return best_topic, best_strength


def personal_reasons(offer: Offer, user: UserView, *, explored: bool) -> tuple[Reason, ...]:
    """Say which evidence the choice rests on: what the customer said first, then what
    (with consent) they showed; business priority when there is neither."""
    reasons: list[Reason] = []
    liked = user.liked(offer)
    if liked:
        reasons.append(Reason(ReasonCode.EXPLICIT_LIKE, f"you said you like {liked[0]}"))
    topic, strength = user.strongest_inferred(offer)
    if strength > 0:
        reasons.append(
            Reason(ReasonCode.INFERRED_INTEREST, f"you recently showed interest in {topic}")
        )
    if not reasons:
        reasons.append(PRIORITY_REASON)
    if explored:
        reasons.append(EXPLORATION_REASON)
    return tuple(reasons)


def by_priority(offers: list[Offer]) -> list[Offer]:
    """Best first; ties broken by offer id, so answers are reproducible."""
    return sorted(offers, key=lambda o: (-o.priority, o.offer_id))


PRIORITY_REASON = Reason(ReasonCode.BUSINESS_PRIORITY, "a featured offer")
EXPLORATION_REASON = Reason(
    ReasonCode.EXPLORATION, "shown now and then so we learn what you like (chosen at random)"
)
CONTROL_REASON = Reason(ReasonCode.CONTROL_GROUP, "ranked by business priority (control group)")
FALLBACK_REASON = Reason(
    ReasonCode.FALLBACK, "ranked by business priority (personal data unavailable right now)"
)
