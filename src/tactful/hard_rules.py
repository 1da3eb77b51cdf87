"""The hard rules: what a user said that no score may override."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from tactful.domain import Offer, Profile, Stance


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
