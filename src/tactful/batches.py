"""Rewards laid end to end as arrays: what ``regression`` learns in one step, built in C
loops from the learner's decoded vectors (a Python loop per reward would cost more than
learning it at tens of thousands of rewards a second)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import numpy.typing as npt

from tactful.features import FloatArray

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

Vector = tuple[list[int], list[float], list[list[int]]]  # indices, values, blocks


@dataclass(frozen=True)
class Batch:
    """Rewards laid end to end: non-zero k belongs to vector ``rows[k]``. Numeric block b
    belongs to vector ``block_rows[b]`` and covers the non-zeros at
    ``block_positions[block_bounds[b]:block_bounds[b + 1]]``."""

    indices: IntArray
    values: FloatArray
    rows: IntArray
    rewards: FloatArray
    block_rows: IntArray
    block_positions: IntArray
    block_bounds: IntArray

    def __len__(self) -> int:
        return len(self.rewards)


def batch_of(vectors: Sequence[Vector], rewards: Sequence[float]) -> Batch:
    """A ``Batch`` from (indices, values, blocks) triples, blocks as positions in the vector.
    The lists are read in C loops (``chain`` into ``fromiter``): at tens of thousands of
    rewards a second, a Python loop over their numbers would cost more than learning them."""
    n = len(vectors)
    lengths = np.fromiter(map(len, (v[0] for v in vectors)), dtype=np.int64, count=n)
    total = int(lengths.sum())
    indices = np.fromiter(chain.from_iterable(v[0] for v in vectors), np.int64, count=total)
    values = np.fromiter(chain.from_iterable(v[1] for v in vectors), np.float64, count=total)
    per_vector = np.fromiter(map(len, (v[2] for v in vectors)), dtype=np.int64, count=n)
    blocks = list(chain.from_iterable(v[2] for v in vectors))
    sizes = np.fromiter(map(len, blocks), dtype=np.int64, count=len(blocks))
    positions = np.fromiter(chain.from_iterable(blocks), np.int64, count=int(sizes.sum()))
    return batch_from_arrays(indices, values, lengths, per_vector, sizes, positions, rewards)


def batch_from_arrays(
    indices: IntArray,
    values: FloatArray,
    lengths: IntArray,
    blocks_per_vector: IntArray,
    block_sizes: IntArray,
    positions: IntArray,
    rewards: Sequence[float],
) -> Batch:
    """A ``Batch`` from vectors laid end to end: ``lengths[j]`` non-zeros and
    ``blocks_per_vector[j]`` blocks for vector j, block positions within their vector."""
    n = len(lengths)
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
    block_rows = np.repeat(np.arange(n, dtype=np.int64), blocks_per_vector)
    if len(positions) and (
        positions.min() < 0 or (positions >= np.repeat(lengths[block_rows], block_sizes)).any()
    ):
        raise ValueError("a block outside its vector")
    starts = np.cumsum(lengths) - lengths  # where each vector begins in the batch
    positions = positions + np.repeat(starts[block_rows], block_sizes)
    bounds = np.concatenate(([0], np.cumsum(block_sizes)))
    return Batch(
        indices, values, rows, np.asarray(rewards, np.float64), block_rows, positions, bounds
    )


def usable_rows(batch: Batch, dim: int) -> BoolArray:
    """Which vectors of the batch a learner can use: indices inside the layout, finite
    values (blocks and lengths ``batch_of`` checks)."""
    bad = np.zeros(len(batch), dtype=bool)
    outside = (batch.indices < 0) | (batch.indices >= dim) | ~np.isfinite(batch.values)
    bad[batch.rows[outside]] = True
    return ~bad


def select(batch: Batch, keep: BoolArray) -> Batch:
    """The batch without the vectors ``keep`` leaves out."""
    if keep.all():
        return batch
    new_row = np.cumsum(keep) - 1
    nonzero = keep[batch.rows]
    moved = np.cumsum(nonzero) - 1  # where each kept non-zero lands
    kept_blocks = keep[batch.block_rows]
    sizes = np.diff(batch.block_bounds)
    in_kept = np.repeat(kept_blocks, sizes)
    return Batch(
        batch.indices[nonzero],
        batch.values[nonzero],
        new_row[batch.rows[nonzero]],
        batch.rewards[keep],
        new_row[batch.block_rows[kept_blocks]],
        moved[batch.block_positions[in_kept]],
        np.concatenate(([0], np.cumsum(sizes[kept_blocks]))),
    )
