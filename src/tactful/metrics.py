"""Every Prometheus metric tactful exports, defined once at import time.

Labels are low-cardinality enums only: never a user id, an offer id or a free-form channel.
Latency buckets start at 0.25 ms because a Decide is expected to take about one millisecond.

With several worker processes (TACTFUL_WORKERS > 1) these are prometheus-client multiprocess
values: each process writes its own file and the supervisor's /metrics sums them. That mode
has no Info or Enum metrics, and a gauge says how processes combine (``multiprocess_mode``,
ignored in a single process); ``live*`` modes drop a process's value when it exits.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# The *_created series double the exposition and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

M = TypeVar("M", Counter, Gauge, Histogram)

LATENCY_BUCKETS = (
    0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.005, 0.0075, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip

# gRPC server metrics, under the names go-grpc-prometheus dashboards already use.
GRPC_STARTED = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC on the server, until its response is ready.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)

# Calls the transport ended before tactful saw them, so grpc_server_handled_total never counts
# them (transport/receiving.py).
GRPC_UNSERVED = Counter(
    "tactful_grpc_calls_unserved_total",
    "Calls ended before a thread took them, by reason: receive_timeout (CANCELLED: the request "
    "message did not arrive within TACTFUL_GRPC_RECEIVE_TIMEOUT_MS), busy (RESOURCE_EXHAUSTED: "
    "TACTFUL_MAX_CONCURRENT_RPCS calls were running), no_request (UNIMPLEMENTED: the client "
    "closed without sending one).",
    ["reason"],
)

# Security.
RATE_LIMITED = Counter(
    "tactful_rate_limited_total",
    "Calls refused with RESOURCE_EXHAUSTED because their API key passed its rate limit.",
)
RATE_LIMIT_UNCHECKED = Counter(
    "tactful_rate_limit_unchecked_total",
    "Calls let through without a rate-limit check because Redis could not be asked.",
)
AUTH_FAILURES = Counter(
    "tactful_auth_failures_total",
    "Calls refused by authentication or authorization, by reason: missing_key, malformed, "
    "unknown_key (UNAUTHENTICATED), forbidden (PERMISSION_DENIED: the key lacks the role).",
    ["reason"],
)

# Domain metrics.
DECISIONS = Counter(
    "tactful_decisions_total",
    "Decide answers, by channel (configured channels only, others as 'other'), arm and hold "
    "reason.",
    ["channel", "arm", "hold_reason"],
)
CHOICES = Counter(
    "tactful_choices_total", "Offers returned, by the reasons given for them.", ["reason"]
)
OUTCOMES = Counter(
    "tactful_outcomes_total",
    "ReportOutcome calls by event and result (recorded, duplicate, unknown_decision).",
    ["event", "result"],
)
# What the dashboard's "CTR by arm" divides: offers served to callers (dry runs excluded) and
# first reports of each outcome, both by the arm of their decision. The ROI report's CTR is
# the exact one (one success per offer served, with an interval); these are the live view.
OFFERS_SERVED = Counter(
    "tactful_offers_served_total",
    "Offers returned by logged Decides (not dry runs, not fallbacks, not when the log write "
    "failed): those an outcome can be reported for; by channel (as tactful_decisions_total) "
    "and arm.",
    ["channel", "arm"],
)
ARM_OUTCOMES = Counter(
    "tactful_arm_outcomes_total",
    "Outcomes recorded (each outcome_id once), by the arm of their decision and event.",
    ["arm", "event"],
)
FALLBACKS = Counter(
    "tactful_store_fallbacks_total",
    "Decide answers made without the store, by what the caller got (fallback or held).",
    ["result"],
)
ABANDONED_DECISIONS = Counter(
    "tactful_abandoned_decisions_total",
    "Decides whose caller was gone (deadline passed, cancelled) before the decision was "
    "written: nothing logged, no contact counted.",
)
DECISION_LOG_FAILURES = Counter(
    "tactful_decision_log_failures_total",
    "Decisions answered but not logged because the store failed in between.",
)
CATALOG_RELOADS = Counter(
    "tactful_catalog_reloads_total", "Times this process reloaded the offer catalog."
)
# A number, not an Info with a version label: multiprocess mode has no Info, and a label per
# version would grow one series per model published.
MODEL_VERSION = Gauge(
    "tactful_model_version",
    "The model version decided with (0: the prior); over several worker processes, the newest "
    "any live one uses (a restarted worker loads the current one at its first Decide).",
    multiprocess_mode="livemax",
)
MODEL_REJECTED = Counter(
    "tactful_model_rejected_total", "Model snapshots refused (corrupt or another feature layout)."
)
LEARNER_APPLIED = Counter(
    "tactful_learner_rewards_applied_total", "Rewards the learner applied to the model."
)
LEARNER_CHANGES = Counter(
    "tactful_learner_changes_detected_total",
    "Times the learner found an offer's or topic's rewards changed and let its next rewards "
    "move the model faster (TACTFUL_DRIFT_THRESHOLD).",
)
LEARNER_RESTARTS = Counter(
    "tactful_learner_restarts_total",
    "Times the learner found the whole model's rewards changed and started it again from "
    "the prior (TACTFUL_DRIFT_THRESHOLD).",
)
LEARNER_LAG_SECONDS = Histogram(
    "tactful_learner_lag_seconds",
    "From an outcome (or a closed reward window) to the model version that includes it "
    "(a sample of at most 64 rewards per version).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0),
)
REDIS_CIRCUIT_STATE = Gauge(
    "tactful_redis_circuit_state",
    "The store circuit breaker: 0 closed (normal), 0.5 half-open (probing), 1 open; the "
    "most open of the live processes.",
    multiprocess_mode="livemax",
)
REDIS_CIRCUIT_TRANSITIONS = Counter(
    "tactful_redis_circuit_transitions_total",
    "Times the store circuit breaker moved into a state.",
    ["state"],
)
LEARNER_BACKLOG = Gauge(
    "tactful_learner_backlog",
    "Rewards in the stream not yet applied.",
    multiprocess_mode="livemax",  # one learner runs; during a hand-over, the larger backlog
)

REDIS_SECONDS = Histogram(
    "tactful_redis_operation_seconds",
    "Time of one store operation (one or more Redis round trips), by operation.",
    ["operation"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
)
REDIS_ERRORS = Counter(
    "tactful_redis_errors_total",
    "Store operations that failed because Redis was unreachable or too slow, by operation.",
    ["operation"],
)

REDIS_RETRIES = Counter(
    "tactful_redis_retries_total",
    "Store operations tried again after a timeout or a dropped connection (within their "
    "budget), by operation: a healthy but busy Redis shows here, not in the errors.",
    ["operation"],
)


def children(metric: M) -> Callable[..., M]:
    """A lookup of ``metric``'s labelled children, each made once: ``labels()`` takes a lock
    and builds its key on every call. Children are made on first use, so /metrics shows only
    the series that happened; a racing double lookup gets the same child, so no lock here.
    An enum among the label values is labelled by its name."""
    memo: dict[tuple[Any, ...], M] = {}

    def child(*values: Any) -> M:
        found = memo.get(values)
        if found is None:
            labels = (v.name if isinstance(v, enum.Enum) else v for v in values)
            found = memo[values] = metric.labels(*labels)
        return found

    return child


redis_seconds = children(REDIS_SECONDS)
redis_errors = children(REDIS_ERRORS)
redis_retries = children(REDIS_RETRIES)
