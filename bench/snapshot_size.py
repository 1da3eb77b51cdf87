"""Snapshot size and encode/decode time: the dense float64 format servers read before issue 16
(format 1) against the sparse float32 one (format 2), at the default space of issue 16
(``FeatureSpace(18)``), with 1,000, 50,000 and all features touched.

A touched feature has a learned weight and a variance of its own (``1 / (l2 + sum x^2)``);
the others keep the prior's weight (0 but for the three dense ones) and ``1 / l2``. Times
are the median of ``--repeat`` runs, in this process; decode includes every check a server
makes before it serves a snapshot (``LinearModel.from_bytes``).

    .venv/bin/python bench/snapshot_size.py [--bits 18] [--repeat 20]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from tactful.bandit import LinearModel, evidence_free, prior_theta
from tactful.features import FeatureSpace

L2 = 1.0


def model(space: FeatureSpace, touched: int, seed: int = 16) -> LinearModel:
    rng = np.random.default_rng(seed)
    theta, variance = prior_theta(space.dim), np.full(space.dim, 1.0 / L2)
    at = rng.choice(space.dim, size=touched, replace=False)
    theta[at] = rng.normal(scale=0.3, size=touched)
    variance[at] = 1.0 / (L2 + rng.gamma(2.0, 20.0, size=touched))
    return LinearModel("ridge-1", theta, space.layout, touched * 10, evidence_free(variance))


def dense_float64(m: LinearModel) -> bytes:
    """Format 1, as ``LinearModel.to_bytes`` wrote it before issue 16."""
    buffer = io.BytesIO()
    header = json.dumps(
        {"version": m.version, "layout": m.layout, "updates": m.updates, "variance": True}
    ).encode()
    buffer.write(len(header).to_bytes(4, "big") + header)
    np.save(buffer, m.theta, allow_pickle=False)
    np.save(buffer, m.variance, allow_pickle=False)
    return buffer.getvalue()


def median_ms(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=18)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    space = FeatureSpace(args.bits)
    print(f"# {platform.python_version()} numpy {np.__version__}, dim {space.dim:,}")
    print("| touched | format | size | encode | decode |")
    print("|---:|---|---:|---:|---:|")
    for touched in (1_000, 50_000, space.dim):
        m = model(space, min(touched, space.dim))
        encoders = (("dense float64", dense_float64), ("sparse float32", LinearModel.to_bytes))
        for name, encode in encoders:
            raw = encode(m)
            loaded = LinearModel.from_bytes(raw, space)
            assert np.allclose(loaded.theta, m.theta, rtol=1e-6, atol=1e-7)
            enc = median_ms(lambda encode=encode, m=m: encode(m), args.repeat)
            dec = median_ms(lambda raw=raw: LinearModel.from_bytes(raw, space), args.repeat)
            print(f"| {touched:,} | {name} | {_size(len(raw))} | {enc:.1f} ms | {dec:.1f} ms |")


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


if __name__ == "__main__":
    main()
