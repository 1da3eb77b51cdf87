"""Off-policy estimates (``off_policy``).

Only personalised decisions that drew a single slot and kept it, and whose log has the
candidate set (``candidates`` in the record: every eligible offer's id, logged model score,
priority and explicit-like flag): for those the logged propensity is the exact probability
of the logged offer given the candidate set, so a deterministic target policy pi can be
replayed on the same candidates and

  IPS   = mean( 1[pi(x) = a] r / p )
  SNIPS = sum( 1[pi(x) = a] r / p ) / sum( 1[pi(x) = a] / p )
  DR    = mean( rhat(x, pi(x)) + 1[pi(x) = a] (r - rhat(x, a)) / p )

with r the logged offer's reward (its best outcome's reward; 0 without an outcome) and rhat a
ridge regression of r on (logged score, priority, explicit like, one-hot offer), cross-fitted
on two halves of the log. Decisions with more than one slot are left out: there a choice's
propensity is conditional on the picks before it and the log lists choices by score, not in
pick order, so the slot-1 propensity is not known. Control decisions are left out too: their
propensity is 1, deterministic, no support for any other choice. Targets:

  priority   highest business priority (ties: offer id), what the control arm does
  greedy     highest logged model score, the logging policy without exploration
  explicit   offers the user explicitly likes first, then by priority
  logging    the logged (stochastic) policy itself: every weight is 1, all three are the
             mean reward, the on-policy figure the others can be read against

Intervals are mean +- 1.96 standard errors (delta method for SNIPS).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tactful.report.arms import Z95
from tactful.report.log import Record


@dataclass(frozen=True)
class Logged:
    """One single-slot personalised decision, as OPE needs it."""

    candidates: tuple[str, ...]
    scores: tuple[float, ...]
    priorities: tuple[float, ...]
    liked: tuple[bool, ...]
    action: int  # index of the logged offer in candidates
    propensity: float
    reward: float
    record: Record | None = None


Policy = Callable[[Logged], int]  # the candidate index a deterministic policy picks


def by_priority(d: Logged) -> int:
    return min(range(len(d.candidates)), key=lambda i: (-d.priorities[i], d.candidates[i]))


def greedy(d: Logged) -> int:
    return int(np.argmax(d.scores))


def explicit_first(d: Logged) -> int:
    return min(
        range(len(d.candidates)),
        key=lambda i: (not d.liked[i], -d.priorities[i], d.candidates[i]),
    )


TARGETS: dict[str, Policy] = {
    "priority": by_priority,
    "greedy": greedy,
    "explicit": explicit_first,
}


def single_slot(records: Iterable[Record]) -> tuple[list[Logged], int]:
    """The decisions OPE can use, and how many personalised decisions were left out."""
    used: list[Logged] = []
    skipped = 0
    for record in records:
        if record.arm != "PERSONALIZED" or not record.choices:
            continue
        candidates = record.payload.get("candidates")
        choices = record.choices
        if not candidates or int(candidates.get("slots", 0)) != 1 or len(choices) != 1:
            skipped += 1
            continue
        ids = tuple(str(i) for i in candidates["ids"])
        chosen = str(choices[0]["offer_id"])
        if chosen not in ids:
            skipped += 1
            continue
        used.append(
            Logged(
                candidates=ids,
                scores=tuple(float(s) for s in candidates["scores"]),
                priorities=tuple(float(p) for p in candidates["priorities"]),
                liked=tuple(bool(v) for v in candidates["liked"]),
                action=ids.index(chosen),
                propensity=float(choices[0]["propensity"]),
                reward=record.reward(chosen),
                record=record,
            )
        )
    return used, skipped


class RewardModel:
    """rhat(x, a): ridge regression of the reward on (1, logged score, priority, explicit
    like, one-hot offer id), fitted on the logged (x, a, r)."""

    def __init__(self, data: Sequence[Logged], l2: float = 1.0) -> None:
        self._offers = {o: i for i, o in enumerate(sorted({o for d in data for o in d.candidates}))}
        if not data:
            self._w = np.zeros(4 + len(self._offers))
            return
        x = np.stack([self._x(d, d.action) for d in data])
        y = np.array([d.reward for d in data])
        penalty = l2 * np.eye(x.shape[1])
        penalty[0, 0] = 1e-6  # the intercept is not shrunk
        self._w = np.linalg.solve(x.T @ x + penalty, x.T @ y)

    def _x(self, d: Logged, i: int) -> np.ndarray[Any, np.dtype[np.float64]]:
        x = np.zeros(4 + len(self._offers))
        x[:4] = (1.0, d.scores[i], d.priorities[i], float(d.liked[i]))
        index = self._offers.get(d.candidates[i])
        if index is not None:
            x[4 + index] = 1.0
        return x

    def __call__(self, d: Logged, i: int) -> float:
        return float(np.clip(self._x(d, i) @ self._w, 0.0, None))


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float

    @property
    def low(self) -> float:
        return self.value - Z95 * self.se

    @property
    def high(self) -> float:
        return self.value + Z95 * self.se


@dataclass(frozen=True)
class PolicyEstimate:
    name: str
    n: int
    matches: int  # decisions where the target picks the logged offer
    ips: Estimate
    snips: Estimate
    dr: Estimate


def _mean(terms: Sequence[float]) -> Estimate:
    n = len(terms)
    if n == 0:
        return Estimate(math.nan, math.nan)
    a = np.asarray(terms)
    return Estimate(float(a.mean()), float(a.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan)


def cross_fitted(data: Sequence[Logged]) -> list[Callable[[Logged, int], float]]:
    """For each decision, a reward model fitted on the other half of the log."""
    halves = (data[0::2], data[1::2])
    models = (RewardModel(halves[1]), RewardModel(halves[0]))
    return [models[i % 2] for i in range(len(data))]


def estimate(
    name: str,
    policy: Policy,
    data: Sequence[Logged],
    rhat: Sequence[Callable[[Logged, int], float]] | None = None,
) -> PolicyEstimate:
    rhat = cross_fitted(data) if rhat is None else rhat
    weights = [
        (1.0 / d.propensity if policy(d) == d.action and d.propensity > 0 else 0.0) for d in data
    ]
    ips = [w * d.reward for w, d in zip(weights, data, strict=True)]
    dr = [
        model(d, policy(d)) + w * (d.reward - model(d, d.action))
        for w, d, model in zip(weights, data, rhat, strict=True)
    ]
    total = sum(weights)
    if total > 0:
        v = sum(ips) / total
        se = math.sqrt(sum((w * (d.reward - v)) ** 2 for w, d in zip(weights, data, strict=True)))
        snips = Estimate(v, se / total)
    else:
        snips = Estimate(math.nan, math.nan)
    matches = sum(w > 0 for w in weights)
    return PolicyEstimate(name, len(data), matches, _mean(ips), snips, _mean(dr))


def off_policy(data: Sequence[Logged]) -> list[PolicyEstimate]:
    rhat = cross_fitted(data)
    out = [estimate(name, policy, data, rhat) for name, policy in TARGETS.items()]
    # The logging policy is stochastic: on its own log every weight is 1, so all three
    # estimators are the mean reward (a check on the others, and on the data).
    served = _mean([d.reward for d in data])
    out.append(PolicyEstimate("logging", len(data), len(data), served, served, served))
    return out
