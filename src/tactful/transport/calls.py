"""How every call is served: its request message received on the event loop within
TACTFUL_GRPC_RECEIVE_TIMEOUT_MS, the API's blocking work run in a bounded thread pool once the
request is there, domain errors turned into statuses, and the gRPC server metrics.

Why not gRPC's thread-per-call server: it hands a call a thread as soon as the call starts,
and the thread then waits for the request message. A client that opens calls and never sends
their message holds the threads (four calls, four threads), and its calls count against the
RPC limit, so a handful of them turn every other call away, health checks included. Here the
event loop waits for the messages, which costs it nothing; a thread is given to a call only
once its request has arrived, and TACTFUL_MAX_CONCURRENT_RPCS counts only those calls.

Each unary method is served as a client-streaming one (the two are the same on the wire), so
that the handler, not gRPC, reads the request and can stop waiting for it. The core
(``Decider``, ``ProfileService``, ``CatalogService``) is plain synchronous Python that blocks
on Redis: it runs in the pool with a ``CallContext``, never on the loop, and the status it
ends with is sent from the loop (gRPC's asyncio ``abort()`` is a coroutine of the loop's).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from tactful import deadline, metrics
from tactful.errors import FieldViolation, InvalidArgument, TactfulError
from tactful.transport import statuses
from tactful.transport.auth import Authenticator, rate_limited
from tactful.transport.statuses import Failure

log = logging.getLogger(__name__)

#: A call whose deadline passed while it waited for a thread: doing the work now would only
#: make the next calls late too.
LATE = Failure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed in queue")
BUSY = Failure(
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    "server busy: too many calls at once (TACTFUL_MAX_CONCURRENT_RPCS); retry with backoff",
)
NO_REQUEST = Failure(
    grpc.StatusCode.INVALID_ARGUMENT, "a unary call takes exactly one request message"
)
INTERNAL = Failure(grpc.StatusCode.INTERNAL, "internal error")
STOPPING = Failure(grpc.StatusCode.UNAVAILABLE, "the server is stopping: retry")


class CallContext:
    """What a servicer may ask of its call, from the pool thread it runs in."""

    __slots__ = ("_active", "_deadline")

    def __init__(self, time_remaining: float | None) -> None:
        self._deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self._active = True

    def time_remaining(self) -> float | None:
        """Seconds until the caller's deadline (None: it set none)."""
        return None if self._deadline is None else self._deadline - time.monotonic()

    def is_active(self) -> bool:
        """False once the caller has cancelled or gone, or the server has stopped the call."""
        return self._active

    def abandon(self) -> None:
        self._active = False


