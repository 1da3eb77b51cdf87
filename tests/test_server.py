"""Standard services a deployment relies on: health (Kubernetes gRPC probes) and reflection
(grpcurl), and the NOT_SERVING flip that starts a graceful stop."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tactful.transport.server import SERVICE_NAMES, build_server

from conftest import make_settings


def test_health_reports_every_service_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", *SERVICE_NAMES):
        response = stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, name


def test_reflection_lists_the_api(channel):
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
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
