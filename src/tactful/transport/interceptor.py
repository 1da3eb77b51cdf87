"""One server interceptor: gRPC metrics for every unary RPC, and the one place where domain
errors become gRPC statuses (INVALID_ARGUMENT carries google.rpc.BadRequest details).

It also decodes the requests: bytes that are not the method's request message are the
caller's mistake, INVALID_ARGUMENT, where gRPC itself would answer INTERNAL."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import Counter

from tactful import deadline, metrics
from tactful.errors import (
    Abandoned,
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    TactfulError,
    Unavailable,
)

log = logging.getLogger(__name__)


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


class Undecodable:
    """What a request that could not be decoded becomes, so that the handler, not gRPC, answers
    it (gRPC answers INTERNAL, "Exception deserializing request!", and logs a traceback)."""

    __slots__ = ("violation",)

    def __init__(self, violation: FieldViolation) -> None:
        self.violation = violation


def tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The handler's request deserializer, turning a DecodeError into an Undecodable."""
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as error:
            # The whole request is at fault, so the violation names no field; the error
            # names the message type ("Error parsing message with type 'tactful.v1...'").
            return Undecodable(FieldViolation("", f"undecodable request: {error}"))

    return decode


class ServerInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        # gRPC calls intercept_service on every RPC: the wrapped handler (and its metric
        # children) is built once per method and reused.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        wrapped = self._wrapped.get(handler_call_details.method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming RPCs (health Watch, reflection) pass through untouched
        wrapped = self._wrap(handler_call_details.method, handler)
        self._wrapped[handler_call_details.method] = wrapped
        return wrapped

    @staticmethod
    def _wrap(full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, method = full_method.lstrip("/").rpartition("/")
        behavior = handler.unary_unary
        started = metrics.GRPC_STARTED.labels("unary", service, method)
        latency = metrics.GRPC_HANDLING_SECONDS.labels("unary", service, method)
        # The handled counter's children, by status code, looked up once each (labels()
        # takes a lock and builds a key on every call).
        handled: dict[grpc.StatusCode, Counter] = {}

        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            started.inc()
            start = time.perf_counter()
            try:
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    # The caller has given up (it waited in the queue past its deadline):
                    # doing the work now would only make the next calls late too.
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed in queue")
                if isinstance(request, Undecodable):
                    raise InvalidArgument([request.violation])
                # The store sizes its Redis budgets from what is left of it.
                with deadline.call_deadline(remaining):
                    return behavior(request, context)
            except TactfulError as error:
                context.abort_with_status(rpc_status.to_status(to_status(error)))
            except Exception:
                if context.code() is None:  # not an abort() of the servicer's own
                    log.exception("unhandled error in %s", method)
                    context.abort(grpc.StatusCode.INTERNAL, "internal error")
                raise
            finally:
                latency.observe(time.perf_counter() - start)
                code = context.code() or grpc.StatusCode.OK
                counter = handled.get(code)
                if counter is None:
                    counter = metrics.GRPC_HANDLED.labels("unary", service, method, code.name)
                    handled[code] = counter
                counter.inc()

        # A method with a thread pool of its own (health) keeps it.
        pool = getattr(behavior, "experimental_thread_pool", None)
        if pool is not None:
            observed.experimental_thread_pool = pool  # type: ignore[attr-defined]
        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
