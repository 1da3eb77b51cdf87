"""Standard services a deployment relies on: health (Kubernetes gRPC probes) and reflection
(grpcurl; a setting, off by default), and the NOT_SERVING flip that starts a graceful stop."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tactful.settings import Settings
from tactful.transport.server import SERVICE_NAMES, build_server, connection_age_options

from conftest import make_settings


def test_health_reports_every_service_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", *SERVICE_NAMES):
        response = stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, name


def test_reflection_is_off_by_default(channel):
    assert Settings.from_env({}).server.reflection is False
    with pytest.raises(grpc.RpcError) as off:
        ProtoReflectionDescriptorDatabase(channel).get_services()
    assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_make_serve_turns_reflection_on():
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    serve = makefile.split("\nserve:", 1)[1].split("\n\n", 1)[0]
    assert "TACTFUL_GRPC_REFLECTION=true" in serve


def test_reflection_lists_the_api_when_set(store):
    settings = Settings.from_env({"TACTFUL_GRPC_REFLECTION": "true"})
    assert settings.server.reflection is True
    base = make_settings()
    running = build_server(
        dataclasses.replace(base, server=dataclasses.replace(base.server, reflection=True)),
        store,
        port=0,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    finally:
        running.stop(None)
    assert {
        "tactful.v1.Decisioning",
        "tactful.v1.Profiles",
        "tactful.v1.Catalog",
        "grpc.health.v1.Health",
    } <= services


def test_stop_marks_health_not_serving_first(store):
    running = build_server(make_settings(), store, port=0)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest()).status == 1
        running.health.enter_graceful_shutdown()
        status = stub.Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    running.stop(1.0)


def test_connection_age_options_follow_the_setting():
    settings = Settings.from_env({})
    assert settings.server.max_connection_age_seconds == 0
    assert connection_age_options(settings) == []  # default: connections live forever
    aged = Settings.from_env(
        {
            "TACTFUL_GRPC_MAX_CONNECTION_AGE_SECONDS": "300",
            "TACTFUL_SHUTDOWN_GRACE_SECONDS": "7.5",
        }
    )
    assert connection_age_options(aged) == [
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", 7_500),
    ]


def test_an_old_connection_is_closed_and_the_client_reconnects(store):
    """Behind an L4 balancer a client rebalances only when its connection ends: past the age
    the server sends GOAWAY, the channel drops to IDLE, and the next call reconnects."""
    base = make_settings()
    settings = dataclasses.replace(
        base,
        server=dataclasses.replace(
            base.server, max_connection_age_seconds=0.3, shutdown_grace_seconds=1.0
        ),
    )
    running = build_server(settings, store, port=0)
    states: list[grpc.ChannelConnectivity] = []
    closed = threading.Event()

    def watch(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if grpc.ChannelConnectivity.READY in states and state != grpc.ChannelConnectivity.READY:
            closed.set()

    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            channel.subscribe(watch)
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
            assert closed.wait(10), f"connection still open past its age: {states}"
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
            channel.unsubscribe(watch)
    finally:
        running.stop(1.0)
