"""Building and running the gRPC server: services, health, reflection, graceful stop.

The servers are grpc.aio servers on the process's event loop (transport/loop.py): requests are
received on the loop and the API's calls run in a thread pool once their request is there
(transport/calls.py says why). Everything here is called from ordinary threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from tactful import keys as redis_keys
from tactful.core import (
    CatalogCache,
    CatalogService,
    Decider,
    ModelCache,
    ProfileService,
    RecentRules,
)
from tactful.features import FeatureSpace
from tactful.settings import Settings
from tactful.store import Store
from tactful.transport import auth, standard
from tactful.transport.calls import Calls
from tactful.transport.health import Health, HealthServicer
from tactful.transport.loop import LoopThread, event_loop
from tactful.transport.servicers import CatalogServicer, DecisioningServicer, ProfilesServicer
from tactful.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    decisioning_pb2,
    decisioning_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    decisioning_pb2.DESCRIPTOR.services_by_name["Decisioning"].full_name,
    profiles_pb2.DESCRIPTOR.services_by_name["Profiles"].full_name,
    catalog_pb2.DESCRIPTOR.services_by_name["Catalog"].full_name,
)
#: Every method of the three services, as gRPC names them (``/tactful.v1.Catalog/PutOffer``).
METHODS = tuple(
    f"/{service.full_name}/{method.name}"
    for module in (decisioning_pb2, profiles_pb2, catalog_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
)
#: The plaintext health port's message limit: a HealthCheckRequest names one service.
HEALTH_PORT_MAX_RECEIVE_BYTES = 1024


@dataclass
class Running:
    server: Any  # grpc.aio.Server
    port: int
    health: Health
    decider: Decider
    catalog: CatalogService
    loop: LoopThread
    pool: futures.ThreadPoolExecutor
    health_server: Any | None = None  # TACTFUL_HEALTH_PORT's, when set
    health_port: int = 0

    def stop(self, grace: float | None) -> None:
        """Graceful: report NOT_SERVING first so balancers drain us, then let in-flight
        RPCs finish within the grace period (None: cancel them at once). The health port
        answers NOT_SERVING until then. Returns once no call of this server runs."""
        self.health.enter_graceful_shutdown()
        self.loop.run(self._stop(grace))
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def _stop(self, grace: float | None) -> None:
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(None)


class _Handlers:
    """Stands in for a server to the generated ``add_*Servicer_to_server`` functions, and
    keeps the method handlers they register, by service."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers come again, by name, below

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self.services[service] = dict(handlers)


def connection_age_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC channel options that close a connection once it is TACTFUL_GRPC_MAX_CONNECTION_AGE_
    SECONDS old (gRPC adds +-10 % jitter, so a fleet's clients do not all reconnect at once).

    gRPC keeps one long-lived HTTP/2 connection per client: behind an L4 balancer (a ClusterIP
    Service) every call of a client then goes to the pod it first reached, and pods added by
    an autoscaler get no traffic. A GOAWAY at the age limit makes the client reconnect, and the
    balancer picks again; calls in flight get the shutdown grace to finish."""
    server = settings.server
    if server.max_connection_age_seconds <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", max(1, round(server.max_connection_age_seconds * 1000))),
        ("grpc.max_connection_age_grace_ms", round(server.shutdown_grace_seconds * 1000)),
    ]


def _bind(server: Any, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise RuntimeError(f"could not bind {address}")
    return int(bound)


def _add(server: Any, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def _add_standard(server: Any, calls: Calls, services: _Handlers, *, observe: bool) -> None:
    """The standard services' handlers; ``observe``: health Check keeps its gRPC metrics."""
    for service, handlers in services.services.items():
        wrapped = {
            m: standard.handler(calls, f"/{service}/{m}", h, observe=observe)
            for m, h in handlers.items()
        }
        _add(server, service, wrapped)


@dataclass(frozen=True)
class _Plan:
    """What build_server works out before anything starts."""

    settings: Settings
    address: str
    credentials: grpc.ServerCredentials | None
    reuse_port: bool
    health_port: int
    calls: Calls
    api: dict[str, dict[str, grpc.RpcMethodHandler]]


async def _start(plan: _Plan) -> tuple[Any, int, HealthServicer, Any | None, int]:
    """On the loop: the main server (and the health port's), started."""
    settings, calls = plan.settings, plan.calls
    reuse = ("grpc.so_reuseport", 1 if plan.reuse_port else 0)
    server = grpc.aio.server(
        migration_thread_pool=calls.pool,
        options=[
            reuse,
            ("grpc.max_receive_message_length", settings.server.max_receive_message_bytes),
            *connection_age_options(settings),
        ],
    )
    for service, handlers in plan.api.items():
        _add(server, service, {m: calls.api(f"/{service}/{m}", h) for m, h in handlers.items()})

    servicer = HealthServicer(("", *SERVICE_NAMES))
    services = _Handlers()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, services)
    if settings.server.reflection:
        names = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(names), services
        )
    _add_standard(server, calls, services, observe=True)
    server.add_generic_rpc_handlers((calls.refuse_unknown(),))
    bound = _bind(server, plan.address, plan.credentials)
    for name in ("", *SERVICE_NAMES):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    if not plan.health_port:
        return server, bound, servicer, None, 0
    try:
        health_server, health_bound = await _start_health_only(plan, servicer)
    except RuntimeError:
        await server.stop(None)
        raise
    return server, bound, servicer, health_server, health_bound


