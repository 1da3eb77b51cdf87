"""A profile written as one line of the format, every time included, so that export ->
import into an empty Redis gives the same profiles."""

from __future__ import annotations

import datetime
import json
from typing import Any

from tactful.domain import Profile
from tactful.profile_line.shapes import EPOCH


def _iso(seconds: float) -> str:
    when = EPOCH + datetime.timedelta(microseconds=round(seconds * 1e6))
    return when.isoformat().replace("+00:00", "Z")


def to_line(profile: Profile) -> str:
    """A profile as one line of the format (every time included; lists in a stable order),
    without the newline."""
    data: dict[str, Any] = {"user_id": profile.user_id}
    if profile.attributes:
        data["attributes"] = {
            a.name: {"value": a.value, "source": a.source.name, "updated_at": _iso(a.updated_at)}
            for a in sorted(profile.attributes, key=lambda a: a.name)
        }
    if profile.topic_preferences:
        data["topic_preferences"] = [
            {"topic": t.topic, "stance": t.stance.name, "updated_at": _iso(t.updated_at)}
            for t in sorted(profile.topic_preferences, key=lambda t: t.topic)
            if t.stance is not None
        ]
    if profile.channel_preferences:
        data["channel_preferences"] = [
            {"channel": c.channel, "opted_in": c.opted_in, "updated_at": _iso(c.updated_at)}
            for c in sorted(profile.channel_preferences, key=lambda c: c.channel)
        ]
    if profile.max_messages_per_day:
        data["max_messages_per_day"] = profile.max_messages_per_day
    if profile.quiet_hours is not None:
        q = profile.quiet_hours
        data["quiet_hours"] = {
            "start_hour": q.start_hour,
            "end_hour": q.end_hour,
            "time_zone": q.time_zone,
        }
    if profile.consent.updated_at:  # given or withdrawn at some time (never asked: left out)
        data["consent"] = {
            "inferred_personalization": profile.consent.inferred_personalization,
            "updated_at": _iso(profile.consent.updated_at),
        }
    if profile.signals:
        data["signals"] = [
            {"topic": s.topic, "weight": s.weight, "observed_at": _iso(s.observed_at)}
            for s in sorted(profile.signals, key=lambda s: s.topic)
        ]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
