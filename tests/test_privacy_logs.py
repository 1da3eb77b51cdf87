"""User ids never reach logs or metrics: a full run of `tactful serve` at DEBUG level, every
RPC (good and bad input, the learner included), then the logs and /metrics are searched for
the user id and for the digest its keys are named by."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
from test_serve import data_dir, free_port, start, stop, wait_serving  # noqa: F401

from tactful.keys import user_digest
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import profiles_pb2 as p

USER = "privacy-probe-7f3a@example.com"


def every_rpc(channel: grpc.Channel) -> None:
    decisioning = decisioning_pb2_grpc.DecisioningStub(channel)
    profiles = profiles_pb2_grpc.ProfilesStub(channel)
    profiles.SetPreferences(
        p.SetPreferencesRequest(
            user_id=USER,
            topic_preferences=[p.TopicPreference(topic="running", stance=p.STANCE_LIKE)],
            consent=p.Consent(inferred_personalization=True),
        )
    )
    profiles.RecordSignals(
        p.RecordSignalsRequest(user_id=USER, signals=[p.Signal(topic="yoga", weight=2.0)])
    )
    profiles.GetProfile(p.GetProfileRequest(user_id=USER))
    answer = decisioning.Decide(d.DecideRequest(user_id=USER, channel="web", request_id="r1"))
    decisioning.Decide(d.DecideRequest(user_id=USER, channel="web", request_id="r1"))  # replay
    decisioning.Decide(d.DecideRequest(user_id=USER, channel="email", slots=2))
    decisioning.ReportOutcome(
        d.ReportOutcomeRequest(
            decision_id=answer.decision_id,
            offer_id=answer.choices[0].offer_id,
            event=d.OUTCOME_EVENT_CLICK,
            outcome_id="click-1",
        )
    )
    refused = [
        lambda: decisioning.Decide(d.DecideRequest(user_id=USER, channel="web", slots=99)),
        lambda: decisioning.Decide(d.DecideRequest(user_id=USER + "x" * 300, channel="web")),
        lambda: decisioning.ReportOutcome(
            d.ReportOutcomeRequest(
                decision_id=answer.decision_id,
                offer_id=USER,
                event=d.OUTCOME_EVENT_CLICK,
                outcome_id="bad",
            )
        ),
        lambda: profiles.SetPreferences(
            p.SetPreferencesRequest(user_id=USER, topic_preferences=[p.TopicPreference()])
        ),
    ]
    for call in refused:
        try:
            call()
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        else:
            raise AssertionError("bad input was accepted")
    profiles.DeleteProfile(p.DeleteProfileRequest(user_id=USER))


def test_a_full_run_never_writes_a_user_id_to_logs_or_metrics(data_dir: Path):  # noqa: F811
    port, metrics_port = free_port(), free_port()
    server = start(
        data_dir,
        port,
        TACTFUL_LOG_LEVEL="DEBUG",
        TACTFUL_METRICS_PORT=str(metrics_port),
        TACTFUL_REWARD_WINDOW_SECONDS="1",  # the learner closes the email decision's window
    )
    try:
        wait_serving(port, server)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            every_rpc(channel)
        time.sleep(1.5)  # the learner applies the click and the closed window
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            exposition = response.read().decode()
        assert 'tactful_outcomes_total{event="CLICK",result="recorded"} 1.0' in exposition
    finally:
        output = stop(server)
    assert "serving gRPC on" in output  # the run did log
    for secret in (USER, user_digest(USER), USER.split("@")[0]):
        assert secret not in output, f"{secret!r} in the server's logs"
        assert secret not in exposition, f"{secret!r} in /metrics"
