"""Validation of ``tactful report`` on the simulator: does each off-policy estimate land near
the policy's true value, and does the uplift interval cover the true uplift?

A tactful server runs in process (gRPC on 127.0.0.1, an embedded redis-server in a temporary
directory, control share 30%, no learner: the prior model decides) and the world of
``tactful.sim`` is loaded through its API. Each round a random user in a random context asks
Decide (slots=1, every offer a candidate); the click is drawn from ``sim.click_probability``
(contacts_today=0 for every round, so the truth needs no contact bookkeeping) and reported with
ReportOutcome. Then the decision log is read back from Redis as ``tactful report`` reads it.

Truth, for the decisions the estimators use (personalised, single slot): a target policy's
true value is the mean true click probability of the offer it picks from each decision's
logged candidates. The true uplift is the mean true click probability of what the personalised
arm showed minus that of what the control arm showed.

    .venv/bin/python bench/report_validation.py [--rounds 20000] [--seed 1]

20000 rounds take about a minute on a 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from tactful import report, sim
from tactful.settings import Settings
from tactful.v1 import decisioning_pb2, decisioning_pb2_grpc

TOLERANCE = 0.10  # relative


@dataclass
class World:
    population: sim.Population
    catalog: sim.Catalog
    # decision_id -> (user, context) of every decision made
    asked: dict[str, tuple[sim.User, sim.Context]] = dataclasses.field(default_factory=dict)

    def truth(self, decision_id: str, offer_id: str) -> float:
        user, context = self.asked[decision_id]
        offer = next(o for o in self.catalog.offers if o.offer_id == offer_id)
        return sim.click_probability(user, offer, context, 0)


def settings(control_share: float = 0.3, gamma: float = 20.0) -> Settings:
    base = Settings.from_env(
        {
            "TACTFUL_PSEUDONYM_KEY": "report-validation",
            "TACTFUL_SEED": "7",
            "TACTFUL_CONTROL_SHARE": str(control_share),
            "TACTFUL_EXPLORATION_GAMMA": str(gamma),
            "TACTFUL_AUTH_DISABLED": "true",  # an in-process server on 127.0.0.1
        }
    )
    return dataclasses.replace(
        base, server=dataclasses.replace(base.server, host="127.0.0.1", grpc_port=0)
    )


def simulate(
    channel: grpc.Channel,
    rounds: int,
    seed: int,
    *,
    n_users: int = 300,
    n_offers: int = 12,
) -> World:
    """Load a world through ``channel`` and play ``rounds`` decisions with their outcomes."""
    rng = np.random.default_rng(seed)
    population = sim.Population.generate(n_users, rng)
    catalog = sim.Catalog.generate(n_offers, population.topics, rng)
    sim.load(channel, population, catalog)
    world = World(population, catalog)
    stub = decisioning_pb2_grpc.DecisioningStub(channel)
    by_id = {o.offer_id: o for o in catalog.offers}
    all_ids = list(by_id)
    for i in range(rounds):
        user = population.users[int(rng.integers(len(population.users)))]
        context = sim.Context.sample(rng)
        request = sim.decide_request(user, context, all_ids)
        request.request_id = f"validation-{seed}-{i}"  # the server's draw is seeded by it
        reply = stub.Decide(request, timeout=10)
        if not reply.choices:
            continue
        world.asked[reply.decision_id] = (user, context)
        offer = by_id[reply.choices[0].offer_id]
        clicked = sim.sample_reward(user, offer, context, 0, rng) > 0
        stub.ReportOutcome(
            decisioning_pb2.ReportOutcomeRequest(
                decision_id=reply.decision_id,
                offer_id=offer.offer_id,
                event=(
                    decisioning_pb2.OUTCOME_EVENT_CLICK
                    if clicked
                    else decisioning_pb2.OUTCOME_EVENT_IMPRESSION_IGNORED
                ),
                outcome_id=f"{reply.decision_id}-o",
            ),
            timeout=10,
        )
    return world


@dataclass(frozen=True)
class Comparison:
    name: str
    truth: float
    estimates: dict[str, report.Estimate]

    def error(self, estimator: str) -> float:
        return abs(self.estimates[estimator].value - self.truth) / self.truth


def compare(world: World, records: Sequence[report.Record]) -> tuple[list[Comparison], float]:
    """Each target's true value next to its estimates, and the true uplift."""
    data, _ = report.single_slot(records)
    estimates = {e.name: e for e in report.off_policy(data)}
    policies = {**report.TARGETS, "logging": lambda d: d.action}
    comparisons = []
    for name, policy in policies.items():
        assert all(d.record is not None for d in data)
        truth = float(
            np.mean(
                [
                    world.truth(str(d.record.payload["decision_id"]), d.candidates[policy(d)])
                    for d in data
                    if d.record is not None
                ]
            )
        )
        e = estimates[name]
        comparisons.append(Comparison(name, truth, {"IPS": e.ips, "SNIPS": e.snips, "DR": e.dr}))
    by_arm: dict[str, list[float]] = {"PERSONALIZED": [], "CONTROL": []}
    for r in records:
        if r.arm in by_arm:
            for choice in r.choices:
                decision_id = str(r.payload["decision_id"])
                by_arm[r.arm].append(world.truth(decision_id, str(choice["offer_id"])))
    true_uplift = float(np.mean(by_arm["PERSONALIZED"]) - np.mean(by_arm["CONTROL"]))
    return comparisons, true_uplift


def main(argv: list[str] | None = None) -> int:
    from tactful.embedded_redis import EmbeddedRedis
    from tactful.store.redis_store import RedisStore
    from tactful.store.wire import connect
    from tactful.transport.server import build_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", help="also write the ROI report (report.md, plots) here")
    args = parser.parse_args(argv)
    config = settings()
    with tempfile.TemporaryDirectory() as data_dir:
        embedded = EmbeddedRedis(data_dir).start()
        try:
            client = connect(embedded.url, socket_timeout=5, connect_timeout=5, max_connections=16)
            store = RedisStore.for_settings(client, config)
            running = build_server(config, store, port=0)
            started = time.time()
            try:
                with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                    world = simulate(channel, args.rounds, args.seed)
            finally:
                running.stop(None)  # type: ignore[arg-type]
            records = report.read_log(client, 0.0, time.time() + 1)
        finally:
            embedded.stop()
    # The report's period: the simulated run (its store held nothing else).
    built = report.build(records, started, time.time())
    if args.out:
        print(f"report: {report.write(records, started, time.time(), Path(args.out))}")
    comparisons, true_uplift = compare(world, records)
    print(f"{args.rounds} rounds in {time.time() - started:.0f} s, {len(records)} decisions")
    print(f"OPE on {built.ope_used} single-slot personalised decisions")
    print(f"{'policy':<10} {'truth':>7}  " + "  ".join(f"{e:>22}" for e in ("IPS", "SNIPS", "DR")))
    ok = True
    for c in comparisons:
        cells = []
        for name, e in c.estimates.items():
            within = c.error(name) <= TOLERANCE
            ok &= within
            cells.append(f"{e.value:.4f} ({c.error(name):5.1%}{'' if within else ' !'})".rjust(22))
        print(f"{c.name:<10} {c.truth:7.4f}  " + "  ".join(cells))
    u = built.uplift
    covered = u.low <= true_uplift <= u.high
    ok &= covered
    print(
        f"uplift: observed {u.difference:+.4f}, 95% CI [{u.low:+.4f}, {u.high:+.4f}], "
        f"true {true_uplift:+.4f}: {'covered' if covered else 'NOT covered'}"
    )
    print("all estimates within 10% and uplift covered" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
