"""The one place where domain errors become gRPC statuses: INVALID_ARGUMENT carries
google.rpc.BadRequest details, sized to fit the trailers a client accepts."""

from __future__ import annotations

from typing import NamedTuple

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tactful.errors import (
    Abandoned,
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TactfulError,
    Unavailable,
)

# The status travels in the trailers, which a client refuses past 8 KiB (grpc-python's
# default grpc.max_metadata_size): a refused trailer reaches the caller as RESOURCE_EXHAUSTED,
# "Stream removed", with none of the violations. The message is sent twice (grpc-message,
# percent-encoded: up to 3 bytes a byte; and inside grpc-status-details-bin, base64: 4 bytes
# for 3), the details once, so these budgets keep the whole status near 5 KiB.
MAX_MESSAGE_BYTES = 512
MAX_DETAILS_BYTES = 2048


def _cut(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def bad_request(error: InvalidArgument) -> status_pb2.Status:
    """INVALID_ARGUMENT with a BadRequest of the violations, as many as fit the budget; the
    message says how many were left out (a request with a thousand bad ids has a thousand)."""
    details = error_details_pb2.BadRequest()
    for violation in error.violations:
        details.field_violations.add(
            field=_cut(violation.field, 256), description=_cut(violation.description, 512)
        )
        if details.ByteSize() > MAX_DETAILS_BYTES:
            del details.field_violations[-1]
            break
    shown = len(details.field_violations)
    message = str(InvalidArgument(list(error.violations[:shown])))
    if shown < len(error.violations):
        message = f"{len(error.violations) - shown} more violations not shown; {message}"
    detail = any_pb2.Any()
    detail.Pack(details)
    return status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message=_cut(message, MAX_MESSAGE_BYTES),
        details=[detail],
    )


def to_status(error: TactfulError) -> status_pb2.Status:
    if isinstance(error, InvalidArgument):
        return bad_request(error)
    if isinstance(error, NotFound):
        return status_pb2.Status(code=code_pb2.NOT_FOUND, message=str(error))
    if isinstance(error, FailedPrecondition):
        message = _cut(str(error), MAX_MESSAGE_BYTES)
        return status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=message)
    if isinstance(error, Aborted):
        return status_pb2.Status(code=code_pb2.ABORTED, message=str(error))
    if isinstance(error, Abandoned):
        return status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message=str(error))
    if isinstance(error, Unavailable):
        return status_pb2.Status(
            code=code_pb2.UNAVAILABLE,
            message="the store is unavailable; the request may not have been applied: retry it",
        )
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")


class Failure(NamedTuple):
    """A status other than OK to end a call with."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()


def failure(status: status_pb2.Status) -> Failure:
    """A google.rpc.Status as a Failure: its code and message, and the whole status in the
    grpc-status-details-bin trailer, where a client's rpc_status.from_call finds the details."""
    answer = rpc_status.to_status(status)
    return Failure(answer.code, answer.details, tuple(answer.trailing_metadata))
