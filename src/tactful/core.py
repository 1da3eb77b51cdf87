"""The core: Decide, ReportOutcome, profiles and the catalog as plain Python.

Nothing here imports gRPC or protobuf; the transport converts messages to the dataclasses of
``tactful.domain`` and calls these objects. Errors are the domain errors of ``tactful.errors``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tactful import metrics, scoring, validation
from tactful import segments as segment_rules
from tactful.bandit import LinearModel, SnapshotError, pick_slate, prior_theta, project
from tactful.contact_policy import ContactPolicy, Limits, Window, carried_over, counter_field
from tactful.domain import (
    Arm,
    Attribute,
    AttributesUpdate,
    ChannelPreference,
    Choice,
    ContactCounter,
    Cooldown,
    DecideRequest,
    Decision,
    HoldReason,
    ObservedSignal,
    Offer,
    OutcomeEvent,
    OutcomeReport,
    PreferencesUpdate,
    Profile,
    Reason,
    ReasonCode,
    Segment,
    Signal,
    Stance,
    TopicPreference,
)
from tactful.errors import (
    Abandoned,
    Aborted,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from tactful.features import (
    FeatureSpace,
    RequestContext,
    SparseVector,
    squash,
)
from tactful.privacy import Pseudonymizer, in_control_group
from tactful.settings import PolicySettings, SegmentSettings, Settings
from tactful.store import (
    ContactSpend,
    DecisionInputs,
    LoggedDecision,
    OutcomeStatus,
    RequestTaken,
    Store,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]


def _always() -> bool:
    return True


DAY_SECONDS = 86400
CONTROL_MODEL = "priority"  # the model_version of control-arm answers
FALLBACK_MODEL = "fallback-priority"
# A request id taken by a concurrent Decide: how long to wait for the winner's record.
REPLAY_WAIT_ATTEMPTS = 5
REPLAY_WAIT_SECONDS = 0.002


# Stored rules were accepted under the limits of their day; a later, stricter setting must not
# make the catalog unloadable, so rules are read back under the parser's own hard limits.
_STORED_RULE_LIMITS = segment_rules.RuleLimits(
    max_length=1 << 20, max_depth=segment_rules.HARD_MAX_DEPTH, max_nodes=1 << 20
)


@dataclass(frozen=True, slots=True)
class CompiledSegment:
    segment: Segment
    # None: the stored rule no longer parses (a bug or a hand-edited store): fail closed,
    # see ``SegmentBook.allows``.
    predicate: segment_rules.Predicate | None
    # A bandit feature (see ``tactful.features``): not sensitive, and reads neither explicit
    # stances nor inferred signals, so neither kind of evidence enters the score through it.
    feature: bool


class SegmentBook:
    """The catalog's segments of one version, each compiled once (closures, no Redis): what
    a Decide evaluates in process, once per request."""

    def __init__(self, segments: Iterable[Segment]) -> None:
        compiled: dict[str, CompiledSegment] = {}
        for segment in segments:
            try:
                rule = segment_rules.parse(segment.rule, _STORED_RULE_LIMITS)
            except segment_rules.RuleError as exc:
                log.error("segment %r: stored rule refused: %s", segment.segment_id, exc)
                compiled[segment.segment_id] = CompiledSegment(segment, None, False)
                continue
            reads_evidence = segment_rules.uses_inferred(rule) or bool(
                (refs := segment_rules.referenced(rule)).liked_topics or refs.disliked_topics
            )
            feature = not segment.sensitive and not reads_evidence
            compiled[segment.segment_id] = CompiledSegment(
                segment, segment_rules.compile(rule), feature
            )
        self.by_id: dict[str, CompiledSegment] = dict(sorted(compiled.items()))
        self._evaluated = tuple(
            (segment_id, c.predicate)
            for segment_id, c in self.by_id.items()
            if c.predicate is not None
        )

    def __bool__(self) -> bool:
        return bool(self.by_id)

    def members(self, given: segment_rules.SegmentInput) -> tuple[str, ...]:
        """The ids of the segments ``given`` is in, in id order."""
        return tuple(segment_id for segment_id, predicate in self._evaluated if predicate(given))

    def allows(self, offer: Offer, members: frozenset[str]) -> bool:
        """Targeting: in one of the offer's segments (when it names any) and in none of its
        excluded ones. A segment that cannot be evaluated (unknown, or a stored rule that no
        longer parses) counts as not in for ``segments`` and as in for ``excluded_segments``:
        a targeting rule we cannot check never widens who sees an offer."""
        if offer.segments and members.isdisjoint(offer.segments):
            return False
        if offer.excluded_segments:
            if not members.isdisjoint(offer.excluded_segments):
                return False
            for segment_id in offer.excluded_segments:
                known = self.by_id.get(segment_id)
                if known is None or known.predicate is None:
                    return False
        return True

    def reason(self, offer: Offer, members: frozenset[str]) -> Reason | None:
        """Why a targeted offer was eligible: the first of its segments the user is in."""
        for segment_id in offer.segments:
            if segment_id in members:
                if self.by_id[segment_id].segment.sensitive:
                    return SENSITIVE_SEGMENT_REASON
                return Reason(ReasonCode.SEGMENT, f"offered to segment {segment_id}")
        return None

    def logged(self, members: Iterable[str]) -> list[str]:
        """The memberships a decision log records: sensitive ones never leave the profile."""
        return [m for m in members if not self.by_id[m].segment.sensitive]

    def features(self, members: Iterable[str], limit: int) -> tuple[str, ...]:
        return tuple(m for m in members if self.by_id[m].feature)[:limit]


SENSITIVE_SEGMENT_REASON = Reason(ReasonCode.SEGMENT, "offered because of something you told us")


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    """Offers and segments of one catalog version, swapped in together."""

    offers: Mapping[str, Offer] = field(default_factory=dict)
    segments: SegmentBook = field(default_factory=lambda: SegmentBook(()))


class CatalogCache:
    """The offer catalog and its segments (compiled once per version), cached in process.
    Every Decide reads the catalog's version in its one round trip; a version this process
    has not loaded yet triggers a reload (offers and segments in one read), so a change made
    through any process is seen by all of them on their next request.

    Only a read that started after the last reload can trigger one (``read_at``, from
    ``time.monotonic``, taken before the read). Versions only grow, so a read that started
    earlier and saw another version is a request that was in flight during the reload: what
    is loaded is at least as new, and reloading for it would make every stale request of a
    burst reload again. A fresher read that sees a *lower* version is no stale read but the
    store going back (a flush or a restore restarts the count from 0): it reloads too."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._version = -1
        self._loaded_at = -math.inf  # monotonic time the last reload's read started
        self._snapshot = CatalogSnapshot()

    def snapshot(self, version: int, *, read_at: float) -> CatalogSnapshot:
        if version != self._version and read_at > self._loaded_at:
            with self._lock:
                if version != self._version and read_at > self._loaded_at:
                    self._reload_locked()
        return self._snapshot

    def offers(self, version: int, *, read_at: float) -> Mapping[str, Offer]:
        return self.snapshot(version, read_at=read_at).offers

    def refresh(self) -> Mapping[str, Offer]:
        with self._lock:
            self._reload_locked()
        return self._snapshot.offers

    def last_known(self) -> Mapping[str, Offer]:
        """Whatever was loaded last, possibly stale: what a fallback answer is made of."""
        return self._snapshot.offers

    def last_snapshot(self) -> CatalogSnapshot:
        return self._snapshot

    def _reload_locked(self) -> None:
        started = time.monotonic()
        version, offers, segments = self._store.load_catalog()
        # One object, one assignment: a request sees offers and segments of one version.
        self._snapshot = CatalogSnapshot({o.offer_id: o for o in offers}, SegmentBook(segments))
        self._version = version
        self._loaded_at = started
        metrics.CATALOG_RELOADS.inc()


