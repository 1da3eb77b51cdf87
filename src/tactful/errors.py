"""Domain errors. The transport maps each to one gRPC status in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str  # path in the request message, e.g. "offer.topics[2]"
    description: str


class TactfulError(Exception):
    """Base of the errors a caller can act on."""


class InvalidArgument(TactfulError):
    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = tuple(violations)
        super().__init__(
            "; ".join(
                f"{v.field}: {v.description}" if v.field else v.description for v in violations
            )
        )


class NotFound(TactfulError):
    pass


class FailedPrecondition(TactfulError):
    """The request is well formed but the state does not allow it now (e.g. deleting a
    segment that offers still name); the message says what to change first."""


class Unavailable(TactfulError):
    """The store could not be reached in time. A write may or may not have been applied
    (a reply that came too late is no proof that nothing was done): retrying it is safe for
    every idempotent call, which is every write but RecordSignals."""


class Abandoned(TactfulError):
    """The caller is gone (its deadline passed, or it cancelled): the work stopped before
    anything was written, so no contact was counted for an answer nobody saw."""


class Aborted(TactfulError):
    """The call was in flight while what it writes to was erased (DeleteProfile): nothing was
    written, so nothing of the erased user comes back. Sent again, it is a new write."""
