"""The ROI report and the decision-log export: what the decision log and the outcomes in Redis
say about what personalisation earned, and what other policies would have earned.

The report is read from the log (``log``), measured per arm (``arms``), per segment
(``by_segment``) and off-policy (``ope``), put together (``content``), and written as
Markdown, HTML and plots (``render``, ``plots``); the export writes the log for Vowpal
Wabbit (``dsjson``). Each module's doc says what it computes and why.
"""

from __future__ import annotations

from tactful.report.arms import ARMS, Z95, ArmStats, Uplift, arm_stats, uplift, wilson
from tactful.report.by_segment import (
    DEFAULT_TOP_SEGMENTS,
    NO_SEGMENT,
    SegmentRow,
    SegmentSection,
    memberships,
    segment_section,
)
from tactful.report.content import ReasonStats, Report, build, evidence, reason_stats
from tactful.report.dsjson import dsjson_lines, export
from tactful.report.log import SCAN_BATCH, SUCCESS_EVENTS, Record, read_log
from tactful.report.ope import (
    TARGETS,
    Estimate,
    Logged,
    Policy,
    PolicyEstimate,
    RewardModel,
    by_priority,
    cross_fitted,
    estimate,
    explicit_first,
    greedy,
    off_policy,
    single_slot,
)
from tactful.report.plots import plot
from tactful.report.render import HTML_STYLE, html, markdown, write

__all__ = [
    "ARMS",
    "DEFAULT_TOP_SEGMENTS",
    "HTML_STYLE",
    "NO_SEGMENT",
    "SCAN_BATCH",
    "SUCCESS_EVENTS",
    "TARGETS",
    "Z95",
    "ArmStats",
    "Estimate",
    "Logged",
    "Policy",
    "PolicyEstimate",
    "ReasonStats",
    "Record",
    "Report",
    "RewardModel",
    "SegmentRow",
    "SegmentSection",
    "Uplift",
    "arm_stats",
    "build",
    "by_priority",
    "cross_fitted",
    "dsjson_lines",
    "estimate",
    "evidence",
    "explicit_first",
    "export",
    "greedy",
    "html",
    "markdown",
    "memberships",
    "off_policy",
    "plot",
    "read_log",
    "reason_stats",
    "segment_section",
    "single_slot",
    "uplift",
    "wilson",
    "write",
]
