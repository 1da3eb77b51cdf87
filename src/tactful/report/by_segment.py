"""Arms and uplift per segment (``segment_section``).

Each decision logs the user's non-sensitive segment memberships (``segments`` in the record;
sensitive memberships never leave the profile). Per segment: the decisions whose user was in
it, broken down by arm as in ``arms``, and the uplift of PERSONALIZED over CONTROL within
it, with the same interval (``arms``). A decision in several segments counts in each, so the
rows do not add up to the total; "no segment" holds the decisions that logged an empty list,
and decisions that logged no list at all (the catalog had no segments, or the decision was
held before they were evaluated) are only counted. The ``top`` largest segments (by
decisions) get a row each; the rest share one row, the decisions in at least one of them.
Small segments give wide intervals: read "not significant" as "not measured", not as "no
effect".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tactful.report.arms import ArmStats, Uplift, arm_stats, uplift
from tactful.report.log import Record

NO_SEGMENT = "(no segment)"
DEFAULT_TOP_SEGMENTS = 20


@dataclass(frozen=True)
class SegmentRow:
    """The decisions of one group of users: a segment, "no segment", or the segments past
    the top ones together (``segments`` says which)."""

    label: str
    segments: tuple[str, ...]
    arms: dict[str, ArmStats]
    uplift: Uplift

    @property
    def decisions(self) -> int:
        return sum(s.decisions for s in self.arms.values())


@dataclass(frozen=True)
class SegmentSection:
    rows: list[SegmentRow]  # the top segments, largest first, then the rest, then no segment
    segments_seen: int  # distinct segment ids in the log
    recorded: int  # decisions that logged their memberships (an empty list included)
    unrecorded: int  # decisions that logged none


def memberships(record: Record) -> list[str] | None:
    """The segments a decision logged its user in (None: it logged no list)."""
    segments = record.payload.get("segments")
    return None if segments is None else [str(s) for s in segments]


def _row(label: str, segments: tuple[str, ...], records: list[Record]) -> SegmentRow:
    arms = arm_stats(records)
    p, c = arms["PERSONALIZED"], arms["CONTROL"]
    return SegmentRow(label, segments, arms, uplift(p.successes, p.shown, c.successes, c.shown))


def segment_section(records: Iterable[Record], top: int = DEFAULT_TOP_SEGMENTS) -> SegmentSection:
    """Arms and uplift per segment (see the module doc): the ``top`` largest segments, the
    others together, and the decisions in no segment."""
    by_segment: dict[str, list[Record]] = {}
    nowhere: list[Record] = []
    recorded = unrecorded = 0
    for record in records:
        segments = memberships(record)
        if segments is None:
            unrecorded += 1
            continue
        recorded += 1
        if not segments:
            nowhere.append(record)
        for segment in dict.fromkeys(segments):
            by_segment.setdefault(segment, []).append(record)
    ranked = sorted(by_segment, key=lambda s: (-len(by_segment[s]), s))
    rows = [_row(s, (s,), by_segment[s]) for s in ranked[:top]]
    rest = ranked[top:]
    if rest:
        seen: set[int] = set()  # a decision in several of them counts once
        union: list[Record] = []
        for segment in rest:
            for record in by_segment[segment]:
                if id(record) not in seen:
                    seen.add(id(record))
                    union.append(record)
        rows.append(_row(f"{len(rest)} other segments", tuple(rest), union))
    if nowhere:
        rows.append(_row(NO_SEGMENT, (), nowhere))
    return SegmentSection(rows, len(by_segment), recorded, unrecorded)
