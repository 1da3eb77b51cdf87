"""The reward model's learner: online regression at O(non-zeros) per reward.

It replaces a ridge regression that kept the full ``A^-1`` (O(d^2) per reward and d^2 memory:
at 2^18 hashed dimensions neither fits). What it keeps instead:

* per feature i: the weight ``w_i`` (starting at the fixed rule's prior,
  ``bandit.prior_theta``), the sum of squares ``s_i`` of its values learned, and its scale
  ``m_i`` (the largest |x_i| seen). Its precision is ``p_i = l2 * min(m_i, 1)^2 + s_i``: for
  a feature whose values are small, the ridge prior in the feature's own unit, as Vowpal
  Wabbit's ``--normalized`` does, so a numeric context value of 0.001 learns as one of 1
  does; larger values are already compressed (``sign(v) * log1p(|v|)``, ``features``), and
  a prior grown with their scale slowed learning (wine 0.924 against 0.956, iris 0.882
  against 0.891 over 1,000 rounds offline; raw digits, whose pixels reach 2.8 after log1p,
  liked it: 0.895 against 0.869). When a scale grows, what the weight learned shrinks with
  it, as VW does (``_grow_scales``). ``1 / p_i`` is the weight's variance, what the
  exploration bonus reads (``bandit.LinearModel.scores``).
* per numeric block (``features.SparseVector.blocks``: a topic's own feature and its crosses
  with each numeric context value): the block's ``sum z z^T``. Numeric values are correlated
  and rarely centred; fitted one weight at a time they converge slowly (0.82 against ridge's
  0.99 on the wine data set, bench/README.md), so within a block the fit is ridge, exact.
  A block is as large as the request's numeric context, not as the feature space; past
  ``PRIOR_WIDTH`` values its prior grows with it, so a wide context does not overfit.

A reward r of vector x moves the weights along ``P x``, where P is ``1/p_i`` on features
outside blocks and the block's ``A^-1`` (ridge prior in the features' units plus its sum)
within one, by Sherman-Morrison's step:

  g = x^T P x                      (how new this vector is to the model)
  w += P x * (r - w.x) / (1 + g)

so the prediction for x moves ``g / (1 + g)`` of the way to r: nearly all the way for a
vector the model has never seen, by about 1/n once its features were seen n times, never
past r. Within a block this is ridge regression exactly; outside, a diagonal approximation of
it.

Twins. The diagonal approximation takes features as unrelated, and many are not: where a
site has one channel, an offer's bias and its bias on that channel are in exactly the same
vectors, and so are a topic and its crosses with the channel and the hour. Taken one by one,
k such twins each take a share of every residual as if it alone explained it, so their
prediction moves about k/n of the way where ridge moves it 1/n: each reward counts k times,
and the fit stays as noisy as one on n/k rewards. So each feature keeps a fingerprint of the
rewards it was seen in (``histories``: the sum of a random number drawn per reward), and
within a vector the features outside blocks with the same fingerprint (seen so far in
exactly the same rewards) are learned as one feature standing for them all: their precision
is the prior plus the squares of them all, and they share the pull their vector gives (ridge,
too, fits only the sum of features that always occur together). Once twins part
(a second channel comes), their fingerprints differ and each is learned on its own again.
On 30 seeds of each scenario of bench/offline_policy.py this lifted every one but ``synth``
(even): ``sim`` known users 0.170 to 0.180, newcomers 0.248 to 0.255, ``digits-pca`` 0.873 to
0.878, ``drift`` 0.800 to 0.813, ``iris`` 0.930 to 0.943; it costs the learner about 0.6 us a
reward (one sort of a batch's keys). The published variance stays each feature's own: read
by the bonus, the twins' joint precision explored less and cost ``digits-pca`` 0.017 and
``drift`` 0.05.

Rewards come in batches (what one read of the stream returns), applied as one step: every
vector's residual is taken against the weights before the batch; outside blocks each
feature's summed pull is divided by its precision *after* the batch (a feature that n vectors
share moves by about their mean residual, not n times it); within a block the step is
ridge's for the whole batch at once. One reward alone is the sequential step above. The cost
is a few vectorised passes over the batch's non-zeros, and per distinct block one m x m
inverse.

Squares and block sums add up, and scales take maxima, across learners; weights move by
deltas. So learners on separate shares of the stream merge their work (``Delta``).

Tastes change: each numeric block watches its residuals (``changes``), and a unit whose
rewards changed keeps its weights but only the precision of ``RESET_SIGHTINGS`` sightings,
so the next rewards move them quickly (``OnlineRegression._reset_changed``); when the whole
model's rewards changed at once, it starts again from the prior (``OnlineRegression._restart``).
"""

