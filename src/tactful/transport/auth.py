"""Who may call what: API keys with roles, checked by a server interceptor, and the server's
TLS credentials.

A client sends its key in metadata (``authorization: Bearer <key>`` or ``x-api-key: <key>``).
Settings hold only the keys' sha256 digests (``TACTFUL_API_KEYS``): the presented key is
hashed, looked up by its digest, and the digests compared in constant time. Each method needs
one role, worked out once per method; ``admin`` implies every role. Health checking and
reflection stay open (probes and tools carry no key); any other method no table names needs
``admin`` (default deny).

A refused call never reaches the servicer: it is answered at once, its request neither waited
for nor parsed. It is counted in ``grpc_server_started_total`` / ``grpc_server_handled_total``
with its status code like any other call, and in ``tactful_auth_failures_total{reason}``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tactful import keys, metrics
from tactful.errors import Unavailable
from tactful.settings import SecuritySettings, SettingsError
from tactful.store import Store
from tactful.transport import receiving

log = logging.getLogger(__name__)

DECIDE, PROFILE, ADMIN = "decide", "profile", "admin"

#: The role each service needs, and the methods that need another one.
SERVICE_ROLES = {
    "tactful.v1.Decisioning": DECIDE,
    "tactful.v1.Profiles": PROFILE,
    "tactful.v1.Catalog": ADMIN,
}
METHOD_ROLES = {
    # Erasure deletes a customer's whole history: not for a front end that edits preferences.
    "/tactful.v1.Profiles/DeleteProfile": ADMIN,
}
#: Services anyone may call: orchestrator probes and grpcurl carry no key.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

_BEARER = "bearer "


def required_role(full_method: str) -> str | None:
    """The role ``/package.Service/Method`` needs; None: open to all."""
    if full_method in METHOD_ROLES:
        return METHOD_ROLES[full_method]
    service = full_method.lstrip("/").rpartition("/")[0]
    if service in OPEN_SERVICES:
        return None
    return SERVICE_ROLES.get(service, ADMIN)


def effective_roles(roles: Sequence[str]) -> frozenset[str]:
    return frozenset({DECIDE, PROFILE, ADMIN}) if ADMIN in roles else frozenset(roles)


def presented_key(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The key in ``authorization: Bearer <key>`` (first) or ``x-api-key: <key>``; "" when
    a header is there but holds no usable key; None when there is none."""
    api_key: str | None = None
    for name, value in metadata or ():
        if name == "authorization":
            if not isinstance(value, str) or value[: len(_BEARER)].lower() != _BEARER:
                return ""
            return value[len(_BEARER) :].strip()
        if name == "x-api-key" and api_key is None:
            api_key = value.strip() if isinstance(value, str) else ""
    return api_key


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuses a call without a known key (UNAUTHENTICATED) or whose key lacks the method's
    role (PERMISSION_DENIED). Must come first among the server's interceptors: the ones after
    it cache their handler per method, whoever calls.

    ``methods`` are the full names of the methods the server has: their roles and refusal
    handlers are worked out once. A name outside them is judged on every call and cached
    nowhere, so a caller cannot grow memory or metric labels by inventing method names."""

    def __init__(
        self,
        api_keys: Sequence[tuple[str, Sequence[str]]],
        methods: Iterable[str],
        limiter: Limiter | None = None,
    ) -> None:
        self._limiter = limiter
        self._keys = {
            digest: (digest, effective_roles(roles))
            for digest, roles in ((bytes.fromhex(h), r) for h, r in api_keys)
        }
        self._roles = {method: required_role(method) for method in methods}
        self._refusals = {
            (method, reason): _refusal(method, reason, role, labelled=True)
            for method, role in self._roles.items()
            if role is not None
            for reason in _MESSAGES
        }

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = details.method
        role = self._roles[method] if method in self._roles else required_role(method)
        if role is None:
            return continuation(details)
        key = presented_key(details.invocation_metadata)
        if not key:
            return self._refuse(method, "missing_key" if key is None else "malformed", role)
        presented = hashlib.sha256(key.encode()).digest()
        # Looked up by the digest of what was presented, then compared in constant time: no
        # timing depends on how much of a stored digest a guess matches.
        stored, roles = self._keys.get(presented, (_NO_DIGEST, frozenset()))
        if not hmac.compare_digest(stored, presented):
            return self._refuse(method, "unknown_key", role)
        if role not in roles:
            return self._refuse(method, "forbidden", role)
        handler = continuation(details)
        if self._limiter is None or handler is None or handler.unary_unary is None:
            return handler
        return _rate_limited(handler, self._limiter, presented, method, method in self._roles)

    def _refuse(self, method: str, reason: str, role: str) -> grpc.RpcMethodHandler:
        handler = self._refusals.get((method, reason))
        return handler or _refusal(method, reason, role, labelled=False)


_NO_DIGEST = bytes(32)

_MESSAGES = {
    "missing_key": (
        grpc.StatusCode.UNAUTHENTICATED,
        "no API key: send metadata `authorization: Bearer <key>` (or `x-api-key: <key>`)",
    ),
    "malformed": (
        grpc.StatusCode.UNAUTHENTICATED,
        "malformed credentials: expected `authorization: Bearer <key>`",
    ),
    "unknown_key": (grpc.StatusCode.UNAUTHENTICATED, "unknown API key"),
    "forbidden": (grpc.StatusCode.PERMISSION_DENIED, "this API key lacks the role"),
}


def _refusal(method: str, reason: str, role: str, *, labelled: bool) -> grpc.RpcMethodHandler:
    """A handler that refuses at once (its request left unparsed), counted like any call."""
    code, message = _MESSAGES[reason]
    if reason == "forbidden":
        message = f"{message} {role!r} that {method} needs"
    failures = metrics.AUTH_FAILURES.labels(reason)
    counters = []
    if labelled:  # a made-up method name must not become a label value
        service, _, name = method.lstrip("/").rpartition("/")
        counters = [
            metrics.GRPC_STARTED.labels("unary", service, name),
            metrics.GRPC_HANDLED.labels("unary", service, name, code.name),
        ]

    def refuse(request: Any, context: grpc.ServicerContext) -> NoReturn:
        failures.inc()
        for counter in counters:
            counter.inc()
        log.debug("refused %s: %s", method, reason)
        context.abort(code, message)
        raise AssertionError("unreachable")  # pragma: no cover - abort raises

    # Answered at once: the request is not waited for (transport/receiving.py).
    setattr(refuse, receiving.ANSWERS_UNREAD, True)
    return grpc.unary_unary_rpc_method_handler(refuse)


#: Given an API key's digest, the seconds until it may call again (0: now).
Limiter = Callable[[bytes], float]


def rate_limiter(store: Store, security: SecuritySettings) -> Limiter | None:
    """The per-key token bucket of the settings, kept in Redis so every process shares it;
    None when there is no limit. A store that cannot be asked lets the call through: a rate
    limit must not turn a Redis outage into an API outage."""
    rate = security.rate_limit_per_second
    if not rate:
        return None
    burst = security.rate_limit_burst or max(1.0, rate)

    def seconds_to_wait(digest: bytes) -> float:
        try:
            return store.take_token(bucket=keys.rate_bucket(digest), rate=rate, burst=burst)
        except Unavailable:
            metrics.RATE_LIMIT_UNCHECKED.inc()
            return 0.0

    return seconds_to_wait


def _rate_limited(
    handler: grpc.RpcMethodHandler, limiter: Limiter, digest: bytes, method: str, known: bool
) -> grpc.RpcMethodHandler:
    """``handler``, asking the key's bucket first. The check runs in the RPC's thread, not in
    the interceptor: gRPC calls interceptors on its one serving thread, which must never wait
    on Redis."""
    behavior = handler.unary_unary

    def limited(request: Any, context: grpc.ServicerContext) -> Any:
        wait = limiter(digest)
        if wait <= 0:
            return behavior(request, context)
        metrics.RATE_LIMITED.inc()
        if known:  # a made-up method name must not become a label value
            service, _, name = method.lstrip("/").rpartition("/")
            metrics.GRPC_STARTED.labels("unary", service, name).inc()
            code = grpc.StatusCode.RESOURCE_EXHAUSTED.name
            metrics.GRPC_HANDLED.labels("unary", service, name, code).inc()
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1_000_000, int(wait * 1e9)))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status = status_pb2.Status(
            code=code_pb2.RESOURCE_EXHAUSTED,
            message=f"rate limit of this API key reached: retry in {wait:.3f} s",
            details=[detail],
        )
        context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError("unreachable")  # pragma: no cover - abort raises

    return grpc.unary_unary_rpc_method_handler(
        limited,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _read(path: str, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{setting}={path!r}: cannot read it ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise SettingsError(f"{setting}={path!r}: not a PEM file")
    return data


def server_credentials(security: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings (mutual TLS with a client CA); None: plaintext."""
    if not security.tls_cert_file:
        return None
    cert = _read(security.tls_cert_file, "TACTFUL_TLS_CERT_FILE")
    key = _read(security.tls_key_file, "TACTFUL_TLS_KEY_FILE")
    client_ca = (
        _read(security.tls_client_ca_file, "TACTFUL_TLS_CLIENT_CA_FILE")
        if security.tls_client_ca_file
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def check_serving(security: SecuritySettings) -> None:
    """What a server needs beyond well-formed settings: keys (unless auth is off) and readable
    TLS files. Raises SettingsError before anything starts."""
    if not security.auth_disabled and not security.api_keys:
        raise SettingsError(
            "authentication is on but TACTFUL_API_KEYS is empty, so every call would be "
            "refused: make a key with `python -m tactful new-key --roles decide` and set "
            "TACTFUL_API_KEYS, or (local development only) set TACTFUL_AUTH_DISABLED=true"
        )
    server_credentials(security)


def interceptors(
    security: SecuritySettings, methods: Iterable[str], port_hint: str, store: Store
) -> list[grpc.ServerInterceptor]:
    """The auth interceptor for these settings, or none (loudly) when auth is disabled."""
    if security.auth_disabled:
        log.warning(
            "*** AUTHENTICATION DISABLED (TACTFUL_AUTH_DISABLED=true): anyone who can reach %s "
            "can read and erase profiles and change the catalog. Development only. ***",
            port_hint,
        )
        return []
    check_serving(security)
    return [AuthInterceptor(security.api_keys, methods, rate_limiter(store, security))]
