"""deploy/: the alert rules pass promtool's checks and their unit tests, and every PromQL in the
alerts and the Grafana dashboard names only metrics tactful exports; the dashboard, Grafana
provisioning, Prometheus configuration and docker-compose file agree with each other.

promtool comes from Debian's `prometheus` package (`make promtool`, which `make test` runs);
the promtool tests are skipped when it is not on PATH. No YAML parser is a dependency: the
YAML files are checked by structure here (and parsed too when PyYAML happens to be installed);
promtool parses the Prometheus ones for real.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from tactful import metrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "tactful.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "tactful.yml"
COMPOSE = DEPLOY / "docker-compose.yml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not on PATH: `make promtool` installs it (Debian package prometheus; "
    "needs root and apt-get)",
)


def promtool(*args: str) -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


@needs_promtool
def test_promtool_checks_the_alert_rules():
    promtool("check", "rules", str(ALERTS.relative_to(REPO)))


@needs_promtool
def test_promtool_unit_tests_of_the_alert_rules_pass():
    promtool("test", "rules", str(ALERTS_TEST.relative_to(REPO)))


@needs_promtool
def test_promtool_checks_the_prometheus_config():
    promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(REPO)))


# --- metric names ----------------------------------------------------------------------------

SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum"),
    "info": ("_info",),
}


def exported_names() -> set[str]:
    """The series names of every metric defined in tactful.metrics, labelled or not (a
    labelled metric has no samples until first used, so names come from name and type)."""
    names = set()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.collect():
                names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


EXPORTED = exported_names()

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$:])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan", "atan2", "start", "end"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside strings, label matchers,
    ranges and grouping lists that are not functions, aggregations or keywords."""
    expr = _STRING.sub('""', expr)
    expr = re.sub(r"\{[^{}]*\}", " ", expr)
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)
    expr = _GROUPING.sub(" ", expr)
    return {m for m in _IDENTIFIER.findall(expr) if m.lower() not in _KEYWORDS}


def test_the_promql_name_extraction():
    expr = (
        "histogram_quantile(0.99, sum by (job, le) (rate(grpc_server_handling_seconds_bucket"
        '{grpc_method="Decide", instance=~"$instance"}[$__rate_interval]))) > 1e3 '
        "and on (job) sum(rate(tactful_decisions_total[5m] offset 1d)) > 2 * "
        "(max(tactful_learner_backlog) or vector(0))"
    )
    assert metric_names(expr) == {
        "grpc_server_handling_seconds_bucket",
        "tactful_decisions_total",
        "tactful_learner_backlog",
    }
    assert "tactful_model_version" in EXPORTED and "tactful_learner_lag_seconds_bucket" in EXPORTED
    assert {"grpc_server_handled_total", "grpc_server_started_total"} <= EXPORTED


# --- alerts ----------------------------------------------------------------------------------


def yaml_blocks(text: str, item: str) -> list[str]:
    """The text of each `- <item>:` list entry (up to the next entry at its indentation)."""
    blocks: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(rf"(\s*)- {item}:", line)
        if not m:
            continue
        indent = len(m.group(1))
        block = [line]
        for following in lines[i + 1 :]:
            stripped = following.strip()
            own_indent = len(following) - len(following.lstrip())
            if stripped and not stripped.startswith("#") and own_indent <= indent:
                break
            block.append(following)
        blocks.append("\n".join(block))
    return blocks


def rule_exprs(block: str) -> str:
    """The `expr:` of one rule, inline or a `|` block scalar."""
    lines = block.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        if m.group(2) not in ("|", "|-", ">", ">-"):
            return m.group(2)
        indent = len(m.group(1))
        return "\n".join(
            itertools.takewhile(
                lambda s, indent=indent: not s.strip() or len(s) - len(s.lstrip()) > indent,
                lines[i + 1 :],
            )
        )
    raise AssertionError(f"no expr in\n{block}")


ALERT_BLOCKS = {
    re.match(r"\s*- alert:\s*(\S+)", b).group(1): b  # type: ignore[union-attr]
    for b in yaml_blocks(ALERTS.read_text(), "alert")
}


def test_every_alert_has_severity_annotations_and_real_metric_names():
    assert len(ALERT_BLOCKS) >= 8
    for name, block in ALERT_BLOCKS.items():
        assert re.search(r"severity: (critical|warning)\b", block), name
        for annotation in ("summary", "description", "runbook"):
            assert re.search(rf"^\s+{annotation}: \S", block, re.M), f"{name}: no {annotation}"
        used = metric_names(rule_exprs(block))
        assert used, f"{name}: no metric in its expr"
        # `up` is Prometheus' own, for the scrape-target alert.
        assert used <= EXPORTED | {"up"}, f"{name} uses unknown metrics {used - EXPORTED}"


