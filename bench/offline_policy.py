"""The learner and the policy in one process, without a server: seconds per seed, and the same
seed always gives the same reward (the server's learner publishes on its own clock, so a
seed's reward varies from run to run there). For finding why a scenario learns as it does
and comparing learners over many seeds; ``policy_quality.py`` stays the measurement of the
product through its API.

Each round is featurized as the server does (``FeatureSpace.featurize_many``), scored with
the published weights plus the exploration bonus, drawn by inverse gap weighting
(``bandit.pick_slate``), and its reward learned in batches of ``--batch``; the learner
publishes every ``--publish`` rewards. Settings are the defaults (gamma 200, scale 50,
share 0.1, bonus 0.4, l2 1, drift threshold 4).

Scenarios: ``digits-pca``, ``digits-raw``, ``wine``, ``iris``, ``synth``, ``drift`` (as in
``policy_quality.py``: reward 1 when the offer's class is the label; ``drift``: from half
the rounds each offer pays for the next class) and ``sim`` (the simulated world with 70 %
of users stating a persona, then 600 newcomers for 3 decisions each; ``--segments 0``
learns nothing from memberships). ``--learner old`` is the full-``A^-1`` ridge learner
tactful had before issue 16 (``old_ridge.py``; use ``--bits 9``, it is O(d^2))::

    .venv/bin/python bench/offline_policy.py --scenario digits-pca --seeds 30
    .venv/bin/python bench/offline_policy.py --scenario sim --seeds 6 --bits 9 --learner old
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from old_ridge import RidgeLearner
from policy_quality import Labelled, bundled, digits_pca, digits_raw, synthetic

from tactful import sim
from tactful.bandit import pick_slate, prior_theta, project
from tactful.batches import Vector, batch_of
from tactful.domain import Offer
from tactful.features import FeatureBatch, FeatureSpace, FloatArray, RequestContext, squash
from tactful.features import SparseVector as Sparse
from tactful.regression import OnlineRegression

GAMMA, GAMMA_SCALE, SHARE, BONUS = 200.0, 50.0, 0.1, 0.4


class Learner:
    """What the policy sees of a learner: rewards in, published weights and variances out."""

    def __init__(self, kind: str, space: FeatureSpace) -> None:
        self.kind = kind
        if kind == "old":
            self.old = RidgeLearner(space, l2=1.0, kappa=1.0)
        else:
            prior = prior_theta(space.dim)
            self.new = OnlineRegression(space, l2=1.0, rate=1.0, prior=prior, drift_threshold=4.0)

    def learn(self, vectors: list[Vector], rewards: list[float]) -> None:
        if self.kind == "old":
            for (indices, values, _), reward in zip(vectors, rewards, strict=True):
                self.old.update(Sparse(tuple(indices), tuple(values)), reward)
        else:
            self.new.learn(batch_of(vectors, rewards))

    def publish(self) -> tuple[FloatArray, FloatArray | None, int]:
        if self.kind == "old":  # its bonus was not published: none
            return self.old.theta(), None, self.old.updates
        return project(self.new.weights, 1.0), self.new.variance(), self.new.updates


class Policy:
    """Decides with what the learner last published; learns every choice's reward."""

    def __init__(self, learner: Learner, seed: int, batch: int, publish: int) -> None:
        self.learner = learner
        self.rng = np.random.default_rng(seed + 1000)
        self.batch, self.publish = batch, publish
        self.theta, self.variance, self.updates = learner.publish()
        self.vectors: list[Vector] = []
        self.rewards: list[float] = []
        self.seen = 0

    def choose(self, batch: FeatureBatch) -> int:
        scores = batch.dot(self.theta)
        if self.variance is not None:
            scores = scores + BONUS * batch.spread(self.variance)
        gamma = max(GAMMA, GAMMA_SCALE * math.sqrt(self.updates))
        return pick_slate(scores, 1, gamma, self.rng, SHARE)[0].index

    def learn(self, batch: FeatureBatch, chosen: int, reward: float) -> None:
        vector = batch.vector(chosen)
        self.vectors.append(
            (list(vector.indices), list(vector.values), list(map(list, vector.blocks)))
        )
        self.rewards.append(reward)
        if len(self.rewards) >= self.batch:
            self.learner.learn(self.vectors, self.rewards)
            self.vectors, self.rewards = [], []
        self.seen += 1
        if self.seen % self.publish == 0:
            self.theta, self.variance, self.updates = self.learner.publish()


