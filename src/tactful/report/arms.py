"""Arms and uplift (``arm_stats``, ``uplift``).

Per arm: decisions, holds, shown offers, offers clicked or converted ("successes"), CTR =
successes / shown offers, conversions, value. The uplift of PERSONALIZED over CONTROL is the
difference of the two CTRs with Newcombe's hybrid score interval (method 10: from the two
Wilson intervals), at 95%. It treats shown offers as independent; users are the unit of the
split, so with many shown offers per user the true interval is somewhat wider.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from tactful.report.log import SUCCESS_EVENTS, Record

Z95 = 1.959963984540054
ARMS = ("PERSONALIZED", "CONTROL", "FALLBACK")


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
