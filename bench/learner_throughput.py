"""Learner throughput: how many rewards per second the learner applies, today's learner
against the one before issue 16, in the same run.

Feature vectors are shaped like a Decide's (a catalog of 200 offers over 30 topics, 1 to 3
topics each; requests on 3 channels, 4 placements, every hour, two categorical and four
numeric context values), featurized by tactful's own ``FeatureSpace``. Three measurements:

* ``model``: the reward model alone, in this process: the old ``RidgeLearner.update`` (full
  ``A^-1``, one reward at a time) at 9 to 11 hash bits, and today's
  ``OnlineRegression.learn`` in batches of a stream read (``learner.READ_COUNT``) at the
  default space and at 2^20.
* ``learners``: whole learner processes against a real redis-server (tactful's embedded one,
  in a temporary directory): ``--rewards`` rewards are put on the reward stream first, then
  1, 2 and 4 ``tactful learn`` loops (``Learner.run``, separate processes, released together)
  read, apply, hand on deltas, merge, publish and save until every reward is in the saved
  state. Two rates: through the backlog (the slope of deliveries between 20% and 80% of the
  stream: what learners sustain while behind, the target's measure) and from the release to
  the last save (with the processes' start and the last save's wait, up to a checkpoint
  interval: shorter runs show less). ``--json-stream`` adds one learner on a stream of JSON
  vectors, as servers wrote them before the packed form.

* ``lag`` (``--lag``, instead of the rows above): rewards put on the stream at a steady
  ``--rate`` (5,000/s) for ``--lag-seconds``, each with its send time, as ReportOutcome puts
  them, while one ``tactful learn`` loop (a process, default settings) learns them. A watcher
  polls the current version every few milliseconds and loads each new one as a server does
  (GET and ``LinearModel.from_bytes``, timed). A version includes the first ``updates``
  rewards (one learner learns them in stream order), so each reward's lag is the time from
  its XADD to the first sight of the first version that includes it.

The target (issue 16) is at least 50,000 rewards/s for one learner at the default space, and
throughput that grows with the number of learners; the outcome-to-model lag at 5,000
rewards/s within a second.

    .venv/bin/python bench/learner_throughput.py [--rewards 100000] [--learners 1,2,4]
        [--bits 18,20]
    .venv/bin/python bench/learner_throughput.py --lag [--rate 5000] [--lag-seconds 20]
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import multiprocessing
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import redis
from old_ridge import RidgeLearner

from tactful import keys
from tactful.bandit import LinearModel, prior_theta, project
from tactful.batches import batch_of
from tactful.domain import Offer
from tactful.embedded_redis import EmbeddedRedis
from tactful.features import FeatureSpace, RequestContext, SparseVector, UserEvidence
from tactful.learner import READ_COUNT, Learner
from tactful.regression import OnlineRegression
from tactful.settings import Settings
from tactful.store import reward_vectors
from tactful.store.model_store import ModelStore
from tactful.store.wire import connect, undecoded

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


def old_model_rate(bits: int, *, seconds: float, seed: int) -> dict[str, float]:
    space = FeatureSpace(bits)
    learner = RidgeLearner(space, l2=1.0, kappa=1.0)
    stream = vectors(space, seed)
    batch = [next(stream) for _ in range(2_000)]
    rewards = np.random.default_rng(seed).random(len(batch)) < 0.1
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        learner.update(batch[done % len(batch)], float(rewards[done % len(batch)]))
        done += 1
    return {"bits": bits, "rate": done / (time.perf_counter() - started)}


def model_rate(bits: int, *, seconds: float, seed: int) -> dict[str, float]:
    space = FeatureSpace(bits)
    model = OnlineRegression(space, l2=1.0, rate=1.0, prior=prior_theta(space.dim))
    stream = vectors(space, seed)
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(8):
        xs = [next(stream) for _ in range(READ_COUNT)]
        rewards = (rng.random(len(xs)) < 0.1).astype(float).tolist()
        batches.append(
            batch_of(
                [(list(x.indices), list(x.values), [list(b) for b in x.blocks]) for x in xs],
                rewards,
            )
        )
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = batches[(done // READ_COUNT) % len(batches)]
        model.learn(batch)
        done += len(batch)
    return {"bits": bits, "rate": done / (time.perf_counter() - started)}


def fill_stream(
    client: Any, space: FeatureSpace, rewards: int, seed: int, form: str = "packed"
) -> list[tuple[int, int]]:
    """``rewards`` entries as the reward scripts write them; ``form`` "json" writes the
    vectors as servers did before the packed form (``store/reward_vectors.py``). Returns
    their ids, in order."""
    encode = reward_vectors.pack if form == "packed" else orjson.dumps
    stream = vectors(space, seed)
    rng = random.Random(seed)
    now = time.time()
    ids: list[tuple[int, int]] = []
    for start in range(0, rewards, 2_000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(rewards, start + 2_000)):
            x = encode(next(stream).to_json())
            reward = 1.0 if rng.random() < 0.1 else 0.0
            fields = {"d": f"decision-{i}", "o": "offer", "r": reward, "x": x, "t": now}
            pipe.xadd(keys.OUTCOME_STREAM, fields)
        ids += [_id(entry_id) for entry_id in pipe.execute()]
    return ids


def _id(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def learner_process(url: str, bits: int, name: str, ready: Any, go: Any, stop: Any) -> None:
    settings = Settings.from_env({"TACTFUL_FEATURE_HASH_BITS": str(bits)})
    client = connect(url, socket_timeout=5.0, connect_timeout=2.0, max_connections=4)
    learner = Learner(
        ModelStore(client), FeatureSpace(bits), settings.learning, consumer=name, leader=False
    )
    ready.set()
    go.wait()
    halt = threading.Event()
    watcher = threading.Thread(target=lambda: (stop.wait(), halt.set()), daemon=True)
    watcher.start()
    learner.run(halt)


def settle_append_only_file(client: Any) -> None:
    """Rewrite the append-only file now and wait for it: filling the stream grows the file
    past Redis's rewrite threshold, and a rewrite (a fork copying the stream, on the other
    core) starting while the learners run would time the fill, not the learners."""
    try:
        client.bgrewriteaof()
    except redis.exceptions.ResponseError as exc:  # one the fill set off: wait for it
        if "already in progress" not in str(exc):
            raise
    while True:
        persistence = client.info("persistence")
        if not (persistence["aof_rewrite_in_progress"] or persistence["aof_rewrite_scheduled"]):
            return
        time.sleep(0.05)


def progress(client: Any, ids: list[tuple[int, int]]) -> tuple[int, bool]:
    """How many rewards were delivered to the learners (Redis 6 has no "entries-read": the
    position of the group's last delivered id among the stream's), and whether all are in
    the saved state (every one delivered, none pending, no delta waiting)."""
    (group,) = client.xinfo_groups(keys.OUTCOME_STREAM)
    read = bisect.bisect_right(ids, _id(group["last-delivered-id"]))
    saved = read == len(ids) and group["pending"] == 0 and client.llen(keys.LEARNER_DELTAS) == 0
    return read, bool(saved)


def steady_rate(samples: list[tuple[float, int]], total: int) -> float:
    """Rewards/s while the learners work through the backlog: the slope of deliveries
    between 20% and 80% of the stream (a learner reads one batch ahead of what it learned),
    without the start (processes taking the lease, loading) and the end (the last save)."""
    low = next((t, n) for t, n in samples if n >= 0.2 * total)
    high = next((t, n) for t, n in samples if n >= 0.8 * total)
    return (high[1] - low[1]) / (high[0] - low[0]) if high[0] > low[0] else float("nan")


def learners_rate(
    n: int, bits: int, rewards: int, seed: int, form: str = "packed"
) -> dict[str, Any]:
    space = FeatureSpace(bits)
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as data, EmbeddedRedis(data) as redis_server:
        client = connect(
            redis_server.url, socket_timeout=10.0, connect_timeout=2.0, max_connections=4
        )
        ModelStore(client).ensure_group()
        ids = fill_stream(client, space, rewards, seed, form)
        settle_append_only_file(client)
        ready = [context.Event() for _ in range(n)]
        go, stop = context.Event(), context.Event()
        children = [
            context.Process(
                target=learner_process,
                args=(redis_server.url, bits, f"bench-{k}", ready[k], go, stop),
            )
            for k in range(n)
        ]
        for child in children:
            child.start()
        for event in ready:
            event.wait(60)
        before = client.info()
        started = time.perf_counter()
        go.set()
        samples: list[tuple[float, int]] = []
        rewrites, rewriting = 0, False
        while True:
            delivered, saved = progress(client, ids)
            samples.append((time.perf_counter(), delivered))
            now_rewriting = bool(client.info("persistence")["aof_rewrite_in_progress"])
            rewrites += now_rewriting and not rewriting
            rewriting = now_rewriting
            if saved:
                break
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        after = client.info()
        stop.set()
        for child in children:
            child.join(30)
        client.close()
    return {
        "learners": n,
        "bits": bits,
        "rewards": rewards,
        "form": form,
        "rate": rewards / elapsed,
        "steady": steady_rate(samples, rewards),
        # What Redis did meanwhile: its CPU per reward, and append-only file rewrites.
        "redis_us_per_reward": 1e6
        * sum(after[k] - before[k] for k in ("used_cpu_user", "used_cpu_sys"))
        / rewards,
        "aof_rewrites": rewrites,
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def lag(bits: int, rate: float, seconds: float, seed: int) -> dict[str, float]:
    """Outcome to visible model at a steady ``rate`` (see the module's docstring)."""
    space = FeatureSpace(bits)
    stream = vectors(space, seed)
    count = min(20_000, int(rate * seconds))
    xs = [reward_vectors.pack(next(stream).to_json()) for _ in range(count)]
    kappa = Settings.from_env({}).learning.kappa
    context = multiprocessing.get_context("spawn")
    sent: list[float] = []  # send time of reward k, in stream order
    seen: list[tuple[float, int]] = []  # (first seen, updates) of each version
    loads: list[float] = []  # seconds to load a version, as a server does
    with tempfile.TemporaryDirectory() as data, EmbeddedRedis(data) as redis_server:
        client = connect(
            redis_server.url, socket_timeout=10.0, connect_timeout=2.0, max_connections=4
        )
        ModelStore(client).ensure_group()
        ready, go, stop = context.Event(), context.Event(), context.Event()
        child = context.Process(
            target=learner_process, args=(redis_server.url, bits, "lag-0", ready, go, stop)
        )
        child.start()
        ready.wait(60)
        go.set()
        done = threading.Event()

        def watch() -> None:
            watcher = connect(
                redis_server.url, socket_timeout=10.0, connect_timeout=2.0, max_connections=2
            )
            last = 0
            while not done.is_set():
                current = int(watcher.get(keys.MODEL_CURRENT) or 0)
                if current != last:
                    at = time.time()
                    started = time.perf_counter()
                    raw = undecoded(watcher, "GET", keys.model_snapshot(current))
                    if raw is not None:  # what ModelCache._load does
                        model = LinearModel.from_bytes(bytes(raw), space)
                        project(model.theta, kappa)
                        loads.append(time.perf_counter() - started)
                        seen.append((at, model.updates))
                    last = current
                time.sleep(0.002)
            watcher.close()

        watcher_thread = threading.Thread(target=watch, daemon=True)
        watcher_thread.start()
        rng = random.Random(seed)
        tick = 0.01  # a pipeline of rate * tick rewards every tick
        per_tick = max(1, round(rate * tick))
        started = time.time()
        k = 0
        while time.time() - started < seconds:
            due = started + (k // per_tick) * tick
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)
            pipe = client.pipeline(transaction=False)
            now = time.time()
            for _ in range(per_tick):
                reward = 1.0 if rng.random() < 0.1 else 0.0
                fields = {"d": f"decision-{k}", "o": "offer", "r": reward, "x": xs[k % len(xs)]}
                pipe.xadd(keys.OUTCOME_STREAM, {**fields, "t": now})
                sent.append(now)
                k += 1
            pipe.execute()
        finish = time.time() + 5.0
        while time.time() < finish and not (seen and seen[-1][1] >= len(sent)):
            time.sleep(0.05)
        done.set()
        watcher_thread.join(5)
        stop.set()
        child.join(30)
        client.close()
    lags = []
    versions = iter(seen)
    at, updates = next(versions, (math.inf, 0))
    for k, sent_at in enumerate(sent):
        while updates <= k and at != math.inf:
            at, updates = next(versions, (math.inf, 0))
        lags.append(at - sent_at)
    included = [x for x in lags if x != math.inf]
    return {
        "bits": bits,
        "rate": len(sent) / seconds,
        "rewards": len(sent),
        "missing": len(lags) - len(included),
        "versions": len(seen),
        "lag_p50": percentile(included, 50),
        "lag_p99": percentile(included, 99),
        "lag_max": max(included, default=float("nan")),
        "load_p50": percentile(loads, 50),
        "load_p99": percentile(loads, 99),
        "loads_per_second": len(loads) / seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="18,20", help="hash sizes of today's learner")
    parser.add_argument("--old-bits", default="9,10,11", help="hash sizes of the old one")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per model row")
    parser.add_argument("--rewards", type=int, default=100_000, help="rewards per learner row")
    parser.add_argument("--learners", default="1,2,4", help="learner processes per row")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lag", action="store_true", help="measure the lag instead")
    parser.add_argument("--rate", type=float, default=5_000, help="rewards/s in --lag")
    parser.add_argument("--lag-seconds", type=float, default=20.0, help="length of --lag")
    parser.add_argument(
        "--json-stream",
        action="store_true",
        help="also one learner on a stream of JSON vectors (as servers wrote them before)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    bits = [int(b) for b in args.bits.split(",")]

    print(
        f"machine: {platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}"
    )
    figures: dict[str, list[dict[str, float]]] = {"old": [], "model": [], "learners": []}
    if args.lag:
        row = lag(bits[0], args.rate, args.lag_seconds, args.seed)
        figures["lag"] = [row]
        print(
            f"[bench] lag at {row['rate']:,.0f} rewards/s, bits {bits[0]}, "
            f"{row['rewards']:,} rewards ({row['missing']} never seen), "
            f"{row['versions']} versions: outcome -> model visible "
            f"p50 {row['lag_p50'] * 1000:.0f} ms, p99 {row['lag_p99'] * 1000:.0f} ms, "
            f"max {row['lag_max'] * 1000:.0f} ms; a server's load of a version "
            f"p50 {row['load_p50'] * 1000:.1f} ms, p99 {row['load_p99'] * 1000:.1f} ms, "
            f"{row['loads_per_second']:.1f} loads/s",
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as out:
                json.dump(figures, out, indent=2)
        return 0
    for b in (int(b) for b in args.old_bits.split(",")):
        row = old_model_rate(b, seconds=args.seconds, seed=args.seed)
        figures["old"].append(row)
        print(f"[bench] model   old ridge (A^-1)   bits {b:2d}: {row['rate']:>10,.0f} rewards/s")
    for b in bits:
        row = model_rate(b, seconds=args.seconds, seed=args.seed)
        figures["model"].append(row)
        print(f"[bench] model   online regression  bits {b:2d}: {row['rate']:>10,.0f} rewards/s")
    rows: list[tuple[int, int, str]] = []
    for b in bits:
        if args.json_stream:
            rows.append((1, b, "json"))
        rows += [(int(k), b, "packed") for k in args.learners.split(",")]
    for n, b, form in rows:
        row = learners_rate(n, b, args.rewards, args.seed, form)
        figures["learners"].append(row)
        print(
            f"[bench] learners {n} ({form} stream) bits {b:2d}: "
            f"{row['steady']:>10,.0f} rewards/s through the backlog, "
            f"{row['rate']:>10,.0f} rewards/s from release to saved state "
            f"({args.rewards:,} rewards; redis-server {row['redis_us_per_reward']:.1f} us "
            f"CPU a reward, {row['aof_rewrites']} AOF rewrites)",
            flush=True,
        )
    one = [
        r
        for r in figures["learners"]
        if r["learners"] == 1 and r["bits"] == bits[0] and r["form"] == "packed"
    ]
    if one:
        met = one[0]["steady"] >= TARGET_REWARDS_PER_SECOND
        print(
            f"target: one learner >= {TARGET_REWARDS_PER_SECOND:,} rewards/s at "
            f"{bits[0]} bits: {one[0]['steady']:,.0f} ({'met' if met else 'NOT MET'})"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
