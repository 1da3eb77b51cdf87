"""The contact policy's pieces: calendar days and quiet hours in the user's zone, the
capacity the counters leave, and the atomic check-and-consume script on a real Redis."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tactful.contact_policy import (
    CARRY_SECONDS,
    ContactPolicy,
    Limits,
    Window,
    carried_over,
)
from tactful.domain import Profile, QuietHours
from tactful.settings import ContactSettings
from tactful.store.codecs import DAY_MARK
from tactful.store.scripts import CONSUME_CONTACTS_LUA

POLICY = ContactPolicy(ContactSettings())


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


@settings(max_examples=200, deadline=None)
@given(
    st.floats(1.7e9, 1.8e9),  # 2023 to 2027: DST changes included
    st.lists(
        st.tuples(
            st.integers(-2 * 86400, 2 * 86400),  # around that time, on both sides of midnights
            st.sampled_from(
                ["", "Europe/Paris", "America/Los_Angeles", "Atlantic/Azores", "America/Havana"]
            ),
        ),
        min_size=1,
        max_size=30,
    ),
)
@example(1761442200.0, [(-3600, "Atlantic/Azores"), (14400, "Atlantic/Azores")])
@example(1762059600.0, [(0, "America/Havana"), (18000, "America/Havana")])
def test_the_remembered_day_is_the_day_worked_out_afresh(base, times):
    """``window`` remembers each zone's last day: whatever the order of the times asked, it
    answers what a policy that never saw another time would."""
    policy = ContactPolicy(ContactSettings())
    for offset, zone in times:
        now = base + offset
        profile = Profile("u", quiet_hours=QuietHours(0, 0, zone) if zone else None)
        assert policy.window(now, profile) == ContactPolicy(ContactSettings()).window(now, profile)
        # A day runs from one local midnight (the first, where the clocks went back) to the
        # next: a fresh policy gives the same day to any time within it.
        day = policy.window(now, profile)
        assert ContactPolicy(ContactSettings()).window(day.start, profile) == day


def test_a_day_is_the_calendar_day_in_the_users_zone():
    paris = Profile("u", quiet_hours=QuietHours(22, 7, "Europe/Paris"))
    window = POLICY.window(ts("2026-11-26T23:30:00+00:00"), paris)  # 00:30 on the 27th in Paris
    assert window.start == ts("2026-11-27T00:00:00+01:00")
    assert window.end == ts("2026-11-28T00:00:00+01:00")
    utc = POLICY.window(ts("2026-11-26T23:30:00+00:00"), Profile("u"))
    assert utc.start == ts("2026-11-26T00:00:00+00:00")


def test_a_day_across_a_dst_change_is_23_hours():
    paris = Profile("u", quiet_hours=QuietHours(0, 0, "Europe/Paris"))
    window = POLICY.window(ts("2026-03-29T12:00:00+02:00"), paris)
    assert window.end - window.start == 23 * 3600


@pytest.mark.parametrize(
    ("local_time", "channel", "held_until"),
    [
        ("2026-11-26T23:00:00+01:00", "push", "2026-11-27T07:00:00+01:00"),
        ("2026-11-27T06:59:00+01:00", "email", "2026-11-27T07:00:00+01:00"),
        ("2026-11-27T07:00:00+01:00", "push", None),
        ("2026-11-26T21:59:00+01:00", "push", None),
        ("2026-11-26T23:00:00+01:00", "web", None),  # render-time channels are not held
    ],
)
def test_quiet_hours_wrap_midnight_in_the_users_zone(local_time, channel, held_until):
    profile = Profile("u", quiet_hours=QuietHours(22, 7, "Europe/Paris"))
    until = POLICY.quiet_until(ts(local_time), profile, channel)
    assert until == (ts(held_until) if held_until else None)


def test_the_lowest_applicable_cap_wins():
    policy = ContactPolicy(ContactSettings(daily_cap=5, channel_caps=(("email", 3.0),)))
    profile = Profile("u", max_messages_per_day=2)
    window = Window(0.0, 86400.0)
    limits = policy.limits("email", profile)
    assert limits == Limits(daily=5, channel=3, user=2, gap_seconds=0.0, interruptive=True)
    assert policy.capacity(10, window, limits, {}, 0.0, "email").remaining == 2
    counts = {("!", ""): 2}
    full = policy.capacity(10, window, limits, counts, 0.0, "email")
    assert full.remaining == 0 and full.open_again == 86400.0
    web = policy.limits("web", profile)  # the customer's own cap counts interruptions only
    assert policy.capacity(10, window, web, counts, 0.0, "web").remaining == 5


def test_a_minimum_gap_closes_the_channel_until_it_has_passed():
    policy = ContactPolicy(ContactSettings(min_gap_seconds=(("push", 3600.0),)))
    limits = policy.limits("push", Profile("u"))
    capacity = policy.capacity(1000.0, Window(0, 86400), limits, {}, 500.0, "push")
    assert capacity.remaining == 0 and capacity.open_again == 4100.0


def test_the_day_of_a_zone_left_counts_as_long_as_it_overlaps_today():
    """A customer in UTC moves to Tokyo at 12:00 UTC (21:00 in Tokyo, whose day began at
    15:00 UTC the day before): the UTC day overlaps Tokyo's today, so it counts."""
    now = ts("2026-11-26T12:00:00+00:00")
    tokyo = POLICY.window(now, Profile("u", quiet_hours=QuietHours(0, 0, "Asia/Tokyo")))
    utc_day = ts("2026-11-26T00:00:00+00:00")
    assert carried_over(utc_day, tokyo, now)
    # From Paris to Los Angeles (found in review): two e-mails at 09:05 in Paris are 00:05 in
    # LA, the same LA day; they count for the whole LA day, after the Paris day has ended too.
    paris_day = ts("2026-06-10T00:00:00+02:00")
    la = Profile("u", quiet_hours=QuietHours(0, 0, "America/Los_Angeles"))
    for local in ("2026-06-10T01:00:00-07:00", "2026-06-10T23:59:00-07:00"):
        now = ts(local)
        assert carried_over(paris_day, POLICY.window(now, la), now), local
    # The next LA day does not overlap the Paris day: it is past.
    tomorrow = ts("2026-06-11T00:30:00-07:00")
    assert not carried_over(paris_day, POLICY.window(tomorrow, la), tomorrow)


