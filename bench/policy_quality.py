"""Policy quality: tactful's learned policy against baselines, on a real server, in one run.

Three scenarios (``sim`` and ``digits`` by default; ``coldstart`` when asked for), each run
for several seeds. For every seed a fresh ``python -m tactful serve``
(one per tactful variant, e.g. per exploration gamma) starts on 127.0.0.1 with its embedded
redis-server in a fresh temporary directory, its embedded learner, no demo catalog, no control
group and ``TACTFUL_SEED`` set; the world is loaded through the gRPC API. Then for each round
every policy chooses one offer for the same (user, context) and is rewarded by the same draw
(common random numbers: a click happens when one shared uniform falls below the chosen offer's
click probability); tactful is asked with Decide (slots=1, every offer a candidate) and told the
outcome with ReportOutcome (CLICK or IMPRESSION_IGNORED), so it learns while it is measured.

``sim`` (``tactful.sim``): users with hidden tastes from a few personas, some stating accurate
but incomplete likes and dislikes, some consenting to noisy inferred signals; offers with
topics and a priority weakly correlated with their appeal; placement and device change which
topics work; fatigue lowers clicks. Policies:
  oracle         the eligible offer with the highest true click probability (the ceiling)
  tactful        the server's choice
  vw squarecb    Vowpal Wabbit ``--cb_explore_adf --squarecb`` on the same features (if the
                 ``vowpalwabbit`` package is importable)
  priority       the eligible offer with the highest business priority (tactful's control arm)
  uniform        uniformly at random among the eligible offers
Eligibility (no disliked topic, a sensitive offer needs a like) is computed with
``tactful.sim.eligible``; tactful's own choice is checked to fall inside it.

``digits`` (scikit-learn's bundled ``load_digits``, if scikit-learn is importable): a
supervised-to-bandit conversion. Each image is a context, each of the 10 classes an offer with
its own topic (``digit-<k>``), reward 1 when the chosen class is the label. The context goes
through tactful's own features: the first ``--pca`` principal components (standardised) as
``numeric_context``, which tactful hashes per topic (``t:digit-<k>|n:pc<j>``), so each class
learns its own linear score. Policies: tactful, vw squarecb, uniform, and ``full-info ridge``:
an online ridge regression that sees every label (all 10 rewards per round) and plays greedily,
the full-information limit a bandit learner approaches. Every policy gets the same features
(``sign(v)*log1p(|v|)`` of each component, as tactful computes them).

``coldstart`` (``--scenarios coldstart``): learning at persona level. The ``sim`` world where
a share of users (``--persona-share``, 0.7) state their persona as the STATED attribute
``persona``, and the bench defines one segment per persona (``stated.persona == "p<k>"``, not
sensitive, so its membership is a bandit feature). Two tactful servers per variant: ``tactful
segments`` learns from memberships, ``tactful no segments`` has
``TACTFUL_SEGMENT_MAX_FEATURES=0`` (same catalog, segments and profiles; nothing learned from
membership). Both run with a 1 s Redis timeout (this measures learning, not latency). After
``--rounds`` decisions of the known users, ``--newcomers`` brand-new users of the same
personas (stated likes as usual, no consent so no signals: all that is known is what they said)
arrive one after the other for ``--first-k`` decisions each. Besides the usual table (over
all rounds), a cold-start table: each policy's mean reward on the newcomers' k-th decision
(k = 1..first-k), on their first k, and the true click probability of those choices; then the
gain of segment features (with minus without, paired by seed), over all newcomers and split
by whether they stated their persona (those who did not are in no segment: a control).
Policies: oracle, the two tactful servers, priority, uniform.

Output: per scenario a table of mean reward, last-quarter reward and (sim) the mean true click
probability of the chosen offers, mean ± sd over seeds; for tactful also how often it
explored, and its learner lag (``tactful_learner_lag_seconds`` from /metrics).

    .venv/bin/python bench/policy_quality.py [--seeds 3] [--rounds 4000] [--gammas 200,1000]
        [--bonuses 0,0.4] [--set TACTFUL_EXPLORATION_GAMMA_SCALE=20]

The defaults (both scenarios, 3 seeds, 4000 rounds, one tactful server) take about 2 minutes
on a 2-core machine; each extra gamma or bonus adds about a minute. ``--set`` passes a
setting to every tactful server (the bench gives them none of its own environment's).

    .venv/bin/python bench/policy_quality.py --scenarios coldstart [--newcomers 600] [--first-k 3]

takes about 4 minutes with 3 seeds (4000 + 1800 rounds, two tactful servers).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np
import numpy.typing as npt
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

from tactful import sim
from tactful.settings import LearningSettings
from tactful.v1 import catalog_pb2, catalog_pb2_grpc, decisioning_pb2, decisioning_pb2_grpc

try:
    import vowpalwabbit
except ImportError:  # optional: pip install vowpalwabbit (the dev extra has it)
    vowpalwabbit = None

FloatArray = npt.NDArray[np.float64]
RPC_TIMEOUT_S = 5.0
NOTHING = -1  # a policy's choice when what it showed is not eligible: no reward
DRAIN_TIMEOUT_S = 15.0
DEFAULT_GAMMA = LearningSettings().exploration_gamma
DEFAULT_BONUS = LearningSettings().exploration_bonus


# --- rounds ---------------------------------------------------------------------------------


@dataclass
class Round:
    """One decision, the same for every policy."""

    request: decisioning_pb2.DecideRequest  # for tactful (its candidates: every offer)
    offer_ids: list[str]  # the eligible offers
    probs: FloatArray  # true reward probability of each eligible offer
    priorities: list[float]
    vw_shared: str
    vw_actions: list[str]
    u: float  # the common random number: offer i is clicked iff u < probs[i]
    x: FloatArray | None = None  # dense context features (full-information ridge)
    cold: int = 0  # coldstart: the k-th decision (1-based) of a newcomer, 0 for others
    stated_persona: bool = False  # coldstart: that newcomer stated their persona


class Scenario(Protocol):
    name: str
    description: str
    policies: tuple[str, ...]  # the baselines that apply, besides tactful

    def load(self, channel: grpc.Channel) -> None: ...

    def rounds(self, n: int) -> Iterator[Round]: ...


def vw_token(text: str) -> str:
    return text.replace(" ", "_").replace(":", "_").replace("|", "_")


class SimScenario:
    name = "sim"
    policies = ("oracle", "vw", "priority", "uniform")

    def __init__(self, seed: int, n_users: int, n_offers: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.population = sim.Population.generate(n_users, self.rng)
        self.catalog = sim.Catalog.generate(n_offers, self.population.topics, self.rng)
        self.description = (
            f"{n_users} users ({sum(bool(u.likes) for u in self.population.users)} with stated "
            f"likes, {sum(u.consent for u in self.population.users)} consenting), {n_offers} "
            f"offers ({sum(o.sensitive for o in self.catalog.offers)} sensitive), "
            f"{len(self.population.topics)} topics"
        )

    def load(self, channel: grpc.Channel) -> None:
        sim.load(channel, self.population, self.catalog)

    def rounds(self, n: int) -> Iterator[Round]:
        users = self.population.users
        contacts: dict[str, int] = {}
        for _ in range(n):
            user = users[int(self.rng.integers(len(users)))]
            r = self._round(user, contacts)
            if r is not None:
                yield r

    def _round(self, user: sim.User, contacts: dict[str, int]) -> Round | None:
        """One decision for ``user`` in a context drawn now (None: nothing is eligible)."""
        offers = self.catalog.offers
        context = sim.Context.sample(self.rng)
        u = float(self.rng.random())
        eligible = [o for o in offers if sim.eligible(user, o, context.channel)]
        if not eligible:
            return None
        seen = contacts.get(user.user_id, 0)
        contacts[user.user_id] = seen + 1  # tactful counts the same contacts today
        return Round(
            request=sim.decide_request(user, context, [o.offer_id for o in offers]),
            offer_ids=[o.offer_id for o in eligible],
            probs=np.array([sim.click_probability(user, o, context, seen) for o in eligible]),
            priorities=[o.priority for o in eligible],
            vw_shared=(
                f"shared |c placement={context.placement} device={context.device} "
                f"|f contacts:{math.log1p(seen):.4f}"
            ),
            vw_actions=[self._vw_action(user, o) for o in eligible],
            u=u,
        )

    @staticmethod
    def _vw_action(user: sim.User, offer: sim.SimOffer) -> str:
        """tactful's features in VW's words: like / inferred / priority as dense values, topics
        and the offer id crossed with the context by ``-q ca``."""
        weight = 1.0 / math.sqrt(len(offer.topics))
        topics = " ".join(f"t={t}:{weight:.4f}" for t in offer.topics)
        dense = f"priority:{offer.priority}"
        if not user.likes.isdisjoint(offer.topics):
            dense += " like:1"
        strength = user.strongest_signal(offer.topics) if user.consent else 0.0
        if strength > 0:
            dense += f" inferred:{strength / (1 + strength):.4f}"
        return f"|a {topics} o={vw_token(offer.offer_id)} |d {dense}"


class ColdStartScenario(SimScenario):
    """The ``sim`` world where a share of users state their persona (the STATED attribute
    ``persona``, with one segment per persona, ``stated.persona == "p<k>"``), in two phases:
    ``rounds`` decisions of the known users, as in ``sim``; then ``newcomers`` brand-new users
    of the same personas (stated likes as usual, no consent, so no behaviour: nothing but what
    they said) arrive one after the other, each for ``first_k`` decisions in a row. Compared:
    tactful with segment memberships as features and tactful with
    ``TACTFUL_SEGMENT_MAX_FEATURES=0`` (same segments, same profiles, nothing learned from
    membership)."""

    name = "coldstart"
    policies = ("oracle", "priority", "uniform")

    def __init__(
        self,
        seed: int,
        n_users: int,
        n_offers: int,
        *,
        newcomers: int,
        first_k: int,
        persona_share: float,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.population = sim.Population.generate(n_users, self.rng, persona_share=persona_share)
        self.catalog = sim.Catalog.generate(n_offers, self.population.topics, self.rng)
        self.newcomers = self.population.newcomers(newcomers, self.rng, persona_share=persona_share)
        self.first_k = first_k
        users = self.population.users
        self.description = (
            f"{n_users} known users ({sum(u.states_persona for u in users)} stated their "
            f"persona, {sum(bool(u.likes) for u in users)} stated likes, "
            f"{sum(u.consent for u in users)} consenting), then {newcomers} newcomers x "
            f"{first_k} decisions ({sum(u.states_persona for u in self.newcomers)} stated their "
            f"persona, {sum(bool(u.likes) for u in self.newcomers)} stated likes, none "
            f"consenting); {n_offers} offers, {len(self.population.personas)} personas"
        )

    def load(self, channel: grpc.Channel) -> None:
        sim.load(channel, self.population, self.catalog, newcomers=self.newcomers)

    def rounds(self, n: int) -> Iterator[Round]:
        yield from super().rounds(n)
        contacts: dict[str, int] = {}
        for user in self.newcomers:
            for k in range(1, self.first_k + 1):
                r = self._round(user, contacts)
                if r is not None:
                    r.cold, r.stated_persona = k, user.states_persona
                    yield r


def log_signed(values: FloatArray) -> FloatArray:
    """What tactful does to a numeric context value."""
    out: FloatArray = np.sign(values) * np.log1p(np.abs(values))
    return out


class DigitsScenario:
    name = "digits"
    policies = ("full-info ridge", "vw", "uniform")
    CLASSES = 10

    def __init__(self, seed: int, components: int) -> None:
        from sklearn.datasets import load_digits  # optional: only this scenario needs it

        data = load_digits()
        images = np.asarray(data.data, dtype=np.float64) / 16.0
        centred = images - images.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        scores = centred @ vt[:components].T
        self.z = scores / scores.std(axis=0)  # what goes in numeric_context
        self.phi = log_signed(self.z)  # what tactful's features make of it
        self.labels = np.asarray(data.target, dtype=np.int64)
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.components = components
        self.description = (
            f"load_digits: {len(self.labels)} images, {self.CLASSES} classes as offers, "
            f"{components} principal components as numeric_context"
        )

    def load(self, channel: grpc.Channel) -> None:
        stub = catalog_pb2_grpc.CatalogStub(channel)
        for k in range(self.CLASSES):
            offer = catalog_pb2.Offer(
                offer_id=f"digit-{k}",
                title=f"the digit {k}",
                topics=[f"digit-{k}"],
                channels=["web"],
                priority=0.0,
            )
            stub.PutOffer(catalog_pb2.PutOfferRequest(offer=offer), timeout=RPC_TIMEOUT_S)

    def rounds(self, n: int) -> Iterator[Round]:
        ids = [f"digit-{k}" for k in range(self.CLASSES)]
        for t in range(n):
            i = int(self.rng.integers(len(self.labels)))
            probs = np.zeros(self.CLASSES)
            probs[self.labels[i]] = 1.0
            z, phi = self.z[i], self.phi[i]
            yield Round(
                request=decisioning_pb2.DecideRequest(
                    user_id=f"digits-{self.seed}-{t}",
                    channel="web",
                    placement="digits",
                    numeric_context={f"pc{j}": float(v) for j, v in enumerate(z)},
                    candidate_offer_ids=ids,
                    slots=1,
                ),
                offer_ids=ids,
                probs=probs,
                priorities=[0.0] * self.CLASSES,
                vw_shared="shared |x " + " ".join(f"pc{j}:{v:.5f}" for j, v in enumerate(phi)),
                vw_actions=[f"|a d={k}" for k in range(self.CLASSES)],
                u=float(self.rng.random()),
                x=np.concatenate(([1.0], phi)),
            )


# --- policies -------------------------------------------------------------------------------


class Policy:
    name: str

    def choose(self, r: Round) -> int:
        raise NotImplementedError

    def learn(self, r: Round, chosen: int, reward: float) -> None:
        pass

    def notes(self) -> str:
        return ""


class Oracle(Policy):
    name = "oracle"

    def choose(self, r: Round) -> int:
        return int(np.argmax(r.probs))


class Uniform(Policy):
    name = "uniform"

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 1])

    def choose(self, r: Round) -> int:
        return int(self.rng.integers(len(r.offer_ids)))


class Priority(Policy):
    """tactful's control arm: highest priority, ties by offer id."""

    name = "priority"

    def choose(self, r: Round) -> int:
        return min(range(len(r.offer_ids)), key=lambda i: (-r.priorities[i], r.offer_ids[i]))


