"""The standard health service (grpcio-health-checking's asyncio servicer, answered on the
event loop, no thread), for the fixed set of service names this server has; and its status,
set from any thread."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from tactful.transport.loop import LoopThread


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """Watch of a name the server does not serve is NOT_FOUND at once, as Check is.

    The standard servicer answers such a Watch SERVICE_UNKNOWN and keeps the call open, and
    the name with it, in case the service appears later; ours never do. Refused, a name costs
    nothing past its call, however many a caller makes up."""

    def __init__(self, services: Iterable[str]) -> None:
        super().__init__()
        self._known = frozenset(services)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        if request.service not in self._known:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        await super().Watch(request, context)


class Health:
    """The servers' health status: SERVING for every service once they start; NOT_SERVING
    for good once a graceful stop begins. The servicer lives on the event loop; these methods
    may be called from any other thread."""

    def __init__(self, servicer: HealthServicer, loop: LoopThread) -> None:
        self.servicer = servicer
        self._loop = loop

    def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        self._loop.run(self.servicer.set(service, status))

    def enter_graceful_shutdown(self) -> None:
        self._loop.run(self.servicer.enter_graceful_shutdown())
