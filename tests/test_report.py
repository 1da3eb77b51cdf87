"""The ROI report and the DSJson export: the interval math on known cases, the off-policy
estimators on a synthetic log whose truth is known, and the report end to end on a small
simulated run against the in-process server (the full 10% validation, with more rounds, is
``bench/report_validation.py``)."""

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

from conftest import make_settings, redis_url

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
    return dataclasses.replace(
        base, learning=dataclasses.replace(base.learning, exploration_gamma=20.0)
    )


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
