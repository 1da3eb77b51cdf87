"""Soak: writes refused, Decides fallen back and acknowledged writes lost under sustained load,
with Redis healthy and with Redis stalling for a moment every few seconds (issue 14).

The server is what ``make serve`` runs: ``python -m tactful serve`` in a subprocess with
``TACTFUL_WORKERS=2`` (``--workers``), its embedded redis-server in a temporary data directory,
authentication off, 127.0.0.1 and free ports, and otherwise the default settings: the Redis
timeouts and circuit breaker are what is judged, so this bench sets none of them (``--set
TACTFUL_X=value`` passes one anyway, repeatable; the bench gives the server none of its own
environment's ``TACTFUL_*``). The control group keeps its default share. A catalog of 30
offers over 8 topics (web, app, email) is loaded through the API.

``--threads`` client threads (6) in this process, each on a gRPC connection of its own (so the
kernel spreads them over the workers), loop for ``--seconds`` (60) per phase over their own
users (``--users`` per thread, ids ``soak-<phase>-<thread>-<i>``):

  1. SetPreferences: one of the 8 topics LIKE, DISLIKE or NEUTRAL (1 s deadline);
  2. Decide on channel "web" with a 100 ms deadline and a fresh ``request_id``;
  3. for a PERSONALIZED answer with choices: ReportOutcome (CLICK or IMPRESSION_IGNORED) for
     its first choice with a fresh ``outcome_id`` (1 s deadline).

Phases (``--phases``): ``healthy`` leaves Redis alone; ``stalls`` sends ``CLIENT PAUSE 25 ALL``
to the embedded redis-server every 2 s (``--stall-ms``, ``--stall-every``) from a thread of
its own, over the Unix socket ``<data dir>/redis.sock``: Redis answers nobody for 25 ms, as it
does during a fork or when its core is taken. ``--cpu-hogs K`` runs K busy-loop processes for
the whole run: a machine with other work on it.

Counted per phase: calls by method, each non-OK status by method, writes refused
(SetPreferences or ReportOutcome answered anything but OK), Decide answers by arm and the
fallback share (FALLBACK / answered), Decides failed, outcomes NOT_FOUND for answered
PERSONALIZED decisions (a decision answered but never logged), throughput. After the load
stops, a read-back of acknowledged writes (``--sample``, 500, of each kind, one call at a
time, 5 s deadlines): GetProfile must show the last acknowledged stance of each sampled
(user, topic) (a refused write may have been applied after all: such a stance is counted
apart, not as missing); an acknowledged outcome sent again must answer ``recorded=false``
(``recorded=true`` or NOT_FOUND: missing). Outcomes refused during the load are sent again,
as a client would: NOT_FOUND then means the decision was answered but never logged, an
outcome that can no longer be joined. From the server's /metrics, each phase's increase
of ``tactful_redis_errors_total`` by operation, the circuit-breaker transitions, decision-log
failures and store fallbacks.

Targets: healthy: 0 writes refused, fallbacks <= 0.1 %; stalls: 0 writes refused,
fallbacks <= 3 %; both: 0 acknowledged writes missing. A missed target prints NOT MET; the
exit status is 0 all the same unless ``--strict``. Subprocesses (server, hogs) are stopped
on exit, Ctrl-C or error.

    .venv/bin/python bench/soak.py [--seconds 60] [--threads 6] [--workers 2]
        [--phases healthy,stalls] [--cpu-hogs 0] [--sample 500] [--set TACTFUL_X=value]
        [--json bench/out/soak.json] [--strict]

``tests/test_soak.py`` runs the same machinery for a few seconds per phase and asserts the
counts (not the rates).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import redis
from decide_latency import (
    HOST,
    Child,
    free_ports,
    no_interrupts,
    positive,
    progress,
    run_until_stopped,
    tactful_env,
    wait_ready,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tactful.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    decisioning_pb2,
    decisioning_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
)

PHASES = ("healthy", "stalls")
TARGET_FALLBACK_SHARE = {"healthy": 0.001, "stalls": 0.03}
DECIDE_DEADLINE_S = 0.1  # a page render's budget, as in issue 14
WRITE_DEADLINE_S = 1.0
READBACK_DEADLINE_S = 5.0
READBACK_PATIENCE_S = 10.0  # a read-back call refused UNAVAILABLE is tried again this long
SETUP_DEADLINE_S = 10.0
WARMUP_DECIDES = 20  # per client, untimed: each worker loads the catalog and model first
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # else channels share a connection

TOPICS = ("running", "yoga", "cycling", "travel", "cooking", "books", "music", "finance")
SENSITIVE_TOPICS = ("finance",)
STANCES = (profiles_pb2.STANCE_LIKE, profiles_pb2.STANCE_DISLIKE, profiles_pb2.STANCE_NEUTRAL)
STANCE_WEIGHTS = (6, 3, 1)
SET_PREFERENCES, DECIDE, REPORT_OUTCOME = "SetPreferences", "Decide", "ReportOutcome"
METHODS = (SET_PREFERENCES, DECIDE, REPORT_OUTCOME)
WRITES = (SET_PREFERENCES, REPORT_OUTCOME)
ARMS = ("PERSONALIZED", "CONTROL", "FALLBACK")
WATCHED_METRICS = (
    "tactful_redis_errors_total",
    "tactful_redis_circuit_transitions_total",
    "tactful_decision_log_failures_total",
    "tactful_store_fallbacks_total",
    "tactful_abandoned_decisions_total",
)


@dataclass(frozen=True)
class Options:
    seconds: float = 60.0
    threads: int = 6
    workers: int = 2
    phases: tuple[str, ...] = PHASES
    users: int = 300  # per client thread
    sample: int = 500  # acknowledged writes read back per kind and phase
    stall_every_s: float = 2.0
    stall_ms: int = 25
    cpu_hogs: int = 0
    settings: dict[str, str] = field(default_factory=dict)  # extra TACTFUL_* for the server
    seed: int = 1


# --- what one client thread saw --------------------------------------------------------------


@dataclass
class Tally:
    """Counts of one phase (one client thread's, or all of them merged)."""

    calls: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, status code)
    arms: Counter[str] = field(default_factory=Counter)
    outcomes_not_found: int = 0  # NOT_FOUND for an answered PERSONALIZED decision
    outcomes_not_new: int = 0  # a first report answered recorded=false

    def merge(self, other: Tally) -> None:
        self.calls += other.calls
        self.errors += other.errors
        self.arms += other.arms
        self.outcomes_not_found += other.outcomes_not_found
        self.outcomes_not_new += other.outcomes_not_new