class FullInfoRidge(Policy):
    """One ridge regression per offer on the dense context, updated with every offer's reward
    each round (it sees the label): the full-information limit, played greedily."""

    name = "full-info ridge"

    def __init__(self, n_actions: int, dim: int, l2: float = 1.0) -> None:
        self.a_inv = np.eye(dim) / l2
        self.b = np.zeros((dim, n_actions))

    def choose(self, r: Round) -> int:
        assert r.x is not None
        return int(np.argmax(r.x @ (self.a_inv @ self.b)))

    def learn(self, r: Round, chosen: int, reward: float) -> None:
        assert r.x is not None
        u = self.a_inv @ r.x
        self.a_inv -= np.outer(u, u) / (1.0 + r.x @ u)
        self.b += np.outer(r.x, r.probs)


class VowpalWabbit(Policy):
    name = "vw squarecb"

    def __init__(self, seed: int, interactions: str) -> None:
        assert vowpalwabbit is not None
        self.args = f"--cb_explore_adf --squarecb {interactions} --quiet --random_seed {seed}"
        self.vw = vowpalwabbit.Workspace(self.args)
        self.rng = np.random.default_rng([seed, 2])
        self._pmf: list[float] = []

    def choose(self, r: Round) -> int:
        self._pmf = list(self.vw.predict([r.vw_shared, *r.vw_actions]))
        p = np.asarray(self._pmf)
        return int(self.rng.choice(len(p), p=p / p.sum()))

    def learn(self, r: Round, chosen: int, reward: float) -> None:
        lines = [r.vw_shared]
        for i, action in enumerate(r.vw_actions):
            label = f"0:{-reward}:{self._pmf[chosen]} " if i == chosen else ""
            lines.append(label + action)
        self.vw.learn(lines)

    def close(self) -> None:
        self.vw.finish()


