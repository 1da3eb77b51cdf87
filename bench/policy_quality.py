"""Policy quality: tactful's learned policy against baselines, on a real server, in one run.

Scenarios (``sim`` and ``digits`` by default; ``--scenarios all`` for the suite of issue 16,
listed below; ``coldstart`` when asked for), each run for several seeds. For every seed a
fresh ``python -m tactful serve`` (one per tactful variant, e.g. per exploration gamma) starts
on 127.0.0.1 with its embedded redis-server in a fresh temporary directory, its embedded
learner, no demo catalog, no control group and ``TACTFUL_SEED`` set; the world is loaded
through the gRPC API. Then for each round
every policy chooses one offer for the same (user, context) and is rewarded by the same draw
(common random numbers: a click happens when one shared uniform falls below the chosen offer's
click probability); tactful is asked with Decide (slots=1, every offer a candidate) and told the
outcome with ReportOutcome (CLICK or IMPRESSION_IGNORED), so it learns while it is measured.

The server is a black box: the bench speaks only its gRPC API (and reads /metrics), and
``--set TACTFUL_X=...`` passes settings, so it measures any learner behind that API.

``sim`` (``tactful.sim``): users with hidden tastes from a few personas, some stating accurate
but incomplete likes and dislikes, some consenting to noisy inferred signals; offers with
topics and a priority weakly correlated with their appeal; placement and device change which
topics work; fatigue lowers clicks. Policies:
  oracle         the eligible offer with the highest true click probability (the ceiling)
  tactful        the server's choice
  vw squarecb    Vowpal Wabbit ``--cb_explore_adf --squarecb`` on the same features (if the
                 ``vowpalwabbit`` package is importable)
  explicit-first a fixed rule: offers on a topic the user likes first, then by the strongest
  rule           inferred interest in their topics (users who consented), then by priority
  priority       the eligible offer with the highest business priority (tactful's control arm)
  uniform        uniformly at random among the eligible offers
Eligibility (no disliked topic, a sensitive offer needs a like) is computed with
``tactful.sim.eligible``; tactful's own choice is checked to fall inside it.

``scale``: the ``sim`` world with ``--scale-offers`` (1,000) offers, every one a candidate of
every Decide (the API's limit): a large catalog of few topics (12), so most of what can be
learned is shared by topic, and each offer's own appeal needs its own evidence. A class per
offer (1,000 classes) would leave a bandit about one round per class in a run this size.
1,000 rounds by default: a round with 1,000 candidates takes about 60 ms here.

Classification scenarios (scikit-learn's bundled sets, if scikit-learn is importable): a
supervised-to-bandit conversion. Each example is a context (drawn with replacement), each class
an offer with its own topic (``digit-<k>``, ``wine-<k>``, ...), reward 1 when the chosen class
is the label. The features go in as ``numeric_context``, which tactful hashes per topic
(``t:digit-<k>|n:pc<j>``), so each class learns its own linear score. Policies: tactful, vw
squarecb, uniform, and ``full-info ridge``: an online ridge regression that sees every label
(every class's reward each round) and plays greedily, the full-information limit a bandit
learner approaches. Every policy gets the same features (``sign(v)*log1p(|v|)`` of each value,
as tactful computes them).
  digits-pca     ``load_digits``, the first ``--pca`` (16) principal components, standardised
                 (``digits`` is its alias)
  digits-raw     ``load_digits``, the 64 pixel values (0-16) as they come
  wine, iris     ``load_wine`` (13 features, 3 classes), ``load_iris`` (4, 3), raw features;
                 1,000 rounds by default (three classes are learned early)
  synth          ``make_classification`` fixed per seed: 20 classes, 128 features (24
                 informative, 8 redundant, 96 noise), the most a Decide's
                 ``numeric_context`` accepts (more is INVALID_ARGUMENT)
  churn          ``digits-raw`` with three catalogs in turn, 2,000 rounds each (6,000 by
                 default): each phase deletes the previous offers and puts ten new ones with
                 new offer ids and the same class topics (a topic is a real attribute of an
                 offer, so what was learned about it can carry over). VW is given the offer id
                 too, so its actions are new each phase as well. The per-phase table shows the
                 reward per catalog; the target is the last catalog's within 2% of the first's
  churn-fresh    the last catalog of ``churn`` alone on a fresh server: the same examples and
                 draws as churn's last phase, a reference for how much carried over
  drift          ``digits-pca`` where at half the rounds every offer starts paying for another
                 class (a permutation without fixed points, per seed): tastes changed, what was
                 learned is wrong. The full-information limit is told of the change and starts
                 afresh. Per phase: reward over the phase, its first and last quarter, and the
                 rounds until a 200-round moving mean is back to 95% of the reward before

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
explored, and its learner lag (``tactful_learner_lag_seconds`` from /metrics). With more than
one scenario, a summary: per scenario tactful, VW, tactful minus VW paired by seed, the limit
(full-information ridge, or the oracle for sim and scale) and tactful's share of it, the fixed
rule, and tactful's exploration share; then churn's and drift's per-phase figures.

    .venv/bin/python bench/policy_quality.py [--seeds 3] [--rounds 4000] [--gammas 200,1000]
        [--bonuses 0,0.4] [--set TACTFUL_EXPLORATION_GAMMA_SCALE=20]

The defaults (both scenarios, 3 seeds, 4000 rounds, one tactful server) take about 2 minutes
on a 2-core machine; each extra gamma or bonus adds about a minute. ``--set`` passes a
setting to every tactful server (the bench gives them none of its own environment's).

    .venv/bin/python bench/policy_quality.py --scenarios all [--seeds 3]

runs the suite (everything but coldstart) with each scenario's own number of rounds: 23
minutes on this 2-core machine with 3 seeds while other work kept its load average at 5-8
(about 7 minutes a seed). ``--rounds N`` gives every scenario N rounds instead.

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
CHURN_ROUNDS = 6000  # three catalogs of 2000 rounds
SCALE_ROUNDS = 1000  # a Decide over 1,000 candidates is slow
SMALL_SET_ROUNDS = 1000  # wine and iris: three classes, learned early


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
    phase: int = 0  # churn and drift: which catalog or which tastes hold
    stances: list[tuple[float, float]] = field(default_factory=list)  # sim: (like, inferred)


class Scenario(Protocol):
    name: str
    description: str
    policies: tuple[str, ...]  # the baselines that apply, besides tactful
    with_truth: bool  # true click probabilities are known (show them)
    vw_interactions: str

    def load(self, channel: grpc.Channel) -> None: ...

    def begin_phase(self, channel: grpc.Channel, phase: int) -> None: ...

    def rounds(self, n: int) -> Iterator[Round]: ...


def vw_token(text: str) -> str:
    return text.replace(" ", "_").replace(":", "_").replace("|", "_")


class SimScenario:
    name = "sim"
    policies = ("oracle", "vw", "explicit-first", "priority", "uniform")
    with_truth = True
    vw_interactions = "-q ca"

    def __init__(self, seed: int, n_users: int, n_offers: int, name: str = "sim") -> None:
        self.name = name
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

    def begin_phase(self, channel: grpc.Channel, phase: int) -> None:
        pass  # one phase

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
            stances=[self._stance(user, o) for o in eligible],
        )

    @staticmethod
    def _stance(user: sim.User, offer: sim.SimOffer) -> tuple[float, float]:
        """What the user said about the offer's topics (1: a like) and the strongest inferred
        interest in them (0 without consent)."""
        like = float(not user.likes.isdisjoint(offer.topics))
        return like, user.strongest_signal(offer.topics) if user.consent else 0.0

    @classmethod
    def _vw_action(cls, user: sim.User, offer: sim.SimOffer) -> str:
        """tactful's features in VW's words: like / inferred / priority as dense values, topics
        and the offer id crossed with the context by ``-q ca``."""
        weight = 1.0 / math.sqrt(len(offer.topics))
        topics = " ".join(f"t={t}:{weight:.4f}" for t in offer.topics)
        dense = f"priority:{offer.priority}"
        like, strength = cls._stance(user, offer)
        if like:
            dense += " like:1"
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


@dataclass(frozen=True)
class Labelled:
    """A classification data set as a bandit sees it: what goes into ``numeric_context``
    (one row per example, under ``keys``) and the labels 0..classes-1."""

    z: FloatArray
    labels: npt.NDArray[np.int64]
    keys: list[str]
    topic: str  # class k is the offer with topic ``<topic>-<k>``
    description: str

    @property
    def classes(self) -> int:
        return int(self.labels.max()) + 1


def digits_pca(components: int) -> Labelled:
    """``load_digits``: the first principal components of the pixels, standardised."""
    from sklearn.datasets import load_digits  # optional: only these scenarios need it

    data = load_digits()
    images = np.asarray(data.data, dtype=np.float64) / 16.0
    centred = images - images.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    scores = centred @ vt[:components].T
    return Labelled(
        scores / scores.std(axis=0),
        np.asarray(data.target, dtype=np.int64),
        [f"pc{j}" for j in range(components)],
        "digit",
        f"load_digits: {len(data.target)} images, {components} principal components",
    )


def digits_raw() -> Labelled:
    """``load_digits``: the 64 pixel values (0..16) as they come."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return Labelled(
        np.asarray(data.data, dtype=np.float64),
        np.asarray(data.target, dtype=np.int64),
        [f"px{j}" for j in range(data.data.shape[1])],
        "digit",
        f"load_digits: {len(data.target)} images, 64 raw pixel values (0-16)",
    )


