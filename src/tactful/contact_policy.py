"""The contact policy: how often, when, and after what a user may be contacted.

Caps (all counted per user per *calendar day in the user's time zone*: the zone of their quiet
hours, UTC when they set none; a day, not a sliding 24 h, because that is what a customer
means by "at most two e-mails a day", and the preference centre can say when it resets):

- ``TACTFUL_DAILY_CAP``: messages over all channels together;
- ``TACTFUL_CHANNEL_CAPS``: messages on one channel;
- the customer's own ``max_messages_per_day``: messages on interruptive channels together;
- the offer's own ``max_per_user_per_day``: that offer, over all channels.

The lowest applicable cap wins. ``TACTFUL_MIN_GAP_SECONDS`` keeps a least time between two
messages on a channel. Quiet hours hold interruptive channels (``TACTFUL_INTERRUPTIVE_CHANNELS``)
in the customer's own time zone. A DISMISS puts the offer (and, if configured, its topics) on a
cooldown for that user.

Decide checks caps twice: first against the counters its one read returned (so it draws no
more slots than remain, and leaves out offers at their own cap), then atomically in Redis
(the caps script, ``store/lua/consume_contacts.lua``) when it consumes what it returns, so
concurrent Decides for the same user, in any number of processes, can never exceed a cap.
Only what is returned, and not in a dry run, is counted.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from tactful.domain import ContactCounter, Offer, Profile
from tactful.settings import ContactSettings

ALL_CHANNELS = "*"  # counter of every channel together
INTERRUPTIVE = "!"  # counter of the interruptive channels together
COUNTERS_TTL_SECONDS = 3 * 86400  # a day's counters, plus slack for any time zone


@lru_cache(maxsize=1024)
def _zone(name: str) -> dt.tzinfo:
    try:
        return zoneinfo.ZoneInfo(name) if name else dt.UTC
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return dt.UTC


@dataclass(frozen=True, slots=True)
class Window:
    """The user's current calendar day."""

    start: float
    end: float

    @property
    def key(self) -> str:
        return str(int(self.start))