def test_the_alerts_cover_the_issue():
    used = {n for block in ALERT_BLOCKS.values() for n in metric_names(rule_exprs(block))}
    assert {
        "grpc_server_handling_seconds_bucket",
        "grpc_server_handled_total",
        "tactful_learner_lag_seconds_bucket",
        "tactful_store_fallbacks_total",
        "tactful_decision_log_failures_total",
        "tactful_decisions_total",
        "tactful_learner_backlog",
        "tactful_redis_errors_total",
    } <= used
    assert 'hold_reason="FATIGUE_CAP"' in ALERT_BLOCKS["TactfulFatigueHoldSpike"]
    errors = rule_exprs(ALERT_BLOCKS["TactfulGrpcServerErrorsCritical"])
    faults = re.search(r'grpc_code=~"([^"]+)"', errors)
    assert faults is not None
    codes = set(faults.group(1).split("|"))
    assert {"INTERNAL", "UNAVAILABLE", "UNKNOWN"} <= codes
    assert not codes & {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED"}


def test_every_alert_is_unit_tested_firing_and_not_firing():
    text = ALERTS_TEST.read_text()
    firing, quiet = set(), set()
    for m in re.finditer(r"alertname: (\S+)\n\s+exp_alerts:(.*)", text):
        (quiet if m.group(2).strip() == "[]" else firing).add(m.group(1))
    assert set(ALERT_BLOCKS) <= firing, f"never tested firing: {set(ALERT_BLOCKS) - firing}"
    assert set(ALERT_BLOCKS) <= quiet, f"never tested quiet: {set(ALERT_BLOCKS) - quiet}"
    assert "rule_files:\n  - alerts.yml" in text


def test_prometheus_scrapes_tactful_and_loads_the_alerts():
    config = PROMETHEUS_CONFIG.read_text()
    assert re.search(r"^rule_files:\n\s+- alerts\.yml$", config, re.M)
    target = r'- job_name: tactful\n\s+static_configs:\n\s+- targets: \["tactful:9464"\]'
    assert re.search(target, config)
    assert 'up{job="tactful"}' in ALERT_BLOCKS["TactfulDown"]


# --- Grafana ---------------------------------------------------------------------------------


def provisioned_datasource_uid() -> str:
    text = DATASOURCES.read_text()
    assert len(re.findall(r"^\s+- name:", text, re.M)) == 1, "one datasource expected"
    assert re.search(r"^\s+type: prometheus$", text, re.M)
    assert re.search(r"^\s+url: http://prometheus:9090$", text, re.M)
    uid = re.search(r"^\s+uid: (\S+)$", text, re.M)
    assert uid is not None, "the datasource needs a fixed uid for the dashboard to refer to"
    return uid.group(1)


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def datasource_uids(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        source = node.get("datasource")
        if isinstance(source, dict) and source.get("type") == "prometheus":
            yield source["uid"]
        for value in node.values():
            yield from datasource_uids(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_uids(value)


DASHBOARD_JSON: dict[str, Any] = json.loads(DASHBOARD.read_text())


def test_the_dashboard_queries_only_exported_metrics():
    exprs = [
        (panel["title"], target["expr"])
        for panel in all_panels(DASHBOARD_JSON["panels"])
        for target in panel.get("targets", [])
    ]
    assert len(exprs) >= 15
    used: set[str] = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr}"
        assert names <= EXPORTED, f"panel {title!r} uses unknown metrics {names - EXPORTED}"
        used |= names
    for variable in DASHBOARD_JSON["templating"]["list"]:
        query = variable.get("query", "")
        query = query.get("query", "") if isinstance(query, dict) else query
        for metric in re.findall(r"label_values\((\w+)", query):
            assert metric in EXPORTED, f"variable {variable['name']}: {metric}"
    # What the on-call engineer looks for (the issue's list).
    assert {
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "tactful_decisions_total",
        "tactful_choices_total",
        "tactful_store_fallbacks_total",
        "tactful_learner_lag_seconds_bucket",
        "tactful_learner_backlog",
        "tactful_model_version",
        "tactful_offers_served_total",  # CTR by arm, with the uplift
        "tactful_arm_outcomes_total",
    } <= used
    decide = " ".join(expr for _, expr in exprs if 'grpc_method="Decide"' in expr)
    for quantile in ("0.5", "0.99", "0.999"):
        assert f"histogram_quantile({quantile}," in decide


def test_the_dashboard_uses_the_provisioned_datasource():
    uid = provisioned_datasource_uid()
    uids = list(datasource_uids(DASHBOARD_JSON))
    assert uids and set(uids) == {uid}
    for panel in all_panels(DASHBOARD_JSON["panels"]):
        if panel["type"] != "row":
            assert panel.get("datasource", {}).get("uid") == uid, panel["title"]


def test_the_dashboard_layout():
    panels = list(all_panels(DASHBOARD_JSON["panels"]))
    assert DASHBOARD_JSON["uid"] and DASHBOARD_JSON["title"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = panel["title"]
    # Panels the alerts' runbooks send the on-call engineer to.
    titles = {p["title"] for p in panels}
    cited_panels = re.findall(r'\bpanel "([^"]+)"', " ".join(ALERTS.read_text().split()))
    assert len(cited_panels) >= 5
    for cited in cited_panels:
        assert cited in titles, f"alerts.yml cites a panel the dashboard lacks: {cited}"


# --- docker-compose --------------------------------------------------------------------------


def compose_services(text: str) -> dict[str, str]:
    """Each service's block under the top-level `services:` key (2-space indentation)."""
    section = re.search(r"^services:\n(.*?)(?=^\S)", text, re.M | re.S)
    assert section is not None, "no services: section"
    parts = re.split(r"^  ([\w-]+):\n", section.group(1), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_compose_file_wires_the_stack_together():
    text = COMPOSE.read_text()
    assert "\t" not in text
    services = compose_services(text)
    assert set(services) == {"tactful", "redis", "prometheus", "grafana"}

    tactful = services["tactful"]
    context = re.search(r"^\s+context: (\S+)$", tactful, re.M)
    dockerfile = re.search(r"^\s+dockerfile: (\S+)$", tactful, re.M)
    assert context and dockerfile
    assert (DEPLOY / context.group(1) / dockerfile.group(1)).resolve() == REPO / "Dockerfile"
    assert re.search(r"^\s+TACTFUL_REDIS_URL: redis://redis:6379/0$", tactful, re.M)
    assert re.search(r'^\s+TACTFUL_EMBEDDED_LEARNER: "true"$', tactful, re.M)
    assert "condition: service_healthy" in tactful

    redis = services["redis"]
    assert re.search(r"^\s+image: redis:[\w.-]+$", redis, re.M)  # the official image
    assert '"--appendonly", "yes"' in redis

    # Every port on the host's loopback only.
    for port in re.findall(r'^\s+- "([^"]+)"$', text, re.M):
        if re.fullmatch(r"[\d.]*:?\d+:\d+", port):
            assert port.startswith("127.0.0.1:"), port

    # Every file mounted from the repository exists, and lands where its reader looks.
    mounts: dict[str, str] = {}
    for name, block in services.items():
        for host, container in re.findall(r"^\s+- (\.\.?/[^:\s]+):([^:\s]+)(?::ro)?$", block, re.M):
            assert (DEPLOY / host).exists(), f"{name} mounts missing {host}"
            mounts[container] = host
    assert mounts["/etc/prometheus"] == "./prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]
    provider_path = re.search(r"^\s+path: (\S+)$", DASHBOARD_PROVIDER.read_text(), re.M)
    assert provider_path is not None
    assert mounts[f"{provider_path.group(1)}/tactful.json"] == "./grafana/tactful.json"
    for kind in ("datasources", "dashboards"):
        assert mounts[f"/etc/grafana/provisioning/{kind}"] == f"./grafana/provisioning/{kind}"
    # Prometheus' scrape target is the tactful service's metrics port.
    assert "tactful:9464" in PROMETHEUS_CONFIG.read_text()
    assert re.search(r'^\s+- "127\.0\.0\.1:9464:9464"$', tactful, re.M)


def test_the_yaml_files_parse_when_pyyaml_is_installed():
    """PyYAML is not a dependency; where it is installed, every YAML file is parsed too."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        for path in DEPLOY.rglob("*.yml"):
            assert "\t" not in path.read_text(), path  # YAML forbids tabs for indentation
        return
    for path in DEPLOY.rglob("*.yml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    compose = yaml.safe_load(COMPOSE.read_text())
    assert set(compose["services"]) == {"tactful", "redis", "prometheus", "grafana"}
    env = compose["services"]["tactful"]["environment"]
    assert env["TACTFUL_REDIS_URL"] == "redis://redis:6379/0"
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert {uid for uid in datasource_uids(DASHBOARD_JSON)} == {datasources[0]["uid"]}
