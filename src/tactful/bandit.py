"""The contextual bandit: a ridge reward model learned online, and an exploration policy
whose every pick carries its exact probability.

Model. Rewards are regressed on the features of ``tactful.features``, starting from the
foundation's fixed rule (explicit like 1.0, inferred 0.5, priority 1.0), so an untrained model
decides as the fixed rule did and learning moves away from it only as evidence comes in. The
learner (``tactful.regression``) applies each reward at O(non-zeros): ridge within each numeric
block, a diagonal approximation elsewhere; the request path only takes dot products with what
is published: the weights ``theta`` and their variances.

Guarantee. Before ``theta`` is published it is projected so that
``w_explicit >= max(kappa * w_inferred, epsilon)`` and ``w_inferred >= 0`` (kappa >= 1).
Inferred evidence is squashed into [0, 1), so for two offers equal in every other feature,
the explicitly liked one scores ``w_explicit - w_inferred * s > 0`` higher: no inferred signal
of any strength outranks an explicit like, whatever was learned.

Uncertainty. The learner keeps each feature's precision ``p_i`` (its ridge prior plus the sum
of its squared values learned) and publishes ``variance = 1 / p_i`` with every version: the
variance of each weight in a diagonal posterior, the approximation Chapelle & Li use for
Thompson sampling. It was measured against the full ``A^-1`` of the earlier learner and did as
well (bench/README.md, "Other measured figures"). The explicit-like and inferred-interest
variances are always 0 (the learner zeroes them, and so does every server loading a
snapshot): two offers equal but for that evidence get the same bonus, so the guarantee above
holds with a bonus too.

Policy. The policy's score of an offer with features x is its predicted reward plus an
optimism bonus, ``theta . x + c * sqrt(sum_i x_i^2 variance_i)`` with c =
TACTFUL_EXPLORATION_BONUS (``LinearModel.scores``; one gather and one reduce over the
candidates, as the dot product): an offer the model knows little about in this context
scores higher, so it is tried before the evidence against it is taken as final (LinUCB's
idea, with a diagonal covariance). A model without variances (the prior, a snapshot from
before they existed) adds none. Then inverse gap weighting (SquareCB) over those scores:
among K eligible offers with scores y, an offer a other than the best gets p(a) = 1 / (K +
gamma * (y_best - y_a)), and the best gets the rest; gamma = max(TACTFUL_EXPLORATION_GAMMA,
scale * sqrt(rewards learned)), so exploration narrows as evidence grows
(``LinearModel.gamma``). The propensities are computed from the very scores the bonus went
into, so they stay exact. With ``slots`` > 1, slots are filled one after another without
replacement, each from the IGW distribution over the offers still left; a choice's
``propensity`` is its probability *at its slot given the picks before it*, and the
probability of the whole slate (in pick order) is the product of its choices' propensities.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass

import numpy as np

from tactful import snapshot
from tactful.features import (
    EXPLICIT_LIKE,
    INFERRED_INTEREST,
    PRIORITY,
    FeatureBatch,
    FeatureSpace,
    FloatArray,
)

try:  # built on install (pyproject.toml); without a C compiler, the reference runs
    from tactful import _slate

    COMPILED = True
except ImportError:  # pragma: no cover - every CI machine has a compiler
    COMPILED = False

MAX_GAMMA = 1e15
PRIOR = {EXPLICIT_LIKE: 1.0, INFERRED_INTEREST: 0.5, PRIORITY: 1.0}
EPSILON = 1e-3


class SnapshotError(ValueError):
    """A model snapshot that cannot be used (corrupt, or built for another feature layout)."""


def prior_theta(dim: int) -> FloatArray:
    theta = np.zeros(dim)
    for index, weight in PRIOR.items():
        theta[index] = weight
    return theta


def project(theta: FloatArray, kappa: float) -> FloatArray:
    """The closest theta (in the explicit/inferred plane) that keeps explicit >= kappa *
    inferred >= 0 and explicit >= EPSILON; every other weight is left as learned."""
    out = theta.copy()
    explicit, inferred = float(out[EXPLICIT_LIKE]), max(0.0, float(out[INFERRED_INTEREST]))
    if explicit < kappa * inferred:
        t = (kappa * explicit + inferred) / (kappa * kappa + 1.0)
        explicit, inferred = kappa * t, t
        inferred = max(0.0, inferred)
    out[EXPLICIT_LIKE] = max(explicit, kappa * inferred, EPSILON)
    out[INFERRED_INTEREST] = inferred
    return out


def evidence_free(variance: FloatArray) -> FloatArray:
    """The variances with those of the explicit-like and inferred-interest weights set to 0,
    so the bonus never depends on them (see the guarantee in the module doc)."""
    out = variance.copy()
    out[[EXPLICIT_LIKE, INFERRED_INTEREST]] = 0.0
    return out


@dataclass(frozen=True)
class LinearModel:
    """What a server needs to decide: a published, projected theta, the variance of each
    weight (``diag(A^-1)`` without the explicit and inferred ones; None in the prior and in
    snapshots published before it existed: no bonus), and its version."""

    version: str
    theta: FloatArray
    layout: str
    updates: int = 0  # rewards learned: exploration narrows as evidence grows
    variance: FloatArray | None = None

    def gamma(self, floor: float, scale: float) -> float:
        """The IGW gamma for this model: ``max(floor, scale * sqrt(updates))``. SquareCB's
        gamma grows with the square root of the rounds seen; the floor keeps a new model
        from exploring almost uniformly (its prior is already a sensible rule)."""
        return max(floor, scale * math.sqrt(self.updates))

    def scores(
        self, batch: FeatureBatch, bonus: float, predicted: FloatArray | None = None
    ) -> FloatArray:
        """The policy's score of each vector of ``batch``: the predicted reward ``theta . x``
        (``predicted``, when the caller has it already) plus ``bonus`` times its spread
        ``sqrt(sum_i x_i^2 variance_i)`` (optimism in the face of uncertainty); the
        predicted reward alone without a bonus or a variance."""
        if predicted is None:
            predicted = batch.dot(self.theta)
        if bonus <= 0 or self.variance is None:
            return predicted
        out: FloatArray = predicted + bonus * batch.spread(self.variance)
        return out

    def to_bytes(self) -> bytes:
        """A snapshot in the compact format (``tactful.snapshot``)."""
        meta = {"version": self.version, "layout": self.layout, "updates": self.updates}
        return snapshot.encode(meta, self.theta, self.variance)

    @classmethod
    def from_bytes(cls, raw: bytes, space: FeatureSpace) -> LinearModel:
        """A model from a snapshot of either format, checked before anything is served."""
        try:
            header, theta, variance = snapshot.decode(raw, space.dim)
            version, updates = str(header["version"]), int(header.get("updates", 0))
        except (
            ValueError,
            OSError,
            EOFError,
            TypeError,
            KeyError,
            AttributeError,
            RecursionError,
        ) as exc:
            raise SnapshotError(f"corrupt model snapshot: {exc!r}") from exc
        if header.get("layout") != space.layout or theta.shape != (space.dim,):
            raise SnapshotError(
                f"snapshot for layout {header.get('layout')!r} {theta.shape}, "
                f"this server uses {space.layout!r} ({space.dim},)"
            )
        if theta.dtype != np.float64 or not np.all(np.isfinite(theta)):
            raise SnapshotError("model snapshot holds non-finite weights")
        if variance is not None:
            if variance.shape != (space.dim,) or variance.dtype != np.float64:
                raise SnapshotError(
                    f"model snapshot variance {variance.dtype} {variance.shape}, "
                    f"this server uses float64 ({space.dim},)"
                )
            if not np.all(np.isfinite(variance)) or np.any(variance < 0):
                raise SnapshotError("model snapshot holds negative or non-finite variances")
            # Whoever wrote it, the bonus never reads the explicit or inferred weights.
            variance = evidence_free(variance)
        return cls(version, theta, space.layout, updates, variance)


@dataclass(frozen=True, slots=True)
class Pick:
    index: int  # position in the candidate list
    propensity: float  # probability of this pick at its slot, given the picks before it
    explored: bool  # not the policy's best remaining offer


class SlateDraws:
    """The generators slates are drawn with, seeded by (process seed, user, request_id or
    decision_id), as VW's explore library seeds from the event id: the same request with the
    same inputs draws the same slate (reproducible tests and replays), different requests,
    and different users reusing a request id, draw independently; no lock is shared between
    threads.

    The 128-bit state comes from BLAKE2b keyed with the process seed, and is set on the
    serving thread's own PCG64: setting a state is far cheaper than seeding a fresh
    ``default_rng`` (its SeedSequence) per Decide."""

    def __init__(self, seed: int) -> None:
        self._key = seed.to_bytes(8, "big")
        self._thread = threading.local()  # one generator per serving thread

    def generator(self, user_id: str, event_id: str) -> np.random.Generator:
        key = f"{user_id}\x00{event_id}".encode("utf-8", "surrogatepass")
        digest = hashlib.blake2b(key, digest_size=16, key=self._key).digest()
        generator: np.random.Generator | None = getattr(self._thread, "generator", None)
        if generator is None:
            generator = self._thread.generator = np.random.Generator(np.random.PCG64(0))
        generator.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": int.from_bytes(digest, "big"), "inc": 1},
            "has_uint32": 0,
            "uinteger": 0,
        }
        return generator


def igw_probabilities(predicted: FloatArray, gamma: float) -> FloatArray:
    return _igw(predicted, int(predicted.argmax()), gamma)


# Array methods, not np.* functions: on arrays of ~50 the functions' dispatch costs more than
# the work, and the request path calls these a few times per slot.
def _igw(predicted: FloatArray, best: int, gamma: float) -> FloatArray:
    probs: FloatArray = 1.0 / (len(predicted) + gamma * (float(predicted[best]) - predicted))
    probs[best] = 0.0
    probs[best] = 1.0 - probs.sum()
    return probs


def draw(probs: FloatArray, rng: np.random.Generator) -> int:
    """An index drawn with probabilities ``probs``: what ``rng.choice(len(probs), p=probs)``
    draws (the same uniform number, the same inverse-CDF lookup, so the same index), without
    its argument checks, which cost more than the draw on the request path."""
    cdf = probs.cumsum()
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


def gamma_for_share(scores: FloatArray, best: int, gamma: float, share: float) -> float:
    """The least gamma >= ``gamma`` (within 1%) at which inverse gap weighting over
    ``scores`` explores (picks an offer scored below the best) with probability at most
    ``share``.

    With many offers, or gaps of a few hundredths (click rates), IGW at a fixed gamma spreads
    most of the probability over the other offers: the exploration probability
    ``f = sum 1 / (K + gamma * gap)`` is near ``(K - 1) / K``. ``1 / f`` is nearly linear in
    gamma (exactly so with one gap), so Newton's method on it climbs from ``gamma`` to the
    answer in two or three steps; should it not, ``sum(1 / gap) / share`` is a gamma at which
    ``f <= share`` for sure."""
    gaps = float(scores[best]) - scores
    gaps = gaps[gaps > 0]
    k = len(scores)
    for _ in range(4):
        terms = 1.0 / (k + gamma * gaps)
        explore = float(terms.sum())
        if explore <= share * 1.01:
            return gamma
        slope = float((gaps * terms * terms).sum())  # -f'(gamma)
        if slope <= 0.0:  # gaps too small for a float: take the bound
            break
        with np.errstate(over="ignore"):
            gamma = min(
                gamma + (1.0 / share - 1.0 / explore) * explore * explore / slope, MAX_GAMMA
            )
    if float((1.0 / (k + gamma * gaps)).sum()) <= share * 1.01:
        return gamma
    # Gaps at the edge of float precision are ties: gamma stays finite.
    with np.errstate(divide="ignore", over="ignore"):
        bound = float((1.0 / gaps).sum()) / share
    return min(max(gamma, bound), MAX_GAMMA)


def pick_slate_reference(
    predicted: FloatArray,
    slots: int,
    gamma: float,
    rng: np.random.Generator,
    share: float = 1.0,
) -> list[Pick]:
    """Fill ``slots`` one after another without replacement, each by inverse gap weighting
    over the offers still left. Gamma is raised, once for the slate, where needed so that
    the first slot explores with probability at most about ``share`` (``gamma_for_share``);
    the later slots, with fewer offers left, use the same gamma.

    The reference: Decide runs the compiled ``tactful._slate.pick_slate``, which gives the
    same picks and propensities bit for bit (tests/test_slate_kernel.py)."""
    remaining = np.arange(len(predicted))
    picks: list[Pick] = []
    if share < 1.0 and len(predicted) > 1:
        gamma = gamma_for_share(predicted, int(predicted.argmax()), gamma, share)
    for _ in range(min(slots, len(predicted))):
        scores = predicted[remaining]
        best = int(scores.argmax())
        probs = _igw(scores, best, gamma)
        # The last offer left is certain (probability 1): no number is drawn for it.
        at = draw(probs, rng) if len(remaining) > 1 else 0
        # A pick that ties with the best is not exploration: it is as good as the policy knows.
        picks.append(Pick(int(remaining[at]), float(probs[at]), scores[at] < scores[best]))
        remaining = np.concatenate((remaining[:at], remaining[at + 1 :]))
    return picks


def pick_slate(
    predicted: FloatArray,
    slots: int,
    gamma: float,
    rng: np.random.Generator,
    share: float = 1.0,
) -> list[Pick]:
    """``pick_slate_reference``, compiled (``_slate.pyx``): a Decide's slate at a few
    microseconds instead of a numpy call per step of every slot."""
    if not COMPILED:
        return pick_slate_reference(predicted, slots, gamma, rng, share)
    scores = np.ascontiguousarray(predicted, dtype=np.float64)
    return [
        Pick(index, propensity, explored)
        for index, propensity, explored in _slate.pick_slate(
            scores, slots, gamma, rng, share, MAX_GAMMA
        )
    ]
