"""The Grafana dashboard and the alert rules against a real Prometheus scraping a real
`tactful serve` under traffic: every panel's query is accepted by Prometheus, the panels an
on-call engineer reads first show numbers, the instance variable lists the server, and every
alert rule evaluates without error on the metrics tactful really exports.

This is what Grafana would show, short of Grafana itself (no Grafana binary can be installed
here; test_deploy.py checks the dashboard's JSON, datasource and layout). Prometheus is the
`prometheus` binary of Debian's package, which `make promtool` installs; skipped without it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_deploy import ALERTS, DASHBOARD_JSON, all_panels
from test_serve import data_dir, free_port, start, stop, wait_serving  # noqa: F401 (fixture)

from tactful.embedded_redis import with_parent_death
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import profiles_pb2 as p

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus is not on PATH: `make promtool` installs it (Debian package prometheus)",
)

SCRAPE_SECONDS = 1
# Grafana's $__rate_interval is at least four scrape intervals; the variable's "All" is ".*".
RATE_INTERVAL = f"{4 * SCRAPE_SECONDS + 1}s"
# What an on-call engineer looks at first: under traffic, each shows a number.
MUST_SHOW = {
    "Decide rate",
    "Decide p99",
    "Decide latency",
    "Requests by method",
    "Decisions by arm",
    "Decisions by channel",
    "Choices by reason",
    "Outcomes",
    "Model version",
    "Redis operation latency (p99)",
    "Server errors",  # 0, not "No data"
    "Hold reasons",  # e-mail's cap of 2 a day holds the traffic's later e-mails
    "Learner lag",  # the clicks, learned and published
    "CTR by arm",  # half the users are in the control group here
    "Uplift (personalised - control)",
}


BROKEN_ALERTS = {
    "TactfulDown",
    "TactfulGrpcServerErrorsCritical",
    "TactfulGrpcServerErrors",
    "TactfulRedisErrors",
    "TactfulStoreFallbacks",
    "TactfulDecisionLogFailures",
    "TactfulModelRejected",
}


def grafana_expr(expr: str) -> str:
    """As Grafana sends it: the variables replaced (the time range: the last hour)."""
    for variable, value in (
        ("$__rate_interval", RATE_INTERVAL),
        ("$__range", "1h"),
        ('"$instance"', '".*"'),
    ):
        expr = expr.replace(variable, value)
    return expr


def api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
            if found:
                return found
        except (OSError, AssertionError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.25)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """(Prometheus port, tactful metrics port): a Prometheus with the project's alert rules,
    scraping a metrics port that the test's tactful then serves."""
    metrics_port, port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE_SECONDS}s\n"
        f"  evaluation_interval: {SCRAPE_SECONDS}s\n"
        "rule_files:\n"
        f"  - {ALERTS}\n"
        "scrape_configs:\n"
        "  - job_name: tactful\n"
        "    static_configs:\n"
        f'      - targets: ["127.0.0.1:{metrics_port}"]\n'
    )
    assert PROMETHEUS is not None
    process = subprocess.Popen(
        with_parent_death(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ]
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1),
            30,
            "prometheus did not become ready",
        )
        yield port, metrics_port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def traffic(grpc_port: int, stop_sending: threading.Event, errors: list[BaseException]) -> None:
    """Decides on a page and by e-mail for a few users, a click on some of them, and a
    preference change now and then, until told to stop (or a call fails: in ``errors``)."""
    try:
        _send(grpc_port, stop_sending)
    except BaseException as error:
        errors.append(error)


def _send(grpc_port: int, stop_sending: threading.Event) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        decide = decisioning_pb2_grpc.DecisioningStub(channel)
        profiles = profiles_pb2_grpc.ProfilesStub(channel)
        i = 0
        while not stop_sending.is_set():
            user = f"user-{i % 40}"
            answer = decide.Decide(
                d.DecideRequest(user_id=user, channel="web" if i % 3 else "email", slots=2)
            )
            if answer.choices and i % 4 == 0:
                decide.ReportOutcome(
                    d.ReportOutcomeRequest(
                        decision_id=answer.decision_id,
                        offer_id=answer.choices[0].offer_id,
                        event=d.OUTCOME_EVENT_CLICK,
                        outcome_id=f"click-{i}",
                    )
                )
            if i % 25 == 0:
                profiles.SetPreferences(
                    p.SetPreferencesRequest(
                        user_id=user,
                        topic_preferences=[p.TopicPreference(topic="yoga", stance=p.STANCE_LIKE)],
                    )
                )
            i += 1
            time.sleep(0.01)


# One process, and two (as `make serve`): then /metrics sums the workers' multiprocess files.
@pytest.mark.parametrize("workers", [1, 2])
def test_every_panel_and_alert_works_on_a_real_prometheus(
    prometheus: tuple[int, int],
    data_dir: Path,  # noqa: F811 (the fixture of test_serve)
    workers: int,
) -> None:
    prometheus_port, metrics_port = prometheus
    grpc_port = free_port()
    server = start(
        data_dir,
        grpc_port,
        TACTFUL_METRICS_PORT=str(metrics_port),
        TACTFUL_WORKERS=str(workers),
        TACTFUL_CONTROL_SHARE="0.5",  # both arms get traffic: CTR by arm and the uplift
    )
    stop_sending = threading.Event()
    errors: list[BaseException] = []
    sender = threading.Thread(target=traffic, args=(grpc_port, stop_sending, errors))
    try:
        wait_serving(grpc_port, server)
        sender.start()
        instance = f"127.0.0.1:{metrics_port}"
        assert not errors
        wait_until(
            lambda: any(
                t["labels"]["instance"] == instance and t["health"] == "up"
                for t in api(prometheus_port, "targets")["activeTargets"]
            ),
            30,
            "prometheus never scraped tactful",
        )
        # Enough scrapes under traffic for every rate() window to hold two samples.
        time.sleep(4 * SCRAPE_SECONDS + 3)
        assert not errors, errors

        shown: set[str] = set()
        for panel in all_panels(DASHBOARD_JSON["panels"]):
            for target in panel.get("targets", []):
                result = api(prometheus_port, "query", query=grafana_expr(target["expr"]))
                values = [float(series["value"][1]) for series in result["result"]]
                if any(math.isfinite(v) for v in values):
                    shown.add(panel["title"])
        assert shown >= MUST_SHOW, f"panels without data: {sorted(MUST_SHOW - shown)}"

        # The dashboard's instance variable (label_values(tactful_model_version, instance)).
        names = api(
            prometheus_port, "label/instance/values", **{"match[]": "tactful_model_version"}
        )
        assert instance in names

        # Every alert rule loaded, was evaluated, and evaluates without an error.
        def evaluated() -> list[dict[str, Any]]:
            rules = [r for g in api(prometheus_port, "rules")["groups"] for r in g["rules"]]
            return rules if rules and all(r["health"] != "unknown" for r in rules) else []

        rules = wait_until(evaluated, 15, "the alert rules were never evaluated")
        assert len(rules) == ALERTS.read_text().count("- alert:")
        broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
        assert not broken
        # A working server: none of the alerts that say it is broken has even started to fire
        # (the latency ones may, on a busy machine: they are about the machine as well).
        active = {r["name"] for r in rules if r.get("state") in ("pending", "firing")}
        assert {r["name"] for r in rules} >= BROKEN_ALERTS
        assert not active & BROKEN_ALERTS
    finally:
        stop_sending.set()
        if sender.is_alive():
            sender.join(timeout=10)
        stop(server)
