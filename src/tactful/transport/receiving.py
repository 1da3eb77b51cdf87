"""A call gets a thread only once its request message has arrived.

gRPC's synchronous server hands each call to its thread pool as the call starts, and the
thread then waits for the request message: a client that opens calls and never sends their
message holds the threads (four calls, four threads), and its calls count against the RPC
limit, so a handful of them turn every other call away, health checks included.

``ReceiveFirst``, given to the server as its thread pool, takes that hand-off apart: it asks
gRPC's core to receive a call's (first) request message and gives the call to a thread only
when the message is there. Until then the call holds no thread (gRPC's own I/O threads receive
it) and no place in the limit on calls at once; if its message has not arrived within the
receive time limit, the call is ended with CANCELLED. The limit (TACTFUL_MAX_CONCURRENT_RPCS)
is applied as a message arrives, in gRPC's serving thread: a call past it is refused there,
RESOURCE_EXHAUSTED, without a thread. (A call that streams its requests waits for the next
ones in its thread: ``requests_within`` bounds each wait.)

Why not grpc.aio (requests received on an event loop, the core run in a thread pool), which
does the same with public APIs only: on a machine of few cores its event loop competes for
the GIL with the threads running Decide and accepts calls one after another, so past
capacity far fewer calls are answered within their deadline (bench/README.md, "Other
measured figures").

What this leans on is gRPC's private server module (grpc/_server.py, grpcio pinned in
pyproject.toml): the arguments its server gives submit(), a call's state and its receive
callback. ``check()`` verifies at start-up that they are there, and
tests/test_transport_limits.py goes through every path.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc import _server as _grpc
from grpc._cython import cygrpc

from tactful.metrics import GRPC_UNSERVED

log = logging.getLogger(__name__)

#: A behavior with this attribute set answers without reading the request (auth's refusals):
#: it is given a thread at once, so a refused call is answered at once.
ANSWERS_UNREAD = "tactful_answers_unread"

_USED = (
    "_unary_response_in_pool",
    "_stream_response_in_pool",
    "_unary_request",
    "_receive_message",
    "_abort",
    "_is_rpc_state_active",
    "_RECEIVE_MESSAGE_TOKEN",
    "_CLOSED",
    "_EMPTY_FLAGS",
)


def check() -> None:
    """Raises RuntimeError when the installed grpcio lacks what this module uses."""
    missing = [name for name in _USED if not hasattr(_grpc, name)]
    if missing:
        raise RuntimeError(
            f"grpcio {grpc.__version__} lacks grpc._server.{', '.join(missing)}: "
            "tactful.transport.receiving needs the grpcio version pyproject.toml pins"
        )


class Watchdog:
    """Runs a callback when its time limit has passed, unless it was cancelled first: for
    calls waiting for a message. Entries are kept by time limit, each queue in the order of
    its deadlines (an entry joins the queue of its limit last), so adding and cancelling one
    is a dict operation, and one daemon thread wakes only when the oldest entry of a queue is
    due (at most every ``GRANULARITY`` seconds): a call whose message comes in time costs the
    thread nothing, where a timer a call would wake it for every call."""

    GRANULARITY = 0.05

    def __init__(self) -> None:
        self._queues: dict[float, dict[int, tuple[float, Callable[[], None]]]] = {}
        self._condition = threading.Condition(threading.Lock())
        self._keys = itertools.count()
        self.pid = os.getpid()
        threading.Thread(target=self._run, name="receive-watchdog", daemon=True).start()

    def after(self, seconds: float, callback: Callable[[], None]) -> tuple[float, int]:
        key = next(self._keys)
        with self._condition:
            queue = self._queues.setdefault(seconds, {})
            queue[key] = (time.monotonic() + seconds, callback)
            if len(queue) == 1:
                self._condition.notify()  # the thread may be waiting for nothing
        return seconds, key

    def cancel(self, entry: tuple[float, int]) -> None:
        seconds, key = entry
        with self._condition:
            self._queues[seconds].pop(key, None)

    def _due(self) -> tuple[list[Callable[[], None]], float | None]:
        """The callbacks due now, taken out of their queues, and when the next one is."""
        now = time.monotonic()
        due: list[Callable[[], None]] = []
        wake: float | None = None
        for queue in self._queues.values():
            while queue:
                key, (deadline, callback) = next(iter(queue.items()))
                if deadline > now:
                    wake = deadline if wake is None else min(wake, deadline)
                    break
                del queue[key]
                due.append(callback)
        return due, wake

    def _run(self) -> None:
        while True:
            with self._condition:
                due, wake = self._due()
                if not due:
                    timeout = None if wake is None else wake - time.monotonic()
                    self._condition.wait(
                        None if timeout is None else max(timeout, self.GRANULARITY)
                    )
                    continue
            for callback in due:
                try:
                    callback()
                except Exception:
                    log.exception("receive time limit callback failed")


_watchdog_lock = threading.Lock()
_watchdog: Watchdog | None = None


def watchdog() -> Watchdog:
    """The process's watchdog, started on first use (again in a forked child)."""
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None or _watchdog.pid != os.getpid():
            _watchdog = Watchdog()
        return _watchdog