class ModelCache:
    """The model this process decides with. Like the catalog, its version comes with every
    Decide's one read; a new version is loaded once (one GET), and a snapshot that cannot be
    used is rejected with a log line while the previous model stays in service.

    As for the catalog, only a read that started after the last load can switch models, so
    a request that was in flight while a rollback or a new version was loaded does not
    switch the process back. Any other version a fresher read sees is loaded, lower ones
    included: a rollback lowers the version on purpose."""

    def __init__(self, store: Store, space: FeatureSpace, kappa: float) -> None:
        self._store = store
        self._space = space
        self._kappa = kappa
        self._lock = threading.Lock()
        self._version = 0
        self._loaded_at = -math.inf  # monotonic time the last load's read started
        self._model = LinearModel("prior", project(prior_theta(space.dim), kappa), space.layout)
        self._rejected: set[int] = set()

    @property
    def space(self) -> FeatureSpace:
        return self._space

    def model(self, version: int, *, read_at: float) -> LinearModel:
        if (
            version == self._version
            or version == 0
            or version in self._rejected
            or read_at <= self._loaded_at
        ):
            return self._model
        with self._lock:
            if (
                version != self._version
                and version not in self._rejected
                and read_at > self._loaded_at
            ):
                self._load_locked(version)
        return self._model

    def _load_locked(self, version: int) -> None:
        started = time.monotonic()
        raw = self._store.load_model(version=version)
        try:
            if raw is None:
                raise SnapshotError("snapshot missing")
            model = LinearModel.from_bytes(raw, self._space)
            # Whoever wrote it (another release, another kappa, a rollback), the rule that
            # explicit outranks inferred is this server's to keep: project again.
            model = replace(model, theta=project(model.theta, self._kappa))
        except SnapshotError as exc:
            self._rejected.add(version)
            metrics.MODEL_REJECTED.inc()
            log.error(
                "model version %d rejected, keeping %s: %s", version, self._model.version, exc
            )
            return
        self._model, self._version, self._loaded_at = model, version, started
        metrics.MODEL_VERSION.set(version)


@dataclass(frozen=True, slots=True)
class ContactPlan:
    """What consuming a decision's contacts needs: the user's day, the caps on this channel,
    and old fields to drop (counters of other days are the caps script's to fold or drop)."""

    window: Window
    limits: Limits
    stale: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Draft:
    """A decision before its contacts are consumed."""

    decision: Decision
    features: dict[str, SparseVector]
    plan: ContactPlan | None
    # The candidate set the personalised arm drew from, for off-policy evaluation (see _log).
    candidates: dict[str, Any] | None = None
    # The user's segment memberships the log records (None: the catalog has no segments, or
    # the decision was held before they were evaluated).
    segments: list[str] | None = None


@dataclass(frozen=True, slots=True)
class HardRules:
    """What a user said that no score may override: the filters every answer passes,
    personalised, control, replayed or fallback."""

    liked: frozenset[str]
    disliked: frozenset[str]
    opted_out: frozenset[str]
    cooling: frozenset[str]  # "o:<offer_id>" and "t:<topic>" still cooling down

    @classmethod
    def of(cls, profile: Profile, now: float) -> HardRules:
        return cls(
            liked=profile.topics_with(Stance.LIKE),
            disliked=profile.topics_with(Stance.DISLIKE),
            opted_out=profile.opted_out_channels(),
            cooling=frozenset(
                f"o:{c.offer_id}" if c.offer_id else f"t:{c.topic}"
                for c in profile.cooldowns
                if c.until > now
            ),
        )

    def allow(self, offer: Offer) -> bool:
        return (
            self.disliked.isdisjoint(offer.topics)
            and (not offer.sensitive or not self.liked.isdisjoint(offer.topics))
            and not (self.cooling and self._cooling(offer))
        )

    def _cooling(self, offer: Offer) -> bool:
        return f"o:{offer.offer_id}" in self.cooling or any(
            f"t:{t}" in self.cooling for t in offer.topics
        )


