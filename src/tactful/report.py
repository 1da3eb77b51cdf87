"""The ROI report and the decision-log export: what the decision log and the outcomes in Redis
say about what personalisation earned, and what other policies would have earned.

Reading (``read_log``). Decision records (``tactful:{d:<id>}:decision``, JSON, with a TTL)
are found with SCAN and read with their outcomes hash in pipelined batches; records whose
``ts`` is outside ``[since, until)`` are dropped. SCAN walks the whole keyspace (every key
of every user, not just decisions) and every decision is read to learn its time: O(keys)
work and O(decisions) bytes sent, for an offline report that is fine but it should run
against a replica or off-peak, never in a loop. Only decisions still within their TTL exist.

Arms (``arm_stats``, ``uplift``). Per arm: decisions, holds, shown offers, offers clicked or
converted ("successes"), CTR = successes / shown offers, conversions, value. The uplift of
PERSONALIZED over CONTROL is the difference of the two CTRs with Newcombe's hybrid score
interval (method 10: from the two Wilson intervals), at 95%. It treats shown offers as
independent; users are the unit of the split, so with many shown offers per user the true
interval is somewhat wider.

Off-policy estimates (``off_policy``). Only personalised decisions that drew a single slot
and kept it, and whose log has the candidate set (``candidates`` in the record: every
eligible offer's id, logged model score, priority and explicit-like flag): for those the
logged propensity is the exact probability of the logged offer given the candidate set, so a
deterministic target policy pi can be replayed on the same candidates and

  IPS   = mean( 1[pi(x) = a] r / p )
  SNIPS = sum( 1[pi(x) = a] r / p ) / sum( 1[pi(x) = a] / p )
  DR    = mean( rhat(x, pi(x)) + 1[pi(x) = a] (r - rhat(x, a)) / p )

with r the logged offer's reward (its best outcome's reward; 0 without an outcome) and rhat a
ridge regression of r on (logged score, priority, explicit like, one-hot offer), cross-fitted
on two halves of the log. Decisions with more than one slot are left out: there a choice's
propensity is conditional on the picks before it and the log lists choices by score, not in
pick order, so the slot-1 propensity is not known. Control decisions are left out too: their
propensity is 1, deterministic, no support for any other choice. Targets:

  priority   highest business priority (ties: offer id), what the control arm does
  greedy     highest logged model score, the logging policy without exploration
  explicit   offers the user explicitly likes first, then by priority
  logging    the logged (stochastic) policy itself: every weight is 1, all three are the
             mean reward, the on-policy figure the others can be read against

Intervals are mean +- 1.96 standard errors (delta method for SNIPS).

Segments (``segment_section``). Each decision logs the user's non-sensitive segment
memberships (``segments`` in the record; sensitive memberships never leave the profile). Per
segment: the decisions whose user was in it, broken down by arm as above, and the uplift of
PERSONALIZED over CONTROL within it, with the same interval. A decision in several segments
counts in each, so the rows do not add up to the total; "no segment" holds the decisions that
logged an empty list, and decisions that logged no list at all (the catalog had no segments,
or the decision was held before they were evaluated) are only counted. The ``top`` largest
segments (by decisions) get a row each; the rest share one row, the decisions in at least one
of them. Small segments give wide intervals: read "not significant" as "not measured", not as
"no effect".

Export (``dsjson_lines``). The same single-slot decisions, one Vowpal Wabbit DSJson line each
for ``--cb_adf --dsjson``: the context in ``c``, one ``_multi`` entry per candidate,
``_label_cost`` = -reward, ``_label_probability`` = the propensity, ``a`` / ``p`` the 1-based
action ids (logged first) and their probabilities (only the logged one is known; the rest
are 0 placeholders, which VW's CB learning does not use).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tactful import keys

Z95 = 1.959963984540054
SCAN_BATCH = 500
SUCCESS_EVENTS = frozenset({"CLICK", "CONVERSION"})
ARMS = ("PERSONALIZED", "CONTROL", "FALLBACK")


# --- reading the log --------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One logged decision and the outcomes reported against it."""

    payload: Mapping[str, Any]
    outcomes: tuple[Mapping[str, Any], ...]

    @property
    def ts(self) -> float:
        return float(self.payload.get("ts", 0.0))

    @property
    def arm(self) -> str:
        return str(self.payload.get("arm", ""))

    @property
    def choices(self) -> list[Mapping[str, Any]]:
        return list(self.payload.get("choices", []))

    def outcomes_of(self, offer_id: str) -> list[Mapping[str, Any]]:
        return [o for o in self.outcomes if o.get("offer_id") == offer_id]

    def reward(self, offer_id: str) -> float:
        """The best reward reported for this offer (0 without an outcome: the learner's
        default when a reward window closes)."""
        return max((float(o.get("reward", 0.0)) for o in self.outcomes_of(offer_id)), default=0.0)

    def succeeded(self, offer_id: str) -> bool:
        return any(o.get("event") in SUCCESS_EVENTS for o in self.outcomes_of(offer_id))


