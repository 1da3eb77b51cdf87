"""Locust load test of tactful over gRPC.

Follows Locust's own gRPC example (examples/grpc in the locust repository): grpc is switched
to gevent, and a client interceptor reports every RPC to Locust as a "grpc" request.

Traffic of one simulated caller:

- Decide (most of it): a render-time call on web or app with 50 candidate offers from the
  catalog and a 50 ms deadline, for a user drawn from a Zipf-like distribution over
  100,000 users (a few users are very active, most are seen rarely);
- ReportOutcome for about 10% of the decisions that chose something (CLICK or
  IMPRESSION_IGNORED, a fresh outcome_id each time);
- now and then Profiles.SetPreferences (topic stances, channel opt-ins, consent).

At test start a catalog of 200 offers is put through Catalog.PutOffer when ListOffers shows
fewer than 50. Run it with ``python loadtests/run.py`` (``make loadtest``), or by hand:

    locust -f loadtests/locustfile.py --headless --host 127.0.0.1:50051 -u 20 -r 10 -t 30s

The process exits non-zero when more than ``--max-fail-ratio`` of the requests failed, when
Decide's p99 is above ``--max-p99-ms`` (if given), when no Decide was made, or when a task
raised an unexpected error.

Named load shapes live in ``loadtests/shapes/`` (steady, ramp_to_break, spike). Locust uses
the first shape class it finds, so pick one by adding its file to ``-f``:

    locust -f loadtests/locustfile.py,loadtests/shapes/spike.py --headless --host 127.0.0.1:50051
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, between, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import RequestStats

from tactful.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    decisioning_pb2,
    decisioning_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
)

# Make grpc cooperate with gevent (Locust's concurrency) before any channel is created.
grpc_gevent.init_gevent()

log = logging.getLogger("tactful.loadtest")

DEFAULT_HOST = "127.0.0.1:50051"
USERS = 100_000
ZIPF_EXPONENT = 1.1
CANDIDATES = 50
DECIDE_DEADLINE_SECONDS = 0.05  # a render-time call: the page will not wait longer
WRITE_DEADLINE_SECONDS = 1.0
OUTCOME_SHARE = 0.1
CLICK_SHARE = 0.3
SEED_OFFERS = 200
SEED_WHEN_FEWER_THAN = 50

TOPICS = (
    "running", "training", "yoga", "cycling", "swimming", "hiking", "nutrition", "travel",
    "membership", "books", "music", "gaming", "gardening", "cooking", "fashion", "beauty",
    "electronics", "home", "pets", "finance",
)  # fmt: skip
SENSITIVE_TOPICS = ("finance",)
RENDER_CHANNELS = ("web", "app")
SEND_CHANNELS = ("email", "push", "sms")
PLACEMENTS = ("home_hero", "product_page", "cart", "checkout")
DEVICES = ("mobile", "desktop", "tablet")
COUNTRIES = ("FR", "DE", "GB", "US", "ES", "IT")


def grpc_target(host: str | None) -> str:
    """``host:port`` for grpc from a Locust host, which may carry a scheme or a path."""
    target = (host or DEFAULT_HOST).strip()
    if "://" in target:
        target = target.split("://", 1)[1]
    return target.rstrip("/") or DEFAULT_HOST


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Reports every unary RPC to Locust: name, time, response size, and the error if any."""

    def __init__(self, environment: Environment) -> None:
        self.env = environment

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        name = method.rsplit(".", 1)[-1]  # "/tactful.v1.Decisioning/Decide": Decisioning/Decide
        exception: Exception | None = None
        response_length = 0
        start = time.perf_counter()
        call = continuation(client_call_details, request)
        try:
            response_length = call.result().ByteSize()
        except grpc.RpcError as error:
            exception = error
        self.env.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=response_length,
            response=call,
            context=None,
            exception=exception,
        )
        return call


# --- catalog -------------------------------------------------------------------------------


class Catalog:
    """The offer ids the simulated callers choose candidates from (filled at test start)."""

    offer_ids: tuple[str, ...] = ()


def seed_offers(count: int) -> list[catalog_pb2.Offer]:
    """A reproducible catalog: mostly web and app offers, a few sensitive, a few capped."""
    rng = random.Random(42)
    offers = []
    for i in range(count):
        sensitive = rng.random() < 0.05
        topics = (
            [rng.choice(SENSITIVE_TOPICS)]
            if sensitive
            else rng.sample([t for t in TOPICS if t not in SENSITIVE_TOPICS], rng.randint(1, 2))
        )
        channels = [c for c in RENDER_CHANNELS if rng.random() < 0.9] or ["web"]
        channels += [c for c in SEND_CHANNELS if rng.random() < 0.3]
        offers.append(
            catalog_pb2.Offer(
                offer_id=f"lt-offer-{i:04d}",
                title=f"Load-test offer {i} ({', '.join(topics)})",
                topics=topics,
                channels=channels,
                priority=round(rng.random(), 3),
                sensitive=sensitive,
                max_per_user_per_day=rng.choice((0, 0, 0, 3)),
            )
        )
    return offers


