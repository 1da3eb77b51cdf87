"""Ramp to break: users double every 10 s from 5 to 160 (60 s, then stop). The per-stage
table shows where Decide/s stops growing and p99 or failures (DEADLINE_EXCEEDED past the
50 ms deadline, RESOURCE_EXHAUSTED past TACTFUL_MAX_CONCURRENT_RPCS) take off.

    locust -f loadtests/locustfile.py,loadtests/shapes/ramp_to_break.py --headless \\
        --max-fail-ratio 1
"""

from __future__ import annotations

from stages import Stages


class RampToBreakShape(Stages):
    stages = tuple((10.0, users, 50.0) for users in (5, 10, 20, 40, 80, 160))
