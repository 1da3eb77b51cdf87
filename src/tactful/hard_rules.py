"""The hard rules: what a user said that no score may override, and the one eligibility
filter every answer's offers pass, personalised, control or fallback."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tactful.domain import DecideRequest, Offer, Profile, Stance
from tactful.segment_book import SegmentBook


@dataclass(frozen=True, slots=True)
class HardRules:
    """What a user said that no score may override: the filters every answer passes,
    personalised, control, replayed or fallback."""

    liked: frozenset[str]
    disliked: frozenset[str]
    opted_out: frozenset[str]
    cooling: frozenset[str]  # "o:<offer_id>" and "t:<topic>" still cooling down

    @classmethod
    def of(cls, profile: Profile, now: float) -> HardRules:
        return cls(
            liked=profile.topics_with(Stance.LIKE),
            disliked=profile.topics_with(Stance.DISLIKE),
            opted_out=profile.opted_out_channels(),
            cooling=frozenset(
                f"o:{c.offer_id}" if c.offer_id else f"t:{c.topic}"
                for c in profile.cooldowns
                if c.until > now
            ),
        )

    def allow(self, offer: Offer) -> bool:
        return (
            self.disliked.isdisjoint(offer.topics)
            and (not offer.sensitive or not self.liked.isdisjoint(offer.topics))
            and not (self.cooling and self._cooling(offer))
        )

    def _cooling(self, offer: Offer) -> bool:
        return f"o:{offer.offer_id}" in self.cooling or any(
            f"t:{t}" in self.cooling for t in offer.topics
        )


class RecentRules:
    """The hard rules of users this process decided for recently, kept in memory so an answer
    made while Redis is down still honours what they said (bounded LRU). Whoever learns of a
    change keeps it current: Decide when it reads a profile, SetPreferences when it writes
    one, and DeleteProfile, which forgets the user."""

    def __init__(self, size: int = 50_000) -> None:
        self._size = size
        self._rules: OrderedDict[str, HardRules] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, user_id: str, rules: HardRules) -> None:
        with self._lock:
            self._rules[user_id] = rules
            self._rules.move_to_end(user_id)
            if len(self._rules) > self._size:
                self._rules.popitem(last=False)

    def get(self, user_id: str) -> HardRules | None:
        with self._lock:
            return self._rules.get(user_id)

    def forget(self, user_id: str) -> None:
        with self._lock:
            self._rules.pop(user_id, None)


# What is known of a user nothing was read or remembered of: no stance, no opt-out, no
# cooldown, so it refuses only what needs an explicit like (sensitive offers).
NOTHING_KNOWN = HardRules(frozenset(), frozenset(), frozenset(), frozenset())


def eligible(
    offers: Iterable[Offer],
    channel: str,
    now: float,
    rules: HardRules,
    book: SegmentBook,
    members: frozenset[str] | None,
    *,
    sensitive: bool = True,
) -> list[Offer]:
    """The offers an answer may choose from, in the order given: active, on ``channel``,
    allowed by the user's hard rules and by targeting (``book``, for a user in ``members``).

    The answer made without the store differs on purpose, through the two last parameters:
    ``members`` None says the user's memberships are unknown (the profile cannot be read),
    so no targeted offer (``segments`` or ``excluded_segments``) is eligible, since a rule we
    cannot check must not widen an audience; ``sensitive=False`` leaves out every sensitive
    offer, whose explicit like such an answer cannot rely on."""
    return [
        offer
        for offer in offers
        if offer.is_active(now)
        and channel in offer.channels
        and (sensitive or not offer.sensitive)
        and rules.allow(offer)
        and (
            book.allows(offer, members)
            if members is not None
            else not (offer.segments or offer.excluded_segments)
        )
    ]


def candidates(req: DecideRequest, offers: Mapping[str, Offer]) -> list[Offer]:
    """The offers a request may be answered with, in catalog order or the order asked."""
    if not req.candidate_offer_ids:
        return list(offers.values())
    # Ids the catalog does not know (yet, or any more) are skipped, not an error: the page
    # that asked must still render.
    return [offers[i] for i in dict.fromkeys(req.candidate_offer_ids) if i in offers]
