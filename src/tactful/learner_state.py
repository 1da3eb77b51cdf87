"""What learners save and hand each other (``regression.OnlineRegression``): a learner's
saved state and its deltas, packed as compressed numpy archives, and the error for one that
cannot be used."""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tactful.batches import IntArray
from tactful.features import FloatArray


class StateError(ValueError):
    """A saved learner state that cannot be used (corrupt, or for another feature layout)."""


def pack(arrays: dict[str, npt.NDArray[Any]]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return zlib.compress(buffer.getvalue(), 1)


def unpack(raw: bytes) -> dict[str, npt.NDArray[Any]]:
    try:
        with np.load(io.BytesIO(zlib.decompress(raw)), allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError, zlib.error, EOFError) as exc:
        raise StateError(f"unreadable learner state: {exc!r}") from exc


def pack_blocks(blocks: list[tuple[IntArray, FloatArray]]) -> dict[str, npt.NDArray[Any]]:
    """Blocks of several sizes as three flat arrays."""
    return {
        "block_sizes": np.array([len(i) for i, _ in blocks], dtype=np.int64),
        "block_indices": np.concatenate([i for i, _ in blocks] or [np.zeros(0, np.int64)]),
        "block_sums": np.concatenate([g.ravel() for _, g in blocks] or [np.zeros(0)]),
    }


def unpack_blocks(data: dict[str, npt.NDArray[Any]], dim: int) -> list[tuple[IntArray, FloatArray]]:
    sizes = data["block_sizes"].astype(np.int64)
    indices = data["block_indices"].astype(np.int64)
    sums = data["block_sums"].astype(np.float64)
    if int(sizes.sum()) != len(indices) or int((sizes * sizes).sum()) != len(sums):
        raise StateError("learner blocks of inconsistent sizes")
    if len(indices) and (indices.min() < 0 or indices.max() >= dim):
        raise StateError("learner blocks for another feature layout")
    out: list[tuple[IntArray, FloatArray]] = []
    at = square = 0
    for m in sizes.tolist():
        out.append((indices[at : at + m], sums[square : square + m * m].reshape(m, m)))
        at, square = at + m, square + m * m
    return out


@dataclass
class Delta:
    """What a learner added to the shared state since its last delta: sparse, so merging it
    costs its non-zeros. Weights, squares, histories and block sums add; scales take the
    maximum."""

    indices: IntArray
    weights: FloatArray
    squares: FloatArray
    scales: FloatArray
    updates: int
    blocks: list[tuple[IntArray, FloatArray]]
    histories: npt.NDArray[np.uint64] | None = None  # None from a learner before twins

    def to_bytes(self) -> bytes:
        return pack(
            {
                "indices": self.indices,
                "weights": self.weights,
                "squares": self.squares,
                "scales": self.scales,
                "updates": np.array(self.updates),
                **pack_blocks(self.blocks),
                **({} if self.histories is None else {"histories": self.histories}),
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes, dim: int) -> Delta:
        data = unpack(raw)
        try:
            delta = cls(
                data["indices"].astype(np.int64),
                data["weights"].astype(np.float64),
                data["squares"].astype(np.float64),
                data["scales"].astype(np.float64),
                int(data["updates"]),
                unpack_blocks(data, dim),
                data["histories"].astype(np.uint64) if "histories" in data else None,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise StateError(f"unreadable learner delta: {exc!r}") from exc
        n = len(delta.indices)
        if not (len(delta.weights) == len(delta.squares) == len(delta.scales) == n):
            raise StateError("learner delta arrays of different lengths")
        if delta.histories is not None and len(delta.histories) != n:
            raise StateError("learner delta arrays of different lengths")
        if n and (delta.indices.min() < 0 or delta.indices.max() >= dim):
            raise StateError("learner delta for another feature layout")
        return delta
