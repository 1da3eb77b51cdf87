"""The slate draw, compiled against its pure-Python reference, in the same run.

A Decide draws its slate once: the exploration share's gamma, then per slot inverse gap
weighting over the offers left and one draw (``bandit.pick_slate``). This times the
compiled kernel (``tactful._slate``) and the reference (``bandit.pick_slate_reference``)
on the same scores, alternately, at 50 and 1,000 candidates, 3 slots, with the share cap
binding (0.1, the default) and off (1.0). Scores are click-rate-like (0 to 0.1), where the
share cap binds.

    .venv/bin/python bench/slate_kernel.py [--calls 5000]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np

from tactful.bandit import pick_slate, pick_slate_reference


def per_call(fn, predicted, share: float, calls: int) -> float:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    started = time.perf_counter()
    for _ in range(calls):
        fn(predicted, 3, 100.0, rng, share)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls per row and round")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    for n in (50, 1000):
        predicted = np.random.default_rng(0).random(n) * 0.1
        for share in (0.1, 1.0):
            times: dict[str, list[float]] = {"reference": [], "compiled": []}
            for _ in range(3):  # alternate, so drift on the machine hits both alike
                times["reference"].append(
                    per_call(pick_slate_reference, predicted, share, args.calls)
                )
                times["compiled"].append(per_call(pick_slate, predicted, share, args.calls))
            ref, comp = min(times["reference"]), min(times["compiled"])
            print(
                f"[bench] {n:5d} candidates, share {share}: reference {ref:7.1f} us, "
                f"compiled {comp:6.1f} us ({ref / comp:.1f}x)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
