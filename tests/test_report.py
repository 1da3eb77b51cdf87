"""The ROI report and the DSJson export: the interval math on known cases, the off-policy
estimators on a synthetic log whose truth is known, the report end to end on a small
simulated run against the in-process server (the full 10% validation, with more rounds, is
``bench/report_validation.py``), and the per-segment section on segments defined through the
Catalog API, checked against counts taken directly from the decision records."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tactful import report
from tactful.__main__ import main
from tactful.settings import Settings
from tactful.v1 import catalog_pb2, catalog_pb2_grpc, decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import make_settings, offer, redis_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import report_validation


def test_wilson_interval_known_case() -> None:
    # Newcombe (1998), Table I: 81/263 -> 0.2553 to 0.3662.
    low, high = report.wilson(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


def test_newcombe_difference_known_case() -> None:
    # Newcombe (1998), Table II, example (a): 56/70 - 48/80, method 10 -> 0.0524 to 0.3339.
    u = report.uplift(56, 70, 48, 80)
    assert u.difference == pytest.approx(0.2)
    assert (round(u.low, 4), round(u.high, 4)) == (0.0524, 0.3339)
    assert u.significant
    assert not report.uplift(10, 100, 9, 100).significant


def synthetic_log(n: int, seed: int) -> tuple[list[report.Logged], dict[str, float]]:
    """Decisions over 4-6 candidates with known click probabilities, logged by an IGW policy
    on noisy scores; returns the log and each target's true value on it."""
    rng = np.random.default_rng(seed)
    offers = [f"o{i}" for i in range(8)]
    base = rng.uniform(0.02, 0.3, size=len(offers))
    data, truth = [], {name: 0.0 for name in report.TARGETS}
    for _ in range(n):
        k = int(rng.integers(4, 7))
        chosen = sorted(rng.choice(len(offers), size=k, replace=False))
        liked = rng.random(k) < 0.3
        probs = np.clip(base[chosen] + 0.15 * liked, 0, 1)
        scores = probs + rng.normal(0, 0.05, size=k)
        priorities = np.round(rng.random(k), 3)
        igw = 1.0 / (k + 10.0 * (scores.max() - scores))
        best = int(scores.argmax())
        igw[best] = 0.0
        igw[best] = 1.0 - igw.sum()
        action = int(rng.choice(k, p=igw))
        d = report.Logged(
            candidates=tuple(offers[i] for i in chosen),
            scores=tuple(float(s) for s in scores),
            priorities=tuple(float(p) for p in priorities),
            liked=tuple(bool(v) for v in liked),
            action=action,
            propensity=float(igw[action]),
            reward=float(rng.random() < probs[action]),
        )
        data.append(d)
        for name, policy in report.TARGETS.items():
            truth[name] += probs[policy(d)] / n
    return data, truth


def test_off_policy_estimators_recover_known_values() -> None:
    data, truth = synthetic_log(20_000, seed=3)
    estimates = {e.name: e for e in report.off_policy(data)}
    for name, value in truth.items():
        e = estimates[name]
        for est in (e.ips, e.snips, e.dr):
            assert abs(est.value - value) <= max(4 * est.se, 0.1 * value), (name, est, value)
            assert est.low <= est.value <= est.high
    # On its own log, the logging policy's estimate is its mean reward.
    served = estimates["logging"]
    assert served.ips.value == pytest.approx(np.mean([d.reward for d in data]))
    # A target that rarely agrees with the log is matched rarely, and its interval shows it.
    assert estimates["priority"].matches < estimates["greedy"].matches


def test_multi_slot_decisions_are_left_out_of_ope() -> None:
    choice = {"offer_id": "a", "score": 1.0, "propensity": 0.5, "reasons": []}
    candidates = {"ids": ["a", "b"], "scores": [1, 0], "priorities": [0.1, 0.2], "liked": [0, 0]}
    single = report.Record(
        {"arm": "PERSONALIZED", "choices": [choice], "candidates": {**candidates, "slots": 1}},
        (),
    )
    double = report.Record(
        {
            "arm": "PERSONALIZED",
            "choices": [choice, {**choice, "offer_id": "b"}],
            "candidates": {**candidates, "slots": 2},
        },
        (),
    )
    control = report.Record({"arm": "CONTROL", "choices": [choice]}, ())
    used, skipped = report.single_slot([single, double, control])
    assert [d.propensity for d in used] == [0.5] and skipped == 1