def read_log(client: Any, since: float, until: float) -> list[Record]:
    """Every decision logged in ``[since, until)`` with its outcomes (see the module doc for
    what the SCAN costs). ``client`` is a redis-py client that decodes responses."""
    records: list[Record] = []
    pattern = f"{keys.PREFIX}:{{d:*}}:decision"
    batch: list[str] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.get(key)
            pipe.hgetall(key[: -len("decision")] + "outcomes")
        replies = pipe.execute()
        for raw, outcomes in zip(replies[::2], replies[1::2], strict=True):
            if raw is None:  # expired between SCAN and GET
                continue
            payload = json.loads(raw)
            ts = float(payload.get("ts", 0.0))
            if since <= ts < until:
                parsed = tuple(json.loads(v) for v in (outcomes or {}).values())
                records.append(Record(payload, parsed))
        batch.clear()

    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key.decode() if isinstance(key, bytes) else key)
        if len(batch) >= SCAN_BATCH:
            flush()
    if batch:
        flush()
    records.sort(key=lambda r: (r.ts, str(r.payload.get("decision_id", ""))))
    return records


# --- arms and uplift --------------------------------------------------------------------------


@dataclass
class ArmStats:
    decisions: int = 0
    holds: int = 0
    shown: int = 0
    successes: int = 0  # shown offers clicked or converted
    conversions: int = 0
    value: float = 0.0

    @property
    def ctr(self) -> float:
        return self.successes / self.shown if self.shown else 0.0


def arm_stats(records: Iterable[Record]) -> dict[str, ArmStats]:
    stats = {arm: ArmStats() for arm in ARMS}
    for record in records:
        s = stats.setdefault(record.arm, ArmStats())
        s.decisions += 1
        s.holds += record.payload.get("hold_reason", "NONE") != "NONE"
        for choice in record.choices:
            offer_id = str(choice["offer_id"])
            s.shown += 1
            s.successes += record.succeeded(offer_id)
            for outcome in record.outcomes_of(offer_id):
                s.conversions += outcome.get("event") == "CONVERSION"
                if outcome.get("event") in SUCCESS_EVENTS and outcome.get("value") is not None:
                    s.value += float(outcome["value"])
    return stats


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denominator = 1 + z * z / n
    return max(0.0, (centre - half) / denominator), min(1.0, (centre + half) / denominator)


