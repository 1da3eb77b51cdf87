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
  s:<segment_id>             each segment the user is in (see below), value 1
  t:<topic>|s:<segment_id>   topic x segment (each 1/sqrt(#topics)); o:<offer_id>|s:<segment_id>
                             in the ``offer`` set

That is the default feature set, ``shared+offer`` (TACTFUL_FEATURE_SET): what is learned about a
topic in a context carries over to every offer with that topic (a new offer starts from its
topics), and the per-offer bias corrects for what the topics miss. Two others exist for
comparison (``bench/policy_quality.py --feature-sets``): ``shared`` drops the per-offer bias;
``offer`` crosses the offer id, not its topics, with the context (``o:<offer_id>|n:<key>``
and so on), so offers learn nothing from each other.

Explicit and inferred evidence enter only through indices 1 and 2, never inside a hashed
interaction: so their learned weights alone decide how they compare, and the model can keep
``weight[1] >= kappa * weight[2]`` (see ``bandit.project``).

Segment memberships (``tactful.segments``) are features so that learning happens at persona
level: what users of a segment did with a topic's offers carries over to a new user the day
they enter the segment (``t:<topic>|s:<segment_id>``), and ``s:<segment_id>`` lets the model
put the segment's own base rate there rather than into the topics. They come last in each
vector, after the offer's own hashed indices, one set per request (they depend on the user,
not the offer, so the per-context caches above are untouched; the topic x segment indices of
an offer are cached per (topics, memberships)). ``segment_book.SegmentBook`` decides which
memberships are features: only segments whose rule reads neither ``likes``/``dislikes`` nor
``inferred`` (else explicit or inferred evidence would enter through a hashed interaction
and escape the guarantee above), and never a sensitive segment (what a customer stated for
targeting is used for targeting only: it does not shape every other offer's score, and it
does not travel into the decision log and the learner's reward stream, which outlive no
profile but are not the customer's to see). At most ``TACTFUL_SEGMENT_MAX_FEATURES`` of a
user's memberships, the first by segment id.
"""

from __future__ import annotations

import math
import zlib
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, chain
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from tactful.domain import Offer

try:  # built on install (pyproject.toml); without a C compiler, the references run
    from tactful import _features

    COMPILED = True
except ImportError:  # pragma: no cover - every CI machine has a compiler
    COMPILED = False

BIAS, EXPLICIT_LIKE, INFERRED_INTEREST, PRIORITY, CONTACTS_TODAY = range(5)
FEATURE_SETS = ("shared+offer", "shared", "offer")
DENSE_NAMES = ("bias", "explicit_like", "inferred_interest", "priority", "contacts_today")
N_DENSE = len(DENSE_NAMES)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def squash(strength: float) -> float:
    """Inferred strength of any size into [0, 1)."""
    return strength / (1.0 + strength) if strength > 0 else 0.0


def offer_rows_reference(
    offers: list[Offer],
    liked: list[bool],
    inferred: list[float],
    contacts_today: int,
    contacts: float,
    table: dict[str, tuple[tuple[str, ...], array[int]]],
    indices_of: Callable[[Offer], array[int]],
    hashed_values: dict[int, array[float]],
    values_of: Callable[[int], array[float]],
    segment_indices: array[int],
    crossed_of: Callable[[Offer], array[int]] | None,
) -> tuple[array[int], array[float], list[int]]:
    """The rows of ``FeatureSpace.featurize_many``, one offer after another: each row's dense
    features (bias, priority, then explicit_like, inferred_interest and contacts_today where
    they are not 0), the offer's hashed indices in this context (``table``, by offer id with
    the topics they were made for, filled by ``indices_of``), the user's segment indices
    and their crosses with the offer (``crossed_of``, None when the user is in no segment
    that is a feature), and the hashed values, the same for every offer with as many topics
    (``hashed_values``, filled by ``values_of``). Returns the indices, the values and each
    row's end.

    The reference: Decide runs the compiled ``tactful._features.offer_rows``, which gives the
    same rows (tests/test_feature_kernel.py)."""
    if not len(offers) == len(liked) == len(inferred):
        raise ValueError("offers, liked and inferred differ in length")
    # Typed arrays, not lists: the cached parts are appended as memory copies, and the dot
    # product reads them without a conversion.
    indices = array("q")
    values = array("d")
    bounds = [0]
    for offer, is_liked, strength in zip(offers, liked, inferred, strict=True):
        indices.extend((BIAS, PRIORITY))
        values.extend((1.0, offer.priority))
        if is_liked:
            indices.append(EXPLICIT_LIKE)
            values.append(1.0)
        if strength > 0:
            indices.append(INFERRED_INTEREST)
            values.append(strength)
        if contacts_today:
            indices.append(CONTACTS_TODAY)
            values.append(contacts)
        cached = table.get(offer.offer_id)
        if cached is not None and cached[0] == offer.topics:
            own = cached[1]
        else:
            own = indices_of(offer)
            table[offer.offer_id] = (offer.topics, own)
        indices.extend(own)
        n_topics = len(offer.topics)
        hashed = hashed_values.get(n_topics)
        if hashed is None:
            hashed = hashed_values[n_topics] = values_of(n_topics)
        if crossed_of is not None:
            indices.extend(segment_indices)
            indices.extend(crossed_of(offer))
        values.extend(hashed)
        bounds.append(len(indices))
    return indices, values, bounds


def evidence_reference(
    offers: Sequence[Offer], liked_topics: AbstractSet[str], inferred: Mapping[str, float]
) -> tuple[list[bool], list[float]]:
    """The user's evidence on each offer, the ``explicit_like`` and ``inferred_interest``
    features: whether they like one of its topics, and their strongest inferred strength on
    its topics, squashed (0 without consent: ``inferred`` is then empty).

    The reference of the compiled ``tactful._features.evidence``."""
    liked = [not liked_topics.isdisjoint(offer.topics) for offer in offers]
    strengths = []
    for offer in offers:
        best = 0.0
        for topic in offer.topics:
            strength = inferred.get(topic, 0.0)
            if strength > best:
                best = strength
        strengths.append(squash(best))
    return liked, strengths


if COMPILED:
    offer_rows = _features.offer_rows
    evidence = _features.evidence
else:  # pragma: no cover - every CI machine has a compiler
    offer_rows = offer_rows_reference
    evidence = evidence_reference


@dataclass(frozen=True, slots=True)
class SparseVector:
    indices: tuple[int, ...]
    values: tuple[float, ...]
    # Numeric blocks: for each unit (topic, or offer in the ``offer`` set) of a request with
    # numeric context, the positions (in ``indices``) of the unit's own feature and of its
    # numeric crosses; the learner fits each block's weights jointly (``regression``).
    blocks: tuple[tuple[int, ...], ...] = ()

    def to_json(self) -> list[list[Any]]:
        data: list[list[Any]] = [list(self.indices), list(self.values)]
        if self.blocks:
            data.append([list(block) for block in self.blocks])
        return data

    @classmethod
    def from_json(cls, data: Sequence[Sequence[Any]]) -> SparseVector:
        blocks = tuple(tuple(int(p) for p in b) for b in data[2]) if len(data) > 2 else ()
        return cls(tuple(int(i) for i in data[0]), tuple(float(v) for v in data[1]), blocks)


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


# A context key: everything of a RequestContext the hashed indices depend on (channel,
# placement, hour bucket, categorical pairs, numeric keys), not the numbers' values.
ContextKey = tuple[str, str, int, tuple[tuple[str, str], ...], tuple[str, ...]]


class FeatureSpace:
    def __init__(self, hashed_bits: int, feature_set: str = "shared+offer") -> None:
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"feature set {feature_set!r} is not one of {FEATURE_SETS}")
        self.hashed_bits = hashed_bits
        self.feature_set = feature_set
        self.dim = N_DENSE + (1 << hashed_bits)
        self._mask = (1 << hashed_bits) - 1
        # Building and hashing names is the costly part, and it depends only on the offer and
        # the request context, never on the user: indices are remembered per name, per topic
        # in a context, and per offer in a context (a table per recent context, so a request
        # hashes its context key once, not once per offer).
        self.index = lru_cache(maxsize=1 << 16)(self._index)
        self._unit_indices = lru_cache(maxsize=1 << 14)(self._unit_indices_uncached)
        self._context_table = lru_cache(maxsize=256)(_new_table)
        self._crossed_indices = lru_cache(maxsize=1 << 14)(self._crossed_indices_uncached)

    @property
    def layout(self) -> str:
        """Identifies the feature layout: a model built for another one cannot be loaded."""
        default = self.feature_set == "shared+offer"  # keeps the name saved models carry
        return f"tactful-features-1/{self.hashed_bits}" + (
            "" if default else f"/{self.feature_set}"
        )

    def offer_own_indices(
        self, offer_id: str, channels: Sequence[str], segments: Sequence[str]
    ) -> IntArray:
        """The indices that belong to one offer alone (what the learner forgets once the offer
        is gone): its bias and its bias per channel; in the ``offer`` set also its crosses
        with the hour buckets and the segments. (Its crosses there with placements and
        categorical or numeric context cannot be listed from the catalog: they stay until
        learning overwrites them.)"""
        if self.feature_set == "shared":
            return np.zeros(0, dtype=np.int64)
        unit = f"o:{offer_id}"
        names = [unit, *(f"{unit}|c:{channel}" for channel in channels)]
        if self.feature_set == "offer":
            names += [f"{unit}|h:{bucket}" for bucket in range(8)]
            names += [f"{unit}|s:{segment}" for segment in segments]
        return np.array(sorted({self.index(name) for name in names}), dtype=np.int64)

    def _index(self, name: str) -> int:
        return N_DENSE + (zlib.crc32(name.encode("utf-8", "surrogatepass")) & self._mask)

    def featurize(self, ctx: RequestContext, offer: Offer, evidence: UserEvidence) -> SparseVector:
        batch = self.featurize_many(
            ctx, [offer], [evidence.liked], [evidence.inferred], evidence.contacts_today
        )
        return batch.vector(0)

    def featurize_many(
        self,
        ctx: RequestContext,
        offers: Sequence[Offer],
        liked: Sequence[bool],
        inferred: Sequence[float],
        contacts_today: int,
        segments: Sequence[str] = (),
    ) -> FeatureBatch:
        """The vectors of several offers for one request and one user: ``liked[i]`` and
        ``inferred[i]`` are the user's evidence on ``offers[i]`` (see ``UserEvidence``);
        ``segments`` the user's memberships that are features (see the module doc)."""
        key = _context_key(ctx)
        table = self._context_table(key)
        numeric = [math.copysign(math.log1p(abs(number)), number) for _, number in ctx.numeric]
        names_per_topic = 3 + bool(ctx.placement) + len(ctx.categorical)  # see _unit_names
        contacts = math.log1p(contacts_today) if contacts_today else 0.0
        # The hashed values of an offer depend only on its number of topics (weight
        # 1/sqrt(#topics)), on this request's numbers and on how many segments the user is
        # in: built once per topic count.
        hashed_values: dict[int, array[float]] = {}
        memberships = tuple(segments)
        # The user's own segment indices: the same for every offer of this request.
        segment_indices = array("q", [self.index(f"s:{s}") for s in memberships])
        by_offer = self.feature_set == "offer"

        def crossed(offer: Offer) -> array[int]:
            if by_offer:
                return self._crossed_indices("o", (offer.offer_id,), memberships)
            return self._crossed_indices("t", offer.topics, memberships)

        indices, values, bounds = offer_rows(
            offers if isinstance(offers, list) else list(offers),
            liked if isinstance(liked, list) else list(liked),
            inferred if isinstance(inferred, list) else list(inferred),
            contacts_today,
            contacts,
            table,
            lambda o: self._offer_indices(o.offer_id, o.topics, key),
            hashed_values,
            lambda n_topics: self._offer_values(
                n_topics, names_per_topic, numeric, len(memberships)
            ),
            segment_indices,
            crossed if memberships else None,
        )
        layout = None
        if numeric:
            prefix = 2 if self.feature_set == "shared+offer" else 0
            unit = names_per_topic + len(numeric)
            layout = BlockLayout(
                prefix, unit, names_per_topic, len(numeric), len(memberships), by_offer
            )
        return FeatureBatch(indices, values, bounds, layout)

    def _offer_values(
        self, n_topics: int, names_per_topic: int, numeric: list[float], n_segments: int
    ) -> array[float]:
        """The hashed values of an offer with ``n_topics`` topics, matching ``_offer_indices``,
        then those of a user in ``n_segments`` segments: each membership, and each crossed
        with the offer's topics (with its id in the ``offer`` set)."""
        if self.feature_set == "offer":
            values = array("d", [1.0] * names_per_topic + numeric)
            weight, crossed = 1.0, n_segments
        else:
            weight = 1.0 / math.sqrt(n_topics)
            topic_values = [weight] * names_per_topic + [weight * v for v in numeric]
            per_offer = [1.0, 1.0] if self.feature_set == "shared+offer" else []
            values = array("d", per_offer + topic_values * n_topics)
            crossed = n_segments * n_topics
        if n_segments:
            values.extend([1.0] * n_segments + [weight] * crossed)
        return values

    def _offer_indices(self, offer_id: str, topics: tuple[str, ...], key: ContextKey) -> array[int]:
        """The hashed indices of one offer in one context, in the order of the module doc."""
        if self.feature_set == "offer":
            return array("q", self._unit_indices(f"o:{offer_id}", *key))
        indices = array("q")
        if self.feature_set == "shared+offer":
            channel = key[0]
            indices.extend((self.index(f"o:{offer_id}"), self.index(f"o:{offer_id}|c:{channel}")))
        for topic in topics:
            indices.extend(self._unit_indices(f"t:{topic}", *key))
        return indices

    def _crossed_indices_uncached(
        self, kind: str, units: tuple[str, ...], segments: tuple[str, ...]
    ) -> array[int]:
        """``<kind>:<unit>|s:<segment>`` for each unit (topic or offer id), then segment."""
        return array("q", [self.index(f"{kind}:{u}|s:{s}") for u in units for s in segments])

    def _unit_indices_uncached(
        self,
        unit: str,
        channel: str,
        placement: str,
        hour_bucket: int,
        categorical: tuple[tuple[str, str], ...],
        numeric_keys: tuple[str, ...],
    ) -> tuple[int, ...]:
        """The indices of ``unit`` (``t:<topic>``, or ``o:<offer_id>`` in the ``offer`` set)
        alone and crossed with each part of the context."""
        names = [*_unit_names(unit, channel, placement, hour_bucket, categorical)]
        names += (f"{unit}|n:{key}" for key in numeric_keys)
        return tuple(self.index(name) for name in names)


def _context_key(ctx: RequestContext) -> ContextKey:
    return (
        ctx.channel,
        ctx.placement,
        ctx.hour // 3,
        ctx.categorical,
        tuple(name for name, _ in ctx.numeric),
    )


def _new_table(key: ContextKey) -> dict[str, tuple[tuple[str, ...], array[int]]]:
    """An empty table of offer id -> (its topics, its hashed indices), for one context key:
    keyed by the id alone (a string hashes once; a tuple of id and topics on every lookup),
    the topics checked on each hit, since a new catalog version may change them."""
    return {}


class BlockLayout(NamedTuple):
    """Where the numeric blocks of a batch's vectors are (see ``SparseVector.blocks``): after
    the vector's dense features come ``prefix`` per-offer indices, then one unit of
    ``unit_length`` indices per topic (one unit in all in the ``offer`` set), its own feature
    first and its ``numeric`` crosses last; then the segment features."""

    prefix: int
    unit_length: int
    names_per_unit: int
    numeric: int
    segments: int
    by_offer: bool

    def blocks(self, indices: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        dense = 0
        while dense < len(indices) and indices[dense] < N_DENSE:
            dense += 1
        if self.by_offer:
            units = 1
        else:  # each topic adds a unit and, with segments, its crosses with each
            rest = len(indices) - dense - self.prefix - self.segments
            units = rest // (self.unit_length + self.segments)
        first = dense + self.prefix
        numeric = range(self.names_per_unit, self.unit_length)
        return tuple(
            (start, *(start + k for k in numeric))
            for start in range(first, first + units * self.unit_length, self.unit_length)
        )


class FeatureBatch:
    """The vectors of several offers for one request, laid end to end: what the dot product
    needs in one pass, without an object per offer; ``vector(i)`` gives one on its own."""

    __slots__ = ("_bounds", "_indices", "_layout", "_values")

    def __init__(
        self,
        indices: array[int],
        values: array[float],
        bounds: list[int],
        layout: BlockLayout | None = None,
    ) -> None:
        self._indices = indices
        self._values = values
        self._bounds = bounds  # vector i is [bounds[i], bounds[i + 1])
        self._layout = layout  # None without numeric context: no blocks

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def vector(self, i: int) -> SparseVector:
        start, stop = self._bounds[i], self._bounds[i + 1]
        indices = tuple(self._indices[start:stop])
        blocks = self._layout.blocks(indices) if self._layout else ()
        return SparseVector(indices, tuple(self._values[start:stop]), blocks)

    def dot(self, theta: FloatArray) -> FloatArray:
        """theta . x for each vector, in one vectorised pass (as ``dot_many``)."""
        if not len(self):
            return np.zeros(0)
        idx = np.frombuffer(self._indices, dtype=np.int64)
        vals = np.frombuffer(self._values, dtype=np.float64)
        return np.add.reduceat(theta[idx] * vals, self._bounds[:-1])

    def spread(self, variance: FloatArray) -> FloatArray:
        """sqrt(sum_i x_i^2 variance_i) for each vector: the width of the model's estimate
        of x's reward when its weights have these variances and are taken as uncorrelated
        (``bandit.LinearModel.bonus``). One gather and one reduce, as ``dot``."""
        if not len(self):
            return np.zeros(0)
        idx = np.frombuffer(self._indices, dtype=np.int64)
        vals = np.frombuffer(self._values, dtype=np.float64)
        return np.sqrt(np.add.reduceat(variance[idx] * (vals * vals), self._bounds[:-1]))


def _unit_names(
    unit: str,
    channel: str,
    placement: str,
    hour_bucket: int,
    categorical: tuple[tuple[str, str], ...],
) -> Iterable[str]:
    yield unit
    yield f"{unit}|c:{channel}"
    if placement:
        yield f"{unit}|p:{placement}"
    yield f"{unit}|h:{hour_bucket}"
    for key, value in categorical:
        yield f"{unit}|k:{key}={value}"


def dot_many(theta: FloatArray, vectors: Sequence[SparseVector]) -> FloatArray:
    """theta . x for each sparse x, in one vectorised pass."""
    indices = array("q", chain.from_iterable(v.indices for v in vectors))
    values = array("d", chain.from_iterable(v.values for v in vectors))
    bounds = [0, *accumulate(len(v.indices) for v in vectors)]
    return FeatureBatch(indices, values, bounds).dot(theta)
