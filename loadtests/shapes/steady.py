"""Steady: the users, spawn rate and run time of the command line (-u, -r, -t), held flat.

locust -f loadtests/locustfile.py,loadtests/shapes/steady.py --headless -u 20 -r 10 -t 20s
"""

from __future__ import annotations

from stages import Stages


class SteadyShape(Stages):
    use_common_options = True  # reads -u, -r and -t

    def plan(self) -> tuple[tuple[float, int, float], ...]:
        options = self.runner.environment.parsed_options if self.runner else None
        users = int(getattr(options, "num_users", None) or 20)
        spawn_rate = float(getattr(options, "spawn_rate", None) or 10)
        seconds = float(getattr(options, "run_time", None) or 20)
        return ((seconds, users, spawn_rate),)
