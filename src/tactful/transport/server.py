"""Building and running the gRPC server: services, health, reflection, graceful stop.

A call gets one of the server's threads only once its request message has arrived
(transport/receiving.py); health and reflection have threads of their own."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health as standard_health
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from tactful import keys as redis_keys
from tactful.caches import CatalogCache, ModelCache
from tactful.catalog_service import CatalogService
from tactful.decider import Decider
from tactful.features import FeatureSpace
from tactful.hard_rules import RecentRules
from tactful.profile_service import ProfileService
from tactful.settings import Settings
from tactful.store import Store
from tactful.transport import auth, health, receiving
from tactful.transport.interceptor import ServerInterceptor
from tactful.transport.servicers import METHODS, SERVICE_NAMES, add_servicers

log = logging.getLogger(__name__)


#: The threads of the health service (both ports) and of reflection: a probe or a tool never
#: waits behind the API's calls.
HEALTH_THREADS = 1
REFLECTION_THREADS = 2
#: The plaintext health port's message limit: a HealthCheckRequest names one service.
HEALTH_PORT_MAX_RECEIVE_BYTES = 1024


@dataclass
class Running:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    decider: Decider
    catalog: CatalogService
    health_server: grpc.Server | None = None  # TACTFUL_HEALTH_PORT's, when set
    health_port: int = 0
    pools: tuple[futures.ThreadPoolExecutor, ...] = ()

    def stop(self, grace: float | None) -> None:
        """Graceful: report NOT_SERVING first so balancers drain us, then let in-flight
        RPCs finish within the grace period. The health port answers NOT_SERVING until then."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        for pool in self.pools:
            pool.shutdown(wait=False)


def health_only_server(
    settings: Settings,
    servicer: health.HealthServicer,
    pool: futures.ThreadPoolExecutor,
    *,
    port: int,
    reuse_port: bool,
) -> tuple[grpc.Server, int]:
    """A plaintext server with the health service alone, sharing the main server's servicer
    (so both ports report the same status) and threads: a probe that speaks no TLS can ask
    it, and it carries nothing else, so no key or customer data ever crosses it in clear.
    No limit on calls at once: a call waiting for its request holds nothing (so a few cannot
    shut the probe out), and a Check only reads a status."""
    server = grpc.server(
        pool,
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", HEALTH_PORT_MAX_RECEIVE_BYTES),
        ],
        maximum_concurrent_rpcs=None,
    )
    server.add_generic_rpc_handlers((health.handler(servicer, pool),))
    address = f"{settings.server.host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"could not bind the health port {address}")
    server.start()
    return server, bound


def reflection_handler(
    names: Iterable[str], pool: futures.ThreadPoolExecutor, receive_timeout: float
) -> grpc.GenericRpcHandler:
    """Server reflection (grpcio-reflection) on threads of its own. Its calls stream their
    requests: past the first, each holds its thread while it waits for the next, for up to
    the receive time limit."""
    servicer = reflection.ReflectionServicer(tuple(names))
    info = receiving.requests_within(servicer.ServerReflectionInfo, receive_timeout)
    info.experimental_thread_pool = pool  # type: ignore[attr-defined]
    return grpc.method_handlers_generic_handler(
        reflection.SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                info,
                reflection_pb2.ServerReflectionRequest.FromString,
                reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )


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
    # Authentication first: the metrics/error interceptor caches one handler per method.
    interceptors = [
        *auth.interceptors(settings.security, METHODS, address, store),
        ServerInterceptor(),
    ]
    decider, profiles, catalog = _core_services(settings, store)
    receive_timeout = settings.server.receive_timeout_ms / 1000
    pools = _thread_pools(settings, receive_timeout)
    pool, health_pool, reflection_pool = pools
    server = grpc.server(
        pool,
        interceptors=interceptors,
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", settings.server.max_receive_message_bytes),
            *connection_age_options(settings),
        ],
        maximum_concurrent_rpcs=None,  # the pool applies it, once a call's request is there
    )
    add_servicers(server, decider, profiles, catalog)
    health_servicer = health.HealthServicer(("", *SERVICE_NAMES))
    server.add_generic_rpc_handlers((health.handler(health_servicer, health_pool),))
    if settings.server.reflection:
        names = (*SERVICE_NAMES, standard_health.SERVICE_NAME, reflection.SERVICE_NAME)
        handler = reflection_handler(names, reflection_pool, receive_timeout)
        server.add_generic_rpc_handlers((handler,))

    bound = _bind(server, address, credentials)
    _log_transport(settings, tls=credentials is not None)
    server.start()
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = Running(server, bound, health_servicer, decider, catalog, pools=pools)
    plain_health = settings.server.health_port if health_port is None else health_port
    if plain_health:
        _add_health_port(running, settings, health_pool, port=plain_health, reuse_port=reuse_port)
    return running


