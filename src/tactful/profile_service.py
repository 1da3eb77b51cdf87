"""Profiles: what the customer says (preferences, attributes), what is observed with their
consent (signals), the profile as they see it, and erasure."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from tactful import validation
from tactful.domain import (
    Attribute,
    AttributesUpdate,
    ChannelPreference,
    ContactCounter,
    Cooldown,
    ObservedSignal,
    PreferencesUpdate,
    Profile,
    Signal,
    TopicPreference,
    decay,
)
from tactful.hard_rules import HardRules, RecentRules
from tactful.settings import Settings
from tactful.store import Store


class ProfileService:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        recent: RecentRules | None = None,
    ) -> None:
        self._store = store
        self._half_life = settings.policy.signal_half_life_hours * 3600.0
        self._clock = clock
        # The Decider's memory of hard rules, kept current here (see RecentRules).
        self._recent = recent or RecentRules()

    def set_preferences(self, update: PreferencesUpdate) -> Profile:
        validation.require(validation.check_preferences(update))
        now = self._clock()
        profile = self._store.set_preferences(update=update, now=now)
        self._recent.remember(update.user_id, HardRules.of(profile, now))
        return self._present(profile, now)

    def set_attributes(self, update: AttributesUpdate) -> Profile:
        """Merge stated or imported facts about the user; the store stamps them with now and
        keeps a STATED value from being replaced by an IMPORTED one."""
        validation.require(validation.check_attributes(update))
        now = self._clock()
        profile = self._store.set_attributes(
            update=update, now=now, limit=validation.MAX_ATTRIBUTES_PER_USER
        )
        return self._present(profile, now)

    def record_signals(self, user_id: str, observed: Sequence[ObservedSignal]) -> bool:
        """Keep inferred signals, but only for a user who consented: True if kept."""
        now = self._clock()
        signals = [
            Signal(s.topic, s.weight, now if s.observed_at is None else s.observed_at)
            for s in observed
        ]
        validation.require(validation.check_signals(user_id, signals, now))
        return self._store.record_signals(user_id=user_id, signals=signals, now=now)

    def get_profile(self, user_id: str) -> Profile:
        validation.require(validation.check_user_id(user_id))
        return self._present(self._store.get_profile(user_id=user_id), self._clock())

    def delete_profile(self, user_id: str) -> None:
        validation.require(validation.check_user_id(user_id))
        self._store.delete_profile(user_id=user_id, now=self._clock())
        self._recent.forget(user_id)

    def _present(self, profile: Profile, now: float) -> Profile:
        """The profile as the customer should see it: signals decayed to now, every list in
        a stable order (the store returns them unordered)."""
        signals = (replace(s, weight=decay(s, now, self._half_life)) for s in profile.signals)
        return replace(
            profile,
            topic_preferences=tuple(sorted(profile.topic_preferences, key=_by_topic)),
            channel_preferences=tuple(sorted(profile.channel_preferences, key=_by_channel)),
            signals=tuple(sorted(signals, key=_by_topic)),
            contact_counters=tuple(sorted(profile.contact_counters, key=_by_channel_offer)),
            cooldowns=tuple(sorted((c for c in profile.cooldowns if c.until > now), key=_by_until)),
            attributes=tuple(sorted(profile.attributes, key=_by_name)),
        )


def _by_until(cooldown: Cooldown) -> tuple[float, str, str]:
    return (cooldown.until, cooldown.offer_id, cooldown.topic)


def _by_topic(item: TopicPreference | Signal) -> str:
    return item.topic


def _by_name(attribute: Attribute) -> str:
    return attribute.name


def _by_channel(item: ChannelPreference) -> str:
    return item.channel


def _by_channel_offer(counter: ContactCounter) -> tuple[str, str]:
    return counter.channel, counter.offer_id