@dataclass
class Written:
    """What is known of one (user, topic) preference: the last acknowledged stance, and the
    stances of refused attempts that may have been applied all the same (those since the last
    acknowledgement, and any abandoned at the deadline: it may still run on the server)."""

    acked: int | None = None
    refused_since: set[int] = field(default_factory=set)
    abandoned: set[int] = field(default_factory=set)


@dataclass
class Ledger:
    """One phase's acknowledged writes, for the read-back."""

    preferences: dict[tuple[str, str], Written] = field(default_factory=dict)
    outcomes: list[decisioning_pb2.ReportOutcomeRequest] = field(default_factory=list)
    refused_outcomes: list[decisioning_pb2.ReportOutcomeRequest] = field(default_factory=list)


def code_of(error: grpc.RpcError) -> str:
    code = error.code() if isinstance(error, grpc.Call) else None
    return code.name if code is not None else "UNKNOWN"


class Client:
    """One client thread's connection, users and loop."""

    def __init__(self, index: int, target: str, options: Options) -> None:
        self.index = index
        self.channel = grpc.insecure_channel(target, options=OWN_CONNECTION)
        self.profiles = profiles_pb2_grpc.ProfilesStub(self.channel)
        self.decisioning = decisioning_pb2_grpc.DecisioningStub(self.channel)
        self.rng = random.Random(options.seed * 1000 + index)
        self.options = options
        self.users: list[str] = []
        self.tally = Tally()
        self.ledger = Ledger()
        self.error: BaseException | None = None

    def begin(self, phase: str) -> None:
        self.users = [f"soak-{phase}-{self.index}-{i}" for i in range(self.options.users)]
        self.tally = Tally()
        self.ledger = Ledger()

    def warm_up(self) -> None:
        for i in range(WARMUP_DECIDES):
            request = decisioning_pb2.DecideRequest(user_id=f"soak-warmup-{i}", channel="web")
            self.decisioning.Decide(request, timeout=SETUP_DEADLINE_S)

    def run(self, stop: threading.Event) -> None:
        try:
            i = 0
            while not stop.is_set():
                user = self.users[i % len(self.users)]
                i += 1
                self.set_preference(user)
                decision = self.decide(user)
                if (
                    decision is not None
                    and decision.arm == decisioning_pb2.ARM_PERSONALIZED
                    and decision.choices
                ):
                    self.report_outcome(decision)
        except BaseException as exc:  # the phase stops and raises it
            self.error = exc
            stop.set()

    def set_preference(self, user: str) -> None:
        topic = self.rng.choice(TOPICS)
        stance = self.rng.choices(STANCES, STANCE_WEIGHTS)[0]
        request = profiles_pb2.SetPreferencesRequest(
            user_id=user,
            topic_preferences=[profiles_pb2.TopicPreference(topic=topic, stance=stance)],
        )
        self.tally.calls[SET_PREFERENCES] += 1
        written = self.ledger.preferences.setdefault((user, topic), Written())
        try:
            self.profiles.SetPreferences(request, timeout=WRITE_DEADLINE_S)
        except grpc.RpcError as error:
            code = code_of(error)
            self.tally.errors[SET_PREFERENCES, code] += 1
            written.refused_since.add(stance)
            if code in ("DEADLINE_EXCEEDED", "CANCELLED"):
                written.abandoned.add(stance)
            return
        written.acked = stance
        written.refused_since.clear()

    def decide(self, user: str) -> decisioning_pb2.DecideResponse | None:
        request = decisioning_pb2.DecideRequest(
            user_id=user, channel="web", placement="home_hero", slots=2, request_id=uuid4()
        )
        self.tally.calls[DECIDE] += 1
        try:
            response: decisioning_pb2.DecideResponse = self.decisioning.Decide(
                request, timeout=DECIDE_DEADLINE_S
            )
        except grpc.RpcError as error:
            self.tally.errors[DECIDE, code_of(error)] += 1
            return None
        self.tally.arms[decisioning_pb2.Arm.Name(response.arm).removeprefix("ARM_")] += 1
        return response

    def report_outcome(self, decision: decisioning_pb2.DecideResponse) -> None:
        click = self.rng.random() < 0.2
        request = decisioning_pb2.ReportOutcomeRequest(
            decision_id=decision.decision_id,
            offer_id=decision.choices[0].offer_id,
            event=(
                decisioning_pb2.OUTCOME_EVENT_CLICK
                if click
                else decisioning_pb2.OUTCOME_EVENT_IMPRESSION_IGNORED
            ),
            outcome_id=uuid4(),
        )
        self.tally.calls[REPORT_OUTCOME] += 1
        try:
            response = self.decisioning.ReportOutcome(request, timeout=WRITE_DEADLINE_S)
        except grpc.RpcError as error:
            code = code_of(error)
            self.tally.errors[REPORT_OUTCOME, code] += 1
            if code == "NOT_FOUND":
                self.tally.outcomes_not_found += 1
            else:
                self.ledger.refused_outcomes.append(request)  # a client would send it again
            return
        if response.recorded:
            self.ledger.outcomes.append(request)
        else:
            self.tally.outcomes_not_new += 1

    def close(self) -> None:
        self.channel.close()


