"""The learner tactful had before issue 16, kept for comparison in the same run
(``bench/learner_throughput.py``): online ridge regression keeping the full ``A^-1``, one
Sherman-Morrison rank-one update per reward, O(d^2)."""

from __future__ import annotations

import numpy as np

from tactful.bandit import evidence_free, prior_theta, project
from tactful.features import FeatureSpace, FloatArray, SparseVector


class RidgeLearner:
    """Online ridge regression with rank-one updates of A^-1, and the diagonal of A."""

    def __init__(self, space: FeatureSpace, *, l2: float, kappa: float) -> None:
        self.space = space
        self.kappa = kappa
        self.l2 = l2
        self.a_inv = np.eye(space.dim) / l2
        self.b = prior_theta(space.dim) * l2  # so that A^-1 b starts at the prior
        self.precision = np.full(space.dim, float(l2))  # diag(A) = l2 + sum x_i^2
        self.updates = 0

    def update(self, x: SparseVector, reward: float) -> None:
        idx = np.asarray(x.indices, dtype=np.int64)
        vals = np.asarray(x.values, dtype=np.float64)
        # Duplicate hashed indices must add up, as they do in the dense x.
        idx, inverse = np.unique(idx, return_inverse=True)
        vals = np.bincount(inverse, weights=vals).astype(np.float64)
        u = self.a_inv[:, idx] @ vals  # A^-1 x
        denominator = 1.0 + float(vals @ u[idx])
        self.a_inv -= np.outer(u, u) / denominator
        self.b[idx] += reward * vals
        self.precision[idx] += vals * vals
        self.updates += 1

    def theta(self) -> FloatArray:
        raw: FloatArray = self.a_inv @ self.b
        return project(raw, self.kappa)

    def variance(self) -> FloatArray:
        """``1 / diag(A)``: each weight's variance in a diagonal posterior (up to the noise
        scale), without the explicit and inferred ones. O(d), what a snapshot carries instead
        of the d x d ``A^-1`` (see the module doc for why not ``diag(A^-1)``)."""
        return evidence_free(1.0 / self.precision)
