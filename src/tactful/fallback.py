"""The answer made without the store, when Redis is down or slow."""

from __future__ import annotations

from collections.abc import Collection

from tactful import metrics, scoring
from tactful.caches import CatalogCache
from tactful.domain import Arm, Choice, DecideRequest, Decision, HoldReason, Profile
from tactful.hard_rules import NOTHING_KNOWN, HardRules, RecentRules, candidates, eligible

FALLBACK_MODEL = "fallback-priority"


def without_store(
    req: DecideRequest,
    decision_id: str,
    now: float,
    profile: Profile | None,
    *,
    catalog: CatalogCache,
    recent: RecentRules,
    render_time_channels: Collection[str],
) -> Decision:
    """A page being rendered still gets an answer from the in-process catalog by business
    priority; a message that would be sent (email, push, sms) is held, since no cap can be
    checked. The hard rules are the ``profile``'s, when it was read before the store failed
    (the catalog or model load), else what this process last knew of the user."""
    if req.channel not in render_time_channels:
        metrics.FALLBACKS.labels("held").inc()
        return _fallback(decision_id, (), HoldReason.STORE_UNAVAILABLE)
    rules = recent.get(req.user_id)
    if profile is not None:
        rules = HardRules.of(profile, now)
        recent.remember(req.user_id, rules)
    if rules is None:
        rules = NOTHING_KNOWN
    if req.channel in rules.opted_out:
        return _fallback(decision_id, (), HoldReason.CHANNEL_OPTED_OUT)
    # Neither sensitive offers (they need an explicit LIKE we cannot check now) nor targeted
    # ones: memberships rest on the profile we cannot read now.
    snapshot = catalog.last_snapshot()
    offers = eligible(
        candidates(req, snapshot.offers),
        req.channel,
        now,
        rules,
        snapshot.segments,
        None,
        sensitive=False,
    )
    choices = tuple(
        Choice(o.offer_id, o.priority, 1.0, (scoring.FALLBACK_REASON,))
        for o in scoring.by_priority(offers)[: req.slots or 1]
    )
    metrics.FALLBACKS.labels("fallback" if choices else "held").inc()
    hold = HoldReason.NONE if choices else HoldReason.STORE_UNAVAILABLE
    return _fallback(decision_id, choices, hold)


def _fallback(decision_id: str, choices: tuple[Choice, ...], hold: HoldReason) -> Decision:
    return Decision(decision_id, choices, hold, FALLBACK_MODEL, Arm.FALLBACK)
