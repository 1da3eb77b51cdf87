"""The compiled slate draw (``tactful._slate``) against its pure-Python reference
(``bandit.pick_slate_reference``): the same picks and the same propensities, bit for bit, for
the same scores and the same random stream; and the same numbers drawn from that stream."""

from __future__ import annotations

import shutil
import sysconfig

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tactful import bandit
from tactful.bandit import MAX_GAMMA, pick_slate, pick_slate_reference

# Where there is a C compiler, the install must have built the kernel: these tests fail
# rather than pass against the reference. Without one they say so and skip.
COMPILER = shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0])
pytestmark = pytest.mark.skipif(
    not bandit.COMPILED and COMPILER is None,
    reason="no C compiler: the slate draw runs its pure-Python reference",
)


def test_the_kernel_is_built():
    assert bandit.COMPILED, "a C compiler is here, but tactful._slate was not built"


# Scores as Decide makes them (predicted reward plus a bonus: around 0 to 1), with ties,
# and sizes past numpy's pairwise-summation block (128) so every branch of the sum runs.
SCORES = st.lists(
    st.one_of(
        st.floats(-1.0, 2.0, allow_nan=False),
        st.sampled_from([0.0, 0.1, 0.1 + 1e-12, 0.5, 1.0, 5e-324]),
    ),
    min_size=1,
    max_size=300,
)
GAMMA = st.one_of(
    st.floats(0.0, 1e6, allow_nan=False), st.sampled_from([0.0, 1.0, 100.0, 1e12, MAX_GAMMA])
)
SHARE = st.one_of(st.floats(0.001, 1.0), st.sampled_from([0.1, 1.0]))


@settings(max_examples=400, deadline=None)
@given(SCORES, st.integers(1, 6), GAMMA, SHARE, st.integers(0, 2**64 - 1))
@example([0.2, 0.2 - 1e-310, 0.1], 2, 100.0, 0.1, 1)  # a subnormal gap
@example([0.3] * 200, 3, 1e12, 0.1, 2)  # all tied, past one summation block
def test_the_kernel_draws_the_reference_slate_bit_for_bit(scores, slots, gamma, share, seed):
    predicted = np.array(scores)
    compiled_rng, reference_rng = (np.random.default_rng(seed) for _ in "ab")
    compiled = pick_slate(predicted, slots, gamma, compiled_rng, share)
    reference = pick_slate_reference(predicted, slots, gamma, reference_rng, share)
    assert [(p.index, p.propensity, bool(p.explored)) for p in compiled] == [
        (p.index, p.propensity, bool(p.explored)) for p in reference
    ]
    # Both took as many numbers from the stream: the next one is the same.
    assert compiled_rng.random() == reference_rng.random()


def test_an_empty_candidate_list_draws_nothing():
    rng = np.random.default_rng(0)
    assert pick_slate(np.zeros(0), 3, 10.0, rng, 0.1) == []
    assert pick_slate_reference(np.zeros(0), 3, 10.0, rng, 0.1) == []
