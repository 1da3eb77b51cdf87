"""Features of one (request, user, offer) triple, for the linear reward model.

A feature vector is sparse: a few named *dense* features at fixed indices, and hashed
features (``crc32`` of a name, stable across processes) in ``2**hashed_bits`` buckets.

Dense features (index: meaning)
  0 bias                1
  1 explicit_like       1 if the user explicitly LIKEs one of the offer's topics, else 0
  2 inferred_interest   w/(1+w) for the strongest decayed inferred signal on the offer's
                        topics, in [0, 1); 0 without consent
  3 priority            the offer's business priority
  4 contacts_today      log1p(messages this user got on this channel today)

Hashed features (shared structure first, so a new offer or user starts from what is shared)
  t:<topic>                  the offer's topics (each 1/sqrt(#topics))
  t:<topic>|c:<channel>      topic x channel
  t:<topic>|p:<placement>    topic x placement
  t:<topic>|h:<hour/3>       topic x time of day (UTC, 3-hour buckets)
  t:<topic>|k:<key>=<value>  topic x categorical context
  t:<topic>|n:<key>          topic x numeric context, value sign(v)*log1p(|v|)
  o:<offer_id>               per-offer bias, and o:<offer_id>|c:<channel>

Explicit and inferred evidence enter only through indices 1 and 2, never inside a hashed
interaction: so their learned weights alone decide how they compare, and the model can keep
``weight[1] >= kappa * weight[2]`` (see ``bandit.project``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from tactful.model import Offer

BIAS, EXPLICIT_LIKE, INFERRED_INTEREST, PRIORITY, CONTACTS_TODAY = range(5)
DENSE_NAMES = ("bias", "explicit_like", "inferred_interest", "priority", "contacts_today")
N_DENSE = len(DENSE_NAMES)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def squash(strength: float) -> float:
    """Inferred strength of any size into [0, 1)."""
    return strength / (1.0 + strength) if strength > 0 else 0.0


@dataclass(frozen=True, slots=True)
class SparseVector:
    indices: tuple[int, ...]
    values: tuple[float, ...]

    def to_json(self) -> list[list[float]]:
        return [list(self.indices), list(self.values)]

    @classmethod
    def from_json(cls, data: Sequence[Sequence[float]]) -> SparseVector:
        return cls(tuple(int(i) for i in data[0]), tuple(float(v) for v in data[1]))


@dataclass(frozen=True, slots=True)
class RequestContext:
    channel: str
    placement: str
    hour: int  # 0-23, UTC
    categorical: tuple[tuple[str, str], ...] = ()
    numeric: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class UserEvidence:
    """What the user said and (with consent) showed, per offer: computed by the core."""

    liked: bool
    inferred: float  # squashed, in [0, 1); 0 without consent
    contacts_today: int


class FeatureSpace:
    def __init__(self, hashed_bits: int) -> None:
        self.hashed_bits = hashed_bits
        self.dim = N_DENSE + (1 << hashed_bits)
        self._mask = (1 << hashed_bits) - 1
        # Hashing a name is the costly part; names repeat across requests, so remember them.
        self.index = lru_cache(maxsize=1 << 16)(self._index)

    @property
    def layout(self) -> str:
        """Identifies the feature layout: a model built for another one cannot be loaded."""
        return f"tactful-features-1/{self.hashed_bits}"

    def _index(self, name: str) -> int:
        return N_DENSE + (zlib.crc32(name.encode("utf-8", "surrogatepass")) & self._mask)

    def featurize(self, ctx: RequestContext, offer: Offer, evidence: UserEvidence) -> SparseVector:
        indices = [BIAS, PRIORITY]
        values = [1.0, offer.priority]
        if evidence.liked:
            indices.append(EXPLICIT_LIKE)
            values.append(1.0)
        if evidence.inferred > 0:
            indices.append(INFERRED_INTEREST)
            values.append(evidence.inferred)
        if evidence.contacts_today:
            indices.append(CONTACTS_TODAY)
            values.append(math.log1p(evidence.contacts_today))
        index = self.index
        indices += (index(f"o:{offer.offer_id}"), index(f"o:{offer.offer_id}|c:{ctx.channel}"))
        values += (1.0, 1.0)
        weight = 1.0 / math.sqrt(len(offer.topics))
        hour_bucket = ctx.hour // 3
        for topic in offer.topics:
            for name in _topic_names(topic, ctx, hour_bucket):
                indices.append(index(name))
                values.append(weight)
            for key, number in ctx.numeric:
                indices.append(index(f"t:{topic}|n:{key}"))
                values.append(weight * math.copysign(math.log1p(abs(number)), number))
        return SparseVector(tuple(indices), tuple(values))


def _topic_names(topic: str, ctx: RequestContext, hour_bucket: int) -> Iterable[str]:
    yield f"t:{topic}"
    yield f"t:{topic}|c:{ctx.channel}"
    if ctx.placement:
        yield f"t:{topic}|p:{ctx.placement}"
    yield f"t:{topic}|h:{hour_bucket}"
    for key, value in ctx.categorical:
        yield f"t:{topic}|k:{key}={value}"


def dot_many(theta: FloatArray, vectors: Sequence[SparseVector]) -> FloatArray:
    """theta . x for each sparse x, in one vectorised pass."""
    lengths = [len(v.indices) for v in vectors]
    idx = np.fromiter((i for v in vectors for i in v.indices), dtype=np.int64)
    vals = np.fromiter((x for v in vectors for x in v.values), dtype=np.float64)
    starts = np.cumsum([0, *lengths[:-1]])
    return np.add.reduceat(theta[idx] * vals, starts) if len(vectors) else np.zeros(0)
