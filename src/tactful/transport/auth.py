"""Who may call what: API keys with roles, checked by a server interceptor, and the server's
TLS credentials.

A client sends its key in metadata (``authorization: Bearer <key>`` or ``x-api-key: <key>``).
Settings hold only the keys' sha256 digests (``TACTFUL_API_KEYS``): the presented key is
hashed, looked up by its digest, and the digests compared in constant time. Each method needs
one role, worked out once per method; ``admin`` implies every role. Health checking and
reflection stay open (probes and tools carry no key); any other method no table names needs
``admin`` (default deny).

A refused call never reaches the servicer (its request is not even parsed). It is counted in
``grpc_server_started_total`` / ``grpc_server_handled_total`` with its status code like any
other call, and in ``tactful_auth_failures_total{reason}``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc

from tactful import metrics
from tactful.settings import SecuritySettings, SettingsError

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
        self, api_keys: Sequence[tuple[str, Sequence[str]]], methods: Iterable[str]
    ) -> None:
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
        return continuation(details)

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

    return grpc.unary_unary_rpc_method_handler(refuse)


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
    security: SecuritySettings, methods: Iterable[str], port_hint: str
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
    return [AuthInterceptor(security.api_keys, methods)]
