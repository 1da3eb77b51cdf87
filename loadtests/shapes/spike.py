"""Spike: 10 users for 15 s, 150 users started at once for 10 s, back to 10 users for 15 s
(40 s, then stop). Shows what a sudden burst costs and how fast latency recovers after it.

    locust -f loadtests/locustfile.py,loadtests/shapes/spike.py --headless
"""

from __future__ import annotations

from stages import Stages


class SpikeShape(Stages):
    stages = ((15.0, 10, 10.0), (10.0, 150, 150.0), (15.0, 10, 150.0))