@dataclass(frozen=True)
class Uplift:
    difference: float  # p1 - p2
    low: float
    high: float
    n1: int
    n2: int

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def uplift(s1: int, n1: int, s2: int, n2: int, z: float = Z95) -> Uplift:
    """p1 - p2 with Newcombe's hybrid score interval (1998, method 10)."""
    p1 = s1 / n1 if n1 else 0.0
    p2 = s2 / n2 if n2 else 0.0
    l1, u1 = wilson(s1, n1, z)
    l2, u2 = wilson(s2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return Uplift(d, low, high, n1, n2)


# --- segments ---------------------------------------------------------------------------------

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


# --- off-policy evaluation --------------------------------------------------------------------


@dataclass(frozen=True)
class Logged:
    """One single-slot personalised decision, as OPE needs it."""

    candidates: tuple[str, ...]
    scores: tuple[float, ...]
    priorities: tuple[float, ...]
    liked: tuple[bool, ...]
    action: int  # index of the logged offer in candidates
    propensity: float
    reward: float
    record: Record | None = None


Policy = Callable[[Logged], int]  # the candidate index a deterministic policy picks


def by_priority(d: Logged) -> int:
    return min(range(len(d.candidates)), key=lambda i: (-d.priorities[i], d.candidates[i]))


def greedy(d: Logged) -> int:
    return int(np.argmax(d.scores))


def explicit_first(d: Logged) -> int:
    return min(
        range(len(d.candidates)),
        key=lambda i: (not d.liked[i], -d.priorities[i], d.candidates[i]),
    )


TARGETS: dict[str, Policy] = {
    "priority": by_priority,
    "greedy": greedy,
    "explicit": explicit_first,
}


def single_slot(records: Iterable[Record]) -> tuple[list[Logged], int]:
    """The decisions OPE can use, and how many personalised decisions were left out."""
    used: list[Logged] = []
    skipped = 0
    for record in records:
        if record.arm != "PERSONALIZED" or not record.choices:
            continue
        candidates = record.payload.get("candidates")
        choices = record.choices
        if not candidates or int(candidates.get("slots", 0)) != 1 or len(choices) != 1:
            skipped += 1
            continue
        ids = tuple(str(i) for i in candidates["ids"])
        chosen = str(choices[0]["offer_id"])
        if chosen not in ids:
            skipped += 1
            continue
        used.append(
            Logged(
                candidates=ids,
                scores=tuple(float(s) for s in candidates["scores"]),
                priorities=tuple(float(p) for p in candidates["priorities"]),
                liked=tuple(bool(v) for v in candidates["liked"]),
                action=ids.index(chosen),
                propensity=float(choices[0]["propensity"]),
                reward=record.reward(chosen),
                record=record,
            )
        )
    return used, skipped


class RewardModel:
    """rhat(x, a): ridge regression of the reward on (1, logged score, priority, explicit
    like, one-hot offer id), fitted on the logged (x, a, r)."""

    def __init__(self, data: Sequence[Logged], l2: float = 1.0) -> None:
        self._offers = {o: i for i, o in enumerate(sorted({o for d in data for o in d.candidates}))}
        if not data:
            self._w = np.zeros(4 + len(self._offers))
            return
        x = np.stack([self._x(d, d.action) for d in data])
        y = np.array([d.reward for d in data])
        penalty = l2 * np.eye(x.shape[1])
        penalty[0, 0] = 1e-6  # the intercept is not shrunk
        self._w = np.linalg.solve(x.T @ x + penalty, x.T @ y)

    def _x(self, d: Logged, i: int) -> np.ndarray[Any, np.dtype[np.float64]]:
        x = np.zeros(4 + len(self._offers))
        x[:4] = (1.0, d.scores[i], d.priorities[i], float(d.liked[i]))
        index = self._offers.get(d.candidates[i])
        if index is not None:
            x[4 + index] = 1.0
        return x

    def __call__(self, d: Logged, i: int) -> float:
        return float(np.clip(self._x(d, i) @ self._w, 0.0, None))


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float

    @property
    def low(self) -> float:
        return self.value - Z95 * self.se

    @property
    def high(self) -> float:
        return self.value + Z95 * self.se


@dataclass(frozen=True)
class PolicyEstimate:
    name: str
    n: int
    matches: int  # decisions where the target picks the logged offer
    ips: Estimate
    snips: Estimate
    dr: Estimate


def _mean(terms: Sequence[float]) -> Estimate:
    n = len(terms)
    if n == 0:
        return Estimate(math.nan, math.nan)
    a = np.asarray(terms)
    return Estimate(float(a.mean()), float(a.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan)


def cross_fitted(data: Sequence[Logged]) -> list[Callable[[Logged, int], float]]:
    """For each decision, a reward model fitted on the other half of the log."""
    halves = (data[0::2], data[1::2])
    models = (RewardModel(halves[1]), RewardModel(halves[0]))
    return [models[i % 2] for i in range(len(data))]


def estimate(
    name: str,
    policy: Policy,
    data: Sequence[Logged],
    rhat: Sequence[Callable[[Logged, int], float]] | None = None,
) -> PolicyEstimate:
    rhat = cross_fitted(data) if rhat is None else rhat
    weights = [
        (1.0 / d.propensity if policy(d) == d.action and d.propensity > 0 else 0.0) for d in data
    ]
    ips = [w * d.reward for w, d in zip(weights, data, strict=True)]
    dr = [
        model(d, policy(d)) + w * (d.reward - model(d, d.action))
        for w, d, model in zip(weights, data, rhat, strict=True)
    ]
    total = sum(weights)
    if total > 0:
        v = sum(ips) / total
        se = math.sqrt(sum((w * (d.reward - v)) ** 2 for w, d in zip(weights, data, strict=True)))
        snips = Estimate(v, se / total)
    else:
        snips = Estimate(math.nan, math.nan)
    matches = sum(w > 0 for w in weights)
    return PolicyEstimate(name, len(data), matches, _mean(ips), snips, _mean(dr))


def off_policy(data: Sequence[Logged]) -> list[PolicyEstimate]:
    rhat = cross_fitted(data)
    out = [estimate(name, policy, data, rhat) for name, policy in TARGETS.items()]
    # The logging policy is stochastic: on its own log every weight is 1, so all three
    # estimators are the mean reward (a check on the others, and on the data).
    served = _mean([d.reward for d in data])
    out.append(PolicyEstimate("logging", len(data), len(data), served, served, served))
    return out


# --- reasons ----------------------------------------------------------------------------------


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


# --- the report -------------------------------------------------------------------------------


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


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2%}"


def _ci(e: Estimate) -> str:
    if math.isnan(e.se):
        return f"{_pct(e.value)}"
    return f"{_pct(e.value)} [{_pct(e.low)}, {_pct(e.high)}]"


def _points(u: Uplift) -> str:
    return f"{u.difference * 100:+.2f} [{u.low * 100:+.2f}, {u.high * 100:+.2f}]"


def _segment_lines(section: SegmentSection, top: int) -> list[str]:
    lines = ["", "## Segments", ""]
    if not section.recorded:
        lines.append(
            "No decision in this period recorded its user's segment memberships (the catalog "
            "had no segments)."
        )
        return lines
    lines += [
        f"{section.recorded} decisions recorded their user's memberships, in "
        f"{section.segments_seen} segments (sensitive segments are never logged). A decision "
        "in several segments counts in each, so the rows do not add up. Uplift: CTR of "
        "personalised minus control, in points, with the 95% Newcombe interval as above.",
        "",
        "| segment | decisions | personalised | control | CTR personalised | CTR control "
        "| uplift (points, 95% CI) | |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in section.rows:
        p, c, u = row.arms["PERSONALIZED"], row.arms["CONTROL"], row.uplift
        if not u.n1 or not u.n2:
            change, verdict = "n/a", "not measurable: an arm showed nothing"
        else:
            change = _points(u)
            verdict = "significant" if u.significant else "**not significant**"
        lines.append(
            f"| {_segment_label(row)} | {row.decisions} | {p.decisions} | {c.decisions} "
            f"| {_pct(p.ctr)} ({p.successes}/{p.shown}) | {_pct(c.ctr)} ({c.successes}/{c.shown}) "
            f"| {change} | {verdict} |"
        )
    lines.append("")
    notes = []
    if any(len(row.segments) > 1 for row in section.rows):
        largest = (
            "the largest segment has a row of its own"
            if top == 1
            else f"the {top} largest segments have a row of their own"
        )
        notes.append(
            f"Only {largest}; the others share one, where a decision in several of them "
            "counts once."
        )
    if section.unrecorded:
        notes.append(
            f"{section.unrecorded} decisions recorded no memberships (held before segments were "
            "evaluated, or made while the catalog had no segments) and are not in the table."
        )
    notes.append(
        "A small segment has a wide interval: **not significant** there means not measured, "
        "not no effect."
    )
    lines.append(" ".join(notes))
    return lines


def _segment_label(row: SegmentRow) -> str:
    """A segment id as a code span: shown as it is, in Markdown and in the HTML page (an id
    such as ``a._b_.`` would otherwise turn into emphasis)."""
    return f"`{row.label}`" if row.segments == (row.label,) else row.label


def markdown(
    report: Report, plots: Sequence[str] = (), top_segments: int = DEFAULT_TOP_SEGMENTS
) -> str:
    lines = [
        "# tactful ROI report",
        "",
        f"Decisions logged from {_iso(report.since)} to {_iso(report.until)} (UTC), "
        "as far as the decision log's TTL keeps them.",
        "",
        "## Arms",
        "",
        "| arm | decisions | holds | offers shown | clicked or converted | CTR | conversions "
        "| value |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, s in report.arms.items():
        lines.append(
            f"| {arm} | {s.decisions} | {s.holds} | {s.shown} | {s.successes} | {_pct(s.ctr)} "
            f"| {s.conversions} | {s.value:.2f} |"
        )
    lines += [
        "",
        "FALLBACK answers (made while Redis was unavailable) cannot be logged, so they are not "
        'counted here: see `tactful_decisions_total{arm="FALLBACK"}` in the metrics.',
    ]
    u = report.uplift
    lines += ["", "## Uplift of personalised over control", ""]
    if not u.n1 or not u.n2:
        lines.append("Not measurable: one of the arms showed no offer in this period.")
    else:
        verdict = (
            "significant at 95%"
            if u.significant
            else "**not significant** at 95%: the interval includes 0, so this period does "
            "not show that personalisation does better (or worse) than control"
        )
        lines.append(
            f"CTR difference (personalised - control): **{u.difference * 100:+.2f} points**, "
            f"95% CI [{u.low * 100:+.2f}, {u.high * 100:+.2f}] points "
            f"(Newcombe hybrid score interval; {u.n1} vs {u.n2} shown offers); {verdict}."
        )
        lines.append(
            "The interval treats shown offers as independent; the split is by user, so "
            "with many offers per user the true interval is somewhat wider."
        )
    lines += _segment_lines(report.segments, top_segments)
    lines += [
        "",
        "## Off-policy estimates (personalised arm, single-slot decisions)",
        "",
        f"{report.ope_used} personalised decisions drew one slot and logged their candidate "
        f"set; {report.ope_skipped} others (several slots, or logged before candidate sets "
        "were kept) are left out: with several slots a choice's propensity is conditional on "
        "the picks before it. Each target policy is replayed on the logged candidates; "
        "estimates are expected rewards per decision with 95% intervals. The reward model of "
        "DR is a ridge on (logged score, priority, explicit like, offer), cross-fitted.",
        "",
    ]
    if report.ope:
        lines += [
            "| policy | matches | IPS | SNIPS | DR |",
            "|---|---:|---:|---:|---:|",
        ]
        for e in report.ope:
            lines.append(
                f"| {e.name} | {e.matches}/{e.n} | {_ci(e.ips)} | {_ci(e.snips)} | {_ci(e.dr)} |"
            )
        lines += [
            "",
            "priority: highest business priority (the control arm's rule); greedy: highest "
            "logged model score (no exploration); explicit: offers the user explicitly likes "
            "first, then priority; logging: what was served (its mean reward, on-policy). "
            "Few matches mean a wide interval.",
        ]
    else:
        lines.append("No decision qualifies.")
    r = report.reasons
    shown = sum(v[0] for v in r.evidence.values())
    lines += [
        "",
        "## What drove personalised choices",
        "",
        "| evidence | offers shown | share | CTR |",
        "|---|---:|---:|---:|",
    ]
    for name, (n, hits) in sorted(r.evidence.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {name} | {n} | {_pct(n / shown)} | {_pct(hits / n if n else 0.0)} |")
    lines.append("")
    lines.append(f"Exploration picks: {r.explored} of {shown} personalised offers shown.")
    lines += ["", "## Holds", "", "| arm | reason | decisions |", "|---|---|---:|"]
    for (arm, hold), n in sorted(r.holds.items()):
        lines.append(f"| {arm} | {hold} | {n} |")
    if not r.holds:
        lines.append("| - | none | 0 |")
    for plot in plots:
        lines += ["", f"![{plot}]({plot})"]
    lines.append("")
    return "\n".join(lines)


def plot(report: Report, out: Path) -> list[str]:
    """PNG plots if matplotlib is installed (it is optional), else none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names: list[str] = []
    arms = [a for a, s in report.arms.items() if s.shown]
    if arms:
        fig, ax = plt.subplots(figsize=(5, 3))
        ctrs = [report.arms[a].ctr for a in arms]
        errors = [
            [
                c - wilson(report.arms[a].successes, report.arms[a].shown)[0]
                for a, c in zip(arms, ctrs, strict=True)
            ],
            [
                wilson(report.arms[a].successes, report.arms[a].shown)[1] - c
                for a, c in zip(arms, ctrs, strict=True)
            ],
        ]
        ax.bar(arms, ctrs, yerr=errors, capsize=4)
        ax.set_ylabel("CTR (95% Wilson)")
        fig.tight_layout()
        fig.savefig(out / "arms.png", dpi=100)
        plt.close(fig)
        names.append("arms.png")
    if report.ope:
        fig, ax = plt.subplots(figsize=(6, 3))
        for k, attr in enumerate(("ips", "snips", "dr")):
            xs = [i + (k - 1) * 0.25 for i in range(len(report.ope))]
            values = [getattr(e, attr) for e in report.ope]
            ax.errorbar(
                xs,
                [v.value for v in values],
                yerr=[Z95 * v.se if not math.isnan(v.se) else 0.0 for v in values],
                fmt="o",
                capsize=3,
                label=attr.upper(),
            )
        ax.set_xticks(range(len(report.ope)), [e.name for e in report.ope])
        ax.set_ylabel("expected reward per decision")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "off_policy.png", dpi=100)
        plt.close(fig)
        names.append("off_policy.png")
    measured = [row for row in report.segments.rows if row.uplift.n1 and row.uplift.n2]
    if measured:
        fig, ax = plt.subplots(figsize=(6, 1.2 + 0.35 * len(measured)))
        ys = list(range(len(measured)))[::-1]  # the largest at the top
        points = [100 * row.uplift.difference for row in measured]
        ax.errorbar(
            points,
            ys,
            xerr=[
                [p - 100 * row.uplift.low for p, row in zip(points, measured, strict=True)],
                [100 * row.uplift.high - p for p, row in zip(points, measured, strict=True)],
            ],
            fmt="o",
            capsize=3,
        )
        ax.axvline(0.0, color="grey", linewidth=0.8)
        ax.set_yticks(ys, [row.label for row in measured])
        ax.set_xlabel("uplift, CTR points (95% Newcombe)")
        fig.tight_layout()
        fig.savefig(out / "segments.png", dpi=100)
        plt.close(fig)
        names.append("segments.png")
    return names


def write(
    records: Sequence[Record],
    since: float,
    until: float,
    out: Path,
    top_segments: int = DEFAULT_TOP_SEGMENTS,
) -> Path:
    """``report.md``, the same as ``report.html``, and the PNG plots both show, in ``out``.
    Returns the Markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    report = build(records, since, until, top_segments)
    path = out / "report.md"
    text = markdown(report, plot(report, out), top_segments)
    path.write_text(text)
    (out / "report.html").write_text(html(text))
    return path


HTML_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
td { font-variant-numeric: tabular-nums; }
img { max-width: 100%; }
"""


def html(text: str) -> str:
    """The Markdown report as one HTML page (tables and all, rendered by Python-Markdown),
    for a browser or a mail; the plots are the same PNG files beside it."""
    import markdown as md

    body = md.markdown(text, extensions=["tables"], output_format="html")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>tactful ROI report</title>\n<style>{HTML_STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


# --- export -----------------------------------------------------------------------------------


def _token(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def dsjson_lines(records: Iterable[Record]) -> Iterator[str]:
    """One DSJson line per single-slot personalised decision (see the module doc)."""
    data, _ = single_slot(records)
    for d in data:
        assert d.record is not None
        payload = d.record.payload
        shared: dict[str, Any] = {
            "ctx": {
                "channel": _token(str(payload.get("channel", ""))),
                "placement": _token(str(payload.get("placement", ""))),
                **{
                    _token(str(k)): _token(str(v))
                    for k, v in dict(payload.get("categorical_context", {})).items()
                },
            },
        }
        numeric = {
            _token(str(k)): float(v) for k, v in dict(payload.get("numeric_context", {})).items()
        }
        if numeric:
            shared["num"] = numeric
        actions = [
            {
                "offer": {"id": _token(offer_id)},
                "ev": {"priority": d.priorities[i], "liked": float(d.liked[i])},
            }
            for i, offer_id in enumerate(d.candidates)
        ]
        order = [d.action, *(i for i in range(len(d.candidates)) if i != d.action)]
        line = {
            "_label_cost": -d.reward,
            "_label_probability": d.propensity,
            "_label_Action": d.action + 1,
            "_labelIndex": d.action,
            "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(d.record.ts)),
            "Version": "1",
            "EventId": str(payload.get("decision_id", "")),
            "a": [i + 1 for i in order],
            "c": {**shared, "_multi": actions},
            "p": [d.propensity, *([0.0] * (len(order) - 1))],
            "VWState": {"m": str(payload.get("model_version", ""))},
        }
        yield json.dumps(line, separators=(",", ":"))


def export(records: Sequence[Record], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for line in dsjson_lines(records):
            f.write(line + "\n")
            n += 1
    return n