def uuid4() -> str:
    return uuid.uuid4().hex


# --- a phase ---------------------------------------------------------------------------------


@dataclass
class ReadBack:
    preferences_checked: int = 0
    preferences_missing: int = 0
    preferences_refused_applied: int = 0  # showed the stance of a refused write
    preferences_unchecked: int = 0  # GetProfile failed even with a generous deadline
    outcomes_checked: int = 0
    outcomes_missing: int = 0
    outcomes_unchecked: int = 0
    # Outcomes refused during the load (not NOT_FOUND), sent again after it, as a client would:
    retried: int = 0
    retried_recorded: int = 0
    retried_duplicate: int = 0  # the refused report had been recorded after all
    retried_not_found: int = 0  # its decision was answered but never logged: the join is lost
    retried_failed: int = 0


@dataclass
class PhaseResult:
    name: str
    seconds: float
    tally: Tally
    readback: ReadBack
    metrics: dict[str, dict[str, float]]  # metric -> label text -> increase in the phase
    stalls_sent: int
    load_before: float
    load_after: float

    @property
    def calls(self) -> int:
        return sum(self.tally.calls.values())

    @property
    def writes_refused(self) -> int:
        """Writes answered with an error: a NOT_FOUND outcome is not one (the decision it
        names was never logged: that is counted as outcomes NOT_FOUND)."""
        return sum(
            n
            for (method, code), n in self.tally.errors.items()
            if method in WRITES and code != "NOT_FOUND"
        )

    @property
    def decides_answered(self) -> int:
        return sum(self.tally.arms.values())

    @property
    def decides_failed(self) -> int:
        return sum(n for (method, _), n in self.tally.errors.items() if method == DECIDE)

    @property
    def fallback_share(self) -> float:
        return self.tally.arms["FALLBACK"] / max(1, self.decides_answered)

    @property
    def writes_missing(self) -> int:
        return self.readback.preferences_missing + self.readback.outcomes_missing

    def must_be_zero(self) -> dict[str, int]:
        """The counts a sound server keeps at zero at any load. (With Redis stalls, a Decide
        whose deadline runs out while its log write waits is answered but not logged: its
        outcome is NOT_FOUND, rarely, and that is not held to zero.)"""
        counts = {
            "writes refused": self.writes_refused,
            "acknowledged preferences missing": self.readback.preferences_missing,
            "acknowledged outcomes missing": self.readback.outcomes_missing,
        }
        if self.stalls_sent == 0:
            counts["outcomes NOT_FOUND"] = self.tally.outcomes_not_found
            counts["refused outcomes NOT_FOUND when sent again"] = self.readback.retried_not_found
        return counts

    def targets(self) -> list[tuple[str, str, bool]]:
        """(what, the figure, met) for each target of the phase."""
        limit = TARGET_FALLBACK_SHARE.get(self.name, TARGET_FALLBACK_SHARE["stalls"])
        return [
            ("writes refused", f"{self.writes_refused} (target 0)", self.writes_refused == 0),
            (
                "fallback share",
                f"{100 * self.fallback_share:.2f} % (target <= {100 * limit:g} %)",
                self.fallback_share <= limit,
            ),
            (
                "acknowledged writes missing",
                f"{self.writes_missing} (target 0)",
                self.writes_missing == 0,
            ),
        ]

    def met(self) -> bool:
        return all(ok for _, _, ok in self.targets())

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": self.name,
            "seconds": round(self.seconds, 3),
            "calls": dict(self.tally.calls),
            "calls_per_second": round(self.calls / self.seconds, 1),
            "errors": {
                method: {c: n for (m, c), n in self.tally.errors.items() if m == method}
                for method in METHODS
            },
            "writes_refused": self.writes_refused,
            "decide_arms": dict(self.tally.arms),
            "decides_failed": self.decides_failed,
            "fallback_share": self.fallback_share,
            "outcomes_not_found": self.tally.outcomes_not_found,
            "outcomes_not_new": self.tally.outcomes_not_new,
            "readback": vars(self.readback),
            "server_metrics": self.metrics,
            "stalls_sent": self.stalls_sent,
            "load_average": [self.load_before, self.load_after],
            "targets": {what: ok for what, _, ok in self.targets()},
            "met": self.met(),
        }


