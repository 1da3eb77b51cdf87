"""ReportOutcome: an outcome stored against its logged decision, and the cooldown a
dismissal starts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tactful import metrics, validation
from tactful.caches import CatalogCache
from tactful.contact_policy import ContactPolicy
from tactful.domain import Arm, Offer, OutcomeEvent, OutcomeReport
from tactful.errors import FieldViolation, InvalidArgument, NotFound
from tactful.store import OutcomeStatus, Store

# Arms as the decision log spells them: what an outcome's arm label may be (a record written
# by another version with something else is not counted by arm).
_ARMS = frozenset(arm.name for arm in Arm)


class Outcomes:
    def __init__(
        self,
        store: Store,
        catalog: CatalogCache,
        contacts: ContactPolicy,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._contacts = contacts
        self._clock = clock

    def record(self, report: OutcomeReport) -> bool:
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
        # The owner is kept beside the record; one that carries it inside, as user_key, counts too.
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
