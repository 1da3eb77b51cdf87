"""What the report says: arms, uplift, off-policy estimates, segments and, for the
personalised arm, the evidence behind each shown offer (``reason_stats``), computed from the
records at once (``build``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tactful.report.arms import ArmStats, Uplift, arm_stats, uplift
from tactful.report.by_segment import DEFAULT_TOP_SEGMENTS, SegmentSection, segment_section
from tactful.report.log import Record
from tactful.report.ope import PolicyEstimate, off_policy, single_slot


def evidence(choice: Mapping[str, Any]) -> str:
    codes = {code for code, _ in choice.get("reasons", [])}
    if "EXPLICIT_LIKE" in codes and "INFERRED_INTEREST" in codes:
        return "explicit + inferred"
    if "EXPLICIT_LIKE" in codes:
        return "explicit only"
    if "INFERRED_INTEREST" in codes:
        return "inferred only"
    if "BUSINESS_PRIORITY" in codes:
        return "priority (no evidence)"
    return "other"


@dataclass
class ReasonStats:
    evidence: dict[str, list[int]] = field(default_factory=dict)  # -> [shown, successes]
    explored: int = 0
    holds: Counter[tuple[str, str]] = field(default_factory=Counter)  # (arm, reason) -> n


def reason_stats(records: Iterable[Record]) -> ReasonStats:
    out = ReasonStats()
    for record in records:
        hold = str(record.payload.get("hold_reason", "NONE"))
        if hold != "NONE":
            out.holds[record.arm, hold] += 1
        if record.arm != "PERSONALIZED":
            continue
        for choice in record.choices:
            row = out.evidence.setdefault(evidence(choice), [0, 0])
            row[0] += 1
            row[1] += record.succeeded(str(choice["offer_id"]))
            out.explored += any(code == "EXPLORATION" for code, _ in choice.get("reasons", []))
    return out


@dataclass(frozen=True)
class Report:
    since: float
    until: float
    arms: dict[str, ArmStats]
    uplift: Uplift
    ope: list[PolicyEstimate]
    ope_used: int
    ope_skipped: int
    reasons: ReasonStats
    segments: SegmentSection


def build(
    records: Sequence[Record],
    since: float,
    until: float,
    top_segments: int = DEFAULT_TOP_SEGMENTS,
) -> Report:
    arms = arm_stats(records)
    p, c = arms["PERSONALIZED"], arms["CONTROL"]
    data, skipped = single_slot(records)
    return Report(
        since,
        until,
        arms,
        uplift(p.successes, p.shown, c.successes, c.shown),
        off_policy(data) if data else [],
        len(data),
        skipped,
        reason_stats(records),
        segment_section(records, top_segments),
    )
