"""A load shape made of timed stages, with a per-stage report (not a shape itself: abstract).

Each stage is (seconds, users, spawn rate). The shape stops the run after the last stage, so
every named shape is bounded in time. At each stage boundary it takes a snapshot of the
Decide statistics, so the report shows throughput, failures and p99 *per stage*: where a
ramp broke, or how a spike was absorbed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from locust import LoadTestShape

DECIDE = ("Decisioning/Decide", "grpc")


@dataclass
class StageRow:
    stage: int
    users: int
    seconds: float
    requests: int
    failures: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _percentile(counts: dict[int, int], q: float) -> float:
    total = sum(counts.values())
    if not total:
        return 0.0
    seen = 0
    for ms in sorted(counts):
        seen += counts[ms]
        if seen >= q * total:
            return float(ms)
    return float(max(counts))


class Stages(LoadTestShape):
    abstract = True
    stages: tuple[tuple[float, int, float], ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[StageRow] = []
        self._stage = -1
        self._snapshot: tuple[float, int, int, dict[int, int]] | None = None

    def plan(self) -> tuple[tuple[float, int, float], ...]:
        return self.stages

    def tick(self) -> tuple[int, float] | None:
        run_time = self.get_run_time()
        end = 0.0
        for index, (seconds, users, spawn_rate) in enumerate(self.plan()):
            end += seconds
            if run_time < end:
                self._enter(index)
                return users, spawn_rate
        self._enter(len(self.plan()))
        return None

    def _decide_now(self) -> tuple[float, int, int, dict[int, int]]:
        entry: Any = None
        if self.runner is not None:
            entry = self.runner.stats.entries.get(DECIDE)
        if entry is None:
            return time.monotonic(), 0, 0, {}
        return time.monotonic(), entry.num_requests, entry.num_failures, dict(entry.response_times)

    def _enter(self, index: int) -> None:
        if index == self._stage:
            return
        now = self._decide_now()
        if self._snapshot is not None and 0 <= self._stage < len(self.plan()):
            t0, n0, f0, rt0 = self._snapshot
            t1, n1, f1, rt1 = now
            delta = {ms: c - rt0.get(ms, 0) for ms, c in rt1.items() if c - rt0.get(ms, 0) > 0}
            self.rows.append(
                StageRow(
                    stage=self._stage + 1,
                    users=self.plan()[self._stage][1],
                    seconds=t1 - t0,
                    requests=n1 - n0,
                    failures=f1 - f0,
                    p50_ms=_percentile(delta, 0.5),
                    p99_ms=_percentile(delta, 0.99),
                )
            )
        self._stage, self._snapshot = index, now

    def report(self) -> str:
        """Per-stage Decide figures (the stage's own requests, not cumulative)."""
        header = (
            f"{'stage':>5} {'users':>6} {'seconds':>8} {'Decides':>8} {'Decide/s':>9} "
            f"{'failed':>7} {'p50 ms':>7} {'p99 ms':>7}"
        )
        lines = [f"\n{type(self).__name__}: Decide per stage (client side)", header]
        lines.append("-" * len(header))
        for r in self.rows:
            failed = r.failures / r.requests if r.requests else 0.0
            lines.append(
                f"{r.stage:>5} {r.users:>6} {r.seconds:>8.1f} {r.requests:>8} {r.rps:>9.1f} "
                f"{failed:>7.1%} {r.p50_ms:>7.0f} {r.p99_ms:>7.0f}"
            )
        return "\n".join(lines)