async def _start_health_only(plan: _Plan, servicer: HealthServicer) -> tuple[Any, int]:
    """A plaintext server with the health service alone, sharing the main server's servicer
    (so both ports report the same status): a probe that speaks no TLS can ask it, and it
    carries nothing else, so no key or customer data ever crosses it in clear."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1 if plan.reuse_port else 0),
            ("grpc.max_receive_message_length", HEALTH_PORT_MAX_RECEIVE_BYTES),
        ],
    )
    services = _Handlers()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, services)
    _add_standard(server, plan.calls, services, observe=False)
    address = f"{plan.settings.server.host}:{plan.health_port}"
    try:
        bound = _bind(server, address, None)
    except RuntimeError:
        raise RuntimeError(f"could not bind the health port {address}") from None
    await server.start()
    return server, bound


def build_server(
    settings: Settings,
    store: Store,
    *,
    port: int | None = None,
    reuse_port: bool = False,
    health_port: int | None = None,
) -> Running:
    """Create and start a server; ``port=0`` binds a free port (tests). Returns it running.
    ``health_port`` (default TACTFUL_HEALTH_PORT; 0 none) adds the plaintext health port.

    ``reuse_port``: bind with SO_REUSEPORT, for the worker processes that share one port
    (TACTFUL_WORKERS > 1). Off otherwise, so a second server on a port in use fails to bind
    instead of silently sharing it.

    Raises SettingsError when the security settings cannot serve (no API keys with auth on,
    unreadable TLS files)."""
    bind_port = settings.server.grpc_port if port is None else port
    address = f"{settings.server.host}:{bind_port}"
    credentials = auth.server_credentials(settings.security)
    authenticator = auth.authenticator(settings.security, METHODS, address, store)
    redis_keys.prepare()
    catalog_cache = CatalogCache(store)
    space = FeatureSpace(settings.learning.hashed_bits, settings.learning.feature_set)
    models = ModelCache(store, space, settings.learning.kappa)
    # What this process knows of each recent user's hard rules, for answers without the
    # store: Decide fills it, SetPreferences and DeleteProfile keep it current.
    recent = RecentRules()
    decider = Decider(store, catalog_cache, models, settings, recent=recent)
    catalog = CatalogService(store, catalog_cache, settings.segments)
    profiles = ProfileService(store, settings, recent=recent)

    api = _Handlers()
    decisioning_pb2_grpc.add_DecisioningServicer_to_server(DecisioningServicer(decider), api)
    profiles_pb2_grpc.add_ProfilesServicer_to_server(ProfilesServicer(profiles), api)
    catalog_pb2_grpc.add_CatalogServicer_to_server(CatalogServicer(catalog), api)
    pool = futures.ThreadPoolExecutor(
        max_workers=settings.server.max_workers, thread_name_prefix="rpc"
    )
    calls = Calls(
        pool=pool,
        receive_timeout=settings.server.receive_timeout_ms / 1000,
        # Load shedding: past this many calls in the process (running or waiting for a
        # thread), a call is refused at once with RESOURCE_EXHAUSTED, so a caller with a
        # render-time deadline hears "no" in a millisecond instead of timing out in a queue.
        max_in_flight=settings.server.max_concurrent_rpcs,
        authenticator=authenticator,
    )
    plain_health = settings.server.health_port if health_port is None else health_port
    plan = _Plan(settings, address, credentials, reuse_port, plain_health, calls, api.services)
    loop = event_loop()
    try:
        server, bound, servicer, health_server, health_bound = loop.run(_start(plan))
    except BaseException:
        pool.shutdown(wait=False)
        raise
    security = settings.security
    transport = "plaintext" if credentials is None else "TLS"
    if security.tls_client_ca_file:
        transport += ", client certificates required"
    keys = "off" if security.auth_disabled else f"{len(security.api_keys)} API key(s)"
    log.info(
        "gRPC transport: %s; authentication: %s; reflection: %s",
        transport,
        keys,
        "on" if settings.server.reflection else "off",
    )
    if health_server is not None:
        log.info("health service also on %s:%d (plaintext)", settings.server.host, plain_health)
    return Running(
        server,
        bound,
        Health(servicer, loop),
        decider,
        catalog,
        loop,
        pool,
        health_server,
        health_bound,
    )


def serve_until_signalled(running: Running, settings: Settings, stop: threading.Event) -> None:
    """Block until ``stop`` is set (by the SIGTERM/SIGINT handler), then stop gracefully."""
    stop.wait()
    log.info(
        "stopping: draining in-flight RPCs for up to %.1fs", settings.server.shutdown_grace_seconds
    )
    running.stop(settings.server.shutdown_grace_seconds)
