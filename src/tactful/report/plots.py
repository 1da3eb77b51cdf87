"""The report's plots, as PNG files, when matplotlib (optional) is installed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tactful.report.arms import Z95, wilson
from tactful.report.content import Report


def plot(report: Report, out: Path) -> list[str]:
    """PNG plots if matplotlib is installed (it is optional), else none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names: list[str] = []
    for name, draw in (
        ("arms.png", _arms),
        ("off_policy.png", _off_policy),
        ("segments.png", _segments),
    ):
        fig = draw(plt, report)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            names.append(name)
    return names


def _arms(plt: Any, report: Report) -> Any:
    """CTR per arm with its Wilson interval; None if no arm showed an offer."""
    arms = [a for a, s in report.arms.items() if s.shown]
    if not arms:
        return None
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
    return fig


def _off_policy(plt: Any, report: Report) -> Any:
    """The three estimates of each target policy; None without estimates."""
    if not report.ope:
        return None
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
    return fig


def _segments(plt: Any, report: Report) -> Any:
    """The uplift of each segment row both arms showed offers in; None if there is none."""
    measured = [row for row in report.segments.rows if row.uplift.n1 and row.uplift.n2]
    if not measured:
        return None
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
    return fig
