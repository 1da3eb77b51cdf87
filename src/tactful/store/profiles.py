"""The store's profile operations: reading a profile, the merges of SetPreferences,
SetAttributes and RecordSignals, erasure, and the bulk import and export."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis.exceptions

from tactful import keys, validation
from tactful.domain import (
    AttributesUpdate,
    PreferencesUpdate,
    Profile,
    ProfileRecord,
    Signal,
)
from tactful.errors import FieldViolation, InvalidArgument
from tactful.store import codecs
from tactful.store.base import RedisBase, check_not_erased
from tactful.store.types import ProfileWrite

#: How long an erased user stays on the erasure fence (``lua/includes/fence.lua``): longer than
#: any call that was in flight during the erasure can still be writing.
ERASURE_FENCE_SECONDS = 300.0

Command = tuple[Any, ...]


class ProfileOperations(RedisBase):
    def get_profile(self, *, user_id: str) -> Profile:
        k = keys.UserKeys.of(user_id)

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for command in codecs.profile_reads(k):
                pipe.execute_command(*command)
            return pipe.execute()

        replies = self._run("get_profile", read, budget=self.write)
        return codecs.decode_profile_replies(user_id, replies)

    def set_preferences(self, *, update: PreferencesUpdate, now: float) -> Profile:
        """Merge the preferences and return the profile right after, atomically (one script:
        all or nothing, and no concurrent writer in between). A call that would leave the
        user more topic stances or channel choices than ``validation`` allows writes nothing
        and raises ``InvalidArgument`` naming the bound."""
        k = keys.UserKeys.of(update.user_id)
        args = [k.digest, repr(now), *codecs.preferences_args(update, now)]
        # Idempotent: every field is set to a value stamped with ``now``, taken once.
        reply = self._merge_into_profile(
            "set_preferences",
            self._set_preferences,
            [k.profile, k.signals, k.contacts, k.cooldowns, k.attributes, k.erased],
            args,
        )
        if not int(reply[0]):
            field, what, limit = (
                ("topic_preferences", "topic stances", validation.MAX_TOPIC_PREFERENCES_PER_USER)
                if reply[1] == "t"
                else (
                    "channel_preferences",
                    "channel choices",
                    validation.MAX_CHANNEL_PREFERENCES_PER_USER,
                )
            )
            raise InvalidArgument(
                [
                    FieldViolation(
                        field,
                        f"a user holds at most {limit} {what}; this would leave {reply[2]} "
                        "(set some to NEUTRAL first)",
                    )
                ]
            )
        return codecs.decode_profile_replies(update.user_id, reply[1:])

    def _merge_into_profile(
        self, operation: str, script: Callable[..., Any], user_keys: list[str], args: list[Any]
    ) -> Any:
        """Run a fenced script that merges into a user's profile and answers ``[ok, hashes of
        the profile right after ...]`` (or the bound it would pass): on the write budget,
        retried (the merges are idempotent); ``Aborted`` if the user was erased meanwhile."""
        reply = self._run(operation, lambda: script(keys=user_keys, args=args), budget=self.write)
        return check_not_erased(reply)

    def set_attributes(self, *, update: AttributesUpdate, now: float, limit: int) -> Profile:
        """Merge the attributes (STATED outranks IMPORTED, an empty value removes; see
        ``lua/set_attributes.lua``) and return the profile right after, atomically. A merge that
        would leave the user more than ``limit`` attributes writes nothing and raises
        ``InvalidArgument``."""
        k = keys.UserKeys.of(update.user_id)
        args = [k.digest, repr(now), *codecs.attributes_args(update, now, limit)]
        # Idempotent: the same values with the same stamp, and the cap counts what they leave.
        reply = self._merge_into_profile(
            "set_attributes",
            self._set_attributes,
            [k.attributes, k.profile, k.signals, k.contacts, k.cooldowns, k.erased],
            args,
        )
        if not int(reply[0]):
            raise InvalidArgument(
                [
                    FieldViolation(
                        "attributes",
                        f"a user holds at most {limit} attributes; this would leave {reply[1]}",
                    )
                ]
            )
        return codecs.decode_profile_replies(update.user_id, reply[1:])

    def record_signals(
        self, *, user_id: str, signals: Sequence[Signal], now: float | None = None
    ) -> bool:
        """Keep the signals if the user consented; False (and nothing kept) otherwise.
        ``now``: when the call began (for the erasure fence)."""
        k = keys.UserKeys.of(user_id)
        started = time.time() if now is None else now
        args = [k.digest, repr(started), *codecs.signals_args(signals, self._half_life)]
        # Not idempotent: observations add up, so a second attempt after a timeout could
        # count them twice. Tried again only when the first was never sent.
        kept = int(
            self._run(
                "record_signals",
                lambda: check_not_erased(
                    self._record_signals(keys=[k.signals, k.profile, k.erased], args=args)
                ),
                budget=self.write,
                idempotent=False,
            )
        )
        if kept < 0:
            limit = validation.MAX_SIGNAL_TOPICS_PER_USER
            raise InvalidArgument(
                [
                    FieldViolation(
                        "signals",
                        f"a user holds signals of at most {limit} topics; this would leave {-kept}",
                    )
                ]
            )
        return bool(kept)

    def delete_profile(self, *, user_id: str, now: float | None = None) -> None:
        """Erasure: the user's keys, and every decision logged for them with its outcomes
        (they hold a pseudonym and the request context). First, atomically in the user's
        slot, the user goes on the erasure fence and their keys go; then the decisions their
        index names, in their own slots; then the index. A call that was in flight meanwhile
        (started before ``now``) cannot write anything of the user again: every script that
        writes a user's keys checks the fence. Idempotent: retried, it finds what is left."""
        k = keys.UserKeys.of(user_id)
        at = time.time() if now is None else now

        # Its decision indexes last: the script returns what they name, then deletes the rest.
        user_keys = [k.erased, k.profile, k.signals, k.contacts, k.requests, k.cooldowns]
        user_keys += [k.attributes, k.requested, k.decisions, k.decided]
        fence: list[Any] = [k.digest, repr(at), ERASURE_FENCE_SECONDS]
        ids: Any = self._run(
            "delete_profile",
            lambda: self._erase_user(keys=user_keys, args=fence),
            budget=self.write,
        )
        if ids:
            self._forget_decisions(user_id, [str(i) for i in ids])

    # --- bulk import and export ---------------------------------------------------------

    def write_profiles(
        self, records: Sequence[ProfileRecord], *, limit: int, started: float | None = None
    ) -> list[ProfileWrite]:
        """Write validated profile records (``tactful import``) in ONE round trip: one
        ``lua/import_profile.lua`` call per user, all its keys in the user's slot, sent as a
        non-transactional pipeline (on a cluster, each node gets its users' calls). Per user,
        atomically: the profile hash as SetPreferences writes it (with the user id), the
        signals deleted if consent is withdrawn, the attributes through SetAttributes' own
        merge (one per source and time, so STATED outranks IMPORTED and the per-user cap
        holds as in the API), then the signals as RecordSignals' script writes them in its
        replacing mode (kept only with consent, read after the profile was written). Not all
        or nothing per batch: every write sets a state, so a failed batch is repaired by
        writing it again."""
        sha = self._import_profile.sha
        fence_at = repr(time.time() if started is None else started)  # the erasure fence
        commands: list[Command] = []
        for record in records:
            digest = keys.user_digest(record.user_id)
            profile, attributes, signals, fence = keys.import_keys(digest)
            commands.append(
                ("EVALSHA", sha, 4, profile, attributes, signals, fence, digest, fence_at,
                 *codecs.import_args(record, limit))
            )  # fmt: skip

        def write() -> list[Any]:
            try:
                return self._round_trip(commands)
            except redis.exceptions.NoScriptError:
                # A Redis that never ran the script (or restarted): load it and write the
                # batch again, which sets the same state.
                self.client.script_load(self._import_profile.script)
                return self._round_trip(commands)

        replies = self._run("write_profiles", write, budget=self.write)
        return [codecs.profile_write(reply) for reply in replies]

    def scan_profiles(self, *, batch: int = 500) -> Iterator[tuple[str | None, Profile]]:
        """Every stored profile (preferences, consent, attributes, signals as stored: weight
        at observed_at) with the user id kept in its profile hash: None for a profile whose
        hash holds none (keys only hold a digest). Found with SCAN (on a cluster, redis-py
        scans every primary), read ``batch`` users per round trip; SCAN may return a user
        twice while Redis resizes its table (harmless to an import)."""
        found: list[str] = []
        for key in self.client.scan_iter(match=keys.USER_PROFILES, count=1000):
            found.append(key)
            if len(found) >= batch:
                yield from self._read_profiles(found)
                found = []
        if found:
            yield from self._read_profiles(found)

    def _read_profiles(self, profile_keys: Sequence[str]) -> Iterator[tuple[str | None, Profile]]:
        users = [keys.UserKeys.of_digest(keys.digest_of(key)) for key in profile_keys]
        commands: list[Command] = []
        for k in users:
            commands += (("HGETALL", k.profile), ("HGETALL", k.signals), ("HGETALL", k.attributes))
        replies = self._run("scan_profiles", lambda: self._round_trip(commands), budget=self.write)
        for i in range(0, len(replies), 3):
            fields = codecs.as_dict(replies[i])
            if not fields:  # deleted since the SCAN found it
                continue
            user_id = fields.get("user_id")
            signals, attributes = codecs.as_dict(replies[i + 1]), codecs.as_dict(replies[i + 2])
            yield user_id, codecs.decode_profile(user_id or "", fields, signals, {}, {}, attributes)