class Tactful(Policy):
    """The server's choice. An answer from the store-unavailable fallback (Redis slower than
    its socket timeout) is counted; it cannot be reported (fallback decisions are not logged),
    and if it is not eligible for this user it earns nothing."""

    def __init__(self, name: str, channel: grpc.Channel) -> None:
        self.name = name
        stub = decisioning_pb2_grpc.DecisioningStub(channel)
        self.decide, self.report = stub.Decide, stub.ReportOutcome
        self.decision_id = ""
        self.explored = 0
        self.decisions = 0
        self.fallbacks = 0
        self.reported = 0
        self.lost = 0  # outcomes ReportOutcome could not store (UNAVAILABLE)
        self.propensity = 0.0
        self.seconds = 0.0

    def choose(self, r: Round) -> int:
        start = time.perf_counter()
        reply = self.decide(r.request, timeout=RPC_TIMEOUT_S)
        self.seconds += time.perf_counter() - start
        self.decisions += 1
        if len(reply.choices) != 1:
            raise RuntimeError(f"unexpected Decide answer: {reply}")
        choice = reply.choices[0]
        if reply.arm == decisioning_pb2.ARM_FALLBACK:
            self.fallbacks += 1
            self.decision_id = ""
            ids = r.offer_ids
            return ids.index(choice.offer_id) if choice.offer_id in ids else NOTHING
        if reply.arm != decisioning_pb2.ARM_PERSONALIZED:
            raise RuntimeError(f"unexpected Decide answer: {reply}")
        if choice.offer_id not in r.offer_ids:
            raise RuntimeError(f"tactful chose {choice.offer_id}, not eligible for this user")
        self.decision_id = reply.decision_id
        self.propensity += choice.propensity
        self.explored += any(
            reason.code == decisioning_pb2.REASON_CODE_EXPLORATION for reason in choice.reasons
        )
        return r.offer_ids.index(choice.offer_id)

    def learn(self, r: Round, chosen: int, reward: float) -> None:
        if not self.decision_id:
            return  # a fallback answer: nothing was logged to report against
        event = (
            decisioning_pb2.OUTCOME_EVENT_CLICK
            if reward > 0
            else decisioning_pb2.OUTCOME_EVENT_IMPRESSION_IGNORED
        )
        start = time.perf_counter()
        try:
            self.report(
                decisioning_pb2.ReportOutcomeRequest(
                    decision_id=self.decision_id,
                    offer_id=r.offer_ids[chosen],
                    event=event,
                    outcome_id=f"{self.decision_id}-outcome",
                ),
                timeout=RPC_TIMEOUT_S,
            )
            self.reported += 1
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            self.lost += 1
        self.seconds += time.perf_counter() - start

    def notes(self) -> str:
        n = max(1, self.decisions)
        personal = max(1, self.decisions - self.fallbacks)
        text = (
            f"explored {self.explored / personal:.1%} of choices, mean propensity "
            f"{self.propensity / personal:.2f}, Decide+ReportOutcome "
            f"{self.seconds / n * 1e3:.1f} ms"
        )
        if self.fallbacks or self.lost:
            text += f"; {self.fallbacks} FALLBACK answers, {self.lost} outcomes UNAVAILABLE"
        return text