def scrape(metrics_port: int) -> dict[tuple[str, str], float]:
    """The watched counters from the server's /metrics, by (name, label text)."""
    url = f"http://{HOST}:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in WATCHED_METRICS:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[s.name, labels] = s.value
    return out


def increase(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {name: {} for name in WATCHED_METRICS}
    for (name, labels), value in sorted(after.items()):
        delta = value - before.get((name, labels), 0.0)
        if delta:
            out[name][labels] = delta
    return out


class Stalls:
    """``CLIENT PAUSE <ms> ALL`` to the embedded redis-server every ``stall_every_s``, from a
    thread of its own, until stopped."""

    def __init__(self, socket: Path, options: Options) -> None:
        self.socket = socket
        self.every_s = options.stall_every_s
        self.ms = options.stall_ms
        self.sent = 0
        self.error: BaseException | None = None

    def run(self, stop: threading.Event) -> None:
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=2.0)
        try:
            while not stop.wait(self.every_s):
                client.execute_command("CLIENT", "PAUSE", self.ms, "ALL")
                self.sent += 1
        except BaseException as exc:  # the phase stops and raises it: no stalls, no figures
            self.error = exc
            stop.set()
        finally:
            client.close()


def run_phase(name: str, clients: list[Client], server: Server, options: Options) -> PhaseResult:
    progress(f"phase {name}: {options.seconds:g} s, {len(clients)} client threads")
    for client in clients:
        client.begin(name)
    before = scrape(server.metrics_port)
    load_before = os.getloadavg()[0]
    stop = threading.Event()
    threads = [
        threading.Thread(target=c.run, args=(stop,), name=f"soak-client-{c.index}", daemon=True)
        for c in clients
    ]
    stalls = Stalls(server.redis_socket, options)
    if name == "stalls":
        threads.append(
            threading.Thread(target=stalls.run, args=(stop,), name="soak-stalls", daemon=True)
        )
    start = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        stop.wait(options.seconds)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=WRITE_DEADLINE_S + 10)
    seconds = time.monotonic() - start
    for client in clients:
        if client.error is not None:
            raise RuntimeError(f"client {client.index} failed") from client.error
    if stalls.error is not None:
        raise RuntimeError("could not pause redis-server") from stalls.error
    load_after = os.getloadavg()[0]
    metrics = increase(before, scrape(server.metrics_port))
    tally, ledger = Tally(), Ledger()
    for client in clients:
        tally.merge(client.tally)
        ledger.preferences.update(client.ledger.preferences)
        ledger.outcomes += client.ledger.outcomes
        ledger.refused_outcomes += client.ledger.refused_outcomes
    readback = read_back(clients[0], ledger, options, random.Random(options.seed))
    return PhaseResult(
        name, seconds, tally, readback, metrics, stalls.sent, load_before, load_after
    )


