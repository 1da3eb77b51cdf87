"""Decide and ReportOutcome as plain Python: the steps of README "How a decision is made".

Nothing here imports gRPC or protobuf; the transport converts messages to the dataclasses of
``tactful.domain`` and calls these objects. Errors are the domain errors of ``tactful.errors``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from tactful import metrics, scoring, validation
from tactful.bandit import LinearModel, Pick, SlateDraws, pick_slate
from tactful.caches import CatalogCache, ModelCache
from tactful.contact_policy import (
    ContactPolicy,
    Counts,
    Limits,
    Window,
    stale_channels,
    todays_counts,
)
from tactful.decision_log import candidates_record, decision_from_log, decision_record
from tactful.domain import (
    Arm,
    Choice,
    DecideRequest,
    Decision,
    HoldReason,
    Offer,
    OutcomeReport,
    Profile,
    decay,
)
from tactful.errors import Abandoned, Aborted, Unavailable
from tactful.fallback import without_store
from tactful.features import FeatureBatch, FloatArray, RequestContext, SparseVector
from tactful.hard_rules import HardRules, RecentRules
from tactful.offer_table import OfferTable, Positions
from tactful.outcomes import Outcomes
from tactful.privacy import Pseudonymizer, in_control_group
from tactful.segment_book import SegmentBook, with_segment
from tactful.settings import PolicySettings, Settings
from tactful.store import ContactSpend, DecisionInputs, LoggedDecision, RequestTaken, Store

log = logging.getLogger(__name__)

Clock = Callable[[], float]


def _always() -> bool:
    return True


DAY_SECONDS = 86400
CONTROL_MODEL = "priority"  # the model_version of control-arm answers
# A request id taken by a concurrent Decide: how long to wait for the winner's record.
REPLAY_WAIT_ATTEMPTS = 5
REPLAY_WAIT_SECONDS = 0.002


@dataclass(frozen=True, slots=True)
class ContactPlan:
    """What consuming a decision's contacts needs: the user's day, the caps on this channel,
    and the channels whose last contact is too old to keep (counters of other days are the
    caps script's to fold or drop)."""

    window: Window
    limits: Limits
    stale: tuple[str, ...]  # channels


@dataclass(frozen=True, slots=True)
class Draft:
    """A decision before its contacts are consumed."""

    decision: Decision
    features: dict[str, SparseVector]
    plan: ContactPlan | None
    # The candidate set the personalised arm drew from, for off-policy evaluation.
    candidates: dict[str, Any] | None = None
    # The user's segment memberships the log records (None: the catalog has no segments, or
    # the decision was held before they were evaluated).
    segments: list[str] | None = None


class Held(Exception):
    """A step left nothing to choose from: the decision is this hold."""

    def __init__(self, draft: Draft) -> None:
        super().__init__(draft.decision.hold_reason.name)
        self.draft = draft


# The state passed between the steps of one Decide is held in named tuples: immutable like
# frozen dataclasses, and built in one call rather than one __setattr__ per field.
class Turn(NamedTuple):
    """One Decide once the store was read: the request, what was read, and who answers."""

    req: DecideRequest
    profile: Profile
    offers: Mapping[str, Offer]
    table: OfferTable  # the same offers, as arrays for eligibility
    book: SegmentBook
    model: LinearModel
    decision_id: str
    now: float
    arm: Arm
    version: str  # the model_version the answer carries
    rules: HardRules

    def decision(self, choices: tuple[Choice, ...]) -> Decision:
        return Decision(self.decision_id, choices, HoldReason.NONE, self.version, self.arm)

    def hold(
        self, reason: HoldReason, until: float | None = None, segments: list[str] | None = None
    ) -> Held:
        decision = Decision(self.decision_id, (), reason, self.version, self.arm, until)
        return Held(Draft(decision, {}, None, segments=segments))


class Room(NamedTuple):
    """What today's counters (from the one read) still allow on the request's channel."""

    plan: ContactPlan
    counts: Counts
    slots: int  # how many offers to draw: no more than the caps let through


class Audience(NamedTuple):
    """The offers the hard rules and targeting allow, and what the user was judged on."""

    offers: list[Offer]
    at: Positions  # their positions in the catalog's table
    view: scoring.UserView
    member_ids: tuple[str, ...]
    members: frozenset[str]
    segments: list[str] | None  # the memberships the log records


class Decider:
    """Decide and ReportOutcome. ``decide`` reads as the steps of a decision; the methods
    below it follow in the same order."""

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
        self._draws = SlateDraws(secrets.randbits(63) if seed < 0 else seed)
        self._contacts = ContactPolicy(settings.contact)
        self._recent = recent or RecentRules()
        self._outcomes = Outcomes(store, catalog, self._contacts, clock)
        self._known_channels = frozenset(
            (*settings.policy.render_time_channels, *settings.contact.interruptive_channels)
        ) | {channel for channel, _ in settings.contact.channel_caps}

    def decide(self, req: DecideRequest, *, wanted: Callable[[], bool] = _always) -> Decision:
        """The steps of README "How a decision is made", in order; a step that leaves nothing
        to choose from ends the decision with a hold (``Held``), which is logged like any.

        ``wanted()`` says whether the caller still waits for the answer (the transport
        passes its deadline/cancellation check): it is asked once more before anything is
        written, and a decision nobody will see is neither logged nor counted."""
        validation.require(validation.check_decide(req))
        now = self._clock()
        turn = self._read(req, uuid.uuid4().hex, now)
        if isinstance(turn, Decision):
            return turn  # a replay, or the answer made without the store
        try:
            room = self._channel_rules(turn)
            audience = self._eligible(turn)
            offers, at = self._under_offer_caps(turn, room, audience)
            if turn.arm is Arm.CONTROL:
                draft = self._by_priority(turn, room, audience, offers)
            else:
                batch, liked = self._features(turn, room, audience, offers, at)
                predicted, scores = self._scores(turn, batch)
                picks = self._pick(turn, offers, scores, room.slots)
                choices = self._reasons(turn, audience, offers, scores, picks)
                draft = Draft(
                    turn.decision(choices),
                    {offers[pick.index].offer_id: batch.vector(pick.index) for pick in picks},
                    room.plan,
                    candidates_record(offers, predicted, liked, len(picks)),
                    audience.segments,
                )
        except Held as held:
            draft = held.draft
        return self._log(turn, draft, wanted)

    def _read(self, req: DecideRequest, decision_id: str, now: float) -> Turn | Decision:
        """The one round trip: profile, catalog and model versions (a catalog version this
        process has not loaded yet reloads its cache; a model version is loaded in the
        background, see ``ModelCache``). A request_id seen recently gets its earlier
        answer again; a store that cannot be read, the answer made without it."""
        profile: Profile | None = None
        try:
            read_at = time.monotonic()
            inputs = self._store.read_for_decision(user_id=req.user_id, request_id=req.request_id)
            profile = inputs.profile
            replay = _fresh_replay(inputs, now, self._policy)
            if replay:
                logged = self._store.get_logged_decision(decision_id=replay, render=True)
                if logged is not None:
                    return self._replay(req, decision_from_log(logged.payload), profile, now)
            snapshot = self._catalog.snapshot(inputs.catalog_version, read_at=read_at)
            model = self._models.model(inputs.model_version, read_at=read_at)
        except Unavailable:
            # What was read (if the profile was) is the freshest account of what the user said.
            decision = without_store(
                req,
                decision_id,
                now,
                profile,
                catalog=self._catalog,
                recent=self._recent,
                render_time_channels=self._policy.render_time_channels,
            )
            self._count(decision, req.channel)
            return decision
        control = in_control_group(
            req.user_id, salt=self._policy.control_salt, share=self._policy.control_share
        )
        rules = HardRules.of(inputs.profile, now)
        self._recent.remember(req.user_id, rules)
        return Turn(
            req,
            inputs.profile,
            snapshot.offers,
            snapshot.table,
            snapshot.segments,
            model,
            decision_id,
            now,
            Arm.CONTROL if control else Arm.PERSONALIZED,
            CONTROL_MODEL if control else model.version,
            rules,
        )

    def _channel_rules(self, turn: Turn) -> Room:
        """The hard rules of the channel: held when the user opted out of it, is in quiet
        hours on it, or has reached its caps or gap; else what the caps leave."""
        req, profile, now = turn.req, turn.profile, turn.now
        if req.channel in turn.rules.opted_out:
            raise turn.hold(HoldReason.CHANNEL_OPTED_OUT)
        quiet_until = self._contacts.quiet_until(now, profile, req.channel)
        if quiet_until is not None:
            raise turn.hold(HoldReason.QUIET_HOURS, quiet_until)
        window = self._contacts.window(now, profile)
        counts = todays_counts(profile.contact_counters, window, now)
        limits = self._contacts.limits(req.channel, profile)
        last_contact = dict(profile.last_contacts).get(req.channel, 0.0)
        capacity = self._contacts.capacity(now, window, limits, counts, last_contact, req.channel)
        if capacity.remaining == 0:
            raise turn.hold(HoldReason.FATIGUE_CAP, capacity.open_again)
        slots = req.slots or 1
        if capacity.remaining > 0:
            slots = min(slots, capacity.remaining)
        return Room(ContactPlan(window, limits, stale_channels(profile, now)), counts, slots)

    def _eligible(self, turn: Turn) -> Audience:
        """Hard rules before any score: the model only ever ranks what the customer allows,
        and targeting (segments, excluded_segments) is one of them."""
        req, profile, book, rules, now = turn.req, turn.profile, turn.book, turn.rules, turn.now
        inferred = self._inferred(profile, now)
        member_ids = book.members_of(req, profile, rules.liked, rules.disliked, inferred)
        members = frozenset(member_ids)
        logged_segments = book.logged(member_ids) if book else None
        table = turn.table
        at = table.eligible_at(req.candidate_offer_ids, req.channel, now, rules, book, members)
        if not len(at):
            raise turn.hold(HoldReason.NO_ELIGIBLE_OFFER, segments=logged_segments)
        view = scoring.UserView(liked_topics=rules.liked, inferred=inferred)
        return Audience(table.offers_at(at), at, view, member_ids, members, logged_segments)

    def _under_offer_caps(
        self, turn: Turn, room: Room, audience: Audience
    ) -> tuple[list[Offer], Positions]:
        """The eligible offers not yet at their own daily cap for this user, and their
        positions."""
        window, counts = room.plan.window, room.counts
        if not turn.table.any_capped:
            return audience.offers, audience.at  # no offer has a cap of its own
        under = [self._contacts.under_offer_cap(o, counts) for o in audience.offers]
        if not any(under):
            raise turn.hold(HoldReason.FATIGUE_CAP, window.end, audience.segments)
        offers = [o for o, ok in zip(audience.offers, under, strict=True) if ok]
        return offers, audience.at[np.array(under, dtype=bool)]

    def _by_priority(
        self, turn: Turn, room: Room, audience: Audience, offers: list[Offer]
    ) -> Draft:
        """The control arm's answer: business priority alone, propensity 1."""
        book, members = turn.book, audience.members
        choices = tuple(
            Choice(
                o.offer_id,
                o.priority,
                1.0,
                with_segment(book, o, members, (scoring.CONTROL_REASON,)),
            )
            for o in scoring.by_priority(offers)[: room.slots]
        )
        return Draft(turn.decision(choices), {}, room.plan, segments=audience.segments)

    def _features(
        self, turn: Turn, room: Room, audience: Audience, offers: list[Offer], at: Positions
    ) -> tuple[FeatureBatch, list[bool]]:
        """Each offer's sparse feature vector, and whether the user explicitly likes it."""
        req, view, book = turn.req, audience.view, turn.book
        liked = view.liked_topics
        context = RequestContext(
            channel=req.channel,
            placement=req.placement,
            hour=int(turn.now % DAY_SECONDS) // 3600,
            categorical=req.categorical_context,
            numeric=req.numeric_context,
        )
        liked_flags, strengths = turn.table.evidence(at, liked, view.inferred)
        batch = self._space.featurize_many(
            context,
            offers,
            liked=liked_flags,
            inferred=strengths,
            contacts_today=room.counts.get((req.channel, ""), 0),
            segments=book.features(audience.member_ids, self._max_feature_segments) if book else (),
        )
        return batch, liked_flags

    def _scores(self, turn: Turn, batch: FeatureBatch) -> tuple[FloatArray, FloatArray]:
        """The model's predicted rewards, and the policy's scores: predicted reward plus the
        optimism bonus (bandit.py). The propensities are computed from these very scores, so
        they stay exact."""
        predicted = batch.dot(turn.model.theta)
        return predicted, turn.model.scores(batch, self._learning.exploration_bonus, predicted)

    def _pick(self, turn: Turn, offers: list[Offer], scores: FloatArray, slots: int) -> list[Pick]:
        """The slate, drawn by inverse gap weighting; listed best score first, whatever order
        the slots were drawn in."""
        learning = self._learning
        gamma = turn.model.gamma(learning.exploration_gamma, learning.exploration_gamma_scale)
        rng = self._draws.generator(turn.req.user_id, turn.req.request_id or turn.decision_id)
        picks = pick_slate(scores, slots, gamma, rng, learning.exploration_share)
        picks.sort(key=lambda pick: (-scores[pick.index], offers[pick.index].offer_id))
        return picks

    def _reasons(
        self,
        turn: Turn,
        audience: Audience,
        offers: list[Offer],
        scores: FloatArray,
        picks: list[Pick],
    ) -> tuple[Choice, ...]:
        """The choices, each with the reasons the customer is shown."""
        book, members, view = turn.book, audience.members, audience.view
        return tuple(
            Choice(
                offers[pick.index].offer_id,
                float(scores[pick.index]),
                pick.propensity,
                with_segment(
                    book,
                    offers[pick.index],
                    members,
                    scoring.personal_reasons(offers[pick.index], view, explored=pick.explored),
                ),
            )
            for pick in picks
        )

    def _log(self, turn: Turn, draft: Draft, wanted: Callable[[], bool]) -> Decision:
        """Unless it is a dry run: log the decision and count its contacts in one write."""
        req, decision = turn.req, draft.decision
        if not req.dry_run:
            if not wanted():
                metrics.ABANDONED_DECISIONS.inc()
                raise Abandoned("the caller is gone: nothing logged, no contact counted")
            try:
                decision = self._log_and_consume(turn, draft)
            except RequestTaken as taken:
                return self._replay_winner(req, taken.decision_id, decision, turn.profile, turn.now)
            except Aborted:
                # The user was erased while this was decided from their profile: nothing of
                # them was kept, and nothing made from it is shown or remembered.
                self._recent.forget(req.user_id)
                decision = replace(decision, choices=(), hold_reason=HoldReason.NO_ELIGIBLE_OFFER)
        self._count(decision, req.channel)
        return decision

    def _log_and_consume(self, turn: Turn, draft: Draft) -> Decision:
        """Log the decision and count what it returns, atomically against every cap, in one
        round trip. Under concurrency (several Decides for one user, in any number of
        processes) the caps script may allow fewer choices than the read suggested: the
        best-ranked win, the rest are dropped, and the decision is logged again as served."""
        req, now, decision, plan = turn.req, turn.now, draft.decision, draft.plan
        spend = self._spend(turn, draft)
        try:
            consumed = self._write(req, decision, draft, now, spend)
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
            self._write(req, served, draft, now, None)  # the record says what was served
        self._count_served(served, req.channel)  # logged: the first write stored the record
        return served

    def _spend(self, turn: Turn, draft: Draft) -> ContactSpend | None:
        """What the caps script is to count for the decision's choices (None: nothing)."""
        decision, plan, req = draft.decision, draft.plan, turn.req
        if not decision.choices or plan is None:
            return None
        limits = plan.limits
        return ContactSpend(
            day=plan.window.key,
            now=turn.now,
            channel=req.channel,
            caps=(limits.daily, limits.channel),
            interruptive=limits.interruptive,
            gap_seconds=limits.gap_seconds,
            slots=len(decision.choices),
            stale=plan.stale,
            ranked=[
                (c.offer_id, turn.offers[c.offer_id].max_per_user_per_day) for c in decision.choices
            ],
            decision_id=decision.decision_id,
            request_id=req.request_id,
            request_id_ttl_seconds=self._policy.request_id_ttl_seconds,
        )

    def _write(
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
        payload = decision_record(
            decision,
            req,
            now=now,
            user=self._pseudonym(req.user_id),
            segments=draft.segments,
            candidates=draft.candidates,
            features=features,
        )
        return self._store.log_decision(
            user_id=req.user_id,
            decision=LoggedDecision(decision.decision_id, payload),
            request_id=req.request_id,
            learn_after=now + self._learning.reward_window_seconds if features else None,
            spend=spend,
        )

    def _replay_winner(
        self, req: DecideRequest, winner: str, mine: Decision, profile: Profile, now: float
    ) -> Decision:
        """A concurrent Decide with this request_id was logged first (a retry racing its
        original): answer what it answered, as any later replay would. Its record was
        written in the same write as its claim, so it is there; on a Redis Cluster it lives
        on another node and may land a moment later, hence the few short waits."""
        for attempt in range(REPLAY_WAIT_ATTEMPTS):
            with contextlib.suppress(Unavailable):
                logged = self._store.get_logged_decision(decision_id=winner, render=True)
                if logged is not None:
                    return self._replay(req, decision_from_log(logged.payload), profile, now)
            if attempt + 1 < REPLAY_WAIT_ATTEMPTS:
                time.sleep(REPLAY_WAIT_SECONDS)
        # Nothing was counted or logged for this decision: it cannot be shown as made.
        return replace(mine, choices=(), hold_reason=HoldReason.STORE_UNAVAILABLE)

    def _replay(
        self, req: DecideRequest, decision: Decision, profile: Profile, now: float
    ) -> Decision:
        """The decision this request_id got before, less anything the customer has declined
        since (a replay never shows what they now refuse). It is the earlier answer again,
        not a new one: an offer is not checked again for being active or on the channel."""
        rules = HardRules.of(profile, now)
        if req.channel in rules.opted_out:
            return replace(decision, choices=(), hold_reason=HoldReason.CHANNEL_OPTED_OUT)
        snapshot = self._catalog.last_snapshot()
        offers, book = snapshot.offers, snapshot.segments
        # Targeting is checked again too: a replay never shows what the user left a segment for.
        inferred = self._inferred(profile, now)
        members = frozenset(book.members_of(req, profile, rules.liked, rules.disliked, inferred))
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

    def _inferred(self, profile: Profile, now: float) -> dict[str, float]:
        """The user's inferred strengths, decayed to ``now``. Without consent, behaviour is not
        even read into the view the model gets, nor into what segment rules read."""
        if not profile.consent.inferred_personalization:
            return {}
        return {s.topic: decay(s, now, self._half_life) for s in profile.signals}

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
        return self._outcomes.record(report)


# The decision counters' labelled children, each made once (see ``metrics.children``).
_decisions_counter = metrics.children(metrics.DECISIONS)  # channel, arm, hold reason
_served_counter = metrics.children(metrics.OFFERS_SERVED)  # channel, arm
_choices_counter = metrics.children(metrics.CHOICES)  # reason code


def _fresh_replay(inputs: DecisionInputs, now: float, policy: PolicySettings) -> str | None:
    """The decision a request_id points to, if it was made within
    TACTFUL_REQUEST_ID_TTL_SECONDS; an older one is a new request."""
    made_at = inputs.replay_made_at
    if made_at is not None and now - made_at > policy.request_id_ttl_seconds:
        return None
    return inputs.replay_decision_id or None
