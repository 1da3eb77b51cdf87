"""The core: Decide and ReportOutcome as plain Python.

Nothing here imports gRPC or protobuf; the transport converts messages to the dataclasses of
``tactful.domain`` and calls these objects. Errors are the domain errors of ``tactful.errors``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tactful import hard_rules, metrics, scoring, validation
from tactful import segments as segment_rules
from tactful.bandit import LinearModel, SlateDraws, pick_slate
from tactful.caches import CatalogCache, CatalogSnapshot, ModelCache
from tactful.contact_policy import ContactPolicy, Limits, Window, carried_over, counter_field
from tactful.decision_log import decision_from_log, decision_to_log
from tactful.domain import (
    Arm,
    Choice,
    ContactCounter,
    DecideRequest,
    Decision,
    HoldReason,
    Offer,
    OutcomeReport,
    Profile,
    Signal,
    decay,
)
from tactful.errors import Abandoned, Aborted, Unavailable
from tactful.fallback import without_store
from tactful.features import RequestContext, SparseVector, squash
from tactful.hard_rules import HardRules, RecentRules
from tactful.outcomes import Outcomes
from tactful.privacy import Pseudonymizer, in_control_group
from tactful.segment_book import SegmentBook, with_segment
from tactful.settings import PolicySettings, Settings
from tactful.store import (
    ContactSpend,
    DecisionInputs,
    LoggedDecision,
    RequestTaken,
    Store,
)

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
        self._draws = SlateDraws(secrets.randbits(63) if seed < 0 else seed)
        self._contacts = ContactPolicy(settings.contact)
        self._recent = recent or RecentRules()
        self._outcomes = Outcomes(store, catalog, self._contacts, clock)
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
        eligible = hard_rules.eligible(
            hard_rules.candidates(req, offers), req.channel, now, rules, book, members
        )
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
                    with_segment(book, o, members, (scoring.CONTROL_REASON,)),
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
            self._draws.generator(req.user_id, req.request_id or decision_id),
        )
        # Choices are listed best score first, whatever order the slots were drawn in.
        picks.sort(key=lambda pick: (-scores[pick.index], eligible[pick.index].offer_id))
        choices = tuple(
            Choice(
                eligible[pick.index].offer_id,
                float(scores[pick.index]),
                pick.propensity,
                with_segment(
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

    def _decayed(self, signals: Sequence[Signal], now: float) -> dict[str, float]:
        return {s.topic: decay(s, now, self._half_life) for s in signals}

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
        return self._outcomes.record(report)


# The decision counters' labelled children, each made once (see ``metrics.children``).
_decisions_counter = metrics.children(metrics.DECISIONS)  # channel, arm, hold reason
_served_counter = metrics.children(metrics.OFFERS_SERVED)  # channel, arm
_choices_counter = metrics.children(metrics.CHOICES)  # reason code


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
