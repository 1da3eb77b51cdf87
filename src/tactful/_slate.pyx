# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True
"""The slate draw of a Decide, compiled: ``bandit.pick_slate_reference`` without a numpy
call per slot (on arrays of ~50, each call's dispatch costs more than its work).

It gives the reference's picks and propensities bit for bit, for the same scores and the
same random stream: every sum is numpy's pairwise summation (``_sum``), the cumulative sums
and the lookup are numpy's, each float operation is the reference's in the same order, and
the build turns off contraction into fused multiply-adds (``pyproject.toml``). A property
test holds the two together (tests/test_slate_kernel.py).
"""

from libc.math cimport isnan
from libc.stdlib cimport free, malloc

cdef Py_ssize_t BLOCK = 128  # numpy's PW_BLOCKSIZE


cdef double _sum(const double* a, Py_ssize_t n) noexcept nogil:
    """numpy's pairwise summation of a contiguous float64 array (``ndarray.sum``)."""
    cdef Py_ssize_t i, j, half
    cdef double res
    cdef double r[8]
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[i]
        return res
    if n <= BLOCK:
        for j in range(8):
            r[j] = a[j]
        i = 8
        while i < n - (n % 8):
            for j in range(8):
                r[j] += a[i + j]
            i += 8
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        while i < n:
            res += a[i]
            i += 1
        return res
    half = n // 2
    half -= half % 8
    return _sum(a, half) + _sum(a + half, n - half)


cdef Py_ssize_t _argmax(const double* a, Py_ssize_t n) noexcept nogil:
    """numpy's argmax: the first largest, or the first NaN."""
    cdef Py_ssize_t i, best = 0
    if isnan(a[0]):
        return 0
    for i in range(1, n):
        if isnan(a[i]):
            return i
        if a[i] > a[best]:
            best = i
    return best


cdef void _igw(const double* scores, Py_ssize_t n, Py_ssize_t best, double gamma,
               double* probs) noexcept nogil:
    """bandit._igw."""
    cdef Py_ssize_t i
    cdef double top = scores[best]
    for i in range(n):
        probs[i] = 1.0 / (<double>n + gamma * (top - scores[i]))
    probs[best] = 0.0
    probs[best] = 1.0 - _sum(probs, n)


cdef Py_ssize_t _draw(const double* probs, Py_ssize_t n, double u, double* cdf) noexcept nogil:
    """bandit.draw with its uniform number ``u``: the cumulative sums, normalised by their
    last, and the first one above ``u`` (``searchsorted(side="right")``)."""
    cdef Py_ssize_t i
    cdef double total = 0.0
    for i in range(n):
        total += probs[i]
        cdf[i] = total
    total = cdf[n - 1]
    for i in range(n):
        cdf[i] = cdf[i] / total
    for i in range(n):
        if cdf[i] > u:
            return i
    return n


cdef double _py_min(double a, double b) noexcept nogil:
    """Python's min(a, b): a unless b < a (so a NaN first stays)."""
    return b if b < a else a


cdef double _py_max(double a, double b) noexcept nogil:
    """Python's max(a, b): a unless b > a."""
    return b if b > a else a


cdef double _gamma_for_share(const double* scores, Py_ssize_t k, Py_ssize_t best,
                             double gamma, double share, double max_gamma, double* gaps,
                             double* terms) noexcept nogil:
    """bandit.gamma_for_share."""
    cdef Py_ssize_t i, m = 0, step
    cdef double gap, explore, slope, top = scores[best]
    for i in range(k):
        gap = top - scores[i]
        if gap > 0:
            gaps[m] = gap
            m += 1
    for step in range(4):
        for i in range(m):
            terms[i] = 1.0 / (<double>k + gamma * gaps[i])
        explore = _sum(terms, m)
        if explore <= share * 1.01:
            return gamma
        for i in range(m):
            terms[i] = gaps[i] * terms[i] * terms[i]
        slope = _sum(terms, m)
        if slope <= 0.0:
            break
        gamma = _py_min(
            gamma + (1.0 / share - 1.0 / explore) * explore * explore / slope, max_gamma
        )
    for i in range(m):
        terms[i] = 1.0 / (<double>k + gamma * gaps[i])
    if _sum(terms, m) <= share * 1.01:
        return gamma
    for i in range(m):
        terms[i] = 1.0 / gaps[i]
    return _py_min(_py_max(gamma, _sum(terms, m) / share), max_gamma)


def pick_slate(const double[::1] predicted, Py_ssize_t slots, double gamma, rng,
               double share, double max_gamma):
    """bandit.pick_slate_reference (``max_gamma``: bandit.MAX_GAMMA): the slate as (index,
    propensity, explored) triples."""
    cdef Py_ssize_t n = predicted.shape[0], left = n, slot, i, at, best
    cdef double u
    cdef list picks = []
    if n == 0 or slots <= 0:
        return picks
    # One block for the scores left, their positions, and three work arrays.
    cdef double* work = <double*>malloc(4 * n * sizeof(double))
    cdef Py_ssize_t* remaining = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
    if work == NULL or remaining == NULL:
        free(work)
        free(remaining)
        raise MemoryError()
    cdef double* scores = work
    cdef double* probs = work + n
    cdef double* spare = work + 2 * n
    cdef double* spare2 = work + 3 * n
    try:
        for i in range(n):
            scores[i] = predicted[i]
            remaining[i] = i
        if share < 1.0 and n > 1:
            gamma = _gamma_for_share(
                scores, n, _argmax(scores, n), gamma, share, max_gamma, spare, spare2
            )
        for slot in range(slots if slots < n else n):
            best = _argmax(scores, left)
            _igw(scores, left, best, gamma, probs)
            if left > 1:
                u = rng.random()
                at = _draw(probs, left, u, spare)
            else:
                at = 0
            if at >= left:  # NaN probabilities: where the reference's lookup fails too
                raise IndexError("no offer drawn")
            picks.append((remaining[at], probs[at], scores[at] < scores[best]))
            for i in range(at, left - 1):
                scores[i] = scores[i + 1]
                remaining[i] = remaining[i + 1]
            left -= 1
    finally:
        free(work)
        free(remaining)
    return picks
