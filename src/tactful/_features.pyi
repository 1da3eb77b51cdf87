# The compiled per-offer loops of a Decide's features (_features.pyx): their signatures for
# the type checker (the references in tactful.features say what they do).
from array import array
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

def offer_rows(
    offers: list[Any],
    liked: list[bool],
    inferred: list[float],
    contacts_today: int,
    contacts: float,
    table: dict[str, tuple[tuple[str, ...], array[int]]],
    indices_of: Callable[[Any], array[int]],
    hashed_values: dict[int, array[float]],
    values_of: Callable[[int], array[float]],
    segment_indices: array[int],
    crossed_of: Callable[[Any], array[int]] | None,
) -> tuple[array[int], array[float], list[int]]: ...
def evidence(
    offers: Sequence[Any], liked_topics: AbstractSet[str], inferred: Mapping[str, float]
) -> tuple[list[bool], list[float]]: ...
def evidence_at(
    at: Any,
    topic_start: Any,
    topic_ids: Any,
    liked_topic: Any,
    strength_of_topic: Any,
) -> tuple[list[bool], list[float]]: ...