# --- servers --------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    child: Child
    channel: grpc.Channel
    metrics_port: int

    def metrics(self) -> dict[str, float]:
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("tactful_learner_"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def drain(self, rewards: int) -> dict[str, float]:
        """Wait until the learner has applied every reward (or give up), then read /metrics."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            figures = self.metrics()
            if figures.get("tactful_learner_rewards_applied_total", 0) >= rewards:
                time.sleep(0.2)  # its last publish (and lag observation) follows the apply
                return self.metrics()
            if time.monotonic() > deadline:
                return figures
            time.sleep(0.1)


def start_servers(
    variants: Sequence[tuple[str, dict[str, str]]], seed: int, workdir: Path
) -> list[Server]:
    servers: list[Server] = []
    children: list[Child] = []
    workdir.mkdir(parents=True, exist_ok=True)
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        for i, (name, extra_env) in enumerate(variants):
            grpc_port, metrics_port = free_ports(2)
            env = tactful_env(grpc_port, metrics_port, workdir / f"data{i}")
            env.update(TACTFUL_SEED=str(seed), TACTFUL_LOG_LEVEL="INFO", **extra_env)
            child = Child.start(
                f"tactful{i}", [sys.executable, "-m", "tactful", "serve"], env, workdir
            )
            children.append(child)
            channel = grpc.insecure_channel(f"{HOST}:{grpc_port}")
            servers.append(Server(name, child, channel, metrics_port))
            health = health_pb2_grpc.HealthStub(channel)
            wait_ready(
                child,
                f"serving gRPC on {HOST}:{grpc_port},",
                lambda h=health: (  # type: ignore[misc]
                    h.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == serving
                ),
            )
    except BaseException:
        stop_servers(servers, children)
        raise
    return servers


def stop_servers(servers: Sequence[Server], children: Sequence[Child] = ()) -> None:
    """SIGTERM every server (and any child started before its Server existed), then wait."""
    with no_interrupts():
        for server in servers:
            server.channel.close()
        for child in [*children, *(s.child for s in servers if s.child not in children)]:
            child.stop()


# --- running --------------------------------------------------------------------------------


@dataclass
class Result:
    rewards: list[float] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)  # true click probability of the choice
    oracle: list[float] = field(default_factory=list)  # the best true click probability


@dataclass
class SeedRun:
    results: dict[str, Result]
    notes: dict[str, str]
    lag: dict[str, dict[str, float]]  # the learner's figures from /metrics, per tactful server
    reported: dict[str, int]  # outcomes stored through ReportOutcome, per tactful server
    seconds: float
    cold: list[tuple[int, bool]] = field(default_factory=list)  # per round: Round.cold, persona


def run_seed(
    scenario: Scenario,
    seed: int,
    rounds: int,
    variants: Sequence[tuple[str, dict[str, str]]],
    workdir: Path,
) -> SeedRun:
    started = time.monotonic()
    servers = start_servers(variants, seed, workdir / f"{scenario.name}-{seed}")
    vw_policy: VowpalWabbit | None = None
    try:
        for server in servers:
            scenario.load(server.channel)
        tactful = [Tactful(s.name, s.channel) for s in servers]
        policies: list[Policy] = list(tactful)
        for name in scenario.policies:
            if name == "oracle":
                policies.insert(0, Oracle())
            elif name == "vw" and vowpalwabbit is not None:
                interactions = "-q ca" if scenario.name == "sim" else "-q xa"
                vw_policy = VowpalWabbit(seed, interactions)
                policies.append(vw_policy)
            elif name == "priority":
                policies.append(Priority())
            elif name == "uniform":
                policies.append(Uniform(seed))
            elif name == "full-info ridge" and isinstance(scenario, DigitsScenario):
                policies.insert(0, FullInfoRidge(scenario.CLASSES, scenario.components + 1))
        results = {p.name: Result() for p in policies}
        cold: list[tuple[int, bool]] = []
        for r in scenario.rounds(rounds):
            cold.append((r.cold, r.stated_persona))
            for policy in policies:
                chosen = policy.choose(r)
                p = 0.0 if chosen == NOTHING else float(r.probs[chosen])
                reward = 1.0 if r.u < p else 0.0
                if chosen != NOTHING:
                    policy.learn(r, chosen, reward)
                results[policy.name].rewards.append(reward)
                results[policy.name].expected.append(p)
                results[policy.name].oracle.append(float(r.probs.max()))
        lag = {s.name: s.drain(t.reported) for s, t in zip(servers, tactful, strict=True)}
        for server in servers:
            if server.child.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.child.proc.returncode}")
        notes = {p.name: p.notes() for p in policies if p.notes()}
        reported = {t.name: t.reported for t in tactful}
    except BaseException:
        for server in servers:
            progress(f"{server.name} log (last lines):\n{server.child.log_tail()}")
        raise
    finally:
        if vw_policy is not None:
            vw_policy.close()
        stop_servers(servers)
    return SeedRun(results, notes, lag, reported, time.monotonic() - started, cold)


def lag_summary(figures: dict[str, float]) -> tuple[float, float, float]:
    """Mean lag, and the upper bounds of the buckets holding the median and the 99th
    percentile (the histogram's own resolution), in seconds."""
    count = figures.get("tactful_learner_lag_seconds_count", 0.0)
    if not count:
        return math.nan, math.nan, math.nan
    mean = figures["tactful_learner_lag_seconds_sum"] / count
    buckets = sorted(
        (float(name.split('le="')[1].rstrip('"}')), value)
        for name, value in figures.items()
        if name.startswith("tactful_learner_lag_seconds_bucket")
    )

    def quantile(q: float) -> float:
        return next((le for le, cumulative in buckets if cumulative >= q * count), math.inf)

    return mean, quantile(0.5), quantile(0.99)


def mean_sd(values: Sequence[float], digits: int = 3, *, signed: bool = False) -> str:
    array = np.asarray(values)
    sd = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    sign = "+" if signed else ""
    return f"{array.mean():{sign}.{digits}f} ± {sd:.{digits}f}"


def report(
    scenario_name: str,
    description: str,
    runs: list[SeedRun],
    rounds: int,
    after_table: Sequence[str] = (),
) -> list[str]:
    names = list(runs[0].results)
    with_truth = scenario_name in ("sim", "coldstart")  # the truth is known: show it
    lines = [
        f"== {scenario_name}: {description}",
        f"   {rounds} rounds x {len(runs)} seeds in {sum(r.seconds for r in runs):.0f} s; "
        "mean ± sd over seeds",
    ]
    header = f"{'policy':<22}{'mean reward':>16}{'last quarter':>16}"
    if with_truth:
        header += f"{'mean true p':>16}{'last-q % oracle':>17}"
    reference = next(name for name in names if name.startswith("tactful"))
    header += f"{'Δ vs ' + reference.removeprefix('tactful '):>18}"
    lines.append(header)
    baseline = [float(np.mean(run.results[reference].rewards)) for run in runs]
    for name in names:
        means, lasts, expected, share = [], [], [], []
        for run in runs:
            result = run.results[name]
            last = slice(len(result.rewards) - len(result.rewards) // 4, None)
            means.append(float(np.mean(result.rewards)))
            lasts.append(float(np.mean(result.rewards[last])))
            expected.append(float(np.mean(result.expected)))
            share.append(100 * float(np.sum(result.expected[last]) / np.sum(result.oracle[last])))
        row = f"{name:<22}{mean_sd(means):>16}{mean_sd(lasts):>16}"
        if with_truth:
            row += f"{mean_sd(expected):>16}{mean_sd(share, 1):>17}"
        delta = [m - b for m, b in zip(means, baseline, strict=True)]
        row += f"{'' if name == reference else mean_sd(delta, signed=True):>18}"
        lines.append(row)
    lines.append(
        f"  (Δ: mean reward minus {reference}'s, paired by seed; last-q % oracle: the true click"
        " probability of the last quarter's choices over the oracle's)"
        if with_truth
        else f"  (Δ: mean reward minus {reference}'s, paired by seed)"
    )
    lines += after_table
    lines += horizons(names, runs, rounds)
    for name in names:
        notes = [run.notes[name] for run in runs if name in run.notes]
        if notes:
            lines.append(f"  {name}: {notes[-1]} (last seed)")
    for name in runs[0].lag:
        summaries = [lag_summary(run.lag[name]) for run in runs]
        applied = [run.lag[name].get("tactful_learner_rewards_applied_total", 0) for run in runs]
        reported = [run.reported[name] for run in runs]
        lines.append(
            f"  {name}: learner lag mean {np.nanmean([s[0] for s in summaries]) * 1e3:.1f} ms, "
            f"median <= {max(s[1] for s in summaries) * 1e3:.0f} ms, "
            f"p99 <= {max(s[2] for s in summaries) * 1e3:.0f} ms (histogram buckets); "
            f"rewards applied {int(sum(applied))} of {sum(reported)} reported"
        )
    return lines


WITH_SEGMENTS, WITHOUT_SEGMENTS = " segments", " no segments"


def segment_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """(with segment features, without) for each tactful variant of the coldstart scenario."""
    return [
        (name.removesuffix(WITHOUT_SEGMENTS) + WITH_SEGMENTS, name)
        for name in names
        if name.endswith(WITHOUT_SEGMENTS)
    ]


def cold_mean(
    run: SeedRun, name: str, k: int | None, truth: bool, stated: bool | None = None
) -> float:
    """Mean reward (or true click probability) of ``name`` over the newcomers' ``k``-th
    decisions (every one of theirs when None), of those who did or did not state their
    persona (all when None)."""
    result = run.results[name]
    values = result.expected if truth else result.rewards
    chosen = [
        v
        for v, (j, st) in zip(values, run.cold, strict=True)
        if j and (k is None or j == k) and (stated is None or st == stated)
    ]
    return float(np.mean(chosen)) if chosen else math.nan


def cold_gain(
    runs: list[SeedRun],
    with_name: str,
    without_name: str,
    k: int | None,
    truth: bool,
    stated: bool | None = None,
) -> list[float]:
    """Per seed, ``cold_mean`` of ``with_name`` minus that of ``without_name``."""
    return [
        cold_mean(r, with_name, k, truth, stated) - cold_mean(r, without_name, k, truth, stated)
        for r in runs
    ]


def cold_start(runs: list[SeedRun], first_k: int) -> tuple[list[str], dict[str, Any]]:
    """The newcomers' rounds only: the mean reward of each one's k-th decision and of their
    first k (and the true click probability of those choices, less noisy); then the gain of
    segment features, paired by seed, over all newcomers and split by whether they stated
    their persona. Those who did not are a control: they are in no segment, so what they gain
    comes only from the model having learned better on the others."""
    names = list(runs[0].results)
    columns: list[tuple[str, int | None, bool]] = [
        *((f"k={k}", k, False) for k in range(1, first_k + 1)),
        (f"first {first_k}", None, False),
        (f"first {first_k} true p", None, True),
    ]
    width = max(24, *(len(n) + 2 for n in names))

    def row(label: str, cells: Sequence[str]) -> str:
        return f"  {label:<{width}}" + "".join(f"{c:>17}" for c in cells)

    per_seed = sum(1 for k, _ in runs[0].cold if k)
    lines = [
        f"  cold start: the newcomers' {per_seed} decisions per seed only; reward of each "
        f"newcomer's k-th decision and of their first {first_k}, mean ± sd over seeds",
        row("policy", [title for title, _, _ in columns]),
    ]
    for name in names:
        lines.append(
            row(name, [mean_sd([cold_mean(r, name, k, t) for r in runs]) for _, k, t in columns])
        )
    figures: dict[str, Any] = {
        name: {
            "cold_mean_reward": [cold_mean(r, name, None, False) for r in runs],
            "cold_mean_true_p": [cold_mean(r, name, None, True) for r in runs],
        }
        for name in names
    }
    for with_name, without_name in segment_pairs(names):
        gain = functools.partial(cold_gain, runs, with_name, without_name)
        lines.append(
            row(
                "gain of segment features",
                [mean_sd(gain(k, t), signed=True) for _, k, t in columns],
            )
        )
        for stated, who in ((True, "stated persona"), (False, "no persona")):
            share = float(
                np.mean([np.mean([st == stated for k, st in r.cold if k == 1]) for r in runs])
            )
            lines.append(
                row(
                    f"  {who} ({share:.0%})",
                    [mean_sd(gain(k, t, stated), signed=True) for _, k, t in columns],
                )
            )
        figures[with_name]["cold_gain"] = {title: gain(k, t) for title, k, t in columns}
        lines.append(
            f"  (gain: {with_name} minus {without_name}, paired by seed: same newcomers, "
            "contexts and reward draws; then split by newcomers who did / did not state their "
            "persona, with their share)"
        )
    return lines, figures


def horizons(names: Sequence[str], runs: list[SeedRun], rounds: int) -> list[str]:
    """Mean reward over the first n rounds for growing n: how fast each policy learns. With
    a full-information learner in the table, each tactful variant's mean as a share of its."""
    ns = sorted({max(1, rounds >> k) for k in range(4)})
    lines = ["  mean reward over the first n rounds (mean over seeds):"]
    lines.append(f"  {'n':<22}" + "".join(f"{n:>9}" for n in ns))
    table = {
        name: [float(np.mean([np.mean(run.results[name].rewards[:n]) for run in runs])) for n in ns]
        for name in names
    }
    for name in names:
        lines.append(f"  {name:<22}" + "".join(f"{v:>9.3f}" for v in table[name]))
    limit = table.get(FullInfoRidge.name)
    if limit is not None:
        for name in names:
            if name.startswith("tactful"):
                shares = "".join(
                    f"{100 * v / w:>8.1f}%" for v, w in zip(table[name], limit, strict=True)
                )
                lines.append(f"  {name + ' % full-info':<22}" + shares)
    return lines


def run(args: argparse.Namespace) -> int:
    gammas = [float(g) for g in args.gammas.split(",")] if args.gammas else [DEFAULT_GAMMA]
    bonuses = [float(b) for b in args.bonuses.split(",")] if args.bonuses else [DEFAULT_BONUS]
    feature_sets = args.feature_sets.split(",")
    common: dict[str, str] = {}
    for assignment in args.set:
        key, sep, value = assignment.partition("=")
        if not sep or not key.startswith("TACTFUL_"):
            progress(f"--set {assignment!r}: expected TACTFUL_<NAME>=<value>")
            return 2
        common[key] = value
    variants: list[tuple[str, dict[str, str]]] = []
    for gamma in gammas:
        for bonus in bonuses:
            for feature_set in feature_sets:
                env = {
                    **common,
                    "TACTFUL_EXPLORATION_GAMMA": repr(gamma),
                    "TACTFUL_EXPLORATION_BONUS": repr(bonus),
                    "TACTFUL_FEATURE_SET": feature_set,
                }
                if args.hash_bits:
                    env["TACTFUL_FEATURE_HASH_BITS"] = str(args.hash_bits)
                name = "tactful" + (f" gamma={gamma:g}" if len(gammas) > 1 else "")
                name += f" bonus={bonus:g}" if len(bonuses) > 1 else ""
                name += f" {feature_set}" if len(feature_sets) > 1 else ""
                variants.append((name, env))
    # The coldstart scenario runs each variant twice: learning from segment memberships, and
    # with TACTFUL_SEGMENT_MAX_FEATURES=0 (the same segments target, nothing is learned). It
    # measures learning, not latency: a 1 s Redis timeout keeps a busy machine from turning
    # answers of one server and not the other into fallbacks.
    paired: list[tuple[str, dict[str, str]]] = []
    patient = {
        "TACTFUL_REDIS_SOCKET_TIMEOUT_MS": "1000",
        "TACTFUL_REDIS_CONNECT_TIMEOUT_MS": "1000",
    }
    for name, env in variants:
        paired.append((name + WITH_SEGMENTS, {**env, **patient}))
        paired.append(
            (name + WITHOUT_SEGMENTS, {**env, **patient, "TACTFUL_SEGMENT_MAX_FEATURES": "0"})
        )
    wanted = set(args.scenarios.split(","))
    unknown = wanted - {"sim", "digits", "coldstart"}
    if unknown:
        progress(f"unknown scenarios: {', '.join(sorted(unknown))}")
        return 2
    scenarios: list[tuple[str, Callable[[int], Scenario], list[tuple[str, dict[str, str]]]]] = []
    if "sim" in wanted:
        scenarios.append(("sim", lambda seed: SimScenario(seed, args.users, args.offers), variants))
    if "coldstart" in wanted:
        scenarios.append(
            (
                "coldstart",
                lambda seed: ColdStartScenario(
                    seed,
                    args.users,
                    args.offers,
                    newcomers=args.newcomers,
                    first_k=args.first_k,
                    persona_share=args.persona_share,
                ),
                paired,
            )
        )
    if "digits" in wanted:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            progress("scikit-learn is not installed: the digits scenario is skipped")
        else:
            scenarios.append(("digits", lambda seed: DigitsScenario(seed, args.pca), variants))
    if vowpalwabbit is None:
        progress("vowpalwabbit is not installed: its policy is skipped")

    workdir = Path(tempfile.mkdtemp(prefix="tq-", dir="/tmp"))
    started = time.monotonic()
    output: list[str] = []
    figures: dict[str, Any] = {}
    try:
        for name, make, servers in scenarios:
            runs: list[SeedRun] = []
            description = ""
            for seed in range(args.seed, args.seed + args.seeds):
                scenario = make(seed)
                description = scenario.description
                progress(f"{name}, seed {seed}: {args.rounds} rounds")
                runs.append(run_seed(scenario, seed, args.rounds, servers, workdir))
            played = len(runs[0].cold)  # coldstart: the newcomers' rounds come on top
            cold_lines: list[str] = []
            cold_figures: dict[str, Any] = {}
            if name == "coldstart":
                cold_lines, cold_figures = cold_start(runs, args.first_k)
            lines = report(name, description, runs, played, cold_lines)
            figures[name] = {
                policy: {
                    "mean_reward": [float(np.mean(r.results[policy].rewards)) for r in runs],
                    "mean_true_p": [float(np.mean(r.results[policy].expected)) for r in runs],
                }
                for policy in runs[0].results
            }
            for policy, values in cold_figures.items():
                figures[name].setdefault(policy, {}).update(values)
            print("\n".join(lines) + "\n", flush=True)
            output += lines
    finally:
        with no_interrupts():
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.monotonic() - started
    print(f"total {total:.0f} s", flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": vars(args), "figures": figures}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=positive, default=3, help="seeds (worlds) per scenario")
    parser.add_argument("--seed", type=int, default=1, help="the first seed")
    parser.add_argument("--rounds", type=positive, default=4000, help="decisions per seed")
    parser.add_argument(
        "--scenarios",
        default="sim,digits",
        help="comma-separated: sim, digits, coldstart (default: sim,digits)",
    )
    parser.add_argument(
        "--gammas",
        default="",
        help=f"comma-separated exploration gammas, one tactful server each "
        f"(default: the setting's default, {DEFAULT_GAMMA:g})",
    )
    parser.add_argument(
        "--bonuses",
        default="",
        help=f"comma-separated exploration bonuses (TACTFUL_EXPLORATION_BONUS), one tactful "
        f"server each (default: the setting's default, {DEFAULT_BONUS:g}; 0: no bonus)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TACTFUL_NAME=VALUE",
        help="a setting for every tactful server (repeatable), e.g. "
        "--set TACTFUL_EXPLORATION_GAMMA_SCALE=50",
    )
    parser.add_argument("--hash-bits", type=int, default=0, help="TACTFUL_FEATURE_HASH_BITS")
    parser.add_argument(
        "--feature-sets",
        default="shared+offer",
        help="comma-separated TACTFUL_FEATURE_SETs, one tactful server each (the ablation: "
        "shared+offer,shared,offer)",
    )
    parser.add_argument("--users", type=positive, default=400, help="sim: users")
    parser.add_argument("--offers", type=positive, default=40, help="sim: offers")
    parser.add_argument(
        "--newcomers", type=positive, default=600, help="coldstart: new users after the rounds"
    )
    parser.add_argument(
        "--first-k", type=positive, default=3, help="coldstart: decisions per newcomer"
    )
    parser.add_argument(
        "--persona-share",
        type=float,
        default=0.7,
        help="coldstart: share of users (known and new) who state their persona",
    )
    parser.add_argument("--pca", type=int, default=16, choices=range(1, 65), metavar="1-64",
                        help="digits: principal components as numeric_context")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    return run_until_stopped(run, args)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