def classification(
    data: Labelled, rounds: int, seed: int, drift: bool, policy: Policy, space: FeatureSpace
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    k = data.classes
    offers = [Offer(f"{data.topic}-{c}", "", (f"{data.topic}-{c}",), ("web",)) for c in range(k)]
    rewards = []
    for t in range(rounds):
        i = int(rng.integers(len(data.labels)))
        label = int(data.labels[i])
        if drift and t >= rounds // 2:
            label = (label + 1) % k
        numeric = tuple(zip(data.keys, map(float, data.z[i]), strict=True))
        context = RequestContext("web", data.topic, 12, (), numeric)
        batch = space.featurize_many(context, offers, [False] * k, [0.0] * k, 0)
        chosen = policy.choose(batch)
        reward = float(chosen == label)
        policy.learn(batch, chosen, reward)
        rewards.append(reward)
    half = rounds // 2
    out = {"mean": float(np.mean(rewards)), "second half": float(np.mean(rewards[half:]))}
    if policy.learner.kind == "online":
        out["restarts"] = float(policy.learner.new.restarts)
        out["changes"] = float(policy.learner.new.changes_detected)
    return out


def simulated(
    rounds: int, seed: int, segments: bool, policy: Policy, space: FeatureSpace
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    population = sim.Population.generate(400, rng, persona_share=0.7)
    catalog = sim.Catalog.generate(40, population.topics, rng)
    newcomers = population.newcomers(600, rng, persona_share=0.7)
    offers = {
        o.offer_id: Offer(o.offer_id, "", tuple(o.topics), tuple(o.channels), o.priority)
        for o in catalog.offers
    }

    def decisions(users: Iterator[sim.User]) -> float:
        """The mean true click probability of the choices made for these users."""
        contacts: dict[str, int] = {}
        chances = []
        for user in users:
            context = sim.Context.sample(rng)
            u = float(rng.random())
            eligible = [o for o in catalog.offers if sim.eligible(user, o, context.channel)]
            if not eligible:
                continue
            seen = contacts.get(user.user_id, 0)
            contacts[user.user_id] = seen + 1
            liked = [not user.likes.isdisjoint(o.topics) for o in eligible]
            inferred = [
                squash(user.strongest_signal(o.topics)) if user.consent else 0.0 for o in eligible
            ]
            member = segments and user.states_persona
            memberships = (sim.persona_segment_id(user.persona),) if member else ()
            ctx = RequestContext("web", context.placement, 12, (("device", context.device),))
            batch = space.featurize_many(
                ctx, [offers[o.offer_id] for o in eligible], liked, inferred, seen, memberships
            )
            chosen = policy.choose(batch)
            chance = sim.click_probability(user, eligible[chosen], context, seen)
            policy.learn(batch, chosen, float(u < chance))
            chances.append(chance)
        return float(np.mean(chances))

    known = decisions(population.users[int(rng.integers(400))] for _ in range(rounds))
    new = decisions(user for user in newcomers for _ in range(3))
    return {"known users (true p)": known, "newcomers' first 3 (true p)": new}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    scenarios = ("digits-pca", "digits-raw", "wine", "iris", "synth", "drift", "sim")
    parser.add_argument("--scenario", choices=scenarios, default="digits-pca")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1, help="the first seed")
    parser.add_argument("--rounds", type=int, default=4000)
    parser.add_argument("--learner", choices=("online", "old"), default="online")
    parser.add_argument("--bits", type=int, default=18)
    parser.add_argument("--batch", type=int, default=5, help="rewards learned in one step")
    parser.add_argument("--publish", type=int, default=20, help="rewards between publishes")
    parser.add_argument("--segments", type=int, default=1, help="sim: learn from memberships")
    args = parser.parse_args(argv)
    data: dict[str, Callable[[int], Labelled]] = {
        "digits-pca": lambda _: digits_pca(16),
        "drift": lambda _: digits_pca(16),
        "digits-raw": lambda _: digits_raw(),
        "wine": lambda _: bundled("wine"),
        "iris": lambda _: bundled("iris"),
        "synth": synthetic,
    }
    started = time.perf_counter()
    results: list[dict[str, float]] = []
    for seed in range(args.seed, args.seed + args.seeds):
        space = FeatureSpace(args.bits)
        policy = Policy(Learner(args.learner, space), seed, args.batch, args.publish)
        run: dict[str, Any]
        if args.scenario == "sim":
            run = simulated(args.rounds, seed, bool(args.segments), policy, space)
        else:
            labelled = data[args.scenario](seed)
            drift = args.scenario == "drift"
            run = classification(labelled, args.rounds, seed, drift, policy, space)
        results.append(run)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in run.items()), flush=True)
    print(
        f"{args.scenario}, {args.learner} learner, {args.seeds} seeds "
        f"({time.perf_counter() - started:.0f} s), mean ± sd (worst seed):"
    )
    for key in results[0]:
        values = np.array([r[key] for r in results])
        spread = values.std(ddof=1) if len(values) > 1 else 0.0
        print(f"  {key}: {values.mean():.3f} ± {spread:.3f} ({values.min():.3f})")


if __name__ == "__main__":
    main()
