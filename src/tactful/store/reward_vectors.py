"""How a reward's feature vector travels in the reward stream (its ``x`` field).

The learner reads tens of thousands of rewards a second, and parsing each vector's JSON (a
Python list per vector, an int or float object per number) cost it more than learning them.
So the stream carries the vector packed, little-endian, in hexadecimal (the stream stays
text, for redis-cli and for clients that decode replies; CPython decodes hex eight times as
fast as base64, which is what counts here):

    u32 magic "tvx1"   u32 n (non-zeros)   u32 k (numeric blocks)   u32 p (block positions)
    f64[n] values      i32[n] indices      u32[k] block sizes       u32[p] block positions
    zeros to a multiple of 8 bytes

A whole read is unpacked at once (``unpack``): the fields joined and decoded in one call,
and every section taken with one numpy gather of its items (each section is aligned to its
item's size, so the joined bytes are viewed as items), no Python object per number.
Vectors written as JSON (by a server from before the packed form) still read: JSON starts
with '[', hex never does.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
Vector = tuple[list[int], list[float], list[list[int]]]  # indices, values, blocks

MAGIC = int.from_bytes(b"tvx1", "little")
HEADER = struct.Struct("<4I")


def pack(vector: Sequence[Sequence[Any]]) -> str:
    """The stream's form of a vector given as the decision record holds it: [indices,
    values] or [indices, values, blocks]."""
    indices, values = vector[0], vector[1]
    blocks: Sequence[Sequence[int]] = vector[2] if len(vector) > 2 else ()
    n, k = len(indices), len(blocks)
    if len(values) != n:
        raise ValueError("indices and values differ in length")
    positions = [p for block in blocks for p in block]
    p = len(positions)
    packed = struct.pack(
        f"<4I{n}d{n}i{k}I{p}I{4 * ((n + k + p) % 2)}x",
        MAGIC,
        n,
        k,
        p,
        *values,
        *indices,
        *map(len, blocks),
        *positions,
    )
    return packed.hex()


def is_json(field: bytes | str) -> bool:
    return field[:1] in (b"[", "[")


def vector_of(field: bytes | str) -> Vector:
    """One field's vector (either form), its numbers checked as ``unpack`` checks them;
    ValueError (or TypeError, IndexError for odd JSON) if unreadable."""
    if is_json(field):
        data = orjson.loads(field)
        if len(data[0]) != len(data[1]):
            raise ValueError("indices and values differ in length")
        return (data[0], data[1], data[2] if len(data) > 2 else [])
    indices, values, _, _, sizes, positions = unpack([field])
    bounds = np.concatenate(([0], np.cumsum(sizes))).tolist()
    blocks = [positions[bounds[b] : bounds[b + 1]].tolist() for b in range(len(sizes))]
    return indices.tolist(), values.tolist(), blocks


def unpack(
    fields: Sequence[bytes | str],
) -> tuple[IntArray, FloatArray, IntArray, IntArray, IntArray, IntArray]:
    """Packed vectors, laid end to end: (indices, values, non-zeros per vector, blocks per
    vector, size of each block, block positions within their vector). ValueError if one
    of them is not a whole packed vector."""
    m = len(fields)
    digits = np.fromiter(map(len, fields), dtype=np.int64, count=m)
    if (digits < 2 * HEADER.size).any() or (digits % 16).any():
        raise ValueError("not a packed vector: too short, or not padded")
    lengths = digits // 2  # in bytes
    try:
        joiner: Any = b"" if m and isinstance(fields[0], bytes) else ""
        joined = binascii.a2b_hex(joiner.join(fields))
    except (binascii.Error, TypeError) as exc:
        raise ValueError(f"not a packed vector ({exc})") from None
    words = np.frombuffer(joined, dtype="<u4")  # every blob starts at a multiple of 8 bytes
    starts = (np.cumsum(lengths) - lengths) // 4  # in words
    header = words[starts[:, None] + np.arange(4)].astype(np.int64)
    if (header[:, 0] != MAGIC).any():
        raise ValueError("not a packed vector")
    n, k, p = header[:, 1], header[:, 2], header[:, 3]
    if (lengths != 8 * ((HEADER.size + 12 * n + 4 * k + 4 * p + 7) // 8)).any():
        raise ValueError("a packed vector whose length is not its header's")
    values = _gather(np.frombuffer(joined, dtype="<f8"), (starts + 4) // 2, n).astype(np.float64)
    at = starts + 4 + 2 * n  # the indices, in words
    indices = _gather(words.view("<i4"), at, n).astype(np.int64)
    block_sizes = _gather(words, at + n, k).astype(np.int64)
    positions = _gather(words, at + n + k, p).astype(np.int64)
    block_rows = np.repeat(np.arange(m), k)
    if (np.bincount(block_rows, weights=block_sizes, minlength=m) != p).any():
        raise ValueError("a packed vector whose blocks are not its positions")
    return indices, values, n, k, block_sizes, positions


def _gather(items: Any, offsets: IntArray, counts: IntArray) -> Any:
    """``counts[j]`` items from ``offsets[j]`` on, for each j, end to end."""
    before = np.cumsum(counts) - counts
    return items[np.repeat(offsets - before, counts) + np.arange(int(counts.sum()))]