from __future__ import annotations

import json
import math

import numpy as np

from tactful.batches import Batch, BoolArray, IntArray
from tactful.changes import (
    MODEL_THRESHOLD_FACTOR,
    NOISE_FLOOR,
    RESET_SIGHTINGS,
    WATCH_AFTER_SIGHTINGS,
    WATCH_PER_FEATURE,
    ModelWatch,
    ResidualWatch,
)
from tactful.features import (
    EXPLICIT_LIKE,
    INFERRED_INTEREST,
    N_DENSE,
    FeatureSpace,
    FloatArray,
)
from tactful.learner_state import Delta, StateError, pack, pack_blocks, unpack, unpack_blocks

MIN_SCALE = 1e-6  # the least scale a feature's prior is measured in
SCALE_CAP = 1.0  # and the largest (see the module doc)
# A block wider than this many features has its prior made that many times stronger: a new
# vector's leverage (``z A^-1 z``) grows with the number of its values, so on a wide block
# the first rewards of a unit overfit its noise features (128 features: 0.134 against
# 0.188 with the scaled prior, digits' 64 raw pixels 0.887 against 0.899; bench/README.md).
# 16 is the width the defaults were chosen at (digits in 16 principal components), where
# nothing moves.
PRIOR_WIDTH = 16
# A batch with at least dim / DENSE_SHARE non-zeros outside blocks sums its pulls over the
# whole space (one pass) rather than over its distinct features (a sort).
DENSE_SHARE = 16
# Mixes a vector's row number into its features' fingerprints, so that twins are found within
# one vector at a time (``OnlineRegression._twins``).
ROW_MIX = np.uint64(0x9E3779B97F4A7C15)


class Block:
    """Exact ridge over one numeric block (a unit's own feature and its numeric crosses):
    the sums of z z^T learned (additive across learners), and the inverse of
    ``l2 * max(1, m / PRIOR_WIDTH) * diag(scale^2) + sums``, remade when they change."""

    __slots__ = ("base", "indices", "inverse", "scaled_by", "sums", "watch")

    def __init__(self, indices: IntArray) -> None:
        self.indices = indices
        m = len(indices)
        self.sums = np.zeros((m, m))
        self.base = np.zeros((m, m))  # the sums when the last delta was taken
        self.inverse: FloatArray | None = None
        self.scaled_by = np.zeros(m)  # the scales the inverse's prior was made with
        self.watch = ResidualWatch()  # this learner's own, not saved or merged

    def sightings(self, scales: FloatArray) -> float:
        """About how many vectors the block has learned: its unit's own feature is 1 in
        each; a numeric feature in its own unit at most that."""
        scale = np.clip(scales[self.indices], MIN_SCALE, SCALE_CAP)
        return float((np.diag(self.sums) / (scale * scale)).max(initial=0.0))

    def inverted(self, l2: float, scales: FloatArray) -> FloatArray:
        scale = scales[self.indices]
        if self.inverse is None or not np.array_equal(scale, self.scaled_by):
            l2 *= max(1.0, len(self.indices) / PRIOR_WIDTH)
            prior = np.where(scale > 0, l2 * np.clip(scale, MIN_SCALE, SCALE_CAP) ** 2, l2)
            self.inverse = np.linalg.inv(self.sums + np.diag(prior))
            self.scaled_by = scale
        return self.inverse

    def fade(self, factor: float) -> None:
        """Scale what the block has learned by ``factor`` (this learner's forgetting)."""
        self.sums *= factor
        self.inverse = None

    def add(self, gram: FloatArray, *, own: bool) -> None:
        """Add to the sums: this learner's own learning, or (``own`` False) another's delta,
        which is then no part of this learner's next delta."""
        self.sums += gram
        if not own:
            self.base += gram
        self.inverse = None


