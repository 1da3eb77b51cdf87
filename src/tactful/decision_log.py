"""The decision log's record of a decision: what a replay answers again, what the learner
and the ROI report read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tactful.domain import (
    Arm,
    Choice,
    DecideRequest,
    Decision,
    HoldReason,
    Offer,
    Reason,
    ReasonCode,
)
from tactful.features import FloatArray, SparseVector


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


def decision_record(
    decision: Decision,
    req: DecideRequest,
    *,
    now: float,
    user: str,
    segments: list[str] | None,
    candidates: dict[str, Any] | None,
    features: Mapping[str, SparseVector],
) -> dict[str, Any]:
    """The record of ``decision``, made for ``req`` at ``now``. ``user`` is the user's keyed
    pseudonym: whoever holds the log cannot test candidate ids against it (the store keeps
    where the user's keys are beside the record, not in it, so a DISMISS still reaches their
    cooldowns)."""
    payload = decision_to_log(decision)
    payload.update(
        ts=now,
        user=user,
        channel=req.channel,
        placement=req.placement,
        numeric_context=dict(req.numeric_context),
        categorical_context=dict(req.categorical_context),
    )
    if segments is not None:
        # The user's memberships (sensitive ones left out), for per-segment reporting.
        payload["segments"] = segments
    if candidates is not None and decision.choices:
        payload["candidates"] = candidates
    if features:
        # x of the (x, a, r, p) tuple: what the learner regresses the reward on.
        payload["features"] = {offer_id: x.to_json() for offer_id, x in features.items()}
    return payload


def candidates_record(
    offers: Sequence[Offer], predicted: FloatArray, liked: Sequence[bool], slots: int
) -> dict[str, Any]:
    """What an off-policy estimate needs to replay another policy on this request: every
    offer the draw was made from, with the model's predicted reward (without the bonus the
    draw added: "greedy on the current model" ranks by the estimate), the business priority
    and whether the user explicitly likes it (parallel lists: no per-offer objects), and how
    many slots were drawn (with more than one, a choice's propensity is conditional on
    earlier picks; see bandit.py)."""
    return {
        "ids": [o.offer_id for o in offers],
        "scores": predicted.round(6).tolist(),
        "priorities": [o.priority for o in offers],
        "liked": [1 if flag else 0 for flag in liked],  # a third of int(flag)'s time
        "slots": slots,
    }