class ReceiveFirst(futures.ThreadPoolExecutor):
    """A thread pool for gRPC's synchronous server that gives a call a thread only once its
    request message has arrived (see the module's docstring).

    ``max_in_flight`` (0: no limit): calls holding a thread or waiting for one, counted from
    the arrival of their message until their thread is done with them (a call whose caller
    has gone still counts while its thread works, so cancelled calls cannot pile work up)."""

    def __init__(
        self,
        *,
        max_workers: int,
        receive_timeout: float,
        max_in_flight: int = 0,
        thread_name_prefix: str = "rpc",
    ) -> None:
        check()
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._receive_timeout = receive_timeout
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._lock = threading.Lock()
        self._too_slow = (
            f"no request message within {receive_timeout * 1000:.0f} ms "
            "(TACTFUL_GRPC_RECEIVE_TIMEOUT_MS)"
        ).encode()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        # gRPC's server calls submit(state.context.run, _unary_response_in_pool or
        # _stream_response_in_pool, rpc_event, state, behavior, argument_thunk,
        # request_deserializer, response_serializer). The thunk of a method with one request
        # message is _unary_request's closure, which waits for the message; that of a method
        # with a stream of them returns the stream, whose first read waits for one.
        if (
            kwargs
            or len(args) != 7
            or args[0] not in (_grpc._unary_response_in_pool, _grpc._stream_response_in_pool)
        ):
            return super().submit(fn, *args, **kwargs)
        in_pool, rpc_event, state, behavior, thunk, deserialize, serialize = args
        if getattr(behavior, ANSWERS_UNREAD, False):
            return super().submit(fn, in_pool, rpc_event, state, behavior, _unread, None, None)
        unary = getattr(thunk, "__qualname__", "") == "_unary_request.<locals>.unary_request"

        def run(first: Any) -> futures.Future[Any]:
            """The call, on a thread, with ``first``: its request (None: a stream that
            ended without one)."""
            if unary:
                argument: Callable[[], Any] = lambda: first  # noqa: E731
            elif first is None:
                argument = lambda: iter(())  # noqa: E731
            else:
                argument = lambda: itertools.chain((first,), thunk())  # noqa: E731
            return super(ReceiveFirst, self).submit(
                fn, in_pool, rpc_event, state, behavior, argument, deserialize, serialize
            )

        return self._receive_first(rpc_event.call, state, deserialize, run, unary=unary)

    def _receive_first(
        self,
        call: Any,
        state: Any,
        deserialize: Callable[[bytes], Any] | None,
        run: Callable[[Any], futures.Future[Any]],
        *,
        unary: bool,
    ) -> futures.Future[None]:
        """Receive the first request without a thread, then ``run(request)`` in one."""
        done: futures.Future[None] = futures.Future()
        receive = _grpc._receive_message(state, call, deserialize)  # gRPC's own bookkeeping

        def expire() -> None:
            with state.condition:
                if _grpc._RECEIVE_MESSAGE_TOKEN in state.due and _grpc._is_rpc_state_active(state):
                    GRPC_UNSERVED.labels("receive_timeout").inc()  # before the caller can see it
                    _grpc._abort(state, call, cygrpc.StatusCode.cancelled, self._too_slow)

        dog = watchdog()
        timer = dog.after(self._receive_timeout, expire)

        def on_message(event: Any) -> Any:  # in gRPC's serving thread
            dog.cancel(timer)
            result = receive(event)
            with state.condition:
                request, state.request = state.request, None
                proceed = _grpc._is_rpc_state_active(state)  # else over: too late, cancelled
                if proceed and request is None and state.client is _grpc._CLOSED and unary:
                    # Half-closed without a message.
                    GRPC_UNSERVED.labels("no_request").inc()  # before the caller can see it
                    _grpc._abort(state, call, cygrpc.StatusCode.unimplemented, _NO_REQUEST)
                    proceed = False
                if proceed and not self._take_slot():
                    GRPC_UNSERVED.labels("busy").inc()  # before the caller can see it
                    _grpc._abort(state, call, cygrpc.StatusCode.resource_exhausted, _BUSY)
                    proceed = False
            if proceed:
                run(request).add_done_callback(lambda _: self._free_slot(done))
            else:
                done.set_result(None)
            return result

        with state.condition:
            call.start_server_batch(
                (cygrpc.ReceiveMessageOperation(_grpc._EMPTY_FLAGS),), on_message
            )
            state.due.add(_grpc._RECEIVE_MESSAGE_TOKEN)
        return done

    def _take_slot(self) -> bool:
        with self._lock:
            if self._max_in_flight and self._in_flight >= self._max_in_flight:
                return False
            self._in_flight += 1
            return True

    def _free_slot(self, done: futures.Future[None]) -> None:
        with self._lock:
            self._in_flight -= 1
        done.set_result(None)


def _unread() -> bytes:
    return b""


_NO_REQUEST = b"a call of this method needs one request message"
_BUSY = b"server busy: too many calls at once (TACTFUL_MAX_CONCURRENT_RPCS); retry with backoff"


def requests_within(
    behavior: Callable[[Iterator[Any], grpc.ServicerContext], Any], seconds: float
) -> Callable[[Iterator[Any], grpc.ServicerContext], Any]:
    """A stream-request behavior whose call is cancelled when a request message it waits for
    does not come within ``seconds``: its thread is then free again."""

    def limited(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        dog = watchdog()

        def timed() -> Iterator[Any]:
            while True:
                timer = dog.after(seconds, context.cancel)
                try:
                    request = next(requests)
                except StopIteration:
                    return
                finally:
                    dog.cancel(timer)
                yield request

        return behavior(timed(), context)

    return limited
