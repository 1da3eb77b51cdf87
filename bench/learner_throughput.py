"""Learner throughput: how many rewards per second the learner applies.

Two measurements, on feature vectors shaped like a Decide's (a catalog of 200 offers over 30
topics, 1 to 3 topics each; requests on 3 channels, 4 placements, every hour, two
categorical and four numeric context values), featurized by tactful's own ``FeatureSpace``:

* ``update``: ``RidgeLearner.update`` alone, in this process, at several hash sizes
  (``--bits``): the cost of one reward in the model, nothing else. Each size runs for at most
  ``--seconds`` or ``--updates`` updates, whichever comes first.
* ``learner``: the whole learner at the default hash size against a real redis-server
  (tactful's embedded one, in a temporary directory): ``--rewards`` rewards are put on the
  reward stream first, then one ``Learner`` reads, applies, publishes and checkpoints until
  it has applied them all. Rewards/s counts from its start to the last one applied.

The target (issue 16) is at least 50,000 rewards/s for one learner at the default feature
space; several learners sharing one stream are not possible yet (one holds the lease), so
that row is reported as not measured.

    .venv/bin/python bench/learner_throughput.py [--bits 9,10,11,12] [--rewards 20000]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from tactful.bandit import RidgeLearner
from tactful.domain import Offer
from tactful.embedded_redis import EmbeddedRedis
from tactful.features import FeatureSpace, RequestContext, SparseVector, UserEvidence
from tactful.keys import OUTCOME_STREAM
from tactful.learner import Learner
from tactful.settings import LearningSettings, Settings
from tactful.store.model_store import ModelStore
from tactful.store.wire import connect

TARGET_REWARDS_PER_SECOND = 50_000


def catalog(rng: random.Random, offers: int = 200, topics: int = 30) -> list[Offer]:
    names = [f"topic-{i}" for i in range(topics)]
    return [
        Offer(
            f"offer-{i}",
            f"Offer {i}",
            tuple(rng.sample(names, rng.randint(1, 3))),
            ("web", "email", "push"),
            priority=rng.random(),
        )
        for i in range(offers)
    ]


def vectors(space: FeatureSpace, seed: int) -> Iterator[SparseVector]:
    """An endless stream of (offer, request, evidence) vectors, as the learner receives them."""
    rng = random.Random(seed)
    offers = catalog(rng)
    while True:
        ctx = RequestContext(
            channel=rng.choice(("web", "email", "push")),
            placement=rng.choice(("home", "cart", "article", "inbox")),
            hour=rng.randrange(24),
            categorical=(("device", rng.choice(("ios", "android", "web"))), ("tier", "gold")),
            numeric=tuple((f"n{i}", rng.random()) for i in range(4)),
        )
        evidence = UserEvidence(rng.random() < 0.3, rng.random() * 0.9, rng.randrange(3))
        yield space.featurize(ctx, rng.choice(offers), evidence)


def update_rate(bits: int, *, seconds: float, most: int, seed: int) -> dict[str, float]:
    space = FeatureSpace(bits)
    learner = RidgeLearner(space, l2=1.0, kappa=1.0)
    stream = vectors(space, seed)
    batch = [next(stream) for _ in range(min(most, 2_000))]
    rewards = np.random.default_rng(seed).random(len(batch)) < 0.1
    done = 0
    started = time.perf_counter()
    while done < most and time.perf_counter() - started < seconds:
        i = done % len(batch)
        learner.update(batch[i], float(rewards[i]))
        done += 1
    elapsed = time.perf_counter() - started
    nnz = float(np.mean([len(set(x.indices)) for x in batch]))
    return {"bits": bits, "dim": space.dim, "nnz": nnz, "updates": done, "rate": done / elapsed}


def learner_rate(rewards: int, *, seed: int) -> dict[str, float]:
    settings = Settings.from_env({})
    learning: LearningSettings = settings.learning
    space = FeatureSpace(learning.hashed_bits, learning.feature_set)
    stream = vectors(space, seed)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as data, EmbeddedRedis(data) as redis_server:
        client = connect(
            redis_server.url, socket_timeout=5.0, connect_timeout=2.0, max_connections=4
        )
        models = ModelStore(client)
        models.ensure_group()
        now = time.time()
        for start in range(0, rewards, 1_000):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(rewards, start + 1_000)):
                x = json.dumps(next(stream).to_json())
                reward = 1.0 if rng.random() < 0.1 else 0.0
                fields = {"d": f"decision-{i}", "o": "offer", "r": reward, "x": x, "t": now}
                pipe.xadd(OUTCOME_STREAM, fields)  # type: ignore[arg-type]
            pipe.execute()
        learner = Learner(models, space, learning, consumer="bench")
        applied = 0
        started = time.perf_counter()
        learner.start()
        while applied < rewards:
            applied += learner.step(block_ms=10)
        learner.stop()
        elapsed = time.perf_counter() - started
        client.close()
    return {"bits": learning.hashed_bits, "rewards": applied, "rate": applied / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="9,10,11,12", help="hash sizes for the update row")
    parser.add_argument("--seconds", type=float, default=5.0, help="most seconds per hash size")
    parser.add_argument("--updates", type=int, default=20_000, help="most updates per size")
    parser.add_argument("--rewards", type=int, default=20_000, help="rewards for the learner")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()

    print(
        f"machine: {platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}"
    )
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        row = update_rate(bits, seconds=args.seconds, most=args.updates, seed=args.seed)
        rows.append(row)
        print(
            f"[bench] update  bits {bits:2d} (d = {row['dim']:,.0f}, {row['nnz']:.0f} non-zeros): "
            f"{row['rate']:>10,.0f} rewards/s ({row['updates']:,.0f} updates)",
            flush=True,
        )
    whole = learner_rate(args.rewards, seed=args.seed)
    print(
        f"[bench] learner bits {whole['bits']:2d} (stream, apply, publish, checkpoint): "
        f"{whole['rate']:>10,.0f} rewards/s ({whole['rewards']:,.0f} rewards)"
    )
    print("[bench] learners 2 and 4 on one stream: not measured (one learner holds the lease)")
    met = whole["rate"] >= TARGET_REWARDS_PER_SECOND
    print(
        f"target: one learner >= {TARGET_REWARDS_PER_SECOND:,} rewards/s at the default space: "
        f"{whole['rate']:,.0f} ({'met' if met else 'NOT MET'})"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"update": rows, "learner": whole}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
