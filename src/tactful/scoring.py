"""The fixed scoring rule of the foundation (the learning bandit replaces only this module).

What customers said outranks what was inferred, by construction:

    score = priority + EXPLICIT_WEIGHT * liked + INFERRED_WEIGHT * squash(inferred)

``liked`` is 1 when the customer explicitly LIKEs one of the offer's topics, and
``squash(w) = w / (1 + w)`` maps an inferred strength of any size into [0, 1). Because
EXPLICIT_WEIGHT >= INFERRED_WEIGHT and squash < 1, an explicit LIKE always scores strictly
higher than an inferred signal of any strength at equal priority. Without consent the inferred
strengths are empty, so they change nothing: not the score, not the reasons.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tactful.model import Arm, Offer, Reason, ReasonCode

MODEL_VERSION = "fixed-rules-1"
EXPLICIT_WEIGHT = 1.0
INFERRED_WEIGHT = 0.5
assert EXPLICIT_WEIGHT >= INFERRED_WEIGHT  # the rule this module exists to keep


def squash(strength: float) -> float:
    return strength / (1.0 + strength) if strength > 0 else 0.0


@dataclass(frozen=True, slots=True)
class UserView:
    """What scoring may know about a user: explicit likes, and inferred strengths only
    with consent (empty otherwise)."""

    liked_topics: frozenset[str]
    inferred: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Scored:
    offer: Offer
    score: float
    reasons: tuple[Reason, ...]


def score_offer(offer: Offer, user: UserView, arm: Arm) -> Scored:
    if arm is Arm.CONTROL:
        return Scored(offer, offer.priority, (_CONTROL_REASON,))
    if arm is Arm.FALLBACK:
        return Scored(offer, offer.priority, (_FALLBACK_REASON,))
    reasons: list[Reason] = []
    score = offer.priority
    liked = sorted(t for t in offer.topics if t in user.liked_topics)
    if liked:
        score += EXPLICIT_WEIGHT
        reasons.append(Reason(ReasonCode.EXPLICIT_LIKE, f"you said you like {liked[0]}"))
    best_topic, best_strength = "", 0.0
    for topic in offer.topics:
        strength = user.inferred.get(topic, 0.0)
        if strength > best_strength:
            best_topic, best_strength = topic, strength
    if best_strength > 0:
        score += INFERRED_WEIGHT * squash(best_strength)
        reasons.append(
            Reason(ReasonCode.INFERRED_INTEREST, f"you recently showed interest in {best_topic}")
        )
    if not reasons:
        reasons.append(_PRIORITY_REASON)
    return Scored(offer, score, tuple(reasons))


def rank(scored: list[Scored]) -> list[Scored]:
    """Best first; ties broken by priority, then offer id, so answers are reproducible."""
    return sorted(scored, key=lambda s: (-s.score, -s.offer.priority, s.offer.offer_id))


_PRIORITY_REASON = Reason(ReasonCode.BUSINESS_PRIORITY, "a featured offer")
_CONTROL_REASON = Reason(ReasonCode.CONTROL_GROUP, "ranked by business priority (control group)")
_FALLBACK_REASON = Reason(
    ReasonCode.FALLBACK, "ranked by business priority (personal data unavailable right now)"
)
