"""The API contract: enum numbers shared by the domain and the protos, and no breaking change
to the names and numbers clients are written against (buf breaking, see buf.yaml)."""

from __future__ import annotations

import enum
import subprocess
import sys
from pathlib import Path

import pytest

from tactful import domain
from tactful.v1 import decisioning_pb2, profiles_pb2

ROOT = Path(__file__).resolve().parent.parent
RELEASED = "proto/released/tactful-v1.binpb"
# The buf CLI of the dev extra (buf-bin), installed next to this interpreter.
BUF = Path(sys.executable).parent / "buf"


@pytest.mark.parametrize(
    ("domain", "proto", "prefix"),
    [
        (domain.ReasonCode, decisioning_pb2.ReasonCode, "REASON_CODE_"),
        (domain.HoldReason, decisioning_pb2.HoldReason, "HOLD_REASON_"),
        (domain.Arm, decisioning_pb2.Arm, "ARM_"),
        (domain.OutcomeEvent, decisioning_pb2.OutcomeEvent, "OUTCOME_EVENT_"),
        (domain.Stance, profiles_pb2.Stance, "STANCE_"),
        (domain.AttributeSource, profiles_pb2.AttributeSource, "ATTRIBUTE_SOURCE_"),
    ],
)
def test_domain_enums_mirror_the_protos(domain: type[enum.IntEnum], proto, prefix: str):
    wire = {name.removeprefix(prefix): number for name, number in proto.items()}
    wire.pop("UNSPECIFIED")
    ours = {member.name: member.value for member in domain if member.value != 0}
    assert ours == wire


def test_no_breaking_change_since_the_released_contract():
    """FILE rules: nothing released is deleted, renamed, renumbered or moved; adding is fine."""
    result = subprocess.run(
        [str(BUF), "breaking", "--against", RELEASED],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (
        f"buf breaking --against {RELEASED}:\n{result.stdout}{result.stderr}"
    )
