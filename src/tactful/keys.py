"""Every Redis key tactful uses is built here.

All keys of one user share the hash tag ``{u:<digest>}`` so multi-key scripts and
transactions on a user stay in one Redis Cluster slot; the catalog shares ``{catalog}``, a
decision and its outcomes share ``{d:<decision_id>}``, and the model, the learner and the
reward stream share ``{model}``. Every script's KEYS and every MULTI/EXEC stay inside one of
these tags (tests/test_cluster.py runs the API on a real cluster, where redis-py refuses
anything else); only non-transactional pipelines span tags. User ids are digested (not
keyed: this is for fixed-length, cluster-safe keys, not for secrecy) so any byte string is a
safe id.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

PREFIX = "tactful"

CATALOG_OFFERS = f"{PREFIX}:{{catalog}}:offers"
CATALOG_VERSION = f"{PREFIX}:{{catalog}}:version"
# hash: segment_id -> JSON of the segment (its rule in canonical form). Next to the offers, so a
# write that checks one against the other is one script in one slot, and bumps the version
# every process reloads offers and segments together on.
CATALOG_SEGMENTS = f"{PREFIX}:{{catalog}}:segments"


# The model and the learner share the {model} slot, so a publish or a checkpoint (with the
# XACK of what it applied) is one MULTI/EXEC.
MODEL_CURRENT = f"{PREFIX}:{{model}}:current"  # string: the version servers decide with
MODEL_SEQ = f"{PREFIX}:{{model}}:seq"  # counter of published versions
MODEL_VERSIONS = f"{PREFIX}:{{model}}:versions"  # zset: version -> published at
MODEL_PINNED = f"{PREFIX}:{{model}}:pinned"  # set by a rollback: the learner stops publishing
LEARNER_STATE = f"{PREFIX}:{{model}}:learner"  # the learner's saved state and its epoch
LEARNER_DELTAS = f"{PREFIX}:{{model}}:deltas"  # list: learners' deltas not in the state yet
OUTCOME_STREAM = f"{PREFIX}:{{model}}:rewards"  # stream of rewards to learn from
LEARNER_GROUP = "learner"
LEARNER_LEASE = f"{PREFIX}:{{model}}:lease"  # who is the one active learner
AWAITING = f"{PREFIX}:{{model}}:awaiting"  # zset: decision_id -> reward window end
# hash: decision_id -> JSON list of the offers whose reward went to the learner, while the
# decision's reward window is open (closing it, or erasure, removes the field). Next to the
# stream, so "send once per offer" is one script in one slot.
LEARNED = f"{PREFIX}:{{model}}:learned"


#: What every model snapshot's key begins with: the version follows (``model_snapshot``). The
#: publish script drops old versions by it.
MODEL_SNAPSHOTS = f"{PREFIX}:{{model}}:snapshot:"


def model_snapshot(version: int) -> str:
    return f"{MODEL_SNAPSHOTS}{version}"


def rate_bucket(key_digest: bytes) -> str:
    """The token bucket of one API key (by the sha256 digest the settings hold)."""
    return f"{PREFIX}:{{rl:{key_digest.hex()[:32]}}}:bucket"


#: How every key of a user begins: the user's digest follows, up to the closing brace.
USER_PREFIX = f"{PREFIX}:{{u:"
#: A SCAN pattern that matches every user's profile hash.
USER_PROFILES = f"{USER_PREFIX}*}}:profile"


def user_digest(user_id: str) -> str:
    return hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class UserKeys:
    profile: str  # hash: stated preferences, consent, limits
    signals: str  # hash: topic -> "weight|observed_at"
    contacts: str  # hash: "window_start|channel|offer_id" -> count
    requests: str  # hash: request_id -> decision_id (Decide idempotency)
    cooldowns: str  # hash: "o:<offer_id>" / "t:<topic>" -> until (after a DISMISS)
    decisions: str  # set: decision ids logged before ``decided`` existed (erasure reads it)
    attributes: str  # hash: name -> "source|updated_at|value" (store/lua/set_attributes.lua)
    # zset: the user's logged decision ids by time, so erasure can reach them (pruned and
    # capped as they are logged: see store/lua/log_decision.lua)
    decided: str
    requested: str  # zset: the request ids of ``requests`` by time (to prune them)
    # zset (one per cluster slot, shared): digests of users erased lately -> erased at; the
    # fence every write of a user checks (store/lua/erase_user.lua)
    erased: str
    digest: str  # the user's digest, as the key names hold it

    @classmethod
    def of(cls, user_id: str) -> UserKeys:
        return cls.of_digest(user_digest(user_id))

    @classmethod
    def of_digest(cls, digest: str) -> UserKeys:
        """The user's keys from the digest a decision log keeps (so an outcome can reach the
        user's cooldowns without the user id)."""
        base = f"{USER_PREFIX}{digest}}}"
        return cls(
            f"{base}:profile",
            f"{base}:signals",
            f"{base}:contacts",
            f"{base}:requests",
            f"{base}:cooldowns",
            f"{base}:decisions",
            f"{base}:attributes",
            f"{base}:decided",
            f"{base}:requested",
            erasure_fence(f"{base}:profile"),
            digest,
        )

    def all(self) -> tuple[str, ...]:
        """Every key of the user: what erasure deletes (the fence is not the user's own)."""
        return (
            self.profile,
            self.signals,
            self.contacts,
            self.requests,
            self.cooldowns,
            self.decisions,
            self.attributes,
            self.decided,
            self.requested,
        )


