"""Bulk import and export of profiles (``tactful import``, ``tactful export --profiles``):
the line format and its checks, bad lines reported by number while the rest is imported, the
API's rules (STATED outranks IMPORTED, signals only with consent), idempotence, the export
round trip and the CLI's exit codes; on a real redis-server and on a Redis Cluster."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tactful import bulk, keys, profile_line, validation
from tactful.__main__ import main
from tactful.domain import (
    AttributeSource,
    AttributesUpdate,
    Consent,
    PreferencesUpdate,
    Profile,
    Signal,
    Stance,
    TopicPreference,
)
from tactful.errors import FieldViolation, InvalidArgument
from tactful.store.redis_store import RedisStore

from conftest import redis_url

STATED, IMPORTED = AttributeSource.STATED, AttributeSource.IMPORTED
NOW = time.time()
HOUR_AGO = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 3600))


def line(user_id: str, **fields: Any) -> str:
    return json.dumps({"user_id": user_id, **fields})


FULL = line(
    "u1",
    attributes={"country": "FR", "persona": {"value": "runner", "source": "STATED"}},
    topic_preferences=[
        {"topic": "running", "stance": "LIKE"},
        {"topic": "golf", "stance": "DISLIKE"},
    ],
    channel_preferences=[{"channel": "email", "opted_in": False}],
    max_messages_per_day=3,
    quiet_hours={"start_hour": 22, "end_hour": 7, "time_zone": "Europe/Paris"},
    consent={"inferred_personalization": True},
    signals=[{"topic": "yoga", "weight": 2.5, "observed_at": HOUR_AGO}],
)


class Bad:
    """Collects what the import reports about bad lines."""

    def __init__(self) -> None:
        self.lines: dict[int, list[FieldViolation]] = {}

    def __call__(self, number: int, violations: Any) -> None:
        self.lines[number] = list(violations)

    def text(self) -> str:
        out = io.StringIO()
        report = bulk.report_to(out)
        for number, violations in self.lines.items():
            report(number, violations)
        return out.getvalue()


def run(store: RedisStore, *lines: str, now: float = NOW, batch: int = 500) -> tuple[Any, Bad]:
    bad = Bad()
    raw = [(text + "\n").encode() for text in lines]
    summary = bulk.import_lines(store, raw, bad_line=bad, now=now, batch=batch)
    return summary, bad


def ordered(profile: Profile) -> Profile:
    """The profile with its lists sorted (the store returns them in hash order)."""
    return dataclasses.replace(
        profile,
        topic_preferences=tuple(sorted(profile.topic_preferences, key=lambda t: t.topic)),
        channel_preferences=tuple(sorted(profile.channel_preferences, key=lambda c: c.channel)),
        signals=tuple(sorted(profile.signals, key=lambda s: s.topic)),
        attributes=tuple(sorted(profile.attributes, key=lambda a: a.name)),
    )


def stored(store: RedisStore, user_id: str) -> Profile:
    return ordered(store.get_profile(user_id=user_id))


def raw_state(store: RedisStore, *user_ids: str) -> dict[str, Any]:
    """Every stored field of the users, as Redis holds it."""
    state = {}
    for user_id in user_ids:
        for key in keys.UserKeys.of(user_id).all():
            if store.client.type(key) == "hash":
                state[key] = store.client.hgetall(key)
    return state


# --- the format ----------------------------------------------------------------------------


def test_a_line_becomes_a_record_with_the_imports_defaults():
    record = bulk.parse_line(FULL, NOW)
    assert record.user_id == "u1"
    by_name = {a.name: a for a in record.attributes}
    # A bare value comes from a system of record; STATED only when the line says so.
    assert (by_name["country"].value, by_name["country"].source) == ("FR", IMPORTED)
    assert by_name["persona"].source is STATED
    assert all(a.updated_at == NOW for a in record.attributes)  # no time given: the run's
    prefs = record.preferences
    assert [(t.topic, t.stance) for t in prefs.topic_preferences] == [
        ("running", Stance.LIKE),
        ("golf", Stance.DISLIKE),
    ]
    assert prefs.max_messages_per_day == 3 and prefs.quiet_hours is not None
    assert prefs.consent == Consent(True, NOW)
    (signal,) = record.signals
    assert signal == Signal("yoga", 2.5, float(int(NOW - 3600)))
    # Only the user id is required: what a line leaves out is left as it is.
    bare = bulk.parse_line('{"user_id": "u2"}', NOW)
    assert bare.preferences == PreferencesUpdate("u2") and not bare.attributes


def test_times_are_iso_8601_or_epoch_seconds_exact_to_the_microsecond():
    text = line(
        "u1",
        consent={"inferred_personalization": True, "updated_at": "2026-01-02T03:04:05.123456Z"},
        topic_preferences=[
            {"topic": "a", "stance": "LIKE", "updated_at": "2026-01-02T04:04:05.000001+01:00"},
            {"topic": "b", "stance": "LIKE", "updated_at": "2026-01-02T03:04:05"},  # UTC
            {"topic": "c", "stance": "LIKE", "updated_at": 1767323045.5},
        ],
    )
    record = bulk.parse_line(text, NOW)
    assert record.preferences.consent is not None
    assert f"{record.preferences.consent.updated_at:.6f}" == "1767323045.123456"
    assert [f"{t.updated_at:.6f}" for t in record.preferences.topic_preferences] == [
        "1767323045.000001",
        "1767323045.000000",
        "1767323045.500000",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not json", [("", "not valid JSON")]),
        ("[1, 2]", [("", "must be a JSON object")]),
        ('{"topic_preferences": []}', [("user_id", "must not be empty")]),
        ('{"user_id": 7}', [("user_id", "must be a string")]),
        ('{"user_id": "u", "colour": "red"}', [('"colour"', "is not a field")]),
        (
            line("u", topic_preferences=[{"topic": "Running", "stance": "LOVE"}]),
            [
                ("topic_preferences[0].topic", "not a valid topic"),
                ("topic_preferences[0].stance", "must be LIKE, DISLIKE or NEUTRAL"),
            ],
        ),
        (
            line("u", topic_preferences=[{"topic": "a"}]),
            [("topic_preferences[0].stance", "is required")],
        ),
        (line("u", topic_preferences={"a": "LIKE"}), [("topic_preferences", "must be a list")]),
        (
            line("u", channel_preferences=[{"channel": "sms", "opted_in": "no"}]),
            [("channel_preferences[0].opted_in", "must be true or false")],
        ),
        (line("u", max_messages_per_day=3.0), [("max_messages_per_day", "must be an integer")]),
        (line("u", max_messages_per_day=5000), [("max_messages_per_day", "between 0 and 1000")]),
        (
            line("u", quiet_hours={"start_hour": 22, "end_hour": 7, "time_zone": "Mars/Base"}),
            [("quiet_hours.time_zone", "not a known IANA time zone")],
        ),
        (
            line("u", consent={"given": True}),
            [
                ("consent.given", "is not a field here"),
                ("consent.inferred_personalization", "is required"),
            ],
        ),
        (
            line("u", attributes={"Country": "FR"}),
            [('attributes["Country"]', "not a valid attribute name")],
        ),
        (
            line("u", attributes={"country": "F\nR"}),
            [('attributes["country"]', "control characters")],
        ),
        (
            line("u", attributes={"country": {"value": "FR", "source": "CRM"}}),
            [('attributes["country"].source', "must be STATED or IMPORTED")],
        ),
        (line("u", attributes={"country": 33}), [('attributes["country"]', "must be an object")]),
        (
            line(
                "u",
                attributes={f"a{i}": "x" for i in range(validation.MAX_ATTRIBUTES_PER_USER + 1)},
            ),
            [("attributes", "at most 128 per user")],
        ),
        (
            line("u", signals=[{"topic": "yoga", "weight": -1}]),
            [("signals[0].weight", "must be between 0 and")],
        ),
        (
            line("u", signals=[{"topic": "yoga", "weight": "2"}]),
            [("signals[0].weight", "must be a number")],
        ),
        (
            line(
                "u", signals=[{"topic": "yoga", "weight": 1, "observed_at": "2999-01-01T00:00:00Z"}]
            ),
            [("signals[0].observed_at", "must not be in the future")],
        ),
        (
            line("u", signals=[{"topic": "yoga", "weight": 1, "observed_at": "yesterday"}]),
            [("signals[0].observed_at", "not an ISO 8601 time")],
        ),
        (
            line("u", signals=[{"topic": "yoga", "weight": 1}, {"topic": "yoga", "weight": 2}]),
            [("signals[1].topic", "given twice")],
        ),
        (
            line(
                "u",
                consent={"inferred_personalization": True, "updated_at": "2999-01-01T00:00:00Z"},
            ),
            [("consent.updated_at", "between year 0001 and now")],
        ),
    ],
)
def test_a_bad_line_is_refused_with_every_problem_named(text, expected):
    with pytest.raises(InvalidArgument) as info:
        bulk.parse_line(text, NOW)
    found = [(v.field, v.description) for v in info.value.violations]
    assert len(found) == len(expected), found
    for (field, description), (want_field, want_text) in zip(found, expected, strict=True):
        assert field == want_field and want_text in description, found


def test_the_progress_line_is_drawn_only_when_asked():
    out = io.StringIO()
    progress = bulk.Progress(out, enabled=True, what="lines")
    progress.update(1500, force=True)
    assert out.getvalue().startswith("\r\x1b[K1,500 lines") and out.getvalue().endswith("/s")
    progress.clear()
    assert out.getvalue().endswith("\r\x1b[K")
    silent = io.StringIO()
    off = bulk.Progress(silent, enabled=False, what="lines")
    off.update(10, force=True)
    off.clear()
    assert silent.getvalue() == ""
    assert not bulk.show_progress(False, io.StringIO())  # not a terminal: quiet
    assert not bulk.show_progress(True)


# --- importing -----------------------------------------------------------------------------


@pytest.mark.both_stores
def test_good_lines_are_imported_as_the_api_would_store_them(store):
    summary, bad = run(store, FULL, line("u2", attributes={"tier": "gold"}))
    assert (summary.lines, summary.imported, summary.bad) == (2, 2, 0) and not bad.lines
    profile = stored(store, "u1")
    assert [(a.name, a.value, a.source) for a in profile.attributes] == [
        ("country", "FR", IMPORTED),
        ("persona", "runner", STATED),
    ]
    assert [(t.topic, t.stance) for t in profile.topic_preferences] == [
        ("golf", Stance.DISLIKE),
        ("running", Stance.LIKE),
    ]
    assert [(c.channel, c.opted_in) for c in profile.channel_preferences] == [("email", False)]
    assert profile.max_messages_per_day == 3
    assert profile.quiet_hours is not None and profile.quiet_hours.time_zone == "Europe/Paris"
    assert profile.consent.inferred_personalization
    assert [(s.topic, s.weight) for s in profile.signals] == [("yoga", 2.5)]
    assert all(a.updated_at == pytest.approx(NOW, abs=1e-6) for a in profile.attributes)
    assert stored(store, "u2").attributes[0].value == "gold"
    # The user id is kept with the profile (keys hold a digest): the export needs it.
    assert store.client.hget(keys.UserKeys.of("u1").profile, "user_id") == "u1"


@pytest.mark.both_stores
def test_bad_lines_are_reported_by_number_and_the_rest_is_imported(store):
    lines = [
        line("u1", attributes={"country": "FR"}),
        "{not json",
        "",  # blank lines are skipped, and still counted for the numbers
        line("u2", topic_preferences=[{"topic": "running", "stance": "MAYBE"}]),
        line("u3", max_messages_per_day=2),
        line("", max_messages_per_day=2),
        line("u4", attributes={"country": "DE"}),
    ]
    summary, bad = run(store, *lines, batch=2)
    assert (summary.lines, summary.imported, summary.bad) == (6, 3, 3)
    assert sorted(bad.lines) == [2, 4, 6]
    assert bad.text().splitlines() == [
        "line 2: not valid JSON (unexpected character, expected a string key, column 2)",
        "line 4: topic_preferences[0].stance: must be LIKE, DISLIKE or NEUTRAL",
        "line 6: user_id: must not be empty",
    ]
    assert stored(store, "u1").attributes[0].value == "FR"
    assert stored(store, "u3").max_messages_per_day == 2
    assert stored(store, "u4").attributes[0].value == "DE"
    assert stored(store, "u2") == Profile(user_id="u2")  # nothing of a bad line is written


def test_a_line_over_the_attribute_cap_is_reported_when_its_batch_is_written(store):
    cap = validation.MAX_ATTRIBUTES_PER_USER
    for start in range(0, cap, 64):
        names = tuple((f"a{i}", "x") for i in range(start, start + 64))
        store.set_attributes(update=AttributesUpdate("u1", names, IMPORTED), now=NOW, limit=cap)
    summary, bad = run(store, line("u1", attributes={"one_too_many": "x"}, max_messages_per_day=4))
    assert (summary.imported, summary.bad) == (0, 1)
    (violation,) = bad.lines[1]
    assert violation.field == "attributes" and "at most 128" in violation.description
    profile = stored(store, "u1")
    assert len(profile.attributes) == cap  # the attributes were not written
    assert profile.max_messages_per_day == 0  # nor the rest of the line: refused whole


def test_a_line_refused_by_its_second_attribute_group_leaves_the_first_unwritten(store):
    """A line's STATED and IMPORTED attributes are two groups: if the second passes the cap,
    the first, already merged, is put back (the line is refused whole)."""
    cap = validation.MAX_ATTRIBUTES_PER_USER
    for start in range(0, cap - 1, 64):
        names = tuple((f"a{i}", "x") for i in range(start, min(start + 64, cap - 1)))
        store.set_attributes(update=AttributesUpdate("u1", names, IMPORTED), now=NOW, limit=cap)
    before = stored(store, "u1").attributes
    summary, _ = run(
        store,
        line(
            "u1",
            attributes={
                "stated_one": {"value": "x", "source": "STATED"},
                "imported_one": "y",
                "imported_two": "z",
            },
        ),
    )
    assert (summary.imported, summary.bad) == (0, 1)
    assert stored(store, "u1").attributes == before


@pytest.mark.both_stores
def test_importing_a_file_twice_leaves_the_same_state(store):
    users = [f"u{i}" for i in range(30)]
    lines = [
        line(
            user,
            attributes={"country": "FR", "tier": {"value": "gold", "updated_at": HOUR_AGO}},
            topic_preferences=[{"topic": "running", "stance": "LIKE", "updated_at": HOUR_AGO}],
            consent={"inferred_personalization": True, "updated_at": HOUR_AGO},
            signals=[
                {"topic": "yoga", "weight": 2.5, "observed_at": HOUR_AGO},
                {"topic": "golf", "weight": 1.0},  # observed "now": the run's start
            ],
        )
        for user in users
    ]
    run(store, *lines, batch=7)
    first = raw_state(store, *users)
    # Again, later: the signals are not added to (RecordSignals would double them).
    run(store, *lines, batch=7, now=NOW + 60)
    again = raw_state(store, *users)
    assert again.keys() == first.keys()
    for key in first:
        assert again[key].keys() == first[key].keys()
    profile = stored(store, "u0")
    assert [(s.topic, s.weight) for s in profile.signals] == [("golf", 1.0), ("yoga", 2.5)]
    # What the file dates is byte for byte the same; what it leaves undated is the run's time.
    undated = {"country", "golf"}
    for key, fields in first.items():
        for name, value in fields.items():
            if name not in undated:
                assert again[key][name] == value, (key, name)
    # A second run at the same time (or a file dating everything) changes nothing at all.
    run(store, *lines, batch=7, now=NOW + 60)
    assert raw_state(store, *users) == again


@pytest.mark.both_stores
def test_an_import_never_overwrites_what_the_customer_stated(store):
    store.set_attributes(
        update=AttributesUpdate("u1", (("country", "FR"),), STATED), now=NOW, limit=128
    )
    summary, _ = run(store, line("u1", attributes={"country": "DE", "tier": "gold"}))
    assert summary.imported == 1
    by_name = {a.name: a for a in stored(store, "u1").attributes}
    assert (by_name["country"].value, by_name["country"].source) == ("FR", STATED)
    assert (by_name["tier"].value, by_name["tier"].source) == ("gold", IMPORTED)
    # Nor removes it; an empty value removes an imported one.
    run(store, line("u1", attributes={"country": "", "tier": ""}))
    assert [(a.name, a.value) for a in stored(store, "u1").attributes] == [("country", "FR")]
    # A line that says the customer stated it replaces it, as SetAttributes STATED does.
    run(store, line("u1", attributes={"country": {"value": "ES", "source": "STATED"}}))
    assert [(a.name, a.value) for a in stored(store, "u1").attributes] == [("country", "ES")]


@pytest.mark.both_stores
def test_signals_are_kept_only_with_consent(store):
    signals = [{"topic": "yoga", "weight": 2.0, "observed_at": HOUR_AGO}]
    summary, _ = run(
        store,
        line("nobody-asked", signals=signals),
        line("declined", consent={"inferred_personalization": False}, signals=signals),
        line("agreed", consent={"inferred_personalization": True}, signals=signals),
    )
    assert (summary.imported, summary.signals_not_kept) == (3, 2)
    assert not stored(store, "nobody-asked").signals
    assert not stored(store, "declined").signals
    assert [s.topic for s in stored(store, "agreed").signals] == ["yoga"]
    # Consent stored earlier counts; withdrawing it in a later line deletes the signals.
    summary, _ = run(store, line("agreed", signals=[{"topic": "golf", "weight": 1.0}]))
    assert summary.signals_not_kept == 0
    assert [s.topic for s in stored(store, "agreed").signals] == ["golf", "yoga"]
    run(store, line("agreed", consent={"inferred_personalization": False}))
    assert not stored(store, "agreed").signals


# --- exporting -----------------------------------------------------------------------------


@pytest.mark.both_stores
def test_export_then_import_into_an_empty_store_gives_the_same_profiles(store):
    run(store, FULL, *(line(f"u{i}", attributes={"n": str(i)}) for i in range(2, 40)))
    # Written through the API too, with NEUTRAL and a withdrawn consent.
    store.set_preferences(
        update=PreferencesUpdate(
            "api-user",
            topic_preferences=(
                TopicPreference("golf", Stance.DISLIKE),
                TopicPreference("running", Stance.NEUTRAL),  # clears: nothing to export
            ),
            consent=Consent(False),
        ),
        now=NOW - 10,
    )
    store.set_attributes(
        update=AttributesUpdate("api-user", (("language", "fr-FR"),), STATED), now=NOW, limit=128
    )
    out = io.StringIO()
    summary = bulk.export_profiles(store, out)
    assert (summary.written, summary.without_user_id) == (40, 0)
    exported = out.getvalue().splitlines()
    users = sorted(json.loads(text)["user_id"] for text in exported)
    before = {user: stored(store, user) for user in users}

    store.client.flushall()
    summary, bad = run(store, *exported, now=NOW + 3600)  # any run time: the file dates all
    assert summary.imported == 40 and not bad.lines
    assert {user: stored(store, user) for user in users} == before
    again = io.StringIO()
    bulk.export_profiles(store, again)
    assert sorted(again.getvalue().splitlines()) == sorted(exported)
    api_user = json.loads(next(t for t in exported if '"api-user"' in t))
    assert api_user["consent"]["inferred_personalization"] is False
    assert api_user["attributes"]["language"]["source"] == "STATED"


def test_a_profile_written_before_user_ids_were_kept_is_counted_not_exported(store):
    run(store, line("u1", max_messages_per_day=2))
    store.client.hset(keys.UserKeys.of("old").profile, "max_per_day", "3")  # no user_id field
    out = io.StringIO()
    summary = bulk.export_profiles(store, out)
    assert (summary.written, summary.without_user_id) == (1, 1)
    assert json.loads(out.getvalue()) == {"user_id": "u1", "max_messages_per_day": 2}


# --- the command line ----------------------------------------------------------------------


def test_the_commands_and_their_exit_codes(
    store, redis_proc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.setenv("TACTFUL_REDIS_URL", redis_url(redis_proc))
    good = tmp_path / "good.jsonl"
    good.write_text(FULL + "\n" + line("u2", max_messages_per_day=1) + "\n")
    assert main(["import", str(good)]) == 0
    err = capsys.readouterr().err
    assert "2 profiles imported of 2 lines" in err and "\r" not in err  # no terminal: no bar

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(line("u3", max_messages_per_day=1) + "\n" + '{"user_id": 3}\n')
    assert main(["import", "--quiet", str(mixed)]) == 1
    err = capsys.readouterr().err
    assert "line 2: user_id: must be a string" in err
    assert "1 profiles imported of 2 lines" in err and "1 bad lines skipped" in err
    assert store.get_profile(user_id="u3").max_messages_per_day == 1

    assert main(["import", str(tmp_path / "missing.jsonl")]) == 2
    assert "No such file" in capsys.readouterr().err

    out = tmp_path / "profiles.jsonl"
    assert main(["export", "--profiles", str(out)]) == 0
    assert "3 profiles" in capsys.readouterr().err
    assert sorted(json.loads(t)["user_id"] for t in out.read_text().splitlines()) == [
        "u1",
        "u2",
        "u3",
    ]
    assert main(["export", "--profiles", "-"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["export", "--profiles", str(out), "--since", "2026-01-01"]) == 2
    with pytest.raises(SystemExit):  # one of --out (decisions) and --profiles
        main(["export", "--out", str(out), "--profiles", str(out)])


@pytest.mark.both_stores
def test_an_import_loads_the_scripts_into_a_redis_that_lost_them(store):
    """A restarted or flushed Redis has no scripts: the batch is written again once they are
    loaded, which sets the same state (nothing is added twice)."""
    run(store, FULL)
    store.client.script_flush()
    summary, bad = run(store, FULL, line("u2", attributes={"tier": "gold"}))
    assert (summary.imported, summary.bad) == (2, 0) and not bad.lines
    assert [(s.topic, s.weight) for s in stored(store, "u1").signals] == [("yoga", 2.5)]
    assert stored(store, "u2").attributes[0].value == "gold"


def _variants() -> list[str]:
    """FULL with one part changed at a time, to values right, wrong, odd and at the limits."""
    base = json.loads(FULL)
    odd: list[Any] = [None, True, 0, -1, 1.5, "", "x", [], {}, [{}], float("nan"), 2**70]
    changes: dict[str, list[Any]] = {
        "user_id": [*odd, "é" * 64, "é" * 65, "u" * 256, "u" * 257],
        "max_messages_per_day": [*odd, 1000, 1001, False],
        "quiet_hours": [
            *odd,
            {"start_hour": 0, "end_hour": 23, "time_zone": "UTC"},
            {"start_hour": 24, "end_hour": 7, "time_zone": "UTC"},
            {"start_hour": 1, "end_hour": 7, "time_zone": "UTC", "x": 1},
            {"start_hour": 1, "end_hour": 7},
            {"start_hour": True, "end_hour": 7, "time_zone": "UTC"},
        ],
        "consent": [
            *odd,
            {"inferred_personalization": False},
            {"inferred_personalization": 1},
            {"inferred_personalization": True, "updated_at": None},
            {"inferred_personalization": True, "updated_at": "2026-01-02T03:04:05+02:00"},
            {"inferred_personalization": True, "updated_at": "0001-01-01T00:00:00Z"},
            {"inferred_personalization": True, "updated_at": 2e11},
            {"inferred_personalization": True, "updated_at": 1e308},
            {"inferred_personalization": True, "updated_at": "soon"},
        ],
        "topic_preferences": [
            *odd,
            [{"topic": "a", "stance": "NEUTRAL"}, {"topic": "a", "stance": "LIKE"}],
            [{"topic": "a", "stance": "like"}],
            [{"topic": "a-b_1", "stance": "LIKE", "updated_at": 1.0}],
            [{"topic": "a", "stance": "LIKE", "extra": 1}],
            [{"topic": "a", "stance": "LIKE"}] * 2,
            [{"topic": f"t{i}", "stance": "LIKE"} for i in range(257)],
            [{"topic": "a" * 65, "stance": "LIKE"}],
        ],
        "channel_preferences": [
            *odd,
            [{"channel": "sms", "opted_in": True, "updated_at": "2026-01-01"}],
            [{"channel": "1sms", "opted_in": True}],
            [{"channel": "sms", "opted_in": 0}],
            [{"channel": "sms", "opted_in": True}] * 2,
        ],
        "signals": [
            *odd,
            [{"topic": "a", "weight": 0}, {"topic": "b", "weight": 1e6}],
            [{"topic": "a", "weight": 1e6 + 1}],
            [{"topic": "a", "weight": 2**1100}],
            [{"topic": "a", "weight": True}],
            [{"topic": "a", "weight": 1, "observed_at": -7e10}],
            [{"topic": "a", "weight": 1, "observed_at": NOW + 299}],
            [{"topic": "a", "weight": 1, "observed_at": NOW + 301}],
            [{"topic": "a", "weight": 1, "observed_at": None}],
            [{"topic": "a", "weight": 1, "x": None}],
            [{"topic": f"t{i}", "weight": 1} for i in range(257)],
        ],
        "attributes": [
            *odd,
            {"a": ""},
            {"a": "x" * 256},
            {"a": "x" * 257},
            {"a": "\x85"},
            {"a1_": {"value": "x", "source": "IMPORTED", "updated_at": 5}},
            {"a": {"value": "x", "source": None}},
            {"a": {"value": 1}},
            {"a": {"value": "x", "source": "STATED", "y": 1}},
            {"a": {"source": "STATED"}},
            {"": "x"},
            {f"a{i}": "x" for i in range(128)},
            {f"a{i}": "x" for i in range(129)},
        ],
        "other": [1],
    }
    out = []
    for name, values in changes.items():
        for value in values:
            data = {**base, name: value}
            out.append(json.dumps(data))
            out.append(json.dumps({"user_id": "u", name: value}))
    return out


@pytest.mark.parametrize("text", _variants())
def test_the_fast_path_returns_only_what_the_general_path_would(text):
    """``_fast_record`` must return, for a line it takes, the record the general path
    returns, and leave every line the general path refuses to it (to be reported as ever)."""
    data = json.loads(text)
    fast = profile_line._fast_record(data, NOW)
    try:
        general = profile_line._general_record(data, NOW)
    except InvalidArgument:
        assert fast is None
    else:
        assert fast is None or fast == general


@pytest.mark.parametrize(
    ("field", "bound", "make"),
    [
        (
            "topic_preferences",
            validation.MAX_TOPIC_PREFERENCES_PER_USER,
            lambda names: {"topic_preferences": [{"topic": n, "stance": "LIKE"} for n in names]},
        ),
        (
            "channel_preferences",
            validation.MAX_CHANNEL_PREFERENCES_PER_USER,
            lambda names: {
                "channel_preferences": [{"channel": n, "opted_in": True} for n in names]
            },
        ),
        (
            "signals",
            validation.MAX_SIGNAL_TOPICS_PER_USER,
            lambda names: {
                "consent": {"inferred_personalization": True},
                "signals": [{"topic": n, "weight": 1.0} for n in names],
            },
        ),
    ],
)
def test_lines_that_would_pass_a_per_user_bound_are_refused_whole(store, field, bound, make):
    """Lines for one user add up; the API's per-user bounds hold for an import too."""
    per_line = 100
    lines = [
        line("u1", **make([f"n{i}" for i in range(start, start + per_line)]))
        for start in range(0, bound, per_line)
    ]
    lines.append(line("u1", max_messages_per_day=4, **make(["one-more"])))
    summary, bad = run(store, *lines)
    assert (summary.imported, summary.bad) == (len(lines) - 1, 1)
    (violation,) = bad.lines[len(lines)]
    assert violation.field == field and f"at most {bound}" in violation.description
    profile = stored(store, "u1")
    assert profile.max_messages_per_day == 0  # the line was refused whole
    assert len(getattr(profile, field)) == bound
