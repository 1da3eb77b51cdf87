"""The report as Markdown and as one HTML page, with its plots (``write``)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

from tactful.report.arms import Uplift
from tactful.report.by_segment import DEFAULT_TOP_SEGMENTS, SegmentRow, SegmentSection
from tactful.report.content import ReasonStats, Report, build
from tactful.report.log import Record
from tactful.report.ope import Estimate
from tactful.report.plots import plot


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
    lines = _arm_lines(report)
    lines += _uplift_lines(report.uplift)
    lines += _segment_lines(report.segments, top_segments)
    lines += _ope_lines(report)
    lines += _reason_lines(report.reasons)
    for name in plots:
        lines += ["", f"![{name}]({name})"]
    lines.append("")
    return "\n".join(lines)


def _arm_lines(report: Report) -> list[str]:
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
    return lines


def _uplift_lines(u: Uplift) -> list[str]:
    lines = ["", "## Uplift of personalised over control", ""]
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
    return lines


def _ope_lines(report: Report) -> list[str]:
    lines = [
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
    return lines


def _reason_lines(r: ReasonStats) -> list[str]:
    shown = sum(v[0] for v in r.evidence.values())
    lines = [
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
    return lines


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
