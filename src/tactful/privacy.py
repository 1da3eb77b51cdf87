"""Pseudonyms for user ids: a keyed hash, so logs and the decision log never hold an id in
clear and cannot be reversed by hashing a list of candidate ids without the key."""

from __future__ import annotations

import hashlib
import hmac


class Pseudonymizer:
    def __init__(self, key: str) -> None:
        self._key = key.encode()

    def __call__(self, user_id: str) -> str:
        digest = hmac.new(self._key, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return digest.hexdigest()[:24]


def in_control_group(user_id: str, *, salt: str, share: float) -> bool:
    """Deterministic arm assignment: the same user and salt give the same arm in every
    process and after restarts; a new salt reshuffles (a new experiment)."""
    if share <= 0:
        return False
    digest = hashlib.blake2b(f"{salt}\x00{user_id}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / 2**64 < share
