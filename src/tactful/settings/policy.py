"""What Decide does: the decision log, the control group, contact rules and segments."""

from __future__ import annotations

from dataclasses import dataclass

from tactful.settings.fields import setting


@dataclass(frozen=True)
class PolicySettings:
    signal_half_life_hours: float = setting(
        "TACTFUL_SIGNAL_HALF_LIFE_HOURS",
        168.0,
        "Inferred signals lose half their weight in this time.",
        min=0.001,
    )
    decision_ttl_seconds: int = setting(
        "TACTFUL_DECISION_TTL_SECONDS",
        7 * 24 * 3600,
        "How long a logged decision can still be joined with an outcome.",
        min=60,
    )
    request_id_ttl_seconds: int = setting(
        "TACTFUL_REQUEST_ID_TTL_SECONDS",
        24 * 3600,
        "How long a Decide request_id replays the same decision.",
        min=1,
    )
    control_share: float = setting(
        "TACTFUL_CONTROL_SHARE",
        0.05,
        "Share of users in the control group (business priority only).",
        min=0.0,
        max=1.0,
    )
    control_salt: str = setting(
        "TACTFUL_CONTROL_SALT",
        "tactful-control-1",
        "Salt of the control-group hash; a new salt starts a new experiment.",
    )
    render_time_channels: tuple[str, ...] = setting(
        "TACTFUL_RENDER_TIME_CHANNELS",
        ("web", "app"),
        "Channels answered at page-render time: they get a fallback answer when the store is "
        "down; other channels are held.",
    )


@dataclass(frozen=True)
class ContactSettings:
    daily_cap: int = setting(
        "TACTFUL_DAILY_CAP",
        0,
        "Messages per user per day over all channels together (0: no such cap).",
        min=0,
        max=10_000,
    )
    channel_caps: tuple[tuple[str, float], ...] = setting(
        "TACTFUL_CHANNEL_CAPS",
        (("email", 2.0), ("push", 3.0), ("sms", 1.0)),
        "Messages per user per day on a channel, as channel=n pairs; unlisted channels have no "
        "cap of their own.",
        per_channel=True,
        min=1,
        max=10_000,
    )
    min_gap_seconds: tuple[tuple[str, float], ...] = setting(
        "TACTFUL_MIN_GAP_SECONDS",
        (),
        "Least time between two messages on a channel, as channel=seconds pairs (e.g. "
        "push=3600); none by default, and render-time channels rarely want one.",
        per_channel=True,
        min=1,
        max=30 * 86400,
    )
    interruptive_channels: tuple[str, ...] = setting(
        "TACTFUL_INTERRUPTIVE_CHANNELS",
        ("email", "push", "sms"),
        "Channels that interrupt: held in quiet hours, and counted against the customer's own "
        "max_messages_per_day.",
    )
    dismiss_cooldown_hours: float = setting(
        "TACTFUL_DISMISS_COOLDOWN_HOURS",
        72.0,
        "A dismissed offer is not shown to that user again for this long (0: no cooldown).",
        min=0.0,
        max=24 * 365,
    )
    dismiss_cools_topics: bool = setting(
        "TACTFUL_DISMISS_COOLS_TOPICS",
        False,
        "A dismiss also cools down every offer sharing a topic with the dismissed one.",
    )


@dataclass(frozen=True)
class SegmentSettings:
    max_rule_length: int = setting(
        "TACTFUL_SEGMENT_MAX_RULE_LENGTH",
        2000,
        "Longest segment rule accepted, in characters (PutSegment refuses a longer one with "
        "INVALID_ARGUMENT).",
        min=1,
        max=100_000,
    )
    max_rule_depth: int = setting(
        "TACTFUL_SEGMENT_MAX_RULE_DEPTH",
        10,
        "Deepest segment rule accepted: a condition is level 1, each not/and/or (and each "
        "parenthesis while reading) one more.",
        min=1,
        max=100,
    )
    max_rule_nodes: int = setting(
        "TACTFUL_SEGMENT_MAX_RULE_NODES",
        100,
        "Most conditions plus not/and/or operators in one segment rule.",
        min=1,
        max=10_000,
    )
    max_segments: int = setting(
        "TACTFUL_MAX_SEGMENTS",
        100,
        "Most segments the catalog holds (a PutSegment of a new one past it is "
        "FAILED_PRECONDITION). Every Decide evaluates them all, in process.",
        min=0,
        max=10_000,
    )
    max_feature_segments: int = setting(
        "TACTFUL_SEGMENT_MAX_FEATURES",
        8,
        "Most segment memberships of one user that become bandit features in one Decide (the "
        "first by segment id); each adds 1 + topics indices per offer (0: segments only "
        "target, nothing is learned from them).",
        min=0,
        max=64,
    )