T = TypeVar("T")


def patiently(method: Callable[..., T], request: Any) -> T:
    """``method(request)``, again while it is refused UNAVAILABLE (a circuit still open after
    the load) for up to READBACK_PATIENCE_S: the read-back asks what was kept, not whether it
    is served."""
    give_up = time.monotonic() + READBACK_PATIENCE_S
    while True:
        try:
            return method(request, timeout=READBACK_DEADLINE_S)
        except grpc.RpcError as error:
            if code_of(error) != "UNAVAILABLE" or time.monotonic() > give_up:
                raise
        time.sleep(0.05)


def read_back(client: Client, ledger: Ledger, options: Options, rng: random.Random) -> ReadBack:
    """After the load: a sample of the acknowledged writes, one call at a time."""
    out = ReadBack()
    acked = sorted(k for k, w in ledger.preferences.items() if w.acked is not None)
    by_user: dict[str, list[str]] = {}
    for user, topic in rng.sample(acked, min(options.sample, len(acked))):
        by_user.setdefault(user, []).append(topic)
    for user, topics in sorted(by_user.items()):
        try:
            profile = patiently(
                client.profiles.GetProfile, profiles_pb2.GetProfileRequest(user_id=user)
            )
        except grpc.RpcError:
            out.preferences_unchecked += len(topics)
            continue
        stored = {p.topic: p.stance for p in profile.topic_preferences}
        for topic in topics:
            written = ledger.preferences[user, topic]
            seen = stored.get(topic, profiles_pb2.STANCE_NEUTRAL)  # NEUTRAL clears the stance
            out.preferences_checked += 1
            if seen == written.acked:
                continue
            if seen in written.refused_since or seen in written.abandoned:
                out.preferences_refused_applied += 1
            else:
                out.preferences_missing += 1
    for request in rng.sample(ledger.outcomes, min(options.sample, len(ledger.outcomes))):
        try:
            response = patiently(client.decisioning.ReportOutcome, request)
        except grpc.RpcError as error:
            if code_of(error) == "NOT_FOUND":
                out.outcomes_checked += 1
                out.outcomes_missing += 1
            else:
                out.outcomes_unchecked += 1
            continue
        out.outcomes_checked += 1
        out.outcomes_missing += response.recorded  # recorded again: the first was lost
    refused = ledger.refused_outcomes
    for request in rng.sample(refused, min(options.sample, len(refused))):
        out.retried += 1
        try:
            response = patiently(client.decisioning.ReportOutcome, request)
        except grpc.RpcError as error:
            if code_of(error) == "NOT_FOUND":
                out.retried_not_found += 1
            else:
                out.retried_failed += 1
            continue
        if response.recorded:
            out.retried_recorded += 1
        else:
            out.retried_duplicate += 1
    return out