def test_yesterday_in_the_same_zone_is_never_carried_even_after_a_23_hour_day():
    paris = Profile("u", quiet_hours=QuietHours(0, 0, "Europe/Paris"))
    for today in ("2026-11-26T00:30:00+01:00", "2026-03-30T00:30:00+02:00"):  # after a DST day
        now = ts(today)
        window = POLICY.window(now, paris)
        yesterday = POLICY.window(window.start - 1, paris)
        assert not carried_over(yesterday.start, window, now)
        assert not carried_over(window.start, window, now)  # today is today, not carried


# --- the script, on a real Redis -----------------------------------------------------------


@pytest.fixture
def consume(redisdb):
    script = redisdb.register_script(CONSUME_CONTACTS_LUA)

    def run(offers, *, slots=1, daily=0, chcap=0, ucap=0, interruptive=True, gap=0, now=100.0,
            day="0", channel="email", stale=(), decision=None, request_id="",
            full_reply=False):  # fmt: skip
        decision = decision or uuid.uuid4().hex
        args = [day, now, channel, daily, chcap, int(interruptive), gap, 3600, slots]
        args += [decision, request_id, 600, CARRY_SECONDS, DAY_MARK, len(stale), *stale]
        for offer_id, cap in offers:
            args += [offer_id, cap]
        redisdb.hset("profile", "max_per_day", ucap)
        reply = script(keys=["contacts", "profile", "requests"], args=args)
        if full_reply:
            return reply
        assert reply[0] == "+"
        return reply[1:]

    return run


def test_the_same_decision_sent_again_gets_its_answer_and_counts_nothing_twice(consume, redisdb):
    """A round trip retried after its reply was lost (the connection broke on the way back)
    sends the script again: same answer, counters unchanged."""
    assert consume([("a", 0), ("b", 0)], slots=2, chcap=3, decision="d1") == ["a", "b"]
    assert consume([("a", 0), ("b", 0)], slots=2, chcap=3, decision="d1") == ["a", "b"]
    assert redisdb.hget("contacts", "0|email|") == "2"
    assert consume([("c", 0)], chcap=3, decision="d2") == ["c"]  # another decision counts
    assert redisdb.hget("contacts", "0|email|") == "3"


def test_a_request_id_is_claimed_by_the_first_decision_only(consume, redisdb):
    assert consume([("a", 0)], decision="d1", request_id="r1", now=100.0) == ["a"]
    assert redisdb.hget("requests", "r1") == "d1|100.0"
    taken = consume([("b", 0)], decision="d2", request_id="r1", now=101.0, full_reply=True)
    assert taken == ["!", "d1"]
    assert redisdb.hget("contacts", "0|email|") == "1"  # nothing counted for d2
    # Past its TTL (600 s here) a request id is a new request.
    assert consume([("b", 0)], decision="d3", request_id="r1", now=701.0) == ["b"]
    assert redisdb.hget("requests", "r1") == "d3|701.0"