def list_offer_ids(stub: catalog_pb2_grpc.CatalogStub) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page = stub.ListOffers(
            catalog_pb2.ListOffersRequest(page_size=1000, page_token=token),
            timeout=WRITE_DEADLINE_SECONDS * 5,
        )
        ids += [offer.offer_id for offer in page.offers]
        token = page.next_page_token
        if not token:
            return ids


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any, **_kwargs: Any) -> None:
    parser.add_argument(
        "--max-fail-ratio",
        type=float,
        default=0.01,
        help="tactful: exit non-zero when more than this share of requests failed",
    )
    parser.add_argument(
        "--max-p99-ms",
        type=float,
        default=0.0,
        help="tactful: exit non-zero when Decide's p99 (client side, whole run) is above "
        "this many milliseconds (0: no such check)",
    )


@events.test_start.add_listener
def _seed_catalog(environment: Environment, **_kwargs: Any) -> None:
    """Make sure there is a catalog to decide from. Not measured: it is set-up, not load."""
    if isinstance(environment.runner, MasterRunner):
        return  # workers seed and read the catalog themselves
    target = grpc_target(environment.host or TactfulUser.host)
    try:
        with grpc.insecure_channel(target) as channel:
            stub = catalog_pb2_grpc.CatalogStub(channel)
            ids = list_offer_ids(stub)
            if len(ids) < SEED_WHEN_FEWER_THAN:
                for offer in seed_offers(SEED_OFFERS):
                    stub.PutOffer(
                        catalog_pb2.PutOfferRequest(offer=offer), timeout=WRITE_DEADLINE_SECONDS
                    )
                log.info("seeded %d offers on %s", SEED_OFFERS, target)
                ids = list_offer_ids(stub)
    except grpc.RpcError as error:
        log.error("could not read or seed the catalog on %s: %s", target, error)
        return
    Catalog.offer_ids = tuple(ids)


@events.quitting.add_listener
def _verdict(environment: Environment, **_kwargs: Any) -> None:
    """After the run (users stopped, stats final): a compact summary, and the exit code,
    0 only if the run was meaningful and (almost) error-free."""
    if environment.runner is None or isinstance(environment.runner, WorkerRunner):
        return  # the master (or the local runner) has the aggregated stats
    stats = environment.stats
    print_summary(stats)
    stage_report = getattr(environment.shape_class, "report", None)  # loadtests/shapes/
    if callable(stage_report):
        print(stage_report(), flush=True)
    max_fail_ratio = getattr(environment.parsed_options, "max_fail_ratio", 0.01)
    max_p99_ms = getattr(environment.parsed_options, "max_p99_ms", 0.0)
    problems = []
    decide = stats.entries.get(("Decisioning/Decide", "grpc"))
    if decide is None or decide.num_requests == 0:
        problems.append("no Decide request was made")
    elif max_p99_ms > 0:
        p99 = decide.get_response_time_percentile(0.99)
        if p99 > max_p99_ms:
            problems.append(f"Decide p99 {p99:.0f} ms is above {max_p99_ms:g} ms")
    if stats.total.fail_ratio > max_fail_ratio:
        problems.append(
            f"{stats.total.fail_ratio:.2%} of requests failed (at most {max_fail_ratio:.2%})"
        )
    if environment.runner.exceptions:
        problems.append(f"{len(environment.runner.exceptions)} kind(s) of error in tasks")
    for problem in problems:
        log.error("load test failed: %s", problem)
    environment.process_exit_code = 1 if problems else 0


def print_summary(stats: RequestStats) -> None:
    """One line per RPC: what a render-time budget is judged on."""
    header = (
        f"{'RPC':<26} {'requests':>9} {'failures':>9} {'req/s':>8} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7}"
    )
    lines = [header, "-" * len(header)]
    for entry in [*sorted(stats.entries.values(), key=lambda e: e.name), stats.total]:
        if not entry.num_requests:
            continue
        p50, p95, p99 = (entry.get_response_time_percentile(q) for q in (0.5, 0.95, 0.99))
        lines.append(
            f"{entry.name:<26} {entry.num_requests:>9} {entry.num_failures:>9} "
            f"{entry.total_rps:>8.1f} {p50:>7.0f} {p95:>7.0f} {p99:>7.0f} "
            f"{entry.max_response_time:>7.0f}"
        )
    print("\ntactful summary (client side; Locust keeps whole milliseconds below 100 ms)")
    print("\n".join(lines), flush=True)