def _core_services(
    settings: Settings, store: Store
) -> tuple[Decider, ProfileService, CatalogService]:
    """The core behind the three services: one catalog cache, model cache and RecentRules
    shared by all of them."""
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
    return decider, profiles, catalog


def _thread_pools(
    settings: Settings, receive_timeout: float
) -> tuple[receiving.ReceiveFirst, receiving.ReceiveFirst, receiving.ReceiveFirst]:
    """The thread pools of the API's calls, of health and of reflection (see HEALTH_THREADS)."""
    pool = receiving.ReceiveFirst(
        max_workers=settings.server.max_workers,
        receive_timeout=receive_timeout,
        # Load shedding: past this many calls in the process (running or waiting for a
        # thread), a call is refused at once with RESOURCE_EXHAUSTED, so a caller with a
        # render-time deadline hears "no" instead of timing out in a queue.
        max_in_flight=settings.server.max_concurrent_rpcs,
    )
    health_pool = receiving.ReceiveFirst(
        max_workers=HEALTH_THREADS, receive_timeout=receive_timeout, thread_name_prefix="health"
    )
    reflection_pool = receiving.ReceiveFirst(
        max_workers=REFLECTION_THREADS,
        receive_timeout=receive_timeout,
        thread_name_prefix="reflection",
    )
    return pool, health_pool, reflection_pool


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``address``, over TLS when there are credentials; the port bound."""
    bound: int
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise RuntimeError(f"could not bind gRPC port {address}")
    return bound


def _log_transport(settings: Settings, *, tls: bool) -> None:
    """Log how the server is reached: transport, authentication and reflection."""
    security = settings.security
    transport = "TLS" if tls else "plaintext"
    if security.tls_client_ca_file:
        transport += ", client certificates required"
    keys = "off" if security.auth_disabled else f"{len(security.api_keys)} API key(s)"
    log.info(
        "gRPC transport: %s; authentication: %s; reflection: %s",
        transport,
        keys,
        "on" if settings.server.reflection else "off",
    )


def _add_health_port(
    running: Running,
    settings: Settings,
    pool: futures.ThreadPoolExecutor,
    *,
    port: int,
    reuse_port: bool,
) -> None:
    """Start the plaintext health port next to the running server. When it cannot bind, stop
    that server before raising: the caller never gets it, so nothing else would stop it."""
    try:
        running.health_server, running.health_port = health_only_server(
            settings, running.health, pool, port=port, reuse_port=reuse_port
        )
    except RuntimeError:
        running.stop(0)
        raise
    log.info("health service also on %s:%d (plaintext)", settings.server.host, port)


def serve_until_signalled(running: Running, settings: Settings, stop: threading.Event) -> None:
    """Block until ``stop`` is set (by the SIGTERM/SIGINT handler), then stop gracefully."""
    stop.wait()
    log.info(
        "stopping: draining in-flight RPCs for up to %.1fs", settings.server.shutdown_grace_seconds
    )
    running.stop(settings.server.shutdown_grace_seconds)