def bundled(name: str) -> Labelled:
    """A scikit-learn bundled set (``wine``, ``iris``) with its raw features."""
    from sklearn import datasets

    data = getattr(datasets, f"load_{name}")()
    x = np.asarray(data.data, dtype=np.float64)
    return Labelled(
        x,
        np.asarray(data.target, dtype=np.int64),
        [f"f{j}" for j in range(x.shape[1])],
        name,
        f"load_{name}: {len(x)} examples, {x.shape[1]} raw features",
    )


SYNTH_FEATURES, SYNTH_INFORMATIVE, SYNTH_CLASSES, SYNTH_SAMPLES = 128, 24, 20, 5000


def synthetic(seed: int) -> Labelled:
    """``make_classification``: as many features as a Decide's ``numeric_context`` may hold
    (128), 24 informative, 8 redundant, the rest noise; fixed per seed."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=SYNTH_SAMPLES,
        n_features=SYNTH_FEATURES,
        n_informative=SYNTH_INFORMATIVE,
        n_redundant=8,
        n_classes=SYNTH_CLASSES,
        n_clusters_per_class=1,
        random_state=seed,
    )
    return Labelled(
        np.asarray(x, dtype=np.float64),
        np.asarray(y, dtype=np.int64),
        [f"f{j}" for j in range(SYNTH_FEATURES)],
        "synth",
        f"make_classification: {SYNTH_SAMPLES} examples, {SYNTH_FEATURES} features "
        f"({SYNTH_INFORMATIVE} informative, 8 redundant)",
    )


class ClassificationScenario:
    """A supervised-to-bandit conversion: each example a context, each class an offer with its
    own topic (``<topic>-<k>``), reward 1 when the chosen offer's class is the label. Examples
    are drawn with replacement. The features go in as ``numeric_context``, which tactful hashes
    per topic (``t:<topic>-<k>|n:<key>``), so each class learns its own linear score; VW and
    the full-information ridge get the same values as tactful computes them
    (``sign(v)*log1p(|v|)``).

    ``phases`` splits the rounds evenly; subclasses say what changes between phases (the
    catalog, the class each offer stands for), and ``first_phase`` plays only the rounds from
    that phase on (same examples and draws: a reference on a fresh server)."""

    policies = ("full-info ridge", "vw", "uniform")
    with_truth = False
    vw_interactions = "-q xa"
    phases = 1
    limit_restarts = False  # the full-information limit starts afresh at each phase

    def __init__(self, name: str, data: Labelled, seed: int, first_phase: int = 0) -> None:
        self.name = name
        self.data = data
        self.phi = log_signed(data.z)  # what tactful's features make of it
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.first_phase = first_phase
        self.dim = len(data.keys) + 1
        self.description = f"{data.description}; {data.classes} classes as offers"

    def offer_ids(self, phase: int) -> list[str]:
        return [f"{self.data.topic}-{k}" for k in range(self.data.classes)]

    def label_of(self, phase: int) -> npt.NDArray[np.int64]:
        """The class each offer pays for (index: the offer's class, as in its topic)."""
        return np.arange(self.data.classes)

    def put_catalog(self, channel: grpc.Channel, phase: int) -> None:
        stub = catalog_pb2_grpc.CatalogStub(channel)
        for k, offer_id in enumerate(self.offer_ids(phase)):
            offer = catalog_pb2.Offer(
                offer_id=offer_id,
                title=f"class {k} of {self.data.topic}",
                topics=[f"{self.data.topic}-{k}"],
                channels=["web"],
                priority=0.0,
            )
            stub.PutOffer(catalog_pb2.PutOfferRequest(offer=offer), timeout=RPC_TIMEOUT_S)

    def load(self, channel: grpc.Channel) -> None:
        self.put_catalog(channel, self.first_phase)

    def begin_phase(self, channel: grpc.Channel, phase: int) -> None:
        """A new catalog replaces the old one: the old offers are deleted, the new put."""
        old, new = self.offer_ids(phase - 1), self.offer_ids(phase)
        if old == new:
            return
        stub = catalog_pb2_grpc.CatalogStub(channel)
        for offer_id in old:
            stub.DeleteOffer(
                catalog_pb2.DeleteOfferRequest(offer_id=offer_id), timeout=RPC_TIMEOUT_S
            )
        self.put_catalog(channel, phase)

    def vw_action(self, k: int, offer_id: str) -> str:
        return f"|a t={self.data.topic}-{k}"

    def rounds(self, n: int) -> Iterator[Round]:
        labels = self.data.labels
        for t in range(n):
            i = int(self.rng.integers(len(labels)))
            u = float(self.rng.random())
            phase = t * self.phases // n
            if phase < self.first_phase:
                continue
            ids = self.offer_ids(phase)
            probs = (self.label_of(phase) == labels[i]).astype(np.float64)
            z, phi = self.data.z[i], self.phi[i]
            yield Round(
                request=decisioning_pb2.DecideRequest(
                    user_id=f"{self.name}-{self.seed}-{t}",
                    channel="web",
                    placement=self.data.topic,
                    numeric_context={
                        key: float(v) for key, v in zip(self.data.keys, z, strict=True)
                    },
                    candidate_offer_ids=ids,
                    slots=1,
                ),
                offer_ids=ids,
                probs=probs,
                priorities=[0.0] * len(ids),
                vw_shared="shared |x "
                + " ".join(f"{key}:{v:.5f}" for key, v in zip(self.data.keys, phi, strict=True)),
                vw_actions=[self.vw_action(k, offer_id) for k, offer_id in enumerate(ids)],
                u=u,
                x=np.concatenate(([1.0], phi)),
                phase=phase,
            )


class ChurnScenario(ClassificationScenario):
    """The catalog is replaced ``phases`` times: each phase deletes the previous offers and
    puts one new offer per class, with a new offer id and the class's topic (topics are real
    attributes of an offer, so what was learned about them can carry over). VW is told the
    offer id too, so it meets new actions as tactful does."""

    def __init__(self, *args: Any, phases: int = 3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phases = phases
        self.description += f"; {phases} catalogs in turn, each with new offer ids"
        if self.first_phase:
            self.description += f"; only catalog {self.first_phase + 1}, on a fresh server"

    def offer_ids(self, phase: int) -> list[str]:
        return [f"c{phase + 1}-{self.data.topic}-{k}" for k in range(self.data.classes)]

    def vw_action(self, k: int, offer_id: str) -> str:
        return f"{super().vw_action(k, offer_id)} o={offer_id}"


class DriftScenario(ClassificationScenario):
    """Tastes change at half the rounds: from then on each offer pays for another class (a
    permutation without fixed points, drawn per seed). Same offers, same features: what was
    learned is now wrong. The full-information limit starts afresh at the change (it is told
    when it happens)."""

    phases = 2
    limit_restarts = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        shuffle = np.random.default_rng([self.seed, 3])
        classes = self.data.classes
        self.permuted = np.arange(classes)
        while np.any(self.permuted == np.arange(classes)):
            self.permuted = shuffle.permutation(classes)
        self.description += "; at half the rounds every offer starts paying for another class"

    def label_of(self, phase: int) -> npt.NDArray[np.int64]:
        return self.permuted if phase else super().label_of(phase)


# --- policies -------------------------------------------------------------------------------


class Policy:
    name: str

    def choose(self, r: Round) -> int:
        raise NotImplementedError

    def learn(self, r: Round, chosen: int, reward: float) -> None:
        pass

    def new_phase(self) -> None:
        """The catalog or the tastes changed (churn, drift)."""

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


class ExplicitFirst(Policy):
    """A fixed rule on what the user told us: offers on a topic they like first, then by the
    strongest inferred interest in the offer's topics (users who consented), then by priority;
    ties by offer id. What a team would ship without a learner."""

    name = "explicit-first rule"

    def choose(self, r: Round) -> int:
        return min(
            range(len(r.offer_ids)),
            key=lambda i: (-r.stances[i][0], -r.stances[i][1], -r.priorities[i], r.offer_ids[i]),
        )


class FullInfoRidge(Policy):
    """One ridge regression per offer on the dense context, updated with every offer's reward
    each round (it sees the label): the full-information limit, played greedily."""

    name = "full-info ridge"

    def __init__(self, n_actions: int, dim: int, *, restarts: bool = False) -> None:
        self.shape, self.restarts = (dim, n_actions), restarts
        self.a_inv, self.b = self._fresh()

    def _fresh(self) -> tuple[FloatArray, FloatArray]:
        return np.eye(self.shape[0]), np.zeros(self.shape)  # a ridge with l2 = 1

    def new_phase(self) -> None:
        if self.restarts:
            self.a_inv, self.b = self._fresh()

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

    def explored_share(self) -> float:
        return self.explored / max(1, self.decisions - self.fallbacks)

    def notes(self) -> str:
        n = max(1, self.decisions)
        personal = max(1, self.decisions - self.fallbacks)
        text = (
            f"explored {self.explored_share():.1%} of choices, mean propensity "
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
    phases: list[int] = field(default_factory=list)  # per round: Round.phase
    explored: dict[str, float] = field(default_factory=dict)  # per tactful server: its share


def baselines(scenario: Scenario, seed: int) -> list[Policy]:
    """The policies the scenario compares tactful with, in its order."""
    policies: list[Policy] = []
    for name in scenario.policies:
        if name == "oracle":
            policies.append(Oracle())
        elif name == "vw" and vowpalwabbit is not None:
            policies.append(VowpalWabbit(seed, scenario.vw_interactions))
        elif name == "explicit-first":
            policies.append(ExplicitFirst())
        elif name == "priority":
            policies.append(Priority())
        elif name == "uniform":
            policies.append(Uniform(seed))
        elif name == "full-info ridge" and isinstance(scenario, ClassificationScenario):
            ridge = FullInfoRidge(
                scenario.data.classes, scenario.dim, restarts=scenario.limit_restarts
            )
            policies.append(ridge)
    return policies


def run_seed(
    scenario: Scenario,
    seed: int,
    rounds: int,
    variants: Sequence[tuple[str, dict[str, str]]],
    workdir: Path,
) -> SeedRun:
    started = time.monotonic()
    servers = start_servers(variants, seed, workdir / f"{scenario.name}-{seed}")
    others = baselines(scenario, seed)
    try:
        for server in servers:
            scenario.load(server.channel)
        tactful = [Tactful(s.name, s.channel) for s in servers]
        limits = [p for p in others if isinstance(p, (Oracle, FullInfoRidge))]
        policies = [*limits, *tactful, *(p for p in others if p not in limits)]
        results = {p.name: Result() for p in policies}
        cold: list[tuple[int, bool]] = []
        phases: list[int] = []
        for r in scenario.rounds(rounds):
            if phases and r.phase != phases[-1]:
                for server in servers:
                    scenario.begin_phase(server.channel, r.phase)
                for policy in policies:
                    policy.new_phase()
            cold.append((r.cold, r.stated_persona))
            phases.append(r.phase)
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
        for policy in others:
            if isinstance(policy, VowpalWabbit):
                policy.close()
        stop_servers(servers)
    seconds = time.monotonic() - started
    explored = {t.name: t.explored_share() for t in tactful}
    return SeedRun(results, notes, lag, reported, seconds, cold, phases, explored)


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
    *,
    with_truth: bool = False,  # the true click probabilities are known: show them
) -> list[str]:
    names = list(runs[0].results)
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
    lines += by_phase(names, runs)
    lines += horizons(names, runs, rounds)
    for name in names:
        notes = [run.notes[name] for run in runs if name in run.notes]
        if notes:
            lines.append(f"  {name}: {notes[-1]} (last seed)")
    for name in runs[0].lag:
        summaries = [lag_summary(run.lag[name]) for run in runs]
        applied = [run.lag[name].get("tactful_learner_rewards_applied_total", 0) for run in runs]
        reported = [run.reported[name] for run in runs]
        changes = [
            int(run.lag[name].get("tactful_learner_changes_detected_total", 0)) for run in runs
        ]
        restarts = [int(run.lag[name].get("tactful_learner_restarts_total", 0)) for run in runs]
        lines.append(
            f"  {name}: learner lag mean {np.nanmean([s[0] for s in summaries]) * 1e3:.1f} ms, "
            f"median <= {max(s[1] for s in summaries) * 1e3:.0f} ms, "
            f"p99 <= {max(s[2] for s in summaries) * 1e3:.0f} ms (histogram buckets); "
            f"rewards applied {int(sum(applied))} of {sum(reported)} reported; "
            f"changes detected per seed {changes}, model restarts {restarts}"
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


RECOVERY_WINDOW, RECOVERY_SHARE = 200, 0.95


def recovery(rewards: FloatArray, before: float) -> int | None:
    """Rounds into a phase until the mean of the last RECOVERY_WINDOW rounds is back to
    RECOVERY_SHARE of ``before`` (None: not within the phase)."""
    if len(rewards) < RECOVERY_WINDOW:
        return None
    moving = np.convolve(rewards, np.ones(RECOVERY_WINDOW) / RECOVERY_WINDOW, mode="valid")
    hits = np.flatnonzero(moving >= RECOVERY_SHARE * before)
    return int(hits[0]) + RECOVERY_WINDOW if len(hits) else None


@dataclass(frozen=True)
class PhaseFigures:
    """One policy's reward in one phase of one seed."""

    mean: float
    first: float  # over the phase's first quarter
    last: float  # over its last quarter
    recovered: int | None  # rounds until back near the previous phase's last quarter


def phase_figures(run: SeedRun, name: str) -> list[PhaseFigures]:
    rewards = np.asarray(run.results[name].rewards)
    phases = np.asarray(run.phases)
    out: list[PhaseFigures] = []
    for phase in sorted(set(run.phases)):
        part = rewards[phases == phase]
        quarter = max(1, len(part) // 4)
        previous = out[-1].last if out else None
        out.append(
            PhaseFigures(
                float(part.mean()),
                float(part[:quarter].mean()),
                float(part[-quarter:].mean()),
                None if previous is None else recovery(part, previous),
            )
        )
    return out


def recovered(waits: Sequence[int | None]) -> str:
    """The worst seed's rounds to recover; "-" if one never did."""
    if None in waits:
        return "-"
    worst = max(w or 0 for w in waits)
    return f"<= {worst} rounds" if worst == RECOVERY_WINDOW else f"{worst} rounds"


def by_phase(names: Sequence[str], runs: list[SeedRun]) -> list[str]:
    """Churn and drift: each policy's reward per phase, over the phase and over its first and
    last quarter, and how many rounds it took to come back to 95% of the previous phase's
    last-quarter reward (a 200-round moving mean; the worst seed, "-" if it never did)."""
    if len(set(runs[0].phases)) < 2:
        return []
    lines = [
        "  by phase (mean ± sd over seeds):",
        f"  {'policy':<22}{'phase':>6}{'mean':>16}{'first quarter':>16}{'last quarter':>16}"
        f"{'recovered after':>17}",
    ]
    for name in names:
        figures = [phase_figures(run, name) for run in runs]
        for k in range(len(figures[0])):
            seeds = [f[k] for f in figures]
            cells = [
                mean_sd([getattr(f, column) for f in seeds]) for column in ("mean", "first", "last")
            ]
            wait = "" if k == 0 else recovered([f.recovered for f in seeds])
            label = name if k == 0 else ""
            lines.append(
                f"  {label:<22}{k + 1:>6}" + "".join(f"{c:>16}" for c in cells) + f"{wait:>17}"
            )
    return lines


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


# --- the suite ------------------------------------------------------------------------------


Variants = list[tuple[str, dict[str, str]]]


@dataclass(frozen=True)
class Entry:
    make: Callable[[int], Scenario]  # the scenario of one seed
    rounds: int
    servers: Variants  # the tactful servers it runs
    sklearn: bool = False  # needs scikit-learn


SUITE = (
    "digits-pca", "digits-raw", "wine", "iris", "synth", "sim", "churn", "churn-fresh", "scale",
    "drift",
)  # fmt: skip
ALIASES: dict[str, tuple[str, ...]] = {"all": SUITE, "suite": SUITE, "digits": ("digits-pca",)}


def scenario_catalog(
    args: argparse.Namespace, variants: Variants, paired: Variants
) -> dict[str, Entry]:
    """Every scenario by name, with its rounds (``--rounds``, else its own default: fewer
    where a round is slow, more where the run has phases)."""

    def rounds(default: int) -> int:
        return int(args.rounds or default)

    def classes(name: str, data: Callable[[int], Labelled], default: int = 4000) -> Entry:
        make = functools.partial(ClassificationScenario, name)
        return Entry(lambda seed: make(data(seed), seed), rounds(default), variants, sklearn=True)

    def churn(name: str, first_phase: int) -> Entry:
        def make(seed: int) -> Scenario:
            return ChurnScenario(name, digits_raw(), seed, first_phase=first_phase)

        return Entry(make, rounds(CHURN_ROUNDS), variants, sklearn=True)

    return {
        "sim": Entry(
            lambda seed: SimScenario(seed, args.users, args.offers), rounds(4000), variants
        ),
        "scale": Entry(
            lambda seed: SimScenario(seed, args.users, args.scale_offers, name="scale"),
            rounds(SCALE_ROUNDS),
            variants,
        ),
        "coldstart": Entry(
            lambda seed: ColdStartScenario(
                seed,
                args.users,
                args.offers,
                newcomers=args.newcomers,
                first_k=args.first_k,
                persona_share=args.persona_share,
            ),
            rounds(4000),
            paired,
        ),
        "digits-pca": classes("digits-pca", lambda seed: digits_pca(args.pca)),
        "digits-raw": classes("digits-raw", lambda seed: digits_raw()),
        "wine": classes("wine", lambda seed: bundled("wine"), SMALL_SET_ROUNDS),
        "iris": classes("iris", lambda seed: bundled("iris"), SMALL_SET_ROUNDS),
        "synth": classes("synth", synthetic),
        "churn": churn("churn", 0),
        "churn-fresh": churn("churn-fresh", 2),
        "drift": Entry(
            lambda seed: DriftScenario("drift", digits_pca(args.pca), seed),
            rounds(4000),
            variants,
            sklearn=True,
        ),
    }


def sklearn_installed() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def policy_means(runs: list[SeedRun], policy: str, truth: bool = False) -> list[float]:
    """Per seed, the policy's mean reward (or mean true click probability)."""
    return [
        float(np.mean(r.results[policy].expected if truth else r.results[policy].rewards))
        for r in runs
    ]


def summary(suite: dict[str, list[SeedRun]]) -> list[str]:
    """One line per scenario: tactful (its first server) against VW, the limit (the
    full-information ridge, or the oracle where the truth is known) and the fixed rule."""
    header = (
        f"{'scenario':<13}{'rounds':>7}{'tactful':>16}{'explored':>9}{'vw squarecb':>16}"
        f"{'tactful - vw':>16}{'ahead':>7}{'limit':>16}{'% of limit':>14}{'fixed rule':>16}"
    )
    lines = ["== summary: mean reward, mean ± sd over seeds", header]
    notes: list[str] = []
    for name, runs in suite.items():
        names = list(runs[0].results)
        tactful = next(n for n in names if n.startswith("tactful"))
        means = functools.partial(policy_means, runs)
        ours = means(tactful)
        cells = [
            f"{name:<13}{len(runs[0].phases):>7}{mean_sd(ours):>16}",
            f"{np.mean([r.explored[tactful] for r in runs]):>9.1%}",
        ]
        if VowpalWabbit.name in names:
            delta = [a - b for a, b in zip(ours, means(VowpalWabbit.name), strict=True)]
            ahead = "yes" if np.mean(delta) > 0 else "no"
            if len(delta) > 1 and abs(np.mean(delta)) < np.std(delta, ddof=1):
                ahead += "?"
            cells += [
                f"{mean_sd(means(VowpalWabbit.name)):>16}",
                f"{mean_sd(delta, signed=True):>16}",
                f"{ahead:>7}",
            ]
        else:
            cells += [f"{'':>16}{'':>16}{'':>7}"]
        limit = next((n for n in names if n in (FullInfoRidge.name, Oracle.name)), None)
        if limit is not None:
            # The true click probability where it is known (for a classification set it is
            # the reward itself): less noisy than clicks.
            share = [
                100 * a / b for a, b in zip(means(tactful, True), means(limit, True), strict=True)
            ]
            mark = "" if limit == FullInfoRidge.name else "*"
            cells += [f"{mean_sd(means(limit)) + mark:>16}", f"{mean_sd(share, 1):>14}"]
        else:
            cells += [f"{'':>16}{'':>14}"]
        if ExplicitFirst.name in names:
            cells.append(f"{mean_sd(means(ExplicitFirst.name)):>16}")
        lines.append("".join(cells))
        notes += phase_notes(name, runs, [tactful, VowpalWabbit.name], suite)
    lines += [
        "  (explored: tactful's share of choices made by exploration; tactful - vw: paired by "
        "seed, ahead '?' when the difference is within its sd; limit: the full-information "
        "ridge, * the oracle; % of limit: of the true click probability; fixed rule: "
        "explicit-first)",
        *notes,
    ]
    return lines


def phase_notes(
    name: str, runs: list[SeedRun], policies: Sequence[str], suite: dict[str, list[SeedRun]]
) -> list[str]:
    """Churn: the last catalog's reward against the first's (target: within 2%), and against
    the last catalog alone on a fresh server; drift: reward before and after the change."""
    if len(set(runs[0].phases)) < 2:
        return []
    lines: list[str] = []
    fresh = suite.get(f"{name}-fresh")
    for policy in (p for p in policies if p in runs[0].results):
        figures = [phase_figures(run, policy) for run in runs]
        ratio = [100 * f[-1].mean / f[0].mean for f in figures]
        text = f"  {name}, {policy}: phase means " + " / ".join(
            mean_sd([f[k].mean for f in figures]) for k in range(len(figures[0]))
        )
        text += f"; last / first {mean_sd(ratio, 1)} %"
        if fresh is not None and policy in fresh[0].results:
            alone = mean_sd(policy_means(fresh, policy))
            text += f"; the last catalog alone on a fresh server {alone}"
        if len(figures[0]) == 2:
            text += (
                f"; before the change, last quarter {mean_sd([f[0].last for f in figures])}, "
                f"after it first quarter {mean_sd([f[1].first for f in figures])}, "
                f"last quarter {mean_sd([f[1].last for f in figures])}"
            )
        lines.append(text)
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
    catalog = scenario_catalog(args, variants, paired)
    wanted: list[str] = []
    for word in args.scenarios.split(","):
        for name in ALIASES.get(word, (word,)):
            if name not in catalog:
                progress(f"unknown scenario {name!r}: choose from {', '.join(ALIASES)}, "
                         f"{', '.join(catalog)}")  # fmt: skip
                return 2
            if name not in wanted:
                wanted.append(name)
    if any(catalog[name].sklearn for name in wanted) and not sklearn_installed():
        progress("scikit-learn is not installed: the classification scenarios are skipped")
        wanted = [name for name in wanted if not catalog[name].sklearn]
    if vowpalwabbit is None:
        progress("vowpalwabbit is not installed: its policy is skipped")

    workdir = Path(tempfile.mkdtemp(prefix="tq-", dir="/tmp"))
    started = time.monotonic()
    figures: dict[str, Any] = {}
    suite: dict[str, list[SeedRun]] = {}
    try:
        for name in wanted:
            entry = catalog[name]
            runs: list[SeedRun] = []
            description = ""
            for seed in range(args.seed, args.seed + args.seeds):
                scenario = entry.make(seed)
                description = scenario.description
                progress(f"{name}, seed {seed}: {entry.rounds} rounds")
                runs.append(run_seed(scenario, seed, entry.rounds, entry.servers, workdir))
            played = len(runs[0].cold)  # coldstart: the newcomers' rounds come on top
            cold_lines: list[str] = []
            cold_figures: dict[str, Any] = {}
            if name == "coldstart":
                cold_lines, cold_figures = cold_start(runs, args.first_k)
            lines = report(
                name, description, runs, played, cold_lines, with_truth=scenario.with_truth
            )
            figures[name] = {
                policy: {
                    "mean_reward": policy_means(runs, policy),
                    "mean_true_p": policy_means(runs, policy, truth=True),
                    "phase_mean_reward": [[f.mean for f in phase_figures(r, policy)] for r in runs],
                }
                for policy in runs[0].results
            }
            for policy in runs[0].explored:
                figures[name][policy]["explored"] = [r.explored[policy] for r in runs]
            for policy, values in cold_figures.items():
                figures[name].setdefault(policy, {}).update(values)
            print("\n".join(lines) + "\n", flush=True)
            suite[name] = runs
    finally:
        with no_interrupts():
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.monotonic() - started
    if len(suite) > 1:
        print("\n".join(summary(suite)) + "\n", flush=True)
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
    parser.add_argument(
        "--rounds",
        type=positive,
        default=0,
        help="decisions per seed in every scenario (default: each scenario's own, 4000 for "
        f"most; {SMALL_SET_ROUNDS} for wine and iris, {CHURN_ROUNDS} for churn, "
        f"{SCALE_ROUNDS} for scale)",
    )
    parser.add_argument(
        "--scenarios",
        default="sim,digits",
        help=f"comma-separated: {', '.join(SUITE)}, coldstart; digits = digits-pca; all (or "
        "suite): the whole suite without coldstart (default: sim,digits)",
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
        "--scale-offers", type=positive, default=1000, help="scale: offers (at most 1000)"
    )
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