# --- the server ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    child: Child
    grpc_port: int
    metrics_port: int
    data_dir: Path

    @property
    def target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def redis_socket(self) -> Path:
        return self.data_dir / "redis.sock"  # the embedded redis-server's (embedded_redis.py)


def start_server(options: Options, workdir: Path) -> Server:
    grpc_port, metrics_port = free_ports(2)
    data_dir = workdir / "data"
    env = tactful_env(grpc_port, metrics_port, data_dir)
    del env["TACTFUL_CONTROL_SHARE"]  # the default control group, as `make serve` has
    env.update(TACTFUL_WORKERS=str(options.workers), **options.settings)
    child = Child.start("tactful", [sys.executable, "-m", "tactful", "serve"], env, workdir)
    return Server(child, grpc_port, metrics_port, data_dir)


def wait_serving(server: Server, channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    wait_ready(
        server.child,
        f"serving gRPC on {server.target},",
        lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == serving,
    )


def catalog(seed: int) -> list[catalog_pb2.Offer]:
    """30 offers over 8 topics; most on web, some only on app and email."""
    rng = random.Random(seed)
    offers = []
    for i in range(30):
        topics = rng.sample(TOPICS, rng.randint(1, 2))
        channels = ["app", "email"] if i % 6 == 5 else ["web", "app"] + ["email"] * (i % 2)
        offers.append(
            catalog_pb2.Offer(
                offer_id=f"soak-offer-{i:02d}",
                title=f"Offer {i}: {' and '.join(topics)}",
                topics=topics,
                channels=channels,
                priority=round(rng.uniform(0.0, 1.0), 3),
                sensitive=any(t in SENSITIVE_TOPICS for t in topics),
            )
        )
    return offers


def load_catalog(channel: grpc.Channel, seed: int) -> int:
    stub = catalog_pb2_grpc.CatalogStub(channel)
    offers = catalog(seed)
    for offer in offers:
        stub.PutOffer(catalog_pb2.PutOfferRequest(offer=offer), timeout=SETUP_DEADLINE_S)
    return len(offers)


# --- the run ---------------------------------------------------------------------------------


def soak(options: Options) -> list[PhaseResult]:
    """Start the server (and hogs), run the phases, stop everything; the phases' figures."""
    for phase in options.phases:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}: expected some of {', '.join(PHASES)}")
    workdir = Path(tempfile.mkdtemp(prefix="tf-soak-", dir="/tmp"))
    children: list[Child] = []
    clients: list[Client] = []
    try:
        progress(f"starting tactful, {options.workers} workers (data in {workdir})")
        server = start_server(options, workdir)
        children.append(server.child)
        with grpc.insecure_channel(server.target) as channel:
            wait_serving(server, channel)
            offers = load_catalog(channel, options.seed)
        clients = [Client(i, server.target, options) for i in range(options.threads)]
        progress(f"{offers} offers loaded; warming up {len(clients)} connections")
        for client in clients:
            client.warm_up()
        for k in range(options.cpu_hogs):
            hog = [sys.executable, "-c", "while True: pass"]
            children.append(Child.start(f"cpu-hog-{k}", hog, dict(os.environ), workdir))
        results = []
        for phase in options.phases:
            results.append(run_phase(phase, clients, server, options))
            if server.child.proc.poll() is not None:  # figures of a dead server mean nothing
                raise RuntimeError(f"tactful exited with {server.child.proc.returncode}")
        return results
    except Exception:
        for child in children[:1]:
            progress(f"{child.name} log (last lines):\n{child.log_tail()}")
        raise
    finally:
        with no_interrupts():
            for client in clients:
                client.close()
            for child in reversed(children):
                child.stop()
            shutil.rmtree(workdir, ignore_errors=True)


