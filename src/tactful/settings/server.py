"""How the server runs: where it listens, its processes, threads and call limits."""

from __future__ import annotations

from dataclasses import dataclass

from tactful.settings.fields import setting


@dataclass(frozen=True)
class ServerSettings:
    host: str = setting(
        "TACTFUL_GRPC_HOST", "0.0.0.0", "Address the gRPC server and the metrics endpoint bind."
    )
    grpc_port: int = setting(
        "TACTFUL_GRPC_PORT", 50051, "gRPC port (0 picks a free one).", min=0, max=65535
    )
    metrics_port: int = setting(
        "TACTFUL_METRICS_PORT", 9464, "Prometheus /metrics port (0 disables).", min=0, max=65535
    )
    health_port: int = setting(
        "TACTFUL_HEALTH_PORT",
        0,
        "A second, plaintext gRPC port serving only the standard health service (no API, no "
        "reflection, no key): for probes that cannot speak TLS, such as Kubernetes' native gRPC "
        "probe, when TACTFUL_TLS_CERT_FILE is set. Same status as the main port. 0: none.",
        min=0,
        max=65535,
    )
    reflection: bool = setting(
        "TACTFUL_GRPC_REFLECTION",
        False,
        "Serve gRPC server reflection (grpcurl, Postman list and describe the API without the "
        ".proto files). Off by default: it hands the whole API surface to anyone who can reach "
        "the port, and no client needs it to call. `make serve` turns it on.",
    )
    workers: int = setting(
        "TACTFUL_WORKERS",
        1,
        "Server processes sharing the gRPC port (SO_REUSEPORT; the kernel spreads connections, "
        "not calls, over them). 1: one process. More: a supervisor process starts "
        "the embedded redis-server, the workers and one learner process, restarts any that "
        "dies, and serves /metrics summed over them. Python runs one core per process: up to "
        "the cores left once redis-server has one.",
        min=1,
        max=64,
    )
    metrics_dir: str = setting(
        "TACTFUL_METRICS_DIR",
        "",
        "With TACTFUL_WORKERS > 1: where the processes keep their metric files (prometheus-"
        "client multiprocess mode; best on tmpfs). Emptied at start. Empty: a new temporary "
        "directory, removed at exit.",
    )
    max_workers: int = setting(
        "TACTFUL_GRPC_MAX_WORKERS",
        4,
        "Threads serving API calls in one process, each given to a call once its request "
        "message has arrived (health and reflection have threads of their own). Python runs "
        "one of them at a time (the GIL): "
        "more threads than it takes to cover the Redis round trips only add contention "
        '(bench/README.md, "Other measured figures"). '
        "Raise it when Redis is far away (each thread waits out two round trips per Decide).",
        min=1,
        max=1024,
    )
    max_concurrent_rpcs: int = setting(
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
    receive_timeout_ms: float = setting(
        "TACTFUL_GRPC_RECEIVE_TIMEOUT_MS",
        5000.0,
        "How long a call may take to deliver its request message (each message, on a "
        "streaming call) once it has started; past it the call is ended with CANCELLED. "
        "Until its message is there a call holds no thread and is not counted in "
        "TACTFUL_MAX_CONCURRENT_RPCS; this bounds how long it holds anything at all.",
        min=1.0,
        max=600_000.0,
    )
    max_receive_message_bytes: int = setting(
        "TACTFUL_GRPC_MAX_RECEIVE_MESSAGE_BYTES",
        256 * 1024,
        "Largest request message accepted (larger: RESOURCE_EXHAUSTED before it is read "
        "whole). The largest valid request is a Decide with 1,000 candidates of the longest "
        "offer ids and full context maps, 157 KB (tests/test_transport_limits.py). The "
        "plaintext health port takes 1 KiB.",
        min=64 * 1024,
        max=64 * 1024 * 1024,
    )
    max_connection_age_seconds: float = setting(
        "TACTFUL_GRPC_MAX_CONNECTION_AGE_SECONDS",
        0.0,
        "Close each client connection after about this long (gRPC sends GOAWAY; calls in "
        "flight get TACTFUL_SHUTDOWN_GRACE_SECONDS to finish), so clients behind an L4 load "
        "balancer reconnect and spread over new server pods (0: connections live forever).",
        min=0.0,
        max=30 * 86400,
    )
    shutdown_grace_seconds: float = setting(
        "TACTFUL_SHUTDOWN_GRACE_SECONDS",
        5.0,
        "On SIGTERM, how long in-flight RPCs may run before the server stops.",
        min=0.0,
    )
    load_demo_catalog: bool = setting(
        "TACTFUL_LOAD_DEMO_CATALOG", True, "Load a small demo catalog when the store has none."
    )
    log_level: str = setting("TACTFUL_LOG_LEVEL", "INFO", "Python logging level.")