def _sums(groups: IntArray, weights: FloatArray, n: int) -> FloatArray:
    """``weights`` summed per group, as floats even when there are none (``bincount`` then
    answers integers)."""
    return np.bincount(groups, weights=weights, minlength=n).astype(np.float64, copy=False)


class OnlineRegression:
    """Weights, sums of squares and scales of every feature, and the numeric blocks (see the
    module doc)."""

    def __init__(
        self,
        space: FeatureSpace,
        *,
        l2: float,
        rate: float,
        prior: FloatArray,
        memory: float = math.inf,
        drift_threshold: float = 0.0,
    ) -> None:
        self.space = space
        self.l2 = l2
        self.rate = rate
        self.drift_threshold = drift_threshold  # 0: no change detection (module doc)
        # The mean non-zero reward so far, the unit residuals are measured in: this
        # learner's own, not saved or merged.
        self._reward_sum = 0.0
        self._rewarded = 0
        self.changes_detected = 0  # blocks whose precision was cut back, this process
        self.restarts = 0  # times the whole model started again, this process
        self.model_watch = ModelWatch()  # this learner's own, not saved or merged
        # Evidence fades: each time a feature (or a block) is seen, what it was seen with
        # before counts (1 - 1/memory) times less, so its precision stops growing near
        # ``memory`` sightings and it keeps learning when tastes change.
        self.keep = 1.0 - 1.0 / memory if math.isfinite(memory) else 1.0
        self.prior = prior
        self.weights = prior.astype(np.float64).copy()
        self.squares = np.zeros(space.dim)
        self.scales = np.zeros(space.dim)
        # Each feature's fingerprint of the rewards it was seen in (module doc: twins): sums
        # of a random 63-bit number per reward, wrapping, so they add across learners.
        self.histories = np.zeros(space.dim, dtype=np.uint64)
        self._reward_ids = np.random.default_rng()
        self._variance: FloatArray | None = None  # see ``variance``
        self._changed = np.zeros(space.dim, dtype=bool)
        self.blocks: dict[bytes, Block] = {}
        # The offers whose own features this state may hold, with their channels: what the
        # learner forgets once one is gone from the catalog (``Learner``).
        self.offers: dict[str, list[str]] = {}
        self.updates = 0
        self._mark()

    # --- learning -------------------------------------------------------------------------

    def learn(self, batch: Batch) -> None:
        """Apply a batch of rewards as one step (see the module doc)."""
        if not len(batch):
            return
        idx, vals, rows = batch.indices, batch.values, batch.rows
        n = len(batch)
        in_block = np.zeros(len(idx), dtype=bool)
        in_block[batch.block_positions] = True
        diagonal = ~in_block
        # The scales first: a feature's prior is measured in its unit from its first value on.
        self._grow_scales(idx, vals)
        predicted = _sums(rows, self.weights[idx] * vals, n)
        groups = self._block_groups(batch)
        residuals = batch.rewards - predicted
        if self.drift_threshold > 0 and self._reset_changed(batch, groups, residuals, diagonal):
            # The model started again: the batch is learned from what it predicts now.
            predicted = _sums(rows, self.weights[idx] * vals, n)
        prior = self._prior(idx)
        twins, twin_of, n_twins = self._twins(idx, rows, diagonal)
        before = prior + self.squares[idx]
        before[twins] = prior[twins] + _sums(twin_of, self.squares[idx[twins]], n_twins)[twin_of]
        newness = _sums(rows[diagonal], (vals * vals / before)[diagonal], n)
        leverages = []
        for block, members, z in groups:
            # How new each vector's block is: z A^-1 z, with A before this batch.
            leverage = np.einsum("km,km->k", z @ block.inverted(self.l2, self.scales), z)
            np.add.at(newness, members, leverage)
            leverages.append(leverage)
            if self.keep < 1.0:
                block.fade(self.keep ** len(z))
            block.add(z.T @ z, own=True)
        step = (batch.rewards - predicted) / (1.0 + newness) * self.rate
        if self.keep < 1.0:
            seen, times = np.unique(idx, return_counts=True)
            self.squares[seen] *= self.keep**times
        np.add.at(self.squares, idx, vals * vals)
        self._changed[idx] = True
        # Twins share the pull their vector gives: each takes its own precision's part of
        # the group's (the pulls are divided by each feature's own precision below).
        share = np.ones(len(idx))
        own = self.squares[idx[twins]]
        share[twins] = (prior[twins] + own) / (prior[twins] + _sums(twin_of, own, n_twins)[twin_of])
        ids = self._reward_ids.integers(1, 2**63, n, dtype=np.uint64)
        nonzero = vals != 0  # as the scales: a feature whose value was 0 was not seen
        np.add.at(self.histories, idx[nonzero], ids[rows[nonzero]])
        # Outside blocks: each feature's summed pull over its precision after the batch, so a
        # feature that n vectors share moves by about their mean residual, not n times it.
        d_idx, d_vals, d_rows = idx[diagonal], (vals * share)[diagonal], rows[diagonal]
        if len(d_idx) * DENSE_SHARE >= self.space.dim:
            # A large batch (a backlog's read): a pass over the space costs less than sorting
            # the batch's indices.
            pulls = _sums(d_idx, d_vals * step[d_rows], self.space.dim)
            touched = np.flatnonzero(pulls)  # a feature with no pull does not move
            pull = pulls[touched]
        else:
            touched, at = np.unique(d_idx, return_inverse=True)
            pull = _sums(at, d_vals * step[d_rows], len(touched))
        self.weights[touched] += pull / self._precision(touched)
        # In a block: the ridge step with the block's A after the batch (for one reward this
        # is Sherman-Morrison's step exactly).
        for (block, members, z), leverage in zip(groups, leverages, strict=True):
            target = z.T @ (step[members] * (1.0 + leverage))
            np.add.at(self.weights, block.indices, block.inverted(self.l2, self.scales) @ target)
        self.updates += n

    def _grow_scales(self, idx: IntArray, vals: FloatArray) -> None:
        """Take the batch's values into each feature's scale (the largest |x| seen). Where a
        scale grows, what the weight learned beyond its prior shrinks by (old / new)^2, as
        in Vowpal Wabbit's normalized update: it was learned against a prior in the old,
        smaller unit. Without this, a numeric value first seen near 0 (a unit of 0.01)
        took a weight near 1 / (0.01 m) from one reward, which predicted far outside any
        reward where later values were of normal size; the offer was then hardly ever
        tried where it pays (digits-pca: one seed in six ended 0.07-0.23 lower; 30
        seeds, bench/README.md)."""
        before = self.scales[idx]
        np.maximum.at(self.scales, idx, np.abs(vals))
        grown = np.flatnonzero((self.scales[idx] > before) & (before > 0))
        if not len(grown):
            return
        at = idx[grown]
        ratio = np.clip(before[grown], MIN_SCALE, SCALE_CAP) / np.clip(
            self.scales[at], MIN_SCALE, SCALE_CAP
        )
        self.weights[at] = self.prior[at] + (self.weights[at] - self.prior[at]) * ratio * ratio

    def _reset_changed(
        self,
        batch: Batch,
        groups: list[tuple[Block, IntArray, FloatArray]],
        residuals: FloatArray,
        diagonal: BoolArray,
    ) -> bool:
        """Cut back the precision of the units whose rewards changed (module doc), before
        this batch is learned: its rewards are the first to count at the new precision.
        True when the whole model started again (``_restart``)."""
        rewards = batch.rewards[batch.rewards != 0]
        self._reward_sum += float(np.abs(rewards).sum())
        self._rewarded += len(rewards)
        unit = self._reward_sum / self._rewarded if self._rewarded else 1.0
        floor = NOISE_FLOOR * unit
        sightings = [block.sightings(self.scales) for block, _, _ in groups]
        watched = [
            n >= max(WATCH_AFTER_SIGHTINGS, WATCH_PER_FEATURE * len(block.indices))
            for n, (block, _, _) in zip(sightings, groups, strict=True)
        ]
        judged = np.ones(len(batch), dtype=bool)  # rewards whose units are all watched
        for is_watched, (_, members, _) in zip(watched, groups, strict=True):
            if not is_watched:
                judged[members] = False
        threshold = MODEL_THRESHOLD_FACTOR * self.drift_threshold
        if self.model_watch.changed(residuals[judged], self.updates, threshold, floor):
            self._restart()
            return True
        changed_rows = np.zeros(len(batch), dtype=bool)
        for (block, members, _), seen, is_watched in zip(groups, sightings, watched, strict=True):
            changed = block.watch.changed(residuals[members], self.drift_threshold, floor)
            if not is_watched:
                block.watch.restart()
            elif changed:
                block.fade(RESET_SIGHTINGS / seen)
                # The evidence it discards leaves the count that narrows exploration too
                # (bandit.ModelSnapshot.gamma): finding what the unit's rewards are now
                # takes exploring again. Without this the drift scenario relearned half
                # as fast (bench/README.md).
                self.updates = max(0, self.updates - int(seen - RESET_SIGHTINGS))
                changed_rows[members] = True
                self.changes_detected += 1
        if not changed_rows.any():
            return False
        # The vectors' own diagonal features too (an offer's bias, its topic's crosses with
        # categorical context), but not the explicit and inferred weights every offer shares.
        self._cut_back(np.unique(batch.indices[diagonal & changed_rows[batch.rows]]))
        return False

    def _cut_back(self, indices: IntArray) -> None:
        """Keep at most ``RESET_SIGHTINGS`` sightings' worth of precision on these diagonal
        features, but not on the explicit and inferred ones every offer shares."""
        hit = indices[(indices != EXPLICIT_LIKE) & (indices != INFERRED_INTEREST)]
        scale = np.clip(self.scales[hit], MIN_SCALE, SCALE_CAP)
        sightings = self.squares[hit] / (scale * scale)
        self.squares[hit] *= np.minimum(1.0, RESET_SIGHTINGS / np.maximum(sightings, 1.0))
        self._changed[hit] = True

    def _restart(self) -> None:
        """The whole model's rewards changed (``changes.ModelWatch``): what it learned is
        wrong everywhere, so it starts again. Every weight goes back to the prior and every
        precision to ``RESET_SIGHTINGS`` sightings at most, and the evidence count that
        narrows exploration to zero; but not the explicit and inferred weights every offer
        shares (what customers said and did weighs what it did before: offers' rewards
        changed, not what a stated like means). Keeping the weights at that precision
        relearned the drift scenario's second half at 0.37; starting from the prior, 0.82
        (bench/README.md)."""
        for block in self.blocks.values():
            seen = block.sightings(self.scales)
            if seen > RESET_SIGHTINGS:
                block.fade(RESET_SIGHTINGS / seen)
            block.watch.restart()
        self._cut_back(np.flatnonzero(self.squares))
        shared = [EXPLICIT_LIKE, INFERRED_INTEREST]
        kept = self.weights[shared]
        self.weights[:] = self.prior
        self.weights[shared] = kept
        self._changed[:] = True
        self.updates = 0
        self.restarts += 1

    def _block_groups(self, batch: Batch) -> list[tuple[Block, IntArray, FloatArray]]:
        """The batch's blocks, grouped by the features they cover: (block, the vectors that
        have it, their values as the rows of a matrix). Vectorised per block size: a loop
        per distinct block, not per reward."""
        groups = []
        sizes = np.diff(batch.block_bounds)
        for m in np.unique(sizes).tolist():
            chosen = np.flatnonzero(sizes == m)
            where = batch.block_positions[batch.block_bounds[chosen][:, None] + np.arange(m)]
            # Rows of indices as single values, so grouping them is a 1-d unique.
            rows = np.ascontiguousarray(batch.indices[where]).view(np.dtype((np.void, 8 * m)))
            keys, which = np.unique(rows.ravel(), return_inverse=True)
            covered = keys.view(np.int64).reshape(-1, m)
            order = np.argsort(which.ravel(), kind="stable")
            splits = np.cumsum(np.bincount(which.ravel(), minlength=len(covered)))[:-1]
            for indices, members in zip(covered, np.split(order, splits), strict=True):
                key = indices.tobytes()
                block = self.blocks.get(key)
                if block is None:
                    block = self.blocks[key] = Block(indices.copy())
                z = batch.values[where[members]]
                groups.append((block, batch.block_rows[chosen[members]], z))
        return groups

    def _twins(
        self, idx: IntArray, rows: IntArray, diagonal: BoolArray
    ) -> tuple[IntArray, IntArray, int]:
        """The batch's positions outside blocks and the dense features, each with its group
        in its vector: the features seen so far in exactly the same rewards (module doc).
        Returns the positions, their groups and the number of groups."""
        at = np.flatnonzero(diagonal & (idx >= N_DENSE))
        key = self.histories[idx[at]] ^ (rows[at].astype(np.uint64) * ROW_MIX)
        keys, group = np.unique(key, return_inverse=True)
        return at, group.ravel(), len(keys)

    def _prior(self, idx: IntArray) -> FloatArray:
        # A feature never seen has no scale yet: its prior is l2 in its own unit. A scale
        # is floored so a feature only ever seen near 0 cannot make its precision 0.
        scale = self.scales[idx]
        return np.where(scale > 0, self.l2 * np.clip(scale, MIN_SCALE, SCALE_CAP) ** 2, self.l2)

    def _precision(self, idx: IntArray) -> FloatArray:
        return self._prior(idx) + self.squares[idx]

    def variance(self) -> FloatArray:
        """``1 / p_i`` for every weight, without the explicit and inferred ones (the bonus
        must never depend on them: ``bandit`` module doc).

        Kept between calls and remade only where a precision changed since: the learner
        publishes it many times a second, and remaking all of it each time cost the learner
        a tenth of its time at 2^18 dimensions."""
        if self._variance is None:
            self._variance = 1.0 / self._precision(np.arange(self.space.dim))
        else:
            changed = np.flatnonzero(self._changed)
            self._variance[changed] = 1.0 / self._precision(changed)
        self._changed[:] = False
        out: FloatArray = self._variance.copy()
        out[[EXPLICIT_LIKE, INFERRED_INTEREST]] = 0.0
        return out

    def _forget_variance(self) -> None:
        self._variance = None
        self._changed = np.zeros(self.space.dim, dtype=bool)

    # --- merging learners' work -----------------------------------------------------------

    def _mark(self) -> None:
        self._base_weights = self.weights.copy()
        self._base_squares = self.squares.copy()
        self._base_histories = self.histories.copy()
        self._base_updates = self.updates
        for block in self.blocks.values():
            block.base = block.sums.copy()

    def take_delta(self) -> Delta:
        """What was learned since the last ``take_delta`` (or ``restore``), and mark now."""
        changed = np.flatnonzero(
            (self.weights != self._base_weights)
            | (self.squares != self._base_squares)
            | (self.histories != self._base_histories)
        )
        blocks = [
            (b.indices, b.sums - b.base)
            for b in self.blocks.values()
            if not np.array_equal(b.sums, b.base)
        ]
        delta = Delta(
            changed,
            self.weights[changed] - self._base_weights[changed],
            self.squares[changed] - self._base_squares[changed],
            self.scales[changed].copy(),
            self.updates - self._base_updates,
            blocks,
            self.histories[changed] - self._base_histories[changed],  # wraps, as they add
        )
        self._mark()
        return delta

    def merge(self, delta: Delta) -> None:
        """Add another learner's delta to this state (not to this learner's own delta)."""
        idx = delta.indices
        self.weights[idx] += delta.weights
        self.squares[idx] = np.maximum(self.squares[idx] + delta.squares, 0.0)
        self.scales[idx] = np.maximum(self.scales[idx], delta.scales)
        self._changed[idx] = True
        self._base_weights[idx] += delta.weights
        self._base_squares[idx] += delta.squares
        if delta.histories is not None:
            self.histories[idx] += delta.histories
            self._base_histories[idx] += delta.histories
        # A delta's count can be negative (a learner that found a change took evidence
        # back); the count stays >= 0, and this learner's own delta unchanged.
        updates = max(0, self.updates + delta.updates)
        self._base_updates += updates - self.updates
        self.updates = updates
        for indices, sums in delta.blocks:
            key = indices.tobytes()
            block = self.blocks.get(key)
            if block is None:
                block = self.blocks[key] = Block(indices)
            block.add(sums, own=False)

    def forget(self, indices: IntArray) -> None:
        """Put these features back as never seen (an offer's own features, once it is gone),
        with every block that holds one of them."""
        self.weights[indices] = self.prior[indices]
        self.squares[indices] = 0.0
        self.scales[indices] = 0.0
        self.histories[indices] = 0
        self._changed[indices] = True
        self._base_weights[indices] = self.weights[indices]
        self._base_squares[indices] = 0.0
        self._base_histories[indices] = 0
        gone = set(indices.tolist())
        for key in [k for k, b in self.blocks.items() if gone.intersection(b.indices.tolist())]:
            del self.blocks[key]

    # --- saving ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        touched = np.flatnonzero(self.scales > 0)
        return pack(
            {
                "dim": np.array(self.space.dim),
                "weights": self.weights,  # dense: what the prior gave counts too
                "touched": touched.astype(np.int64),
                "squares": self.squares[touched],
                "scales": self.scales[touched],
                "histories": self.histories[touched],
                "updates": np.array(self.updates),
                "offers": np.frombuffer(json.dumps(self.offers).encode(), dtype=np.uint8),
                **pack_blocks([(b.indices, b.sums) for b in self.blocks.values()]),
            }
        )

    def restore(self, raw: bytes) -> None:
        """Take up a saved state (and mark it: the next delta starts from here)."""
        data = unpack(raw)
        dim = self.space.dim
        try:
            if int(data["dim"]) != dim:
                raise StateError("learner state built for another feature layout")
            weights = data["weights"].astype(np.float64)
            touched = data["touched"].astype(np.int64)
            squares, scales = data["squares"], data["scales"]
            if "histories" in data:
                histories = data["histories"].astype(np.uint64)
            else:  # saved before twins: each feature its own history, as it was learned
                histories = self._reward_ids.integers(1, 2**63, len(touched), dtype=np.uint64)
            updates = int(data["updates"])
            blocks = unpack_blocks(data, dim)
            offers = json.loads(data["offers"].tobytes()) if "offers" in data else {}
            if not isinstance(offers, dict):
                raise TypeError("offers is not a mapping")
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"unreadable learner state: {exc!r}") from exc
        if weights.shape != (dim,) or not np.all(np.isfinite(weights)):
            raise StateError("learner state holds unusable weights")
        if len(touched) and (touched.min() < 0 or touched.max() >= dim):
            raise StateError("learner state for another feature layout")
        if not (len(squares) == len(scales) == len(histories) == len(touched)):
            raise StateError("learner state arrays of different lengths")
        self.weights = weights
        self.squares = np.zeros(dim)
        self.scales = np.zeros(dim)
        self.squares[touched] = squares
        self.scales[touched] = scales
        self.histories = np.zeros(dim, dtype=np.uint64)
        self.histories[touched] = histories
        self._forget_variance()
        self.updates = updates
        self.offers = {str(k): [str(c) for c in v] for k, v in offers.items()}
        self.blocks = {}
        for indices, sums in blocks:
            block = self.blocks[indices.tobytes()] = Block(indices)
            block.sums = sums.copy()
        self._mark()