# --- the simulated caller ------------------------------------------------------------------


def _zipf_cumulative_weights(n: int, exponent: float) -> list[float]:
    return list(itertools.accumulate(1.0 / rank**exponent for rank in range(1, n + 1)))


USER_RANKS = range(USERS)
USER_CUM_WEIGHTS = _zipf_cumulative_weights(USERS, ZIPF_EXPONENT)


class TactfulUser(User):
    """A page renderer and a preference centre calling tactful."""

    host = DEFAULT_HOST
    wait_time = between(0.01, 0.05)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        channel = grpc.insecure_channel(grpc_target(self.host))
        self._channel = channel
        intercepted = grpc.intercept_channel(channel, LocustInterceptor(environment))
        self.decisioning = decisioning_pb2_grpc.DecisioningStub(intercepted)
        self.profiles = profiles_pb2_grpc.ProfilesStub(intercepted)
        self.catalog = catalog_pb2_grpc.CatalogStub(channel)  # not measured
        self.rng = random.Random()

    def on_start(self) -> None:
        if not Catalog.offer_ids:  # e.g. a worker that started after test_start
            try:
                Catalog.offer_ids = tuple(list_offer_ids(self.catalog))
            except grpc.RpcError as error:
                log.error("could not list offers: %s", error)

    def on_stop(self) -> None:
        self._channel.close()

    def user_id(self) -> str:
        rank = self.rng.choices(USER_RANKS, cum_weights=USER_CUM_WEIGHTS)[0]
        return f"lt-user-{rank:06d}"

    @task(20)
    def decide(self) -> None:
        ids = Catalog.offer_ids
        request = decisioning_pb2.DecideRequest(
            user_id=self.user_id(),
            channel=self.rng.choice(RENDER_CHANNELS),
            placement=self.rng.choice(PLACEMENTS),
            numeric_context={
                "cart_value": round(self.rng.uniform(0, 300), 2),
                "session_seconds": float(self.rng.randint(1, 1800)),
            },
            categorical_context={
                "device": self.rng.choice(DEVICES),
                "country": self.rng.choice(COUNTRIES),
            },
            candidate_offer_ids=self.rng.sample(ids, min(CANDIDATES, len(ids))),
            slots=self.rng.choice((1, 1, 2, 3)),
        )
        try:
            response = self.decisioning.Decide(request, timeout=DECIDE_DEADLINE_SECONDS)
        except grpc.RpcError:
            return  # already reported to Locust by the interceptor
        if response.choices and self.rng.random() < OUTCOME_SHARE:
            self.report_outcome(response)

    def report_outcome(self, response: decisioning_pb2.DecideResponse) -> None:
        event = (
            decisioning_pb2.OUTCOME_EVENT_CLICK
            if self.rng.random() < CLICK_SHARE
            else decisioning_pb2.OUTCOME_EVENT_IMPRESSION_IGNORED
        )
        request = decisioning_pb2.ReportOutcomeRequest(
            decision_id=response.decision_id,
            offer_id=self.rng.choice(response.choices).offer_id,
            event=event,
            outcome_id=uuid.uuid4().hex,
        )
        try:
            self.decisioning.ReportOutcome(request, timeout=WRITE_DEADLINE_SECONDS)
        except grpc.RpcError:
            return  # already reported

    @task(1)
    def set_preferences(self) -> None:
        rng = self.rng
        stances = (
            profiles_pb2.STANCE_LIKE,
            profiles_pb2.STANCE_LIKE,
            profiles_pb2.STANCE_DISLIKE,
            profiles_pb2.STANCE_NEUTRAL,
        )
        request = profiles_pb2.SetPreferencesRequest(
            user_id=self.user_id(),
            topic_preferences=[
                profiles_pb2.TopicPreference(topic=topic, stance=rng.choice(stances))
                for topic in rng.sample(TOPICS, rng.randint(1, 3))
            ],
        )
        if rng.random() < 0.3:
            request.channel_preferences.append(
                profiles_pb2.ChannelPreference(
                    channel=rng.choice(SEND_CHANNELS), opted_in=rng.random() < 0.5
                )
            )
        if rng.random() < 0.3:
            request.consent.inferred_personalization = rng.random() < 0.6
        try:
            self.profiles.SetPreferences(request, timeout=WRITE_DEADLINE_SECONDS)
        except grpc.RpcError:
            return  # already reported