class RecentRules:
    """The hard rules of users this process decided for recently, kept in memory so an answer
    made while Redis is down still honours what they said (bounded LRU). Whoever learns of a
    change keeps it current: Decide when it reads a profile, SetPreferences when it writes
    one, and DeleteProfile, which forgets the user."""

    def __init__(self, size: int = 50_000) -> None:
        self._size = size
        self._rules: OrderedDict[str, HardRules] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, user_id: str, rules: HardRules) -> None:
        with self._lock:
            self._rules[user_id] = rules
            self._rules.move_to_end(user_id)
            if len(self._rules) > self._size:
                self._rules.popitem(last=False)

    def get(self, user_id: str) -> HardRules | None:
        with self._lock:
            return self._rules.get(user_id)

    def forget(self, user_id: str) -> None:
        with self._lock:
            self._rules.pop(user_id, None)


class Decider:
    def __init__(
        self,
        store: Store,
        catalog: CatalogCache,
        models: ModelCache,
        settings: Settings,
        *,
        clock: Clock = time.time,
        recent: RecentRules | None = None,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._models = models
        self._space = models.space
        self._policy = settings.policy
        self._learning = settings.learning
        self._max_feature_segments = settings.segments.max_feature_segments
        self._half_life = settings.policy.signal_half_life_hours * 3600.0
        self._pseudonym = Pseudonymizer(settings.privacy.pseudonym_key)
        self._clock = clock
        seed = settings.learning.seed
        self._seed = secrets.randbits(63) if seed < 0 else seed
        self._seed_key = self._seed.to_bytes(8, "big")
        self._thread_rng = threading.local()  # one generator per serving thread (see _rng)
        self._contacts = ContactPolicy(settings.contact)
        self._recent = recent or RecentRules()
        self._known_channels = frozenset(
            (*settings.policy.render_time_channels, *settings.contact.interruptive_channels)
        ) | {channel for channel, _ in settings.contact.channel_caps}

    def decide(self, req: DecideRequest, *, wanted: Callable[[], bool] = _always) -> Decision:
        """``wanted()`` says whether the caller still waits for the answer (the transport
        passes its deadline/cancellation check): it is asked once more before anything is
        written, and a decision nobody will see is neither logged nor counted."""
        validation.require(validation.check_decide(req))
        now = self._clock()
        decision_id = uuid.uuid4().hex
        profile: Profile | None = None
        try:
            read_at = time.monotonic()
            inputs = self._store.read_for_decision(user_id=req.user_id, request_id=req.request_id)
            profile = inputs.profile
            replay = _fresh_replay(inputs.replay_decision_id, now, self._policy)
            if replay:
                logged = self._store.get_logged_decision(decision_id=replay, render=True)
                if logged is not None:
                    return self._replay(req, decision_from_log(logged.payload), inputs, now)
            snapshot = self._catalog.snapshot(inputs.catalog_version, read_at=read_at)
            model = self._models.model(inputs.model_version, read_at=read_at)
        except Unavailable:
            # What was read (if the profile was) is the freshest account of what the user said.
            return self._without_store(req, decision_id, now, profile)

        offers = snapshot.offers
        draft = self._choose(req, inputs.profile, snapshot, model, decision_id, now)
        decision = draft.decision
        if not req.dry_run:
            if not wanted():
                metrics.ABANDONED_DECISIONS.inc()
                raise Abandoned("the caller is gone: nothing logged, no contact counted")
            try:
                decision = self._log_and_consume(req, draft, offers, now)
            except RequestTaken as taken:
                return self._replay_winner(req, taken.decision_id, decision, inputs, now)
            except Aborted:
                # The user was erased while this was decided from their profile: nothing of
                # them was kept, and nothing made from it is shown or remembered.
                self._recent.forget(req.user_id)
                decision = replace(decision, choices=(), hold_reason=HoldReason.NO_ELIGIBLE_OFFER)
        self._count(decision, req.channel)
        return decision

    def _replay_winner(
        self,
        req: DecideRequest,
        winner: str,
        mine: Decision,
        inputs: DecisionInputs,
        now: float,
    ) -> Decision:
        """A concurrent Decide with this request_id was logged first (a retry racing its
        original): answer what it answered, as any later replay would. Its record was
        written in the same write as its claim, so it is there; on a Redis Cluster it lives
        on another node and may land a moment later, hence the few short waits."""
        for attempt in range(REPLAY_WAIT_ATTEMPTS):
            with contextlib.suppress(Unavailable):
                logged = self._store.get_logged_decision(decision_id=winner, render=True)
                if logged is not None:
                    return self._replay(req, decision_from_log(logged.payload), inputs, now)
            if attempt + 1 < REPLAY_WAIT_ATTEMPTS:
                time.sleep(REPLAY_WAIT_SECONDS)
        # Nothing was counted or logged for this decision: it cannot be shown as made.
        return replace(mine, choices=(), hold_reason=HoldReason.STORE_UNAVAILABLE)

    def _log_and_consume(
        self, req: DecideRequest, draft: Draft, offers: Mapping[str, Offer], now: float
    ) -> Decision:
        """Log the decision and count what it returns, atomically against every cap, in one
        round trip. Under concurrency (several Decides for one user, in any number of
        processes) the caps script may allow fewer choices than the read suggested: the
        best-ranked win, the rest are dropped, and the decision is logged again as served."""
        decision, plan = draft.decision, draft.plan
        spend = None
        if decision.choices and plan is not None:
            limits = plan.limits
            spend = ContactSpend(
                day=plan.window.key,
                now=now,
                channel=req.channel,
                caps=(limits.daily, limits.channel),
                interruptive=limits.interruptive,
                gap_seconds=limits.gap_seconds,
                slots=len(decision.choices),
                stale=plan.stale,
                ranked=[
                    (c.offer_id, offers[c.offer_id].max_per_user_per_day) for c in decision.choices
                ],
                decision_id=decision.decision_id,
                request_id=req.request_id,
                request_id_ttl_seconds=self._policy.request_id_ttl_seconds,
            )
        try:
            consumed = self._log(req, decision, draft, now, spend)
        except Unavailable as error:
            # The answer is still worth more to a page than an error; the decision just
            # cannot be joined with an outcome later. Counted so ops can see it.
            metrics.DECISION_LOG_FAILURES.inc()
            log.warning("decision %s not logged: %s", decision.decision_id, error)
            if spend is None or req.channel in self._policy.render_time_channels:
                return decision  # a page still renders; its view just goes uncounted
            return replace(decision, choices=(), hold_reason=HoldReason.STORE_UNAVAILABLE)
        if consumed is None or len(consumed) == len(decision.choices):
            self._count_served(decision, req.channel)
            return decision
        assert plan is not None
        kept = tuple(c for c in decision.choices if c.offer_id in set(consumed))
        if kept:
            served = replace(decision, choices=kept)
        else:
            open_again = plan.window.end
            if plan.limits.gap_seconds:
                open_again = min(open_again, now + plan.limits.gap_seconds)
            served = replace(
                decision,
                choices=(),
                hold_reason=HoldReason.FATIGUE_CAP,
                next_eligible_time=open_again,
            )
        with contextlib.suppress(Unavailable, Aborted):
            self._log(req, served, draft, now, None)  # the record says what was served
        self._count_served(served, req.channel)  # logged: the first write stored the record
        return served

    def _replay(
        self, req: DecideRequest, decision: Decision, inputs: DecisionInputs, now: float
    ) -> Decision:
        """The decision this request_id got before, less anything the customer has declined
        since (a replay never shows what they now refuse)."""
        rules = HardRules.of(inputs.profile, now)
        if req.channel in rules.opted_out:
            return replace(decision, choices=(), hold_reason=HoldReason.CHANNEL_OPTED_OUT)
        snapshot = self._catalog.last_snapshot()
        offers, book = snapshot.offers, snapshot.segments
        # Targeting is checked again too: a replay never shows what the user left a segment for.
        members = frozenset(self._members(req, inputs.profile, rules, book, now))
        kept = tuple(
            c
            for c in decision.choices
            if c.offer_id in offers
            and rules.allow(offers[c.offer_id])
            and book.allows(offers[c.offer_id], members)
        )
        if len(kept) == len(decision.choices):
            return decision
        hold = decision.hold_reason if kept else HoldReason.NO_ELIGIBLE_OFFER
        return replace(decision, choices=kept, hold_reason=hold)

    def _members(
        self,
        req: DecideRequest,
        profile: Profile,
        rules: HardRules,
        book: SegmentBook,
        now: float,
        inferred: Mapping[str, float] | None = None,
    ) -> tuple[str, ...]:
        """The segments this user is in for this request, in id order: every segment of the
        catalog evaluated once, in process. Inferred strengths are read only with consent."""
        if not book:
            return ()
        if inferred is None:
            consent = profile.consent.inferred_personalization
            inferred = self._decayed(profile.signals, now) if consent else {}
        given = segment_rules.SegmentInput(
            attributes={a.name: (a.value, a.source.name) for a in profile.attributes},
            liked=rules.liked,
            disliked=rules.disliked,
            inferred=segment_rules.squashed(inferred),
            numeric_context=dict(req.numeric_context),
            categorical_context=dict(req.categorical_context),
            channel=req.channel,
        )
        return book.members(given)

    def _choose(
        self,
        req: DecideRequest,
        profile: Profile,
        snapshot: CatalogSnapshot,
        model: LinearModel,
        decision_id: str,
        now: float,
    ) -> Draft:
        control = in_control_group(
            req.user_id, salt=self._policy.control_salt, share=self._policy.control_share
        )
        arm = Arm.CONTROL if control else Arm.PERSONALIZED
        version = CONTROL_MODEL if control else model.version

        def hold(reason: HoldReason, until: float | None = None) -> Draft:
            return Draft(Decision(decision_id, (), reason, version, arm, until), {}, None)

        rules = HardRules.of(profile, now)
        self._recent.remember(req.user_id, rules)
        if req.channel in rules.opted_out:
            return hold(HoldReason.CHANNEL_OPTED_OUT)
        quiet_until = self._contacts.quiet_until(now, profile, req.channel)
        if quiet_until is not None:
            return hold(HoldReason.QUIET_HOURS, quiet_until)
        # What today's counters (from the one read) still allow on this channel.
        window = self._contacts.window(now, profile)
        counts = _todays_counts(profile.contact_counters, window, now)
        limits = self._contacts.limits(req.channel, profile)
        last_contact = dict(profile.last_contacts).get(req.channel, 0.0)
        capacity = self._contacts.capacity(now, window, limits, counts, last_contact, req.channel)
        if capacity.remaining == 0:
            return hold(HoldReason.FATIGUE_CAP, capacity.open_again)
        liked = rules.liked
        offers, book = snapshot.offers, snapshot.segments
        # Without consent, behaviour is not even read into the view the model gets.
        inferred = (
            self._decayed(profile.signals, now) if profile.consent.inferred_personalization else {}
        )
        member_ids = self._members(req, profile, rules, book, now, inferred)
        members = frozenset(member_ids)
        logged_segments = book.logged(member_ids) if book else None
        # Hard rules first: the model only ever ranks what the customer allows, and targeting
        # (segments, excluded_segments) is one of them.
        eligible = [
            offer
            for offer in _candidates(req, offers)
            if offer.is_active(now)
            and req.channel in offer.channels
            and rules.allow(offer)
            and book.allows(offer, members)
        ]
        if not eligible:
            return replace(hold(HoldReason.NO_ELIGIBLE_OFFER), segments=logged_segments)
        eligible = [o for o in eligible if self._contacts.under_offer_cap(o, window, counts)]
        if not eligible:
            return replace(hold(HoldReason.FATIGUE_CAP, window.end), segments=logged_segments)
        slots = req.slots or 1
        if capacity.remaining > 0:
            slots = min(slots, capacity.remaining)  # draw no more than the caps let through
        stale = tuple(f"last|{ch}" for ch, when in profile.last_contacts if when < now - 86400 * 30)
        plan = ContactPlan(window, limits, stale)
        if control:
            choices = tuple(
                Choice(
                    o.offer_id,
                    o.priority,
                    1.0,
                    _with_segment(book, o, members, (scoring.CONTROL_REASON,)),
                )
                for o in scoring.by_priority(eligible)[:slots]
            )
            decision = Decision(decision_id, choices, HoldReason.NONE, version, arm)
            return Draft(decision, {}, plan, segments=logged_segments)

        view = scoring.UserView(liked_topics=liked, inferred=inferred)
        contacts_today = counts.get(counter_field(window, req.channel), 0)
        context = RequestContext(
            channel=req.channel,
            placement=req.placement,
            hour=int(now % DAY_SECONDS) // 3600,
            categorical=req.categorical_context,
            numeric=req.numeric_context,
        )
        liked_flags = [not liked.isdisjoint(offer.topics) for offer in eligible]
        batch = self._space.featurize_many(
            context,
            eligible,
            liked=liked_flags,
            inferred=[squash(view.strongest_inferred(offer)[1]) for offer in eligible],
            contacts_today=contacts_today,
            segments=book.features(member_ids, self._max_feature_segments) if book else (),
        )
        # The policy's scores: predicted reward plus the optimism bonus (bandit.py); the
        # propensities are computed from these very numbers, so they stay exact.
        predicted = batch.dot(model.theta)
        scores = model.scores(batch, self._learning.exploration_bonus, predicted)
        picks = pick_slate(
            scores,
            slots,
            model.gamma(self._learning.exploration_gamma, self._learning.exploration_gamma_scale),
            self._rng(req, decision_id),
        )
        # Choices are listed best score first, whatever order the slots were drawn in.
        picks.sort(key=lambda pick: (-scores[pick.index], eligible[pick.index].offer_id))
        choices = tuple(
            Choice(
                eligible[pick.index].offer_id,
                float(scores[pick.index]),
                pick.propensity,
                _with_segment(
                    book,
                    eligible[pick.index],
                    members,
                    scoring.personal_reasons(eligible[pick.index], view, explored=pick.explored),
                ),
            )
            for pick in picks
        )
        features = {eligible[p.index].offer_id: batch.vector(p.index) for p in picks}
        # What an off-policy estimate needs to replay another policy on this request: every
        # offer the draw was made from, with the model's predicted reward (without the bonus
        # the draw added: "greedy on the current model" ranks by the estimate), the business
        # priority and whether the user explicitly likes it (parallel lists, ~50 entries: a
        # few hundred bytes, no per-offer objects), and how many slots were drawn (with more
        # than one, a choice's propensity is conditional on earlier picks; see bandit.py).
        candidates = {
            "ids": [o.offer_id for o in eligible],
            "scores": predicted.round(6).tolist(),
            "priorities": [o.priority for o in eligible],
            "liked": [int(flag) for flag in liked_flags],
            "slots": len(picks),
        }
        decision = Decision(decision_id, choices, HoldReason.NONE, version, arm)
        return Draft(decision, features, plan, candidates, logged_segments)

    def _rng(self, req: DecideRequest, decision_id: str) -> np.random.Generator:
        """A generator seeded by (process seed, user, request_id or decision_id), as VW's
        explore library seeds from the event id: the same request with the same inputs draws
        the same slate (reproducible tests and replays), different requests, and different
        users reusing a request id, draw independently; no lock is shared between threads.

        The 128-bit state comes from BLAKE2b keyed with the process seed, and is set on this
        thread's own PCG64: a fresh ``default_rng`` per Decide spent 15 µs in SeedSequence
        (5% of a Decide's CPU); setting the state costs 2."""
        key = f"{req.user_id}\x00{req.request_id or decision_id}".encode("utf-8", "surrogatepass")
        digest = hashlib.blake2b(key, digest_size=16, key=self._seed_key).digest()
        generator: np.random.Generator | None = getattr(self._thread_rng, "generator", None)
        if generator is None:
            generator = self._thread_rng.generator = np.random.Generator(np.random.PCG64(0))
        generator.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": int.from_bytes(digest, "big"), "inc": 1},
            "has_uint32": 0,
            "uinteger": 0,
        }
        return generator

    def _decayed(self, signals: Sequence[Signal], now: float) -> dict[str, float]:
        return {s.topic: decay(s, now, self._half_life) for s in signals}

    def _without_store(
        self, req: DecideRequest, decision_id: str, now: float, profile: Profile | None = None
    ) -> Decision:
        """Redis is down or slow. A page being rendered still gets an answer from the
        in-process catalog by business priority; a message that would be sent (email, push,
        sms) is held, since no cap can be checked. The hard rules are the ``profile``'s, when
        it was read before the store failed (the catalog or model load), else what this
        process last knew of the user."""
        if req.channel not in self._policy.render_time_channels:
            metrics.FALLBACKS.labels("held").inc()
            decision = Decision(
                decision_id, (), HoldReason.STORE_UNAVAILABLE, FALLBACK_MODEL, Arm.FALLBACK
            )
            self._count(decision, req.channel)
            return decision
        # What this user said, if this process decided for them recently; sensitive offers
        # need an explicit LIKE we cannot check now, so they are never in a fallback, and
        # neither are targeted ones (segments or excluded_segments): memberships rest on the
        # profile we cannot read now, and a rule we cannot check must not widen an audience.
        rules = self._recent.get(req.user_id)
        if profile is not None:
            rules = HardRules.of(profile, now)
            self._recent.remember(req.user_id, rules)
        if rules is not None and req.channel in rules.opted_out:
            decision = Decision(
                decision_id, (), HoldReason.CHANNEL_OPTED_OUT, FALLBACK_MODEL, Arm.FALLBACK
            )
            self._count(decision, req.channel)
            return decision
        eligible = [
            o
            for o in _candidates(req, self._catalog.last_known())
            if o.is_active(now)
            and req.channel in o.channels
            and not o.sensitive
            and not o.segments
            and not o.excluded_segments
            and (rules is None or rules.allow(o))
        ]
        choices = tuple(
            Choice(o.offer_id, o.priority, 1.0, (scoring.FALLBACK_REASON,))
            for o in scoring.by_priority(eligible)[: req.slots or 1]
        )
        hold = HoldReason.NONE if choices else HoldReason.STORE_UNAVAILABLE
        metrics.FALLBACKS.labels("fallback" if choices else "held").inc()
        decision = Decision(decision_id, choices, hold, FALLBACK_MODEL, Arm.FALLBACK)
        self._count(decision, req.channel)
        return decision

    def _log(
        self,
        req: DecideRequest,
        decision: Decision,
        draft: Draft,
        now: float,
        spend: ContactSpend | None,
    ) -> list[str] | None:
        """One round trip: the decision record (and, with ``spend``, the caps script);
        returns what the script counted. Raises Unavailable."""
        features = {
            c.offer_id: draft.features[c.offer_id]
            for c in decision.choices
            if c.offer_id in draft.features
        }
        candidates = draft.candidates
        payload = decision_to_log(decision)
        payload.update(
            ts=now,
            # The user, by a keyed pseudonym only: whoever holds the log cannot test
            # candidate ids against it. (The store keeps where the user's keys are beside
            # the record, not in it, so a DISMISS still reaches their cooldowns.)
            user=self._pseudonym(req.user_id),
            channel=req.channel,
            placement=req.placement,
            numeric_context=dict(req.numeric_context),
            categorical_context=dict(req.categorical_context),
        )
        if draft.segments is not None:
            # The user's memberships (sensitive ones left out), for per-segment reporting.
            payload["segments"] = draft.segments
        if candidates is not None and decision.choices:
            payload["candidates"] = candidates
        if features:
            # x of the (x, a, r, p) tuple: what the learner regresses the reward on.
            payload["features"] = {offer_id: x.to_json() for offer_id, x in features.items()}
        return self._store.log_decision(
            user_id=req.user_id,
            decision=LoggedDecision(decision.decision_id, payload),
            request_id=req.request_id,
            learn_after=now + self._learning.reward_window_seconds if features else None,
            spend=spend,
        )

    def _count(self, decision: Decision, channel: str) -> None:
        _decisions_counter(self._channel_label(channel), decision.arm, decision.hold_reason).inc()
        for choice in decision.choices:
            for reason in choice.reasons:
                _choices_counter(reason.code).inc()

    def _count_served(self, decision: Decision, channel: str) -> None:
        """Offers served in a logged decision: the ones an outcome can be reported for (the
        dashboard's CTR by arm divides by them). Dry runs, fallbacks and decisions whose log
        write failed are not counted."""
        if decision.choices:
            _served_counter(self._channel_label(channel), decision.arm).inc(len(decision.choices))

    def _channel_label(self, channel: str) -> str:
        # Channel names come from callers: only configured ones become label values.
        return channel if channel in self._known_channels else "other"

    def record_outcome(self, report: OutcomeReport) -> bool:
        """Store an outcome against its logged decision; True if new, False if a duplicate."""
        validation.require(validation.check_outcome(report))
        assert report.event is not None
        outcome: dict[str, Any] = {
            "outcome_id": report.outcome_id,
            "offer_id": report.offer_id,
            "event": report.event.name,
            "value": report.value,
            "reward": report.reward(),
            "ts": self._clock(),
        }
        stored = self._store.record_outcome(
            decision_id=report.decision_id,
            offer_id=report.offer_id,
            outcome_id=report.outcome_id,
            outcome=outcome,
        )
        status = stored.status
        if status == OutcomeStatus.UNKNOWN_DECISION:
            metrics.OUTCOMES.labels(report.event.name, "unknown_decision").inc()
            raise NotFound(f"decision {report.decision_id[:64]!r} is unknown or has expired")
        if status == OutcomeStatus.OFFER_NOT_IN_DECISION:
            raise InvalidArgument([FieldViolation("offer_id", "was not chosen in this decision")])
        recorded = status == OutcomeStatus.RECORDED
        metrics.OUTCOMES.labels(report.event.name, "recorded" if recorded else "duplicate").inc()
        if recorded and stored.arm in _ARMS:
            metrics.ARM_OUTCOMES.labels(stored.arm, report.event.name).inc()
        # A repeated DISMISS sets the cooldown again: if the first attempt's write failed
        # (UNAVAILABLE), the client's retry is what puts the offer away.
        if report.event is OutcomeEvent.DISMISS and self._contacts.cooldown_seconds:
            self._cool_down(report)
        return recorded

    def _cool_down(self, report: OutcomeReport) -> None:
        """A dismissed offer (and, if configured, its topics) stays away from that user,
        unless they were erased since the decision was made (the cooldown would bring a key
        of theirs back)."""
        logged = self._store.get_logged_decision(decision_id=report.decision_id)
        offer = self._catalog.last_known().get(report.offer_id)
        # Records logged before the owner was kept beside them carry it as user_key.
        owner = None if logged is None else logged.owner or logged.payload.get("user_key")
        if not owner:
            return
        dismissed = offer or Offer(report.offer_id, "", (), ())
        self._store.add_cooldowns(
            user_key=owner,
            fields=self._contacts.cooldown_fields(dismissed),
            until=self._clock() + self._contacts.cooldown_seconds,
            started=float(logged.payload.get("ts", 0.0)) if logged is not None else 0.0,
        )


