"""The reward stream's packed vectors: what the server writes is what the learner reads,
whole reads at once, and anything else is refused rather than misread."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tactful.batches import batch_from_arrays, batch_of
from tactful.store import reward_vectors


@st.composite
def vectors(draw):
    n = draw(st.integers(0, 40))
    indices = draw(st.lists(st.integers(0, 2**24 - 1), min_size=n, max_size=n))
    values = draw(
        st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=n, max_size=n)
    )
    blocks = []
    if n:
        position = st.integers(0, n - 1)
        blocks = draw(st.lists(st.lists(position, min_size=1, max_size=6), max_size=3))
    return [indices, values, blocks] if blocks else [indices, values]


@given(st.lists(vectors(), max_size=12))
def test_a_read_of_packed_vectors_is_the_batch_of_their_json(read):
    """The fast path (one decode for the whole read) gives exactly the batch the JSON of
    the same vectors gives, and each vector alone reads back as it was written."""
    rewards = [float(k % 2) for k in range(len(read))]
    packed = [reward_vectors.pack(v).encode() for v in read]
    fast = batch_from_arrays(*reward_vectors.unpack(packed), rewards)
    slow = batch_of([reward_vectors.vector_of(orjson.dumps(v)) for v in read], rewards)
    for name in fast.__dataclass_fields__:
        assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    for vector, field in zip(read, packed, strict=True):
        indices, values, blocks = reward_vectors.vector_of(field)
        assert (indices, values, blocks) == (vector[0], vector[1], vector[2:] and vector[2])


def test_decoded_replies_read_as_raw_ones():
    """Clients that decode replies (claims, a learner's own pending entries) get str."""
    vector = [[3, 9], [1.0, -0.5], [[0, 1]]]
    field = reward_vectors.pack(vector)
    assert reward_vectors.vector_of(field) == reward_vectors.vector_of(field.encode())


GOOD = reward_vectors.pack([[1, 2], [1.0, 2.0], [[0, 1]]])


@pytest.mark.parametrize(
    "field",
    [
        "",
        GOOD[:-16],  # cut short
        GOOD + "00" * 8,  # longer than its header says
        "zz" + GOOD[2:],  # not hex
        "00" * 8 + GOOD[16:],  # no magic
        GOOD[:24] + "09" + GOOD[26:],  # more blocks than the positions hold
        GOOD + "0",  # an odd number of digits
    ],
)
def test_a_field_that_is_not_a_whole_packed_vector_is_refused(field):
    with pytest.raises(ValueError):
        reward_vectors.unpack([GOOD, field])
    if field != GOOD:
        with pytest.raises((ValueError, TypeError, IndexError)):
            reward_vectors.vector_of(field)