# --- report ----------------------------------------------------------------------------------


def _counts(counter: Iterable[tuple[str, float]]) -> str:
    return ", ".join(f"{k or '-'} {v:g}" for k, v in counter) or "none"


def _labelled(metric: dict[str, float], label: str) -> str:
    return _counts((k.removeprefix(f"{label}="), v) for k, v in metric.items())


def phase_text(result: PhaseResult, options: Options) -> list[str]:
    t, rb, m = result.tally, result.readback, result.metrics
    codes = sorted({code for _, code in t.errors})
    lines = [
        f'phase "{result.name}": {result.seconds:.1f} s, {options.threads} client threads, '
        f"{options.workers} workers, {options.cpu_hogs} CPU hogs"
        + (
            f", {result.stalls_sent} stalls of {options.stall_ms} ms"
            if result.name == "stalls"
            else ""
        )
        + f"; load average {result.load_before:.1f} -> {result.load_after:.1f}",
        f"  {'method':<16}{'calls':>8}{'/s':>7}{'OK':>8}" + "".join(f"{c:>19}" for c in codes),
    ]
    for method in METHODS:
        calls = t.calls[method]
        failed = sum(t.errors[method, c] for c in codes)
        lines.append(
            f"  {method:<16}{calls:>8}{calls / result.seconds:>7.0f}{calls - failed:>8}"
            + "".join(f"{t.errors[method, c]:>19}" for c in codes)
        )
    lines.append(f"  {'all':<16}{result.calls:>8}{result.calls / result.seconds:>7.0f}")
    arms = ", ".join(f"{arm} {t.arms[arm]}" for arm in ARMS)
    others = sum(n for arm, n in t.arms.items() if arm not in ARMS)
    lines += [
        f"  Decide: answered {result.decides_answered} ({arms}"
        + (f", other {others}" if others else "")
        + f"), fallback share {100 * result.fallback_share:.2f} %; failed "
        f"{result.decides_failed}",
        f"  writes refused {result.writes_refused} (SetPreferences "
        f"{sum(t.errors[SET_PREFERENCES, c] for c in codes)}, ReportOutcome "
        f"{sum(t.errors[REPORT_OUTCOME, c] for c in codes if c != 'NOT_FOUND')}); outcomes "
        "NOT_FOUND for answered "
        f"personalised decisions {t.outcomes_not_found}"
        + (f"; first reports not recorded {t.outcomes_not_new}" if t.outcomes_not_new else ""),
        f"  read-back: {rb.preferences_checked} acknowledged preferences, "
        f"{rb.preferences_missing} missing ({rb.preferences_refused_applied} showed a refused "
        f"write, {rb.preferences_unchecked} unchecked); {rb.outcomes_checked} acknowledged "
        f"outcomes, {rb.outcomes_missing} missing ({rb.outcomes_unchecked} unchecked)",
        f"  refused outcomes sent again after the load: {rb.retried}: recorded "
        f"{rb.retried_recorded}, already recorded {rb.retried_duplicate}, NOT_FOUND (decision "
        f"never logged) {rb.retried_not_found}, failed {rb.retried_failed}",
        "  server: redis errors by operation (with calls the open circuit refused): "
        f"{_labelled(m['tactful_redis_errors_total'], 'operation')}; breaker transitions: "
        f"{_labelled(m['tactful_redis_circuit_transitions_total'], 'state')}",
        "          decision log failures "
        f"{sum(m['tactful_decision_log_failures_total'].values()):g}; store fallbacks: "
        f"{_labelled(m['tactful_store_fallbacks_total'], 'result')}; abandoned decisions "
        f"{sum(m['tactful_abandoned_decisions_total'].values()):g}",
    ]
    return lines