# The decision counters' labelled children, each made once (see ``metrics.children``).
_decisions_counter = metrics.children(metrics.DECISIONS)  # channel, arm, hold reason
_served_counter = metrics.children(metrics.OFFERS_SERVED)  # channel, arm
_choices_counter = metrics.children(metrics.CHOICES)  # reason code
# Arms as the decision log spells them: what an outcome's arm label may be (a record written
# by another version with something else is not counted by arm).
_ARMS = frozenset(arm.name for arm in Arm)


def decay(signal: Signal, now: float, half_life_seconds: float) -> float:
    age = max(0.0, now - signal.observed_at)
    return float(signal.weight * 0.5 ** (age / half_life_seconds))


def _fresh_replay(stored: str | None, now: float, policy: PolicySettings) -> str | None:
    """The decision a request_id points to, if it was made within TACTFUL_REQUEST_ID_TTL_SECONDS
    (stored as "decision_id|time"); an older one is a new request."""
    if not stored:
        return None
    decision_id, _, made_at = stored.partition("|")
    if made_at and now - float(made_at) > policy.request_id_ttl_seconds:
        return None
    return decision_id


def _todays_counts(
    counters: Iterable[ContactCounter], window: Window, now: float
) -> dict[str, int]:
    """Today's counts by field of ``window``, with those of another zone's day that overlaps
    today added in (``carried_over``: the customer changed time zone; the caps script folds
    them in for good when it next consumes). Counters of past days are left out."""
    counts: dict[str, int] = {}
    for c in counters:
        if c.window_start == window.start or carried_over(c.window_start, window, now):
            field = counter_field(window, c.channel, c.offer_id)
            counts[field] = counts.get(field, 0) + c.count
    return counts


