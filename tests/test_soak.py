"""A short soak (issue 14): ``bench/soak.py``'s machinery for a few seconds per phase against a
real ``tactful serve`` with two workers and its embedded redis-server: three client threads
loop SetPreferences, Decide (100 ms deadline), ReportOutcome, first with Redis left alone,
then with ``CLIENT PAUSE 25 ALL`` every second.

Counts, not times: no write refused, no acknowledged write missing when read back, no outcome
NOT_FOUND for an answered personalised decision (when first reported, or when a refused report
is sent again after the load), in both phases. The fallback share is a rate
target of the bench (``bench/soak.py``), not asserted here. One run serves both tests: the
first checks that the run did the work it reports on, so the second cannot pass by doing
nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import soak

pytestmark = pytest.mark.slow

OPTIONS = soak.Options(
    seconds=4.0, threads=3, workers=2, users=100, sample=200, stall_every_s=1.0, stall_ms=25
)


@pytest.fixture(scope="module")
def run() -> tuple[list[soak.PhaseResult], str]:
    results = soak.soak(OPTIONS)
    return results, soak.text(results, OPTIONS)


def test_the_short_soak_does_what_it_reports_on(run: tuple[list[soak.PhaseResult], str]):
    results, report = run
    assert [r.name for r in results] == ["healthy", "stalls"]
    for result in results:
        assert all(result.tally.calls[m] > 0 for m in soak.METHODS), report
        assert result.decides_answered > 0, report
        assert result.readback.preferences_checked > 0, report
        assert result.readback.outcomes_checked > 0, report
    assert results[0].stalls_sent == 0
    assert results[1].stalls_sent >= 2, report


def test_no_write_refused_or_lost_under_load_and_stalls(run: tuple[list[soak.PhaseResult], str]):
    results, report = run
    counts = {f"{r.name}: {what}": n for r in results for what, n in r.must_be_zero().items()}
    assert counts == dict.fromkeys(counts, 0), report