@pytest.fixture
def settings() -> Settings:
    base = make_settings(control_share=0.3)
    # Much exploration, so the estimates of other policies have support: a low gamma, and
    # no cap on the share of exploration picks (TACTFUL_EXPLORATION_SHARE).
    learning = dataclasses.replace(base.learning, exploration_gamma=20.0, exploration_share=1.0)
    return dataclasses.replace(base, learning=learning)


def test_report_and_export_end_to_end(
    store: Any,
    channel: grpc.Channel,
    redis_proc: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.time()
    world = report_validation.simulate(channel, 1500, seed=5, n_users=200, n_offers=10)
    records = report.read_log(store.client, started - 1, time.time() + 1)
    assert len(records) == len(world.asked)
    assert {r.arm for r in records} == {"PERSONALIZED", "CONTROL"}
    comparisons, true_uplift = report_validation.compare(world, records)
    for c in comparisons:
        for name, est in c.estimates.items():
            # Seeded, so deterministic; 4 standard errors (or 15%) is a sanity bound here,
            # the 10% validation with more rounds is bench/report_validation.py.
            assert abs(est.value - c.truth) <= max(4 * est.se, 0.15 * c.truth), (c, name)
    built = report.build(records, 0.0, time.time() + 1)
    u = built.uplift
    assert u.low <= true_uplift <= u.high

    # The CLI, on the same Redis: the report and the export.
    monkeypatch.setenv("TACTFUL_REDIS_URL", redis_url(redis_proc))
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started - 1))
    assert main(["report", "--since", since, "--out", str(tmp_path / "roi")]) == 0
    text = (tmp_path / "roi" / "report.md").read_text()
    for heading in ("## Arms", "## Uplift", "## Off-policy", "## What drove", "## Holds"):
        assert heading in text
    assert "| PERSONALIZED |" in text and "| greedy |" in text
    if u.significant:
        assert "not significant" not in text
    else:
        assert "**not significant**" in text
    # The same report as a page: the tables rendered, the emphasis as HTML, the plots linked.
    page = (tmp_path / "roi" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    for heading in ("<h2>Arms</h2>", "<h2>Holds</h2>"):
        assert heading in page
    assert "<td>PERSONALIZED</td>" in page and "<td>greedy</td>" in page
    assert "|---" not in page and "**" not in page
    for image in sorted(png.name for png in (tmp_path / "roi").glob("*.png")):
        assert f'src="{image}"' in page

    out = tmp_path / "export.dsjson"
    assert main(["export", "--since", since, "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == built.ope_used > 0
    vowpalwabbit = pytest.importorskip("vowpalwabbit")
    vw = vowpalwabbit.Workspace("--cb_adf --dsjson --quiet")
    try:
        for line in lines:
            parsed = json.loads(line)
            assert 0 < parsed["_label_probability"] <= 1
            examples = vw.parse(line)
            assert len(examples) == len(parsed["c"]["_multi"]) + 1  # shared + one per action
            vw.learn(examples)
            vw.finish_example(examples)
    finally:
        vw.finish()
    assert not math.isnan(built.ope[0].ips.value)


# --- per segment ---------------------------------------------------------------------------

SEGMENTS = {
    "fr": 'attr.country == "FR"',
    "lu": 'attr.country == "LU"',
    "mobile": 'ctx.device == "mobile"',
    "runner": 'stated.persona == "runner"',
}


def expected_segments(user: dict[str, Any], device: str) -> list[str]:
    """What each rule of SEGMENTS says of this user and device, in id order."""
    found = {
        "fr": user.get("country") == "FR",
        "lu": user.get("country") == "LU",
        "mobile": device == "mobile",
        "runner": user.get("persona") == ("runner", p.ATTRIBUTE_SOURCE_STATED),
    }
    return sorted(name for name, member in found.items() if member)


def direct_counts(records: list[report.Record]) -> dict[str, list[int]]:
    """arm -> [decisions, offers shown, offers clicked], straight from the payloads."""
    counts = {"PERSONALIZED": [0, 0, 0], "CONTROL": [0, 0, 0]}
    for r in records:
        row = counts[r.payload["arm"]]
        row[0] += 1
        for choice in r.payload["choices"]:
            row[1] += 1
            row[2] += any(
                o["offer_id"] == choice["offer_id"] and o["event"] == "CLICK" for o in r.outcomes
            )
    return counts


def test_report_by_segment_end_to_end(
    store: Any,
    channel: grpc.Channel,
    redis_proc: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    catalog = catalog_pb2_grpc.CatalogStub(channel)
    profiles = profiles_pb2_grpc.ProfilesStub(channel)
    decisioning = decisioning_pb2_grpc.DecisioningStub(channel)
    for segment_id, rule in SEGMENTS.items():
        catalog.PutSegment(
            catalog_pb2.PutSegmentRequest(
                segment=catalog_pb2.Segment(segment_id=segment_id, rule=rule)
            )
        )
    # A sensitive segment: its memberships target but are never logged, so never reported.
    catalog.PutSegment(
        catalog_pb2.PutSegmentRequest(
            segment=catalog_pb2.Segment(segment_id="health", rule='likes("health")', sensitive=True)
        )
    )
    for i, topic in enumerate(("running", "travel", "books", "cooking", "tech", "music")):
        catalog.PutOffer(
            catalog_pb2.PutOfferRequest(offer=offer(f"o{i}", (topic,), priority=0.1 * i))
        )
    catalog.PutOffer(
        catalog_pb2.PutOfferRequest(
            offer=offer("h", ("health",), sensitive=True, segments=["health"])
        )
    )

    rng = np.random.default_rng(11)
    users: dict[str, dict[str, Any]] = {}
    for i in range(60):
        user_id, user = f"seg-user-{i}", {}
        user["country"] = "LU" if i % 10 == 1 else "FR" if i % 3 == 0 else "DE"
        profiles.SetAttributes(
            p.SetAttributesRequest(
                user_id=user_id,
                attributes={"country": user["country"]},
                source=p.ATTRIBUTE_SOURCE_IMPORTED,
            )
        )
        if i % 4 in (0, 2):  # stated.persona matches only what the customer stated
            source = p.ATTRIBUTE_SOURCE_STATED if i % 4 == 0 else p.ATTRIBUTE_SOURCE_IMPORTED
            user["persona"] = ("runner", source)
            profiles.SetAttributes(
                p.SetAttributesRequest(
                    user_id=user_id, attributes={"persona": "runner"}, source=source
                )
            )
        if i % 5 == 0:
            profiles.SetPreferences(
                p.SetPreferencesRequest(
                    user_id=user_id,
                    topic_preferences=[p.TopicPreference(topic="health", stance=p.STANCE_LIKE)],
                )
            )
        users[user_id] = user

    started = time.time()
    asked: dict[str, list[str]] = {}  # decision id -> the segments its user should be in
    for i in range(700):
        user_id = f"seg-user-{int(rng.integers(len(users)))}"
        device = "mobile" if rng.random() < 0.6 else "desktop"
        reply = decisioning.Decide(
            d.DecideRequest(
                user_id=user_id,
                channel="web",
                placement="home",
                categorical_context={"device": device},
                slots=1,
                request_id=f"seg-{i}",
            )
        )
        assert reply.decision_id and len(reply.choices) == 1
        asked[reply.decision_id] = expected_segments(users[user_id], device)
        # Runners on mobile click more: a segment effect the table can show.
        clicked = rng.random() < (0.35 if "runner" in asked[reply.decision_id] else 0.12)
        decisioning.ReportOutcome(
            d.ReportOutcomeRequest(
                decision_id=reply.decision_id,
                offer_id=reply.choices[0].offer_id,
                event=d.OUTCOME_EVENT_CLICK if clicked else d.OUTCOME_EVENT_IMPRESSION_IGNORED,
                outcome_id=f"{reply.decision_id}-o",
            )
        )

    records = report.read_log(store.client, started - 1, time.time() + 1)
    assert len(records) == len(asked)
    # Each record holds exactly the memberships the rules give, and never the sensitive one.
    for r in records:
        assert r.payload["segments"] == asked[r.payload["decision_id"]]
    assert {r.arm for r in records} == {"PERSONALIZED", "CONTROL"}

    top = 2
    section = report.segment_section(records, top)
    members = {s: [r for r in records if s in r.payload["segments"]] for s in SEGMENTS}
    ranked = sorted(SEGMENTS, key=lambda s: (-len(members[s]), s))
    assert section.segments_seen == len(SEGMENTS)
    assert (section.recorded, section.unrecorded) == (len(records), 0)
    rest = [r for r in records if set(r.payload["segments"]) & set(ranked[top:])]
    nowhere = [r for r in records if not r.payload["segments"]]
    groups = [*((s, (s,), members[s]) for s in ranked[:top])]
    groups.append((f"{len(SEGMENTS) - top} other segments", tuple(ranked[top:]), rest))
    groups.append((report.NO_SEGMENT, (), nowhere))
    assert [row.label for row in section.rows] == [label for label, _, _ in groups]
    for row, (label, ids, group) in zip(section.rows, groups, strict=True):
        assert row.segments == ids and row.decisions == len(group) > 0, label
        counts = direct_counts(group)
        for arm, (decisions, shown, clicked) in counts.items():
            s = row.arms[arm]
            assert (s.decisions, s.shown, s.successes) == (decisions, shown, clicked), (label, arm)
        (_, n1, s1), (_, n2, s2) = counts["PERSONALIZED"], counts["CONTROL"]
        assert row.uplift == report.uplift(s1, n1, s2, n2)

    # The Markdown section: one line per row with those numbers and the verdict.
    text = report.markdown(report.build(records, 0.0, time.time() + 1, top), top_segments=top)
    assert "## Segments" in text and "health" not in text.split("## Segments")[1].split("##")[0]
    for row in section.rows:
        pers, ctrl, u = row.arms["PERSONALIZED"], row.arms["CONTROL"], row.uplift
        label = f"`{row.label}`" if row.segments == (row.label,) else row.label
        line = next(x for x in text.splitlines() if x.startswith(f"| {label} |"))
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1:4] == [str(row.decisions), str(pers.decisions), str(ctrl.decisions)]
        assert cells[4] == f"{pers.ctr:.2%} ({pers.successes}/{pers.shown})"
        assert cells[5] == f"{ctrl.ctr:.2%} ({ctrl.successes}/{ctrl.shown})"
        assert cells[6] == (f"{u.difference * 100:+.2f} [{u.low * 100:+.2f}, {u.high * 100:+.2f}]")
        assert cells[7] == ("significant" if u.significant else "**not significant**")

    # The CLI on the same Redis, with its --segments.
    monkeypatch.setenv("TACTFUL_REDIS_URL", redis_url(redis_proc))
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started - 1))
    out = tmp_path / "roi"
    assert main(["report", "--since", since, "--out", str(out), "--segments", "1"]) == 0
    written = (out / "report.md").read_text()
    assert f"| `{ranked[0]}` |" in written and "| 3 other segments |" in written
    if "segments.png" in written:
        assert (out / "segments.png").stat().st_size > 0


def test_segment_section_without_memberships() -> None:
    """Records from before segments (or from a catalog without any) are counted, not
    tabled; a decision listing a segment twice counts once."""
    choice = {"offer_id": "a", "score": 1.0, "propensity": 1.0, "reasons": []}
    records = [
        report.Record({"arm": "CONTROL", "choices": [choice]}, ()),
        report.Record({"arm": "CONTROL", "choices": [choice], "segments": ["x", "x"]}, ()),
    ]
    section = report.segment_section(records)
    assert (section.recorded, section.unrecorded, section.segments_seen) == (1, 1, 1)
    assert [(row.label, row.decisions) for row in section.rows] == [("x", 1)]
    text = report.markdown(report.build(records, 0.0, 1.0))
    assert "1 decisions recorded no memberships" in text
    empty = report.markdown(report.build(records[:1], 0.0, 1.0))
    assert "No decision in this period recorded" in empty


def test_segment_ids_are_shown_as_they_are_on_the_html_page() -> None:
    """Segment ids may hold '_' and '.': as code spans they are never read as emphasis."""
    page = report.html("| segment |\n|---|\n| `a._b_.` |\n| `x:__y__` |\n")
    assert "<code>a._b_.</code>" in page and "<code>x:__y__</code>" in page
    assert "<em>" not in page and "<strong>" not in page
