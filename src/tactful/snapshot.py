"""The bytes of a published model: a JSON header, then its weights and their variances.

Format 2 (written since issue 16) is sparse and float32. At 2^18 hashed features most
weights are never touched: theta is 0 there and the variance is the prior's ``1 / l2``.
So one set of positions is stored, those where theta is not 0 or the variance is not the
*fill* (the variance most positions share, kept exactly in the header), then the float32
theta and variance at those positions. The positions are a list of int32 or a bitmap of
``dim`` bits, whichever is smaller. A model of the default space is a few KB when little
was learned and about 2 MB with every feature touched (bench/README.md, "Other measured
figures"), where the dense float64 format took 4 MB whatever was learned.

Format 1 (no ``format`` in the header): theta and, when the header says so, the variance
as dense float64 ``.npy`` arrays. Snapshots kept in Redis from before format 2 are read
as they were.

Decoding returns dense float64 arrays; every fault of the bytes themselves raises
``ValueError`` (what the weights may hold is the model's to check)."""

from __future__ import annotations

import io
import json
import math
import tokenize
from typing import Any

import numpy as np
import numpy.lib.format as npy

from tactful.features import FloatArray

FORMAT = 2
_POSITION = np.dtype("<i4")
_VALUE = np.dtype("<f4")
_FILL_SAMPLE = 4096  # positions looked at to choose the fill: it only changes the size


def encode(meta: dict[str, Any], theta: FloatArray, variance: FloatArray | None) -> bytes:
    """Format 2: ``meta`` (version, layout, updates) in the header with what the body
    holds."""
    dim = int(theta.shape[0])
    fill = _common_value(variance) if variance is not None else 0.0
    touched = theta != 0
    if variance is not None:
        touched |= variance != fill
    at = np.flatnonzero(touched)
    bitmap = (dim + 7) // 8 < at.size * _POSITION.itemsize
    header = {
        **meta,
        "format": FORMAT,
        "dim": dim,
        "count": int(at.size),
        "positions": "bitmap" if bitmap else "list",
        "variance": variance is not None,
        "variance_fill": fill,
    }
    raw = json.dumps(header).encode()
    parts = [len(raw).to_bytes(4, "big"), raw]
    parts.append(np.packbits(touched).tobytes() if bitmap else at.astype(_POSITION).tobytes())
    parts.append(theta[at].astype(_VALUE).tobytes())
    if variance is not None:
        parts.append(variance[at].astype(_VALUE).tobytes())
    return b"".join(parts)


def decode(raw: bytes, dim: int) -> tuple[dict[str, Any], FloatArray, FloatArray | None]:
    """The header, theta and the variance (None if the snapshot has none) of a format 1 or
    format 2 snapshot. ``dim``: the size this server uses, checked before anything of that
    size is made."""
    size = int.from_bytes(raw[:4], "big")
    header = json.loads(raw[4 : 4 + size])
    if not isinstance(header, dict):
        raise ValueError("snapshot header is not an object")
    body = memoryview(raw)[4 + size :]
    if "format" not in header:
        return header, *_decode_dense(header, body, dim)
    if header["format"] != FORMAT:
        raise ValueError(f"snapshot format {header['format']!r}, this server reads 1 and 2")
    return header, *_decode_sparse(header, body, dim)


def _decode_dense(
    header: dict[str, Any], body: memoryview, dim: int
) -> tuple[FloatArray, FloatArray | None]:
    buffer = io.BytesIO(body)
    theta = _load_npy(buffer, dim)
    # A snapshot from before the variance was published has none: no bonus.
    variance = _load_npy(buffer, dim) if header.get("variance") else None
    return theta, variance


def _load_npy(buffer: io.BytesIO, dim: int) -> np.ndarray[Any, Any]:
    """One ``.npy`` array, its header read first: numpy makes the array its header
    describes before it reads it, so a mangled shape must not get that far."""
    start = buffer.tell()
    try:
        version = npy.read_magic(buffer)
        if version == (1, 0):
            shape = npy.read_array_header_1_0(buffer)[0]
        elif version == (2, 0):
            shape = npy.read_array_header_2_0(buffer)[0]
        else:
            raise ValueError(f".npy version {version}")
    except (SyntaxError, tokenize.TokenError) as exc:  # numpy reads the header as Python
        raise ValueError(f"corrupt .npy header: {exc!r}") from exc
    if math.prod(shape) > 2 * dim:  # two per weight at most: the checks tell what is wrong
        raise ValueError(f".npy array of shape {shape}, this server uses ({dim},)")
    buffer.seek(start)
    array: np.ndarray[Any, Any] = np.load(buffer, allow_pickle=False)
    return array


def _decode_sparse(
    header: dict[str, Any], body: memoryview, dim: int
) -> tuple[FloatArray, FloatArray | None]:
    stored, count = _whole(header, "dim"), _whole(header, "count")
    if stored != dim:
        raise ValueError(f"snapshot of {stored} weights, this server uses {dim}")
    if not 0 <= count <= dim:
        raise ValueError(f"snapshot stores {count} of {dim} weights")
    has_variance, fill = header["variance"], header["variance_fill"]
    if not isinstance(has_variance, bool) or not isinstance(fill, int | float):
        raise ValueError("snapshot header's variance fields are not a flag and a number")
    kind = header["positions"]
    if kind == "list":
        span = count * _POSITION.itemsize
    elif kind == "bitmap":
        span = (dim + 7) // 8
    else:
        raise ValueError(f"snapshot positions {kind!r}")
    values = count * _VALUE.itemsize
    expected = span + values * (2 if has_variance else 1)
    if len(body) != expected:
        raise ValueError(f"snapshot body of {len(body)} bytes, its header promises {expected}")
    at = _positions(kind, body[:span], count, dim)
    theta, variance = np.zeros(dim), np.full(dim, float(fill)) if has_variance else None
    with np.errstate(invalid="ignore"):  # a NaN is refused with the other checks
        theta[at] = np.frombuffer(body[span : span + values], _VALUE)
        if variance is not None:
            variance[at] = np.frombuffer(body[span + values :], _VALUE)
    return theta, variance


def _positions(kind: str, raw: memoryview, count: int, dim: int) -> np.ndarray[Any, Any]:
    if kind == "bitmap":
        bits = np.unpackbits(np.frombuffer(raw, np.uint8))
        at = np.flatnonzero(bits[:dim])
        if at.size != count or bits[dim:].any():
            raise ValueError("snapshot bitmap does not match its count")
        return at
    at = np.frombuffer(raw, _POSITION).astype(np.intp)
    if at.size and (at[0] < 0 or at[-1] >= dim or np.any(np.diff(at) <= 0)):
        raise ValueError("snapshot positions out of range or out of order")
    return at


def _whole(header: dict[str, Any], name: str) -> int:
    value = header[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"snapshot header's {name} is not a whole number")
    return value


def _common_value(variance: FloatArray) -> float:
    """The variance most positions share (that of features never seen), from a sample."""
    step = max(1, variance.size // _FILL_SAMPLE)
    values, counts = np.unique(variance[::step], return_counts=True)
    return float(values[np.argmax(counts)]) if values.size else 0.0
