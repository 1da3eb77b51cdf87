"""The decision log's record of a decision: what a replay answers again, what the learner
and the ROI report read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tactful.domain import Arm, Choice, Decision, HoldReason, Reason, ReasonCode


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
