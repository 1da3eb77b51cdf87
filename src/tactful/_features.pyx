# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The per-offer loops of a Decide's features, compiled: ``features.offer_rows_reference``
and ``features.evidence_reference`` without the interpreter's dispatch on every offer (a
Decide runs them over every candidate, ~50 to 1,000).

They give their references' results exactly: the same Python objects are read in the same
order (the caches are the caller's dicts, filled through the same callables), and each float
is the reference's one operation. A property test holds them together
(tests/test_feature_kernel.py).
"""

from cpython cimport array

import array as _array

cdef array.array _LONGS = _array.array("q")
cdef array.array _DOUBLES = _array.array("d")

# The dense features' indices (``features``: bias, explicit_like, inferred_interest,
# priority, contacts_today).
cdef long long BIAS = 0, EXPLICIT_LIKE = 1, INFERRED_INTEREST = 2, PRIORITY = 3
cdef long long CONTACTS_TODAY = 4


def offer_rows(
    list offers,
    list liked,
    list inferred,
    long long contacts_today,
    double contacts,
    dict table,
    indices_of,
    dict hashed_values,
    values_of,
    array.array segment_indices,
    crossed_of,
):
    """See ``features.offer_rows_reference``."""
    cdef Py_ssize_t i, n = len(offers)
    if len(liked) != n or len(inferred) != n:
        raise ValueError("offers, liked and inferred differ in length")
    cdef array.array indices = array.clone(_LONGS, 0, False)
    cdef array.array values = array.clone(_DOUBLES, 0, False)
    cdef list bounds = [0]
    cdef long long dense_indices[5]
    cdef double dense_values[5]
    cdef int k
    cdef double strength
    cdef array.array own, hashed
    cdef object offer, topics, offer_id, cached, n_topics
    for i in range(n):
        offer = offers[i]
        dense_indices[0] = BIAS
        dense_values[0] = 1.0
        dense_indices[1] = PRIORITY
        dense_values[1] = offer.priority
        k = 2
        if liked[i]:
            dense_indices[k] = EXPLICIT_LIKE
            dense_values[k] = 1.0
            k += 1
        strength = inferred[i]
        if strength > 0:
            dense_indices[k] = INFERRED_INTEREST
            dense_values[k] = strength
            k += 1
        if contacts_today:
            dense_indices[k] = CONTACTS_TODAY
            dense_values[k] = contacts
            k += 1
        array.extend_buffer(indices, <char*> dense_indices, k)
        array.extend_buffer(values, <char*> dense_values, k)
        topics = offer.topics
        offer_id = offer.offer_id
        cached = table.get(offer_id)
        if cached is not None and (
            (<tuple> cached)[0] is topics or (<tuple> cached)[0] == topics
        ):
            own = (<tuple> cached)[1]
        else:
            own = indices_of(offer)
            table[offer_id] = (topics, own)
        array.extend(indices, own)
        n_topics = len(topics)
        hashed = hashed_values.get(n_topics)
        if hashed is None:
            hashed = values_of(n_topics)
            hashed_values[n_topics] = hashed
        if crossed_of is not None:
            array.extend(indices, segment_indices)
            array.extend(indices, crossed_of(offer))
        array.extend(values, hashed)
        bounds.append(len(indices))
    return indices, values, bounds


def evidence(offers, liked_topics, inferred):
    """See ``features.evidence_reference``."""
    cdef dict strengths_of = inferred if type(inferred) is dict else dict(inferred)
    cdef list liked = []
    cdef list strengths = []
    cdef double best, strength
    cdef bint any_liked
    cdef object offer, topic
    for offer in (offers if type(offers) is list else list(offers)):
        any_liked = False
        best = 0.0
        for topic in offer.topics:
            if not any_liked and topic in liked_topics:
                any_liked = True
            if strengths_of:
                strength = strengths_of.get(topic, 0.0)
                if strength > best:
                    best = strength
        liked.append(any_liked)
        strengths.append(best / (1.0 + best) if best > 0 else 0.0)
    return liked, strengths


def evidence_at(
    const Py_ssize_t[:] at,
    const long long[:] topic_start,
    const int[:] topic_ids,
    const unsigned char[:] liked_topic,
    const double[:] strength_of_topic,
):
    """``evidence`` for the offers at positions ``at`` of an ``OfferTable``, their topics
    as numbers: offer ``p``'s are ``topic_ids[topic_start[p]:topic_start[p + 1]]``, and
    ``liked_topic`` and ``strength_of_topic`` are the user's stances and strengths by topic
    number. The same comparisons and the same division as ``features.evidence_reference``."""
    cdef Py_ssize_t i, j, p, n = at.shape[0]
    cdef list liked = []
    cdef list strengths = []
    cdef double best, strength
    cdef bint any_liked
    cdef int topic
    for i in range(n):
        p = at[i]
        any_liked = False
        best = 0.0
        for j in range(topic_start[p], topic_start[p + 1]):
            topic = topic_ids[j]
            if liked_topic[topic]:
                any_liked = True
            strength = strength_of_topic[topic]
            if strength > best:
                best = strength
        liked.append(any_liked)
        strengths.append(best / (1.0 + best) if best > 0 else 0.0)
    return liked, strengths