def _candidates(req: DecideRequest, offers: Mapping[str, Offer]) -> list[Offer]:
    if not req.candidate_offer_ids:
        return list(offers.values())
    # Ids the catalog does not know (yet, or any more) are skipped, not an error: the page
    # that asked must still render.
    return [offers[i] for i in dict.fromkeys(req.candidate_offer_ids) if i in offers]


def _with_segment(
    book: SegmentBook, offer: Offer, members: frozenset[str], reasons: tuple[Reason, ...]
) -> tuple[Reason, ...]:
    """A targeted offer's reasons start with the segment that made it eligible."""
    if not offer.segments:
        return reasons
    segment = book.reason(offer, members)
    return reasons if segment is None else (segment, *reasons)


def decision_to_log(decision: Decision) -> dict[str, Any]:
    return {
        "decision_id": decision.decision_id,
        "arm": decision.arm.name,
        "hold_reason": decision.hold_reason.name,
        "model_version": decision.model_version,
        "offer_ids": [c.offer_id for c in decision.choices],
        "choices": [
            {
                "offer_id": c.offer_id,
                "score": c.score,
                "propensity": c.propensity,
                "reasons": [[r.code.name, r.detail] for r in c.reasons],
            }
            for c in decision.choices
        ],
        "next_eligible_time": decision.next_eligible_time,
    }


