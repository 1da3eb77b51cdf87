"""Change detection for the reward model's units (``regression``).

Tastes change. A precision that grew with every sighting makes the weights of a unit seen
thousands of times move by a thousandth of each new residual, so a unit whose rewards changed
keeps its old prediction for thousands of sightings more (on the drift scenario,
bench/README.md, the model never recovered). Fading all evidence alike
(``TACTFUL_LEARNING_MEMORY``) costs steady quality everywhere to buy a little speed where a
change happened. Instead each numeric block (an offer's or a topic's own feature crossed with
the numeric context) keeps a moving mean of its residuals and of their squares. A well fitted
unit's residuals average zero; when their recent mean strays more than ``drift_threshold``
standard errors from zero (the standard error from the unit's own residual noise, so a noisy
unit needs more evidence than a near-deterministic one: click rewards are noisy), the unit's
rewards changed. The block and the diagonal features of the vectors that saw it then keep the
weights they have but only the precision of ``RESET_SIGHTINGS`` sightings, so the next rewards
move them quickly; the sightings discarded also leave ``updates``, the evidence count that
narrows exploration, since what the unit's rewards are now has to be found again. (A CUSUM of
residuals in reward units was tried first: it found the drift scenario's change within a few
sightings but fired every 40 to 140 sightings on a unit of steady 0/1 rewards.)

What a unit's watch misses: a change that leaves the unit's mean residual near zero over the
contexts it is chosen in, as when offers swap the audiences they pay for (the drift
scenario: an offer loses its old audience, is no longer chosen there after a few sightings,
and its new audience is found only by exploring). When that happens to every unit at once,
the residuals of all of them stray together: ``ModelWatch`` sees it, and the whole model
starts again. A false alarm there forgets everything, so its bar is higher than a unit's
(``MODEL_THRESHOLD_FACTOR``).
"""

from __future__ import annotations

import math

import numpy as np

from tactful.features import FloatArray

# The weight of each new residual in a block's moving mean of
# residuals (about its last 1 / DRIFT_RATE sightings) and of their squares (slower: the noise
# a change is measured against must not follow the change), a floor on that noise in mean
# non-zero rewards (a perfectly fitted unit is not changed by rounding), and the sightings a
# changed unit's precision is cut back to (10 relearned the drift scenario slower than 3).
# On units of steady 0/1 rewards paying 2% to 50% of the time, a rate of 0.05 fired about once
# in 3,000 sightings at low rates, 0.02 once in 24,000; it finds a fall from 0.6 to 0.06 within
# 20 to 30 sightings, from 0.2 to 0.04 within about 100.
DRIFT_RATE = 0.02
NOISE_RATE = 0.01
SUSPECT = 3.0  # standard errors past which the noise stops being learned (``strays``)
NOISE_FLOOR = 0.05
RESET_SIGHTINGS = 3.0
# A new unit, or one relearning after a change, has residuals of one sign for a while: they
# are the learning, not a change, so a block is watched only once it has this many sightings
# (at 30, steady units of 5% rewards fired just after it, at 50 to 60 sightings).
WATCH_AFTER_SIGHTINGS = 100.0
# ... and at least this many per feature of the block: a unit fitted on few sightings per
# feature predicts the contexts it is chosen in too high (it is chosen where its errors
# flatter it), and that steady bias looked like a change (the synth scenario, 64 features).
WATCH_PER_FEATURE = 10.0


class ResidualWatch:
    """The moving means of one unit's residuals and of their squares: a learner's own, not
    saved or merged. ``noise`` is None until the first residuals are in."""

    __slots__ = ("drift", "noise")

    def __init__(self) -> None:
        self.drift = 0.0
        self.noise: float | None = None

    def restart(self) -> None:
        """Let the mean of the residuals start again (a unit not watched yet, or relearning)."""
        self.drift = 0.0

    def changed(self, residuals: FloatArray, threshold: float, floor: float) -> bool:
        """Add these residuals (in order) to the moving means; True, and the mean of the
        residuals starts again, when it is more than ``threshold`` of its standard errors
        from zero (``strays``)."""
        if not self.strays(residuals, threshold, floor):
            return False
        self.restart()
        return True

    def strays(
        self, residuals: FloatArray, threshold: float, floor: float, *, below_only: bool = False
    ) -> bool:
        """Add these residuals (in order) to the moving means; whether their mean is now
        more than ``threshold`` of its standard errors from zero (``below_only``: below
        it). The error is the noise before these residuals, at least ``floor``."""
        before = self.noise
        self.drift = moving_mean(self.drift, residuals, DRIFT_RATE)
        squares = residuals * residuals
        if before is None:
            self.noise = moving_mean(float(squares.mean()), squares, NOISE_RATE)
            return False
        error = math.sqrt(max(before, floor * floor) * DRIFT_RATE / (2.0 - DRIFT_RATE))
        if abs(self.drift) <= SUSPECT * error:
            # The noise is learned only while the unit looks steady: the large residuals of
            # a change must not raise the bar it is measured against while it builds up.
            self.noise = moving_mean(before, squares, NOISE_RATE)
        return (-self.drift if below_only else abs(self.drift)) > threshold * error


