"""The deadline of the call being served, for the layers below the transport.

The transport knows how long its caller waits (gRPC carries the deadline); the store needs it
to size each Redis budget (a render-time read never waits past it, a write waits as long as it
allows). Rather than threading a parameter through every core and store method, the transport
sets it here for the duration of the call, in the thread that runs it (a ``ContextVar``: each
serving thread sees its own call's deadline, and code run outside any call sees none).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar

#: ``time.monotonic()`` at which the caller stops waiting; None: no deadline (or no call).
_CALL_DEADLINE: ContextVar[float | None] = ContextVar("tactful_call_deadline", default=None)


@contextlib.contextmanager
def call_deadline(seconds_left: float | None) -> Iterator[None]:
    """Within this block, the call being served ends ``seconds_left`` from now (None: never)."""
    at = None if seconds_left is None else time.monotonic() + seconds_left
    token = _CALL_DEADLINE.set(at)
    try:
        yield
    finally:
        _CALL_DEADLINE.reset(token)


def seconds_left() -> float | None:
    """What is left of the current call's deadline (negative once it passed); None: none."""
    at = _CALL_DEADLINE.get()
    return None if at is None else at - time.monotonic()
