"""The profile line of ``tactful import`` and ``tactful export --profiles``: one JSON object
per line::

    {"user_id": "u1",
     "attributes": {"country": "FR",
                    "persona": {"value": "runner", "source": "STATED",
                                "updated_at": "2026-11-20T10:00:00Z"}},
     "topic_preferences": [{"topic": "running", "stance": "LIKE"}],
     "channel_preferences": [{"channel": "email", "opted_in": false}],
     "max_messages_per_day": 3,
     "quiet_hours": {"start_hour": 22, "end_hour": 7, "time_zone": "Europe/Paris"},
     "consent": {"inferred_personalization": true},
     "signals": [{"topic": "yoga", "weight": 2.5, "observed_at": "2026-11-20T10:00:00Z"}]}

Only ``user_id`` is required; a field left out leaves what is stored as it is (a merge, as
the API merges). An attribute is a string (its source is then ``IMPORTED``: a file is a
system of record) or an object with ``value``, ``source`` (``STATED`` or ``IMPORTED``) and
``updated_at``; an empty value removes it. Stances are ``LIKE``, ``DISLIKE`` or ``NEUTRAL``
(clears). Times are ISO 8601 (UTC unless they say otherwise) or epoch seconds; an
``updated_at`` or ``observed_at`` left out is the time the import started. Every line is
checked by the API's own rules (``validation``): a bad line is reported as
``line N: <field>: <problem>``.

Reading a line (``parse_line``) takes the fast path (``fast``) for a line it accepts and the
general path (``general``), which names every problem, for any other; writing one is
``to_line`` (``write``).
"""

from __future__ import annotations

import orjson

from tactful.domain import ProfileRecord
from tactful.errors import FieldViolation, InvalidArgument
from tactful.profile_line.fast import _fast_record
from tactful.profile_line.general import _general_record
from tactful.profile_line.write import to_line

__all__ = ["parse_line", "to_line"]


def parse_line(raw: bytes | str, now: float) -> ProfileRecord:
    """One line as a validated record, or ``InvalidArgument`` with every problem found:
    first its shape (JSON types, unknown fields), then, if the shape is right, the API's
    rules. ``now`` stamps what the line gives no time for."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(
            [FieldViolation("", f"not valid JSON ({exc.msg}, column {exc.colno})")]
        ) from None
    if not isinstance(data, dict):
        raise InvalidArgument([FieldViolation("", "must be a JSON object")])
    record = _fast_record(data, now)
    if record is not None:
        return record
    return _general_record(data, now)