def moving_mean(start: float, values: FloatArray, rate: float) -> float:
    """``m = (1 - rate) m + rate v`` over ``values`` in order from ``start``, in closed form
    (no Python loop over a backlog's rewards)."""
    keep = (1.0 - rate) ** np.arange(len(values) - 1, -1, -1, dtype=np.float64)
    return float((1.0 - rate) ** len(values) * start + rate * (keep @ values))


# The whole model's watch (``ModelWatch``): the slow mean of the residuals a steady model
# still has (about its last 500 rewards), the rewards the model must have learned before it
# is watched, how many times a unit's threshold its test takes, and how many more rewards
# the test must still hold after it first does. On every scenario of the policy suite with
# no change (bench/README.md, about 80 runs), the statistic stayed within 3.7 standard
# errors but once, when a two-sided test without confirmation passed 8 and restarted a
# model; at the drift scenario's change it usually passes 8 within a dozen rewards, stays
# past it, and reaches 12 to 19. Not always: in 3 drift seeds of 30 (the learner and the
# policy in one process, bench/offline_policy.py) the units unlearned their old audiences
# fast enough that the fall peaked under 8 and the model never restarted (second half
# 0.03 to 0.18). At 1.5 times a unit's threshold (6) all 30 restart, once each, and
# 180 seed runs of the scenarios without a change (30 each) restart none.
MODEL_BASELINE_RATE = 0.002
MODEL_WATCH_AFTER = 500
MODEL_THRESHOLD_FACTOR = 1.5
MODEL_CONFIRM_REWARDS = 25


class ModelWatch:
    """Whether the whole model's rewards changed: when tastes change everywhere at once, each
    unit loses the audience it was chosen for and its weights unlearn it within a few
    sightings, too few for its own watch (``ResidualWatch``), while the residuals of all the
    units together fall far at once.

    A model still learning predicts the offers it picks too high (it picks them where its
    errors flatter it), so its residuals do not average zero even while nothing changes; the
    test is of the recent mean against their slow mean, not against zero, and only over the
    rewards whose units are each past their own watch threshold (the units still learning
    carry that bias most). It looks one way only: picks paying far less than the model
    expects is what a restart mends, while a model learning fast earns more than its slow
    mean did. A restart forgets everything, so a fall must still be there
    ``MODEL_CONFIRM_REWARDS`` rewards after it is first seen: a cluster of misses by chance
    fades within them, a change grows."""

    __slots__ = ("baseline", "suspected_for", "watch")

    def __init__(self) -> None:
        self.baseline = 0.0
        self.suspected_for: int | None = None  # rewards since the fall was first seen
        self.watch = ResidualWatch()

    def changed(self, residuals: FloatArray, learned: int, threshold: float, floor: float) -> bool:
        """Add the residuals of rewards whose units are all watched; True, and the watch
        starts again, when their recent mean has stayed below their slow mean by more than
        ``threshold`` standard errors for ``MODEL_CONFIRM_REWARDS`` rewards, once the
        model has ``learned`` at least ``MODEL_WATCH_AFTER`` rewards."""
        if not len(residuals):
            return False
        falls = self.watch.strays(residuals - self.baseline, threshold, floor, below_only=True)
        if learned < MODEL_WATCH_AFTER:
            self.watch.restart()
            falls = False
        if not falls:
            self.suspected_for = None
            self.baseline = moving_mean(self.baseline, residuals, MODEL_BASELINE_RATE)
            return False
        # Not into the baseline: what a change does must not become what is normal.
        if self.suspected_for is None:
            self.suspected_for = 0
            return False
        self.suspected_for += len(residuals)
        if self.suspected_for < MODEL_CONFIRM_REWARDS:
            return False
        self.restart()
        return True

    def restart(self) -> None:
        self.baseline = 0.0
        self.suspected_for = None
        self.watch.restart()
