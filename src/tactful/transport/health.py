"""The standard health service (grpcio-health-checking), for the fixed set of service names
this server has, on a thread pool of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2


class HealthServicer(health.HealthServicer):  # type: ignore[misc]
    """Watch of a name the server does not serve is NOT_FOUND at once, as Check is.

    The standard servicer answers such a Watch SERVICE_UNKNOWN and keeps the call open, in
    case the service appears later (ours never do), and it remembers every name it was asked
    about, for good: a few hundred calls with 4 MiB names grew a worker by a gigabyte."""

    def __init__(self, services: Iterable[str]) -> None:
        super().__init__(experimental_non_blocking=True)
        self._known = frozenset(services)

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> Any:
        if request.service not in self._known:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return super().Watch(request, context, send_response_callback)


def handler(servicer: HealthServicer, pool: futures.ThreadPoolExecutor) -> grpc.GenericRpcHandler:
    """The health service's methods, run on ``pool`` (gRPC's per-method thread pool hook): a
    probe never waits behind the API's calls, nor is refused by their limit."""

    def check(request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Any:
        return servicer.Check(request, context)

    def watch(
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> Any:
        return servicer.Watch(request, context, send_response_callback)

    check.experimental_thread_pool = pool  # type: ignore[attr-defined]
    watch.experimental_thread_pool = pool  # type: ignore[attr-defined]
    # Non-blocking: Watch returns at once and answers through send_response_callback, so an
    # open Watch holds no thread.
    watch.experimental_non_blocking = True  # type: ignore[attr-defined]
    decode = health_pb2.HealthCheckRequest.FromString
    encode = health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler(
        health.SERVICE_NAME,
        {
            "Check": grpc.unary_unary_rpc_method_handler(check, decode, encode),
            "Watch": grpc.unary_stream_rpc_method_handler(watch, decode, encode),
        },
    )