def decision_from_log(payload: Mapping[str, Any]) -> Decision:
    return Decision(
        decision_id=payload["decision_id"],
        choices=tuple(
            Choice(
                c["offer_id"],
                c["score"],
                c["propensity"],
                tuple(Reason(ReasonCode[code], detail) for code, detail in c["reasons"]),
            )
            for c in payload["choices"]
        ),
        hold_reason=HoldReason[payload["hold_reason"]],
        model_version=payload["model_version"],
        arm=Arm[payload["arm"]],
        next_eligible_time=payload.get("next_eligible_time"),
    )


class ProfileService:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        clock: Clock = time.time,
        recent: RecentRules | None = None,
    ) -> None:
        self._store = store
        self._half_life = settings.policy.signal_half_life_hours * 3600.0
        self._clock = clock
        # The Decider's memory of hard rules, kept current here (see RecentRules).
        self._recent = recent or RecentRules()

    def set_preferences(self, update: PreferencesUpdate) -> Profile:
        validation.require(validation.check_preferences(update))
        now = self._clock()
        profile = self._store.set_preferences(update=update, now=now)
        self._recent.remember(update.user_id, HardRules.of(profile, now))
        return self._present(profile, now)

    def set_attributes(self, update: AttributesUpdate) -> Profile:
        """Merge stated or imported facts about the user; the store stamps them with now and
        keeps a STATED value from being replaced by an IMPORTED one."""
        validation.require(validation.check_attributes(update))
        now = self._clock()
        profile = self._store.set_attributes(
            update=update, now=now, limit=validation.MAX_ATTRIBUTES_PER_USER
        )
        return self._present(profile, now)

    def record_signals(self, user_id: str, observed: Sequence[ObservedSignal]) -> bool:
        """Keep inferred signals, but only for a user who consented: True if kept."""
        now = self._clock()
        signals = [
            Signal(s.topic, s.weight, now if s.observed_at is None else s.observed_at)
            for s in observed
        ]
        validation.require(validation.check_signals(user_id, signals, now))
        return self._store.record_signals(user_id=user_id, signals=signals, now=now)

    def get_profile(self, user_id: str) -> Profile:
        validation.require(validation.check_user_id(user_id))
        return self._present(self._store.get_profile(user_id=user_id), self._clock())

    def delete_profile(self, user_id: str) -> None:
        validation.require(validation.check_user_id(user_id))
        self._store.delete_profile(user_id=user_id, now=self._clock())
        self._recent.forget(user_id)

    def _present(self, profile: Profile, now: float) -> Profile:
        """The profile as the customer should see it: signals decayed to now, every list in
        a stable order (the store returns them unordered)."""
        signals = (replace(s, weight=decay(s, now, self._half_life)) for s in profile.signals)
        return replace(
            profile,
            topic_preferences=tuple(sorted(profile.topic_preferences, key=_by_topic)),
            channel_preferences=tuple(sorted(profile.channel_preferences, key=_by_channel)),
            signals=tuple(sorted(signals, key=_by_topic)),
            contact_counters=tuple(sorted(profile.contact_counters, key=_by_channel_offer)),
            cooldowns=tuple(sorted((c for c in profile.cooldowns if c.until > now), key=_by_until)),
            attributes=tuple(sorted(profile.attributes, key=_by_name)),
        )