class Meter:
    """The gRPC server metrics of one method, its children looked up once (``labels()`` takes a
    lock and builds a key on every call)."""

    def __init__(self, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        self._labels = ("unary", service, method)
        self.started = metrics.GRPC_STARTED.labels(*self._labels)
        self.latency = metrics.GRPC_HANDLING_SECONDS.labels(*self._labels)
        self._handled: dict[grpc.StatusCode, Counter] = {}

    def handled(self, code: grpc.StatusCode, seconds: float | None) -> None:
        """A call ended with ``code``, ``seconds`` after its request arrived (None: it was
        answered without one, and its time is the client's, not the server's)."""
        if seconds is not None:
            self.latency.observe(seconds)
        counter = self._handled.get(code)
        if counter is None:
            counter = self._handled[code] = metrics.GRPC_HANDLED.labels(*self._labels, code.name)
        counter.inc()


class Calls:
    """Serves the calls of one server: see the module's docstring."""

    def __init__(
        self,
        *,
        pool: futures.ThreadPoolExecutor,
        receive_timeout: float,
        max_in_flight: int,
        authenticator: Authenticator | None,
    ) -> None:
        self.pool = pool
        self.authenticator = authenticator
        self._receive_timeout = receive_timeout
        self.too_slow = Failure(
            grpc.StatusCode.CANCELLED,
            f"no request message within {receive_timeout * 1000:.0f} ms "
            "(TACTFUL_GRPC_RECEIVE_TIMEOUT_MS)",
        )
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._lock = threading.Lock()

    def api(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """A servicer's unary handler, served as the module's docstring says."""
        return grpc.stream_unary_rpc_method_handler(ApiCall(self, full_method, handler).serve)

    def take_slot(self) -> bool:
        with self._lock:
            if self._max_in_flight and self._in_flight >= self._max_in_flight:
                return False
            self._in_flight += 1
            return True

    def free_slot(self, _: object = None) -> None:
        with self._lock:
            self._in_flight -= 1

    async def receive(self, context: Any) -> bytes | None:
        """The call's next request message; None at the end of its requests. Raises
        TimeoutError when it does not arrive within the time limit."""
        async with asyncio.timeout(self._receive_timeout):
            message = await context.read()
        return None if message is grpc.aio.EOF else message

    async def end(self, context: Any, answer: Failure) -> NoReturn:
        """Ends the call with ``answer``: raises gRPC's AbortError, as abort() does, or
        CancelledError when gRPC had ended the call already."""
        try:
            await context.abort(answer.code, answer.details, answer.trailing_metadata)
        except grpc.aio.AbortError:
            raise
        except Exception:
            # The call was over before a message arrived: one past the size limit (gRPC
            # refused it with RESOURCE_EXHAUSTED) or a client that left. Nothing to send;
            # gRPC takes a cancelled handler quietly.
            raise asyncio.CancelledError from None
        raise AssertionError("unreachable")  # pragma: no cover - abort() raises

    def refuse_unknown(self) -> grpc.GenericRpcHandler:
        """Last in line: a method no service has is refused like a known one (a caller with a
        key that may call anything learns it is UNIMPLEMENTED). Not counted in the metrics: a
        made-up name must not become a label value."""
        return _Unknown(self.authenticator)


def decode(deserialize: Callable[[bytes], Any] | None, data: bytes) -> Any:
    """The request message; bytes that are no such message are the caller's mistake,
    INVALID_ARGUMENT (gRPC itself would answer INTERNAL)."""
    if deserialize is None:
        return data
    try:
        return deserialize(data)
    except DecodeError as error:
        # The whole request is at fault, so the violation names no field; the error names
        # the message type ("Error parsing message with type 'tactful.v1...'").
        raise InvalidArgument([FieldViolation("", f"undecodable request: {error}")]) from None


class ApiCall:
    """One method of the API: the steps of each of its calls."""

    def __init__(self, calls: Calls, full_method: str, handler: grpc.RpcMethodHandler) -> None:
        self._calls = calls
        self._method = full_method
        self._behavior = handler.unary_unary
        self._deserialize = handler.request_deserializer
        self._serialize = handler.response_serializer
        self._meter = Meter(full_method)

    async def serve(self, _: object, context: Any) -> bytes:
        meter = self._meter
        meter.started.inc()
        received: float | None = None

        def handled(code: grpc.StatusCode) -> None:
            meter.handled(code, None if received is None else time.perf_counter() - received)

        try:
            admitted = await self._admit_and_receive(context)
            if isinstance(admitted, Failure):  # (a NamedTuple: asked first)
                answer: bytes | Failure = admitted
            else:
                received = time.perf_counter()
                answer = await self._work(context, *admitted)
        except asyncio.CancelledError:  # the caller has gone, or the server stopped the call
            handled(grpc.StatusCode.CANCELLED)
            raise
        # Counted before the answer goes out: a caller that has it finds it counted.
        if isinstance(answer, bytes):
            handled(grpc.StatusCode.OK)
            return answer
        if answer is not NO_REQUEST:
            handled(answer.code)
            await self._calls.end(context, answer)
        try:
            await self._calls.end(context, answer)
        except asyncio.CancelledError:  # over already: a message past the size limit
            handled(grpc.StatusCode.CANCELLED)
            raise
        except grpc.aio.AbortError:
            handled(answer.code)
            raise

    async def _admit_and_receive(self, context: Any) -> tuple[bytes, bytes | None] | Failure:
        """The request and the caller's key digest; or the refusal to end the call with."""
        calls = self._calls
        caller: bytes | None = None
        if calls.authenticator is not None:
            admitted = calls.authenticator.admit(self._method, context.invocation_metadata())
            if isinstance(admitted, Failure):
                return admitted
            caller = admitted
        try:
            request = await calls.receive(context)
        except TimeoutError:
            return calls.too_slow
        if request is None:
            return NO_REQUEST
        return request, caller

    async def _work(self, context: Any, request: bytes, caller: bytes | None) -> bytes | Failure:
        """A slot, then a thread for the call."""
        calls = self._calls
        if not calls.take_slot():
            return BUSY
        work = CallContext(context.time_remaining())
        try:
            job = calls.pool.submit(self._run, request, work, caller)
        except RuntimeError:  # the pool is shut down: the server is stopping
            calls.free_slot()
            return STOPPING
        # The slot is free once the thread is done with the call, not when the caller goes:
        # a cancelled call's work may still be running.
        job.add_done_callback(calls.free_slot)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            work.abandon()  # the Decide path asks is_active() before it writes
            raise
        except Exception:
            log.exception("unhandled error in %s", self._method)
            return INTERNAL

    def _run(self, request: bytes, context: CallContext, caller: bytes | None) -> bytes | Failure:
        """In a pool thread: everything that may block or take CPU."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return LATE
        authenticator = self._calls.authenticator
        if authenticator is not None:
            wait = authenticator.seconds_to_wait(caller)  # a Redis round trip, with a rate limit
            if wait > 0:
                return rate_limited(wait)
        try:
            # The store sizes its Redis budgets from what is left of the deadline.
            with deadline.call_deadline(context.time_remaining()):
                response = self._behavior(decode(self._deserialize, request), context)
        except TactfulError as error:
            return statuses.failure(statuses.to_status(error))
        return self._serialize(response)  # type: ignore[no-any-return]


class _Unknown(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, authenticator: Authenticator | None) -> None:
        self._authenticator = authenticator

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if self._authenticator is None:
            return None
        refusal = self._authenticator.admit(details.method, details.invocation_metadata)
        if not isinstance(refusal, Failure):
            return None  # gRPC answers UNIMPLEMENTED

        async def refuse(_: object, context: Any) -> None:
            await context.abort(refusal.code, refusal.details)

        return grpc.stream_unary_rpc_method_handler(refuse)