@dataclass(frozen=True, slots=True)
class DecisionKeys:
    record: str  # string: the logged decision, JSON
    outcomes: str  # hash: outcome_id -> outcome JSON
    # string: the digest of the user's keys (``UserKeys.of_digest``), so a DISMISS reaches
    # their cooldowns; kept out of the record, which reports and exports read
    owner: str

    @classmethod
    def of(cls, decision_id: str) -> DecisionKeys:
        return cls._of_base(f"{PREFIX}:{{d:{decision_id}}}")

    @classmethod
    def of_record(cls, record: str) -> DecisionKeys:
        """The keys of the decision whose record is ``record`` (a key SCAN found by
        ``decision_records()``), without reading the decision id out of it."""
        return cls._of_base(record.removesuffix(":decision"))

    @classmethod
    def _of_base(cls, base: str) -> DecisionKeys:
        return cls(f"{base}:decision", f"{base}:outcomes", f"{base}:owner")


def digest_of(user_key: str) -> str:
    """The user digest a key of ``UserKeys`` holds (one SCAN found)."""
    return user_key[len(USER_PREFIX) : user_key.index("}")]


def import_keys(digest: str) -> tuple[str, str, str, str]:
    """The keys a bulk import writes for one user, as ``UserKeys.of_digest`` names them:
    profile, attributes, signals, and the erasure fence of their slot. Built alone because an
    import builds them for every line, and needs none of the user's other keys."""
    base = f"{USER_PREFIX}{digest}}}"
    profile = f"{base}:profile"
    return profile, f"{base}:attributes", f"{base}:signals", erasure_fence(profile)


def decision_records() -> str:
    """The SCAN pattern of every decision's record (``DecisionKeys.record``)."""
    return f"{PREFIX}:{{d:*}}:decision"


def erasure_fence(user_key: str) -> str:
    """The erasure fence of the cluster slot ``user_key`` lives in: a key in that slot (so a
    user's scripts can read it) whose name holds no user's digest (so that once a user is
    erased, no key name holds theirs: ``tests/test_profiles.py``)."""
    return f"{PREFIX}:{{{_slot_tags()[key_slot(user_key.encode())]}}}:erased"


def prepare() -> None:
    """Work out the erasure fences' hash tags now (a server calls it as it starts) rather than
    on the first request that needs one."""
    _slot_tags()


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    """For each of the 16,384 cluster slots, a short hash tag that maps to it: found once
    per process by trying ``f0``, ``f1``, ... (about 170,000 tries, 0.2 s)."""
    tags: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    missing = REDIS_CLUSTER_HASH_SLOTS
    i = 0
    while missing:
        tag = f"f{i}"
        slot = key_slot(tag.encode())
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        i += 1
    return tuple(t for t in tags if t is not None)