def _by_until(cooldown: Cooldown) -> tuple[float, str, str]:
    return (cooldown.until, cooldown.offer_id, cooldown.topic)


def _by_topic(item: TopicPreference | Signal) -> str:
    return item.topic


def _by_name(attribute: Attribute) -> str:
    return attribute.name


def _by_channel(item: ChannelPreference) -> str:
    return item.channel


def _by_channel_offer(counter: ContactCounter) -> tuple[str, str]:
    return counter.channel, counter.offer_id


class CatalogService:
    DEFAULT_PAGE_SIZE = 100

    def __init__(
        self, store: Store, catalog: CatalogCache, segments: SegmentSettings | None = None
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._segments = segments or SegmentSettings()
        self._limits = segment_rules.RuleLimits(
            max_length=self._segments.max_rule_length,
            max_depth=self._segments.max_rule_depth,
            max_nodes=self._segments.max_rule_nodes,
        )

    def put_offer(self, offer: Offer) -> Offer:
        validation.require(validation.check_offer(offer))
        self._store.put_offer(offer=offer)
        return offer

    def get_offer(self, offer_id: str) -> Offer:
        validation.require(validation.check_offer_id(offer_id))
        offer = self._store.get_offer(offer_id=offer_id)
        if offer is None:
            raise NotFound(f"offer {offer_id!r} not found")
        return offer

    def delete_offer(self, offer_id: str) -> None:
        validation.require(validation.check_offer_id(offer_id))
        if not self._store.delete_offer(offer_id=offer_id):
            raise NotFound(f"offer {offer_id!r} not found")

    def list_offers(self, page_size: int, page_token: str) -> tuple[list[Offer], str]:
        after = _page_start(page_size, page_token, validation.OFFER_ID_RE, "ListOffers")
        read_at = time.monotonic()
        offers = self._catalog.offers(self._store.catalog_version(), read_at=read_at)
        ordered = sorted((o for o in offers.values() if o.offer_id > after), key=_offer_key)
        page = ordered[: page_size or self.DEFAULT_PAGE_SIZE]
        more = len(ordered) > len(page)
        return page, _page_token(page[-1].offer_id) if more else ""

    def put_segment(self, segment: Segment) -> Segment:
        """Parse and check the rule (limits from settings; a sensitive segment may read only
        what the customer stated), store it in canonical form and return it as stored."""
        violations = validation.check_segment(segment)
        canonical = segment.rule
        if segment.rule.strip():
            try:
                rule = segment_rules.parse(segment.rule, self._limits)
                if segment.sensitive:
                    segment_rules.check_sensitive(rule)
                canonical = segment_rules.unparse(rule)
            except segment_rules.RuleError as exc:
                violations.append(
                    FieldViolation("segment.rule", f"{exc.message} at position {exc.position}")
                )
        validation.require(violations)
        stored = replace(segment, rule=canonical)
        self._store.put_segment(segment=stored, limit=self._segments.max_segments)
        return stored

    def get_segment(self, segment_id: str) -> Segment:
        validation.require(validation.check_segment_id(segment_id))
        segment = self._store.get_segment(segment_id=segment_id)
        if segment is None:
            raise NotFound(f"segment {segment_id!r} not found")
        return segment

    def delete_segment(self, segment_id: str) -> None:
        """Refused (FailedPrecondition, naming them) while offers name the segment."""
        validation.require(validation.check_segment_id(segment_id))
        if not self._store.delete_segment(segment_id=segment_id):
            raise NotFound(f"segment {segment_id!r} not found")

    def list_segments(self, page_size: int, page_token: str) -> tuple[list[Segment], str]:
        after = _page_start(page_size, page_token, validation.SEGMENT_ID_RE, "ListSegments")
        read_at = time.monotonic()
        book = self._catalog.snapshot(self._store.catalog_version(), read_at=read_at).segments
        ordered = [c.segment for segment_id, c in book.by_id.items() if segment_id > after]
        page = ordered[: page_size or self.DEFAULT_PAGE_SIZE]
        more = len(ordered) > len(page)
        return page, _page_token(page[-1].segment_id) if more else ""

    def is_empty(self) -> bool:
        return not self._catalog.refresh()


def _offer_key(offer: Offer) -> str:
    return offer.offer_id


def _page_start(page_size: int, page_token: str, ids: re.Pattern[str], rpc: str) -> str:
    """The id a page starts after (AIP-158 paging: the token is the last id, encoded)."""
    violations = validation.check_page(page_size)
    after = ""
    if page_token:
        try:
            after = base64.b64decode(page_token, altchars=b"-_", validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            after = ""
        if not ids.fullmatch(after):
            violations.append(FieldViolation("page_token", f"is not a token {rpc} gave"))
    validation.require(violations)
    return after


def _page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode()
