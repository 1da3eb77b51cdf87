"""Who may call what: API keys with roles, checked before a call's request is even read, and
the server's TLS credentials.

A client sends its key in metadata (``authorization: Bearer <key>`` or ``x-api-key: <key>``).
Settings hold only the keys' sha256 digests (``TACTFUL_API_KEYS``): the presented key is
hashed, looked up by its digest, and the digests compared in constant time. Each method needs
one role, worked out once per method; ``admin`` implies every role. Health checking and
reflection stay open (probes and tools carry no key); any other method no table names needs
``admin`` (default deny).

A refused call never reaches the servicer: it is answered at once, its request message not
waited for nor parsed. It is counted in ``grpc_server_started_total`` /
``grpc_server_handled_total`` with its status code like any other call, and in
``tactful_auth_failures_total{reason}``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tactful import keys, metrics
from tactful.errors import Unavailable
from tactful.settings import SecuritySettings, SettingsError
from tactful.store import Store
from tactful.transport.statuses import Failure, failure

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


class Authenticator:
    """Judges a call by its method and metadata alone: refused (UNAUTHENTICATED without a
    known key, PERMISSION_DENIED when the key lacks the method's role), or let through. CPU
    only, a sha256 and a dict lookup: it runs on the event loop as the call starts.

    ``methods`` are the full names of the methods the server has: their roles are worked out
    once. A name outside them is judged on every call and kept nowhere, so a caller cannot
    grow memory by inventing method names."""

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

    def admit(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> Failure | bytes | None:
        """The refusal to answer the call with; else the digest of the caller's key (None: an
        open service, no key asked)."""
        role = self._roles[method] if method in self._roles else required_role(method)
        if role is None:
            return None
        key = presented_key(metadata)
        if not key:
            return _refuse(method, "missing_key" if key is None else "malformed", role)
        presented = hashlib.sha256(key.encode()).digest()
        # Looked up by the digest of what was presented, then compared in constant time: no
        # timing depends on how much of a stored digest a guess matches.
        stored, roles = self._keys.get(presented, (_NO_DIGEST, frozenset()))
        if not hmac.compare_digest(stored, presented):
            return _refuse(method, "unknown_key", role)
        if role not in roles:
            return _refuse(method, "forbidden", role)
        return presented

    def seconds_to_wait(self, digest: bytes | None) -> float:
        """The key's rate limit: 0 when the call may go on now. A Redis round trip: call it
        from the thread pool, never from the event loop."""
        if self._limiter is None or digest is None:
            return 0.0
        return self._limiter(digest)


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


def _refuse(method: str, reason: str, role: str) -> Failure:
    code, message = _MESSAGES[reason]
    if reason == "forbidden":
        message = f"{message} {role!r} that {method} needs"
    metrics.AUTH_FAILURES.labels(reason).inc()
    log.debug("refused %s: %s", method, reason)
    return Failure(code, message)


def rate_limited(wait: float) -> Failure:
    """RESOURCE_EXHAUSTED for a key past its rate, with a google.rpc.RetryInfo of ``wait``."""
    metrics.RATE_LIMITED.inc()
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1_000_000, int(wait * 1e9)))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return failure(
        status_pb2.Status(
            code=code_pb2.RESOURCE_EXHAUSTED,
            message=f"rate limit of this API key reached: retry in {wait:.3f} s",
            details=[detail],
        )
    )


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


def authenticator(
    security: SecuritySettings, methods: Iterable[str], port_hint: str, store: Store
) -> Authenticator | None:
    """The authenticator for these settings, or none (loudly) when auth is disabled."""
    if security.auth_disabled:
        log.warning(
            "*** AUTHENTICATION DISABLED (TACTFUL_AUTH_DISABLED=true): anyone who can reach %s "
            "can read and erase profiles and change the catalog. Development only. ***",
            port_hint,
        )
        return None
    check_serving(security)
    return Authenticator(security.api_keys, methods, rate_limiter(store, security))