def text(results: list[PhaseResult], options: Options) -> str:
    lines = [
        f"soak: machine {os.cpu_count()} CPUs (shared: load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} now), Python "
        f"{platform.python_version()}, grpcio {grpc.__version__}; server settings: defaults"
        + (
            " but " + ", ".join(f"{k}={v}" for k, v in sorted(options.settings.items()))
            if options.settings
            else ""
        ),
        "",
    ]
    for result in results:
        lines += [*phase_text(result, options), ""]
    lines.append("targets:")
    for result in results:
        verdicts = "; ".join(
            f"{what} {figure}: {'ok' if ok else 'missed'}" for what, figure, ok in result.targets()
        )
        lines.append(f"  {result.name}: {verdicts} -> {'MET' if result.met() else 'NOT MET'}")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    settings: dict[str, str] = {}
    for assignment in args.set:
        key, sep, value = assignment.partition("=")
        if not sep or not key.startswith("TACTFUL_"):
            progress(f"--set {assignment!r}: expected TACTFUL_<NAME>=<value>")
            return 2
        settings[key] = value
    options = Options(
        seconds=args.seconds,
        threads=args.threads,
        workers=args.workers,
        phases=tuple(p for p in args.phases.split(",") if p),
        users=args.users,
        sample=args.sample,
        stall_every_s=args.stall_every,
        stall_ms=args.stall_ms,
        cpu_hogs=args.cpu_hogs,
        settings=settings,
        seed=args.seed,
    )
    results = soak(options)
    print(text(results, options), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        figures = {
            "config": {**vars(options), "phases": list(options.phases)},
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "grpcio": grpc.__version__,
            },
            "phases": [r.to_json() for r in results],
            "met": all(r.met() for r in results),
        }
        path.write_text(json.dumps(figures, indent=2) + "\n")
        progress(f"figures written to {path}")
    return 1 if args.strict and not all(r.met() for r in results) else 0


def phase_list(text: str) -> str:
    for phase in text.split(","):
        if phase not in PHASES:
            raise argparse.ArgumentTypeError(f"{phase!r}: expected some of {','.join(PHASES)}")
    return text


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="load time per phase")
    parser.add_argument("--threads", type=positive, default=6, help="client threads")
    parser.add_argument("--workers", type=positive, default=2, help="TACTFUL_WORKERS")
    parser.add_argument(
        "--phases", type=phase_list, default=",".join(PHASES), help="comma-separated phases"
    )
    parser.add_argument("--users", type=positive, default=300, help="users per client thread")
    parser.add_argument(
        "--sample", type=non_negative, default=500, help="acknowledged writes read back per kind"
    )
    parser.add_argument("--stall-every", type=float, default=2.0, help="seconds between stalls")
    parser.add_argument("--stall-ms", type=positive, default=25, help="CLIENT PAUSE length")
    parser.add_argument(
        "--cpu-hogs", type=non_negative, default=0, help="busy-loop processes during the run"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TACTFUL_NAME=VALUE",
        help="a setting for the server (repeatable), e.g. --set TACTFUL_REDIS_MAX_CONNECTIONS=8",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the catalog and the loops")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a target is missed"
    )
    args = parser.parse_args(argv)
    return run_until_stopped(run, args)


if __name__ == "__main__":
    sys.exit(main())
