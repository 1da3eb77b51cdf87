"""Prometheus exposition, scraped over HTTP as Prometheus would."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client import start_http_server

from tactful.transport.server import build_server
from tactful.v1 import catalog_pb2, catalog_pb2_grpc, decisioning_pb2_grpc
from tactful.v1 import decisioning_pb2 as d

from conftest import make_settings, offer


@pytest.fixture(scope="module")
def metrics_url():
    server, thread = start_http_server(0, addr="127.0.0.1")
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    thread.join()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def sample(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_grpc_and_domain_metrics_without_user_ids(metrics_url, catalog, decisioning):
    ok = (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Decide",'
        'grpc_service="tactful.v1.Decisioning",grpc_type="unary"}'
    )
    invalid = ok.replace('grpc_code="OK"', 'grpc_code="INVALID_ARGUMENT"')
    before = scrape(metrics_url)
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a")))
    for i in range(3):
        decisioning.Decide(d.DecideRequest(user_id=f"secret-user-{i}", channel="web"))
    with pytest.raises(grpc.RpcError):
        decisioning.Decide(d.DecideRequest(user_id="secret-user-x", channel="Not A Channel"))
    after = scrape(metrics_url)

    assert sample(after, ok) == sample(before, ok) + 3
    assert sample(after, invalid) == sample(before, invalid) + 1
    assert "grpc_server_started_total{" in after
    assert 'grpc_server_handling_seconds_bucket{grpc_method="Decide"' in after
    assert 'le="0.00025"' in after  # sub-millisecond buckets
    assert 'tactful_decisions_total{arm="PERSONALIZED",channel="web",hold_reason="NONE"}' in after
    assert (
        'tactful_redis_operation_seconds_bucket{le="0.0001",operation="read_for_decision"}' in after
    )
    assert 'tactful_choices_total{reason="BUSINESS_PRIORITY"}' in after
    assert "secret-user" not in after


def test_unconfigured_channels_share_one_label(metrics_url, decisioning):
    for i in range(5):
        decisioning.Decide(d.DecideRequest(user_id="u", channel=f"kiosk-{i}"))
    text = scrape(metrics_url)
    assert "kiosk" not in text  # callers cannot grow the label set
    assert 'channel="other"' in text


def test_ctr_by_arm_counts_offers_served_and_each_outcome_once(metrics_url, store):
    """What the dashboard's "CTR by arm" divides: offers served (never a dry run's) and
    outcomes recorded, both by the arm of their decision; a repeated outcome_id counts once."""
    running = build_server(make_settings(control_share=0.5), store, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            catalog_pb2_grpc.CatalogStub(channel).PutOffer(
                catalog_pb2.PutOfferRequest(offer=offer("a"))
            )
            decide = decisioning_pb2_grpc.DecisioningStub(channel)
            before = scrape(metrics_url)
            answers = [
                decide.Decide(d.DecideRequest(user_id=f"ctr-user-{i}", channel="web"))
                for i in range(20)
            ]
            decide.Decide(d.DecideRequest(user_id="ctr-user-0", channel="web", dry_run=True))
            for answer in answers:
                for _ in range(3):  # the same outcome_id three times: a client's retries
                    decide.ReportOutcome(
                        d.ReportOutcomeRequest(
                            decision_id=answer.decision_id,
                            offer_id="a",
                            event=d.OUTCOME_EVENT_CLICK,
                            outcome_id="click",
                        )
                    )
            after = scrape(metrics_url)
    finally:
        running.stop(None)
    arms = {d.Arm.Name(a.arm).removeprefix("ARM_") for a in answers}
    assert arms == {"PERSONALIZED", "CONTROL"}  # both arms, with half the users in control
    for arm in arms:
        n = sum(d.Arm.Name(a.arm) == f"ARM_{arm}" for a in answers)
        served = f'tactful_offers_served_total{{arm="{arm}",channel="web"}}'
        clicks = f'tactful_arm_outcomes_total{{arm="{arm}",event="CLICK"}}'
        assert sample(after, served) - sample(before, served) == n
        assert sample(after, clicks) - sample(before, clicks) == n
