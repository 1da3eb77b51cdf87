"""A simulated world to measure tactful's policy against: users with hidden tastes, offers,
and a documented click model. Used by tests and ``bench/policy_quality.py``.

Everything random is drawn from a ``numpy.random.Generator`` the caller passes in, so one seed
gives one world.

Population (``Population.generate``)
  ``n_personas`` latent personas, each a taste vector over the topics drawn from
  N(0, PERSONA_SCALE^2). A user belongs to one persona (uniformly) and has
  ``taste = persona taste + N(0, INDIVIDUAL_SCALE^2)`` per topic: the hidden truth.

  Stated preferences (a share ``stated_share`` of users): accurate but incomplete. Of the
  user's STATED_TOP topics they truly like most, those with taste above LIKE_MIN are
  candidates, and the user LIKEs a random non-empty subset of them; of the STATED_TOP they
  like least, those with taste below DISLIKE_MAX are candidates, and the user DISLIKEs a random
  subset of at most two. So a stated LIKE is always a truly liked topic, and a DISLIKE a truly
  hated one, but most of a user's tastes go unsaid.

  Consent (a share ``consent_share`` of users, independent of stating): inferred signals are
  noisy, ``weight = taste + N(0, SIGNAL_NOISE^2)`` per topic, recorded where it is positive
  (signals are non-negative). Without consent there are no signals.

  Stated persona (a share ``persona_share`` of users, 0 by default, independent of the rest):
  the user picked their persona, say in an onboarding screen: the STATED attribute
  ``persona`` = ``p<k>`` (``persona_name``). ``Population.put_segment_requests`` gives one
  segment per persona, ``persona-p<k>`` with the rule ``stated.persona == "p<k>"``: not
  sensitive and reading no stance or signal, so its membership is a bandit feature.

  ``Population.newcomers`` draws more users from the same personas (same tastes, new
  individuals): the cold start of ``bench/policy_quality.py``.

Catalog (``Catalog.generate``)
  Each offer has one topic (or two, with probability TWO_TOPIC_SHARE), a hidden ``appeal``
  ~ N(0, APPEAL_SCALE^2) that every user sees alike, and a business ``priority`` in (0, 1)
  weakly correlated with that appeal: ``sigmoid(rho * z + sqrt(1 - rho^2) * e)`` with
  ``z = appeal / APPEAL_SCALE``, ``e`` ~ N(0, 1), ``rho = PRIORITY_CORRELATION``. An offer
  with a topic in SENSITIVE_TOPICS is sensitive.

Click model (``click_probability``)
  For user u, offer o with topics T(o), context c (placement, device) and ``n`` contacts of u
  on the channel earlier today::

      logit = BASE_LOGIT
              + mean_{t in T(o)} (taste_u[t] + PLACEMENT_EFFECTS[c.placement][t]
                                  + DEVICE_EFFECTS[c.device][t])
              + appeal_o
              - FATIGUE * log1p(n)
      p = 1 / (1 + exp(-logit))

  The context changes which topics work (e.g. finance at checkout, gaming on mobile), and
  fatigue lowers every click probability as contacts pile up (the same penalty for every offer
  of one decision: it changes how often to contact, not what to show).

Eligibility (``eligible``) mirrors tactful's hard rules: the offer is on the channel, has no
topic the user DISLIKEs, and, if sensitive, has a topic the user LIKEs.

To tactful's API: ``Catalog.put_offer_requests``, ``User.set_preferences_request`` (stated
stances, consent, the channel opted in), ``User.record_signals_request`` (consenting users
only), ``User.set_attributes_request`` (users who state their persona only),
``Population.put_segment_requests``, ``decide_request``, and ``load`` which sends them all
through gRPC stubs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tactful.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    decisioning_pb2,
    profiles_pb2,
    profiles_pb2_grpc,
)

TOPICS: tuple[str, ...] = (
    "running", "yoga", "cycling", "travel", "cooking", "tech",
    "gaming", "books", "fashion", "music", "finance", "health",
)  # fmt: skip
SENSITIVE_TOPICS = frozenset({"finance", "health"})
PLACEMENTS: tuple[str, ...] = ("home", "article", "checkout")
DEVICES: tuple[str, ...] = ("mobile", "desktop")
MOBILE_SHARE = 0.6
CHANNEL = "web"
OFFER_CHANNELS: tuple[str, ...] = ("web", "app")

BASE_LOGIT = -2.5
PERSONA_SCALE = 1.0
INDIVIDUAL_SCALE = 0.5
APPEAL_SCALE = 0.4
FATIGUE = 0.35
SIGNAL_NOISE = 0.75
STATED_TOP = 3
LIKE_MIN = 0.5
DISLIKE_MAX = -0.5
TWO_TOPIC_SHARE = 0.4
PRIORITY_CORRELATION = 0.3

# Context effects on the logit, per topic (0 where not listed).
PLACEMENT_EFFECTS: Mapping[str, Mapping[str, float]] = {
    "home": {},
    "article": {"books": 0.8, "tech": 0.6, "cooking": 0.5, "fashion": -0.5, "finance": -0.3},
    "checkout": {"finance": 1.0, "travel": 0.6, "fashion": 0.4, "books": -0.6, "yoga": -0.4},
}
DEVICE_EFFECTS: Mapping[str, Mapping[str, float]] = {
    "mobile": {"gaming": 0.8, "music": 0.6, "running": 0.4, "finance": -0.6, "books": -0.4},
    "desktop": {"tech": 0.4, "finance": 0.4, "gaming": -0.4},
}


PERSONA_ATTRIBUTE = "persona"


def persona_name(persona: int) -> str:
    """The value of the ``persona`` attribute of a user of this persona."""
    return f"p{persona}"


def persona_segment_id(persona: int) -> str:
    return f"persona-{persona_name(persona)}"


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- users -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    user_id: str
    persona: int
    taste: Mapping[str, float]  # hidden truth, per topic
    likes: frozenset[str]  # stated
    dislikes: frozenset[str]  # stated
    consent: bool
    signals: Mapping[str, float]  # inferred (noisy) signals; empty without consent
    states_persona: bool = False  # stated: the persona attribute (see the module doc)

    def set_preferences_request(self) -> profiles_pb2.SetPreferencesRequest:
        stances = [(t, profiles_pb2.STANCE_LIKE) for t in sorted(self.likes)]
        stances += [(t, profiles_pb2.STANCE_DISLIKE) for t in sorted(self.dislikes)]
        return profiles_pb2.SetPreferencesRequest(
            user_id=self.user_id,
            topic_preferences=[
                profiles_pb2.TopicPreference(topic=topic, stance=stance)
                for topic, stance in stances
            ],
            channel_preferences=[profiles_pb2.ChannelPreference(channel=CHANNEL, opted_in=True)],
            consent=profiles_pb2.Consent(inferred_personalization=self.consent),
        )

    def record_signals_request(self) -> profiles_pb2.RecordSignalsRequest | None:
        """The inferred signals, observed now; None for a user without consent or signals."""
        if not self.consent or not self.signals:
            return None
        return profiles_pb2.RecordSignalsRequest(
            user_id=self.user_id,
            signals=[
                profiles_pb2.Signal(topic=topic, weight=weight)
                for topic, weight in sorted(self.signals.items())
            ],
        )

    def set_attributes_request(self) -> profiles_pb2.SetAttributesRequest | None:
        """The persona as a STATED attribute; None for a user who did not state it."""
        if not self.states_persona:
            return None
        return profiles_pb2.SetAttributesRequest(
            user_id=self.user_id,
            attributes={PERSONA_ATTRIBUTE: persona_name(self.persona)},
            source=profiles_pb2.ATTRIBUTE_SOURCE_STATED,
        )

    def strongest_signal(self, topics: Sequence[str]) -> float:
        """The strongest signal on these topics (what tactful's inferred feature squashes)."""
        return max((self.signals.get(t, 0.0) for t in topics), default=0.0)


@dataclass(frozen=True)
class Population:
    topics: tuple[str, ...]
    personas: tuple[tuple[float, ...], ...]  # hidden: n_personas x topics
    users: tuple[User, ...]

    @classmethod
    def generate(
        cls,
        n_users: int,
        rng: np.random.Generator,
        *,
        topics: Sequence[str] = TOPICS,
        n_personas: int = 4,
        stated_share: float = 0.6,
        consent_share: float = 0.5,
        persona_share: float = 0.0,
    ) -> Population:
        topics = tuple(topics)
        personas = rng.normal(0.0, PERSONA_SCALE, size=(n_personas, len(topics)))
        users = _users(
            n_users, rng, topics, personas, stated_share, consent_share, persona_share, 0
        )
        return cls(
            topics,
            tuple(tuple(float(v) for v in row) for row in personas),
            tuple(users),
        )

    def newcomers(
        self,
        n_users: int,
        rng: np.random.Generator,
        *,
        stated_share: float = 0.6,
        consent_share: float = 0.0,
        persona_share: float = 0.0,
    ) -> tuple[User, ...]:
        """``n_users`` more users of the same personas, numbered after this population's; by
        default without consent, so without signals: nothing of their behaviour is known."""
        personas = np.asarray(self.personas)
        first = len(self.users)
        return tuple(
            _users(
                n_users, rng, self.topics, personas, stated_share, consent_share, persona_share,
                first,
            )
        )  # fmt: skip

    def put_segment_requests(self) -> list[catalog_pb2.PutSegmentRequest]:
        """One segment per persona: the users who stated it."""
        return [
            catalog_pb2.PutSegmentRequest(
                segment=catalog_pb2.Segment(
                    segment_id=persona_segment_id(k),
                    rule=f'stated.{PERSONA_ATTRIBUTE} == "{persona_name(k)}"',
                    description=f"users who said they are persona {persona_name(k)}",
                )
            )
            for k in range(len(self.personas))
        ]


def _users(
    n_users: int,
    rng: np.random.Generator,
    topics: tuple[str, ...],
    personas: np.ndarray[Any, np.dtype[np.float64]],
    stated_share: float,
    consent_share: float,
    persona_share: float,
    first: int,
) -> list[User]:
    n_personas, n_topics = personas.shape
    users: list[User] = []
    for i in range(first, first + n_users):
        persona = int(rng.integers(n_personas))
        taste = personas[persona] + rng.normal(0.0, INDIVIDUAL_SCALE, size=n_topics)
        order = np.argsort(-taste)
        states, consents = rng.random() < stated_share, rng.random() < consent_share
        likes: set[str] = set()
        dislikes: set[str] = set()
        if states:
            top = [topics[j] for j in order[:STATED_TOP] if taste[j] > LIKE_MIN]
            bottom = [topics[j] for j in order[-STATED_TOP:] if taste[j] < DISLIKE_MAX]
            if top:
                size = int(rng.integers(1, len(top) + 1))
                likes = {str(t) for t in rng.choice(top, size=size, replace=False)}
            if bottom:
                size = int(rng.integers(1, min(2, len(bottom)) + 1))
                dislikes = {str(t) for t in rng.choice(bottom, size=size, replace=False)}
        noisy = taste + rng.normal(0.0, SIGNAL_NOISE, size=n_topics)
        signals = (
            {topics[j]: round(float(noisy[j]), 3) for j in range(n_topics) if noisy[j] > 0}
            if consents
            else {}
        )
        users.append(
            User(
                user_id=f"sim-user-{i:05d}",
                persona=persona,
                taste={t: float(v) for t, v in zip(topics, taste, strict=True)},
                likes=frozenset(likes),
                dislikes=frozenset(dislikes),
                consent=bool(consents),
                signals=signals,
                # Drawn last, and only when someone may state it: with the default share of
                # 0 a seed gives the same users whether or not this field exists.
                states_persona=persona_share > 0 and bool(rng.random() < persona_share),
            )
        )
    return users


# --- offers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimOffer:
    offer_id: str
    topics: tuple[str, ...]
    priority: float
    sensitive: bool
    appeal: float  # hidden: the same for every user
    channels: tuple[str, ...] = OFFER_CHANNELS

    def to_proto(self) -> catalog_pb2.Offer:
        return catalog_pb2.Offer(
            offer_id=self.offer_id,
            title=f"{' and '.join(self.topics)} offer",
            topics=list(self.topics),
            channels=list(self.channels),
            priority=self.priority,
            sensitive=self.sensitive,
        )


@dataclass(frozen=True)
class Catalog:
    offers: tuple[SimOffer, ...]

    @classmethod
    def generate(cls, n_offers: int, topics: Sequence[str], rng: np.random.Generator) -> Catalog:
        offers = []
        rho = PRIORITY_CORRELATION
        for i in range(n_offers):
            count = 2 if len(topics) > 1 and rng.random() < TWO_TOPIC_SHARE else 1
            chosen = tuple(str(t) for t in rng.choice(list(topics), size=count, replace=False))
            appeal = float(rng.normal(0.0, APPEAL_SCALE))
            noise = float(rng.normal())
            priority = sigmoid(rho * appeal / APPEAL_SCALE + math.sqrt(1 - rho * rho) * noise)
            offers.append(
                SimOffer(
                    offer_id=f"sim-offer-{i:03d}",
                    topics=chosen,
                    priority=round(priority, 3),
                    sensitive=any(t in SENSITIVE_TOPICS for t in chosen),
                    appeal=appeal,
                )
            )
        return cls(tuple(offers))

    def put_offer_requests(self) -> list[catalog_pb2.PutOfferRequest]:
        return [catalog_pb2.PutOfferRequest(offer=o.to_proto()) for o in self.offers]


# --- context and clicks ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Context:
    placement: str
    device: str
    channel: str = CHANNEL

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Context:
        placement = PLACEMENTS[int(rng.integers(len(PLACEMENTS)))]
        device = DEVICES[0] if rng.random() < MOBILE_SHARE else DEVICES[1]
        return cls(placement, device)

    def effect(self, topic: str) -> float:
        """What this context adds to the logit of an offer on ``topic``."""
        return PLACEMENT_EFFECTS.get(self.placement, {}).get(topic, 0.0) + DEVICE_EFFECTS.get(
            self.device, {}
        ).get(topic, 0.0)


def click_probability(user: User, offer: SimOffer, context: Context, contacts_today: int) -> float:
    """The true click probability (see the module docstring for the formula)."""
    affinity = sum(user.taste.get(t, 0.0) + context.effect(t) for t in offer.topics)
    logit = (
        BASE_LOGIT
        + affinity / len(offer.topics)
        + offer.appeal
        - FATIGUE * math.log1p(max(0, contacts_today))
    )
    return sigmoid(logit)


def sample_reward(
    user: User,
    offer: SimOffer,
    context: Context,
    contacts_today: int,
    rng: np.random.Generator,
) -> float:
    """1.0 (a click) with the click probability, else 0.0."""
    return 1.0 if rng.random() < click_probability(user, offer, context, contacts_today) else 0.0


def eligible(user: User, offer: SimOffer, channel: str = CHANNEL) -> bool:
    """tactful's hard rules: on the channel, no disliked topic, sensitive only with a like."""
    if channel not in offer.channels or not user.dislikes.isdisjoint(offer.topics):
        return False
    return not offer.sensitive or not user.likes.isdisjoint(offer.topics)


def decide_request(
    user: User,
    context: Context,
    candidates: Sequence[str] = (),
    *,
    slots: int = 1,
    dry_run: bool = False,
) -> decisioning_pb2.DecideRequest:
    """A Decide for this user in this context: the device goes in as categorical context."""
    return decisioning_pb2.DecideRequest(
        user_id=user.user_id,
        channel=context.channel,
        placement=context.placement,
        categorical_context={"device": context.device},
        candidate_offer_ids=list(candidates),
        slots=slots,
        dry_run=dry_run,
    )


def load(
    channel: Any,
    population: Population,
    catalog: Catalog,
    timeout: float = 10.0,
    *,
    newcomers: Sequence[User] = (),
) -> None:
    """Put the catalog and every user's preferences, consent, signals and stated persona into
    tactful through the gRPC API on ``channel`` (a ``grpc.Channel``); the persona segments too
    when someone states a persona. ``newcomers`` (``Population.newcomers``) are loaded alike."""
    offers = catalog_pb2_grpc.CatalogStub(channel)
    profiles = profiles_pb2_grpc.ProfilesStub(channel)
    users = (*population.users, *newcomers)
    if any(user.states_persona for user in users):
        for segment in population.put_segment_requests():
            offers.PutSegment(segment, timeout=timeout)
    for request in catalog.put_offer_requests():
        offers.PutOffer(request, timeout=timeout)
    for user in users:
        profiles.SetPreferences(user.set_preferences_request(), timeout=timeout)
        signals = user.record_signals_request()
        if signals is not None:
            profiles.RecordSignals(signals, timeout=timeout)
        attributes = user.set_attributes_request()
        if attributes is not None:
            profiles.SetAttributes(attributes, timeout=timeout)


__all__ = [
    "TOPICS",
    "Catalog",
    "Context",
    "Population",
    "SimOffer",
    "User",
    "click_probability",
    "decide_request",
    "eligible",
    "load",
    "persona_name",
    "persona_segment_id",
    "sample_reward",
]