def test_script_consumes_best_ranked_first_and_stops_at_a_cap(consume, redisdb):
    assert consume([("a", 0), ("b", 0), ("c", 0)], slots=3, chcap=2) == ["a", "b"]
    assert consume([("c", 0)], chcap=2) == []  # channel cap reached
    assert redisdb.hget("contacts", "0|email|") == "2"
    assert redisdb.hget("contacts", "0|*|a") == "1"
    tomorrow = dict(day="86400", now=86400 + 100.0)
    assert consume([("c", 0)], chcap=2, **tomorrow) == ["c"]  # a new day
    assert redisdb.hget("contacts", "0|email|") is None  # yesterday's fields are gone


def test_script_adds_a_day_of_another_zone_to_today_and_drops_past_days(consume, redisdb):
    today, other, past = 10 * 86400, 10 * 86400 - 7 * 3600, 9 * 86400
    redisdb.hset(
        "contacts",
        mapping={
            f"{other}|email|": 2,
            f"{other}|*|a": 1,
            f"{past}|email|": 9,
            f"{past}|*|b": 9,
            "last|email": 5.0,
        },
    )
    now = today + 3600
    run = dict(chcap=4, day=str(today), now=now)
    assert consume([("a", 2), ("b", 0)], **run) == ["a"]
    assert redisdb.hget("contacts", f"{today}|email|") == "3"  # 2 carried + 1
    assert redisdb.hget("contacts", f"{today}|*|a") == "2"  # a's own cap of 2 is now reached
    assert redisdb.hkeys("contacts") and not [
        f for f in redisdb.hkeys("contacts") if f.startswith((f"{other}|", f"{past}|"))
    ]
    assert consume([("a", 2), ("b", 0)], slots=2, **run) == ["b"]
    assert consume([("b", 0)], **run) == []  # 2 carried + 2 today: the cap of 4


def test_script_counts_what_was_folded_after_its_caller_read(consume, redisdb):
    """Found in review: a Decide that read the profile before a change of zone consumes
    under the old day, after a Decide of the new zone folded that day into its own. The
    script looks at every field, so the old day's Decide still sees the sends."""
    old_day, new_day = 10 * 86400, 10 * 86400 + 9 * 3600
    now = new_day + 60
    assert consume([("a", 0)], chcap=2, day=str(old_day), now=now - 30) == ["a"]
    assert consume([("b", 0)], chcap=2, day=str(new_day), now=now) == ["b"]  # folds old_day
    assert consume([("c", 0)], chcap=2, day=str(old_day), now=now) == []  # read before: held
    assert redisdb.hget("contacts", f"{old_day}|email|") == "2"  # folded back, nothing lost


def test_script_skips_an_offer_at_its_own_cap_for_the_next(consume):
    assert consume([("a", 1)]) == ["a"]
    assert consume([("a", 1), ("b", 0)]) == ["b"]


def test_script_honours_the_gap(consume):
    assert consume([("a", 0)], gap=60, now=100.0) == ["a"]
    assert consume([("b", 0)], gap=60, now=159.0) == []
    assert consume([("b", 0)], gap=60, now=160.0) == ["b"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.integers(1, 5),
    st.lists(st.tuples(st.integers(1, 3), st.integers(0, 2)), min_size=1, max_size=40),
)
def test_no_cap_is_ever_exceeded_under_concurrency(redisdb, consume, cap, requests):
    """Many threads consume at once; whatever they asked for, the counters never pass the
    cap and every unit counted was returned to exactly one caller."""
    redisdb.delete("contacts")
    returned = []
    lock = threading.Lock()

    def one(request):
        slots, offer_cap = request
        got = consume([("a", offer_cap), ("b", 0), ("c", 0)], slots=slots, chcap=cap)
        with lock:
            returned.extend(got)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, requests))
    assert len(returned) <= cap
    assert int(redisdb.hget("contacts", "0|email|") or 0) == len(returned)


def test_a_counter_of_a_day_not_begun_by_this_clock_keeps_the_hash_scanned(consume, redisdb):
    """Found in review: servers' clocks differ. A Decide on a server a second behind, for a
    customer read before a change of zone, meets the new zone's counter of a day that has
    not begun by its clock: it keeps it, and must not mark the hash as all of its own day,
    or the next Decide of that day would skip the scan and pass the cap."""
    utc_day, new_york_day = 10 * 86400, 10 * 86400 + 5 * 3600
    cap = dict(daily=2, chcap=0)
    assert consume([("a", 0)], day=str(new_york_day), now=new_york_day + 0.5, **cap) == ["a"]
    assert consume([("b", 0)], day=str(utc_day), now=new_york_day - 0.5, **cap) == ["b"]
    assert not redisdb.hexists("contacts", DAY_MARK)
    assert consume([("c", 0)], day=str(utc_day), now=new_york_day + 60, **cap) == []
    assert redisdb.hget("contacts", DAY_MARK) == str(utc_day)  # folded: one day again
