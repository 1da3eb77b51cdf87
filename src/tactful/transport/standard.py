"""The standard services' calls (health, reflection): their asyncio servicers run on the event
loop as they are, and only the receiving of their requests is the transport's, within
TACTFUL_GRPC_RECEIVE_TIMEOUT_MS as for the API (transport/calls.py)."""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tactful.errors import InvalidArgument
from tactful.transport import statuses
from tactful.transport.calls import NO_REQUEST, Calls, Meter, decode


def handler(
    calls: Calls, full_method: str, method: grpc.RpcMethodHandler, *, observe: bool
) -> grpc.RpcMethodHandler:
    """A standard service's asyncio method handler, its request messages received within the
    time limit. ``observe``: keep the gRPC metrics of a unary one (health Check)."""
    return StandardCall(calls, full_method, method, observe=observe).handler()


class StandardCall:
    """One method of a standard service, its request messages received within the time limit
    (whatever its streaming shape, gRPC is told it reads a stream, so that it is the handler
    that waits for the messages)."""

    def __init__(
        self, calls: Calls, full_method: str, handler: grpc.RpcMethodHandler, *, observe: bool
    ) -> None:
        self._calls = calls
        self._handler = handler
        self._deserialize = handler.request_deserializer
        self._meter = Meter(full_method) if observe else None

    def handler(self) -> grpc.RpcMethodHandler:
        h = self._handler
        if h.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary, response_serializer=h.response_serializer
            )
        if h.unary_stream is not None or h.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming, response_serializer=h.response_serializer
            )
        return h  # client-streaming, unary answer: none of the standard services has one

    async def _first(self, context: Any) -> Any:
        """The one request of a unary-request method; the call is ended without it."""
        try:
            request = await self._calls.receive(context)
        except TimeoutError:
            await self._calls.end(context, self._calls.too_slow)
        if request is None:
            await self._calls.end(context, NO_REQUEST)
        return await self._decoded(context, request)

    async def _decoded(self, context: Any, data: bytes) -> Any:
        try:
            return decode(self._deserialize, data)
        except InvalidArgument as error:
            await self._calls.end(context, statuses.failure(statuses.to_status(error)))

    async def _requests(self, context: Any) -> AsyncIterator[Any]:
        """The requests of a streaming call, each within the time limit."""
        while True:
            try:
                request = await self._calls.receive(context)
            except TimeoutError:
                await self._calls.end(context, self._calls.too_slow)
            if request is None:
                return
            yield await self._decoded(context, request)

    async def _unary(self, _: object, context: Any) -> Any:
        meter = self._meter
        if meter is None:
            return await self._handler.unary_unary(await self._first(context), context)
        meter.started.inc()
        received: float | None = None
        code = grpc.StatusCode.CANCELLED
        try:
            request = await self._first(context)
            received = time.perf_counter()
            response = await self._handler.unary_unary(request, context)
            code = grpc.StatusCode.OK
            return response
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            meter.handled(code, None if received is None else time.perf_counter() - received)

    async def _streaming(self, _: object, context: Any) -> None:
        h = self._handler
        if h.unary_stream is not None:
            responses = h.unary_stream(await self._first(context), context)
        else:
            responses = h.stream_stream(self._requests(context), context)
        if inspect.isasyncgen(responses):
            async for response in responses:
                await context.write(response)
        else:
            await responses  # the handler writes its responses itself