@dataclass(frozen=True, slots=True)
class Limits:
    """The caps that apply to one user on one channel; 0 means no such cap."""

    daily: int
    channel: int
    user: int  # the customer's own, when the channel interrupts
    gap_seconds: float
    interruptive: bool


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the counters of the read allow: how many more messages, and from when on the
    channel is open again if it is closed."""

    remaining: int  # -1: unlimited
    open_again: float | None


#: A day that began more than this before today's is over, even if it was a long (25-hour) day
#: of another zone; yesterday in the same zone always began at least this long before today.
CARRY_SECONDS = 23 * 3600


def carried_over(start: float, window: Window, now: float) -> bool:
    """Whether counters of the day that began at ``start`` count today, as ``window``'s.

    They do when that day is another zone's and overlaps today: the customer moved to another
    time zone (today or yesterday), and what they were sent in the old zone's day may have
    been sent today in the new one (a move of zone must never reset a cap). Message times are
    not kept, so the whole old day counts: a cap can only be met early, never passed. The day
    before in the same zone is never carried: it began at least 23 hours (a spring-forward
    day) before this one, and ended when this one began. The caps script
    (``store/lua/consume_contacts.lua``) applies the same rule, on every field of the hash,
    when it consumes."""
    return start != window.start and window.start - CARRY_SECONDS < start <= now


#: Today's contacts, by (channel, offer_id): offer_id "" counts the channel as a whole, and
#: the channels ``ALL_CHANNELS`` and ``INTERRUPTIVE`` count several channels together.
Counts = Mapping[tuple[str, str], int]

#: A channel's last contact this long ago no longer matters to any minimum gap: the caps
#: script drops its mark.
STALE_CONTACT_SECONDS = 30 * 86400
ZONES_KEPT = 1024  # time zones whose current day ContactPolicy.window keeps


def todays_counts(counters: Iterable[ContactCounter], window: Window, now: float) -> Counts:
    """Today's counts in ``window``, with those of another zone's day that overlaps today
    added in (``carried_over``: the customer changed time zone; the caps script folds them in
    for good when it next consumes). Counters of past days are left out."""
    counts: dict[tuple[str, str], int] = {}
    for c in counters:
        if c.window_start == window.start or carried_over(c.window_start, window, now):
            key = (c.channel, c.offer_id)
            counts[key] = counts.get(key, 0) + c.count
    return counts


def stale_channels(profile: Profile, now: float) -> tuple[str, ...]:
    """The channels whose last contact is too old to matter (``STALE_CONTACT_SECONDS``)."""
    return tuple(ch for ch, when in profile.last_contacts if when < now - STALE_CONTACT_SECONDS)


class ContactPolicy:
    def __init__(self, settings: ContactSettings) -> None:
        self.daily_cap = settings.daily_cap
        self.channel_caps = {ch: int(n) for ch, n in settings.channel_caps}
        self.gaps = dict(settings.min_gap_seconds)
        self.interruptive = frozenset(settings.interruptive_channels)
        self.cooldown_seconds = settings.dismiss_cooldown_hours * 3600.0
        self.cools_topics = settings.dismiss_cools_topics
        # The last day worked out in each time zone: any time within it has that same day,
        # so most Decides skip the calendar arithmetic (a few µs). Zone names come from
        # profiles: past ZONES_KEPT of them, the kept days start over.
        self._days: dict[str, Window] = {}

    def window(self, now: float, profile: Profile) -> Window:
        name = profile.quiet_hours.time_zone if profile.quiet_hours else ""
        day = self._days.get(name)
        if day is not None and day.start <= now < day.end:
            return day
        zone = _zone(name)
        local = dt.datetime.fromtimestamp(now, zone)
        # fold=0: in a zone whose clocks go back over midnight (Azores, Havana), a time in
        # the repeated hour still has the day that began at the first midnight.
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
        tomorrow = (midnight + dt.timedelta(days=1)).replace(tzinfo=None)
        end = tomorrow.replace(tzinfo=zone).timestamp()  # DST-safe: local midnight again
        if len(self._days) >= ZONES_KEPT:
            self._days = {}
        day = self._days[name] = Window(midnight.timestamp(), end)
        return day

    def quiet_until(self, now: float, profile: Profile, channel: str) -> float | None:
        """When the user's quiet hours end, if they hold this channel now."""
        quiet = profile.quiet_hours
        if channel not in self.interruptive or quiet is None or quiet.start_hour == quiet.end_hour:
            return None
        local = dt.datetime.fromtimestamp(now, _zone(quiet.time_zone))
        hour = local.hour
        if quiet.start_hour < quiet.end_hour:
            inside = quiet.start_hour <= hour < quiet.end_hour
        else:  # wraps midnight, e.g. 22 -> 7
            inside = hour >= quiet.start_hour or hour < quiet.end_hour
        if not inside:
            return None
        end = local.replace(hour=quiet.end_hour, minute=0, second=0, microsecond=0)
        if end <= local:
            end += dt.timedelta(days=1)
        return end.timestamp()

    def limits(self, channel: str, profile: Profile) -> Limits:
        interruptive = channel in self.interruptive
        return Limits(
            daily=self.daily_cap,
            channel=self.channel_caps.get(channel, 0),
            user=profile.max_messages_per_day if interruptive else 0,
            gap_seconds=self.gaps.get(channel, 0.0),
            interruptive=interruptive,
        )

    def capacity(
        self,
        now: float,
        window: Window,
        limits: Limits,
        counts: Counts,
        last_contact: float,
        channel: str,
    ) -> Capacity:
        if limits.gap_seconds and now - last_contact < limits.gap_seconds:
            return Capacity(0, last_contact + limits.gap_seconds)
        remaining = -1
        for cap, counter in (
            (limits.daily, ALL_CHANNELS),
            (limits.channel, channel),
            (limits.user, INTERRUPTIVE),
        ):
            if cap:
                left = max(0, cap - counts.get((counter, ""), 0))
                remaining = left if remaining < 0 else min(remaining, left)
        return Capacity(remaining, window.end if remaining == 0 else None)

    def under_offer_cap(self, offer: Offer, counts: Counts) -> bool:
        cap = offer.max_per_user_per_day
        return not cap or counts.get((ALL_CHANNELS, offer.offer_id), 0) < cap

    def cooldown_fields(self, dismissed: Offer) -> list[str]:
        """What a DISMISS puts on cooldown: the offer (``o:<id>``) and, if configured, its
        topics (``t:<topic>``)."""
        fields = [f"o:{dismissed.offer_id}"]
        if self.cools_topics:
            fields += [f"t:{topic}" for topic in dismissed.topics]
        return fields
