"""The asyncio event loop the process's gRPC servers run on, in a thread of its own.

One loop for the whole process, started when the first server is built and kept for the
process's life: grpc.aio binds its completion queue to the loop it first meets, so servers
built and stopped one after another (tests do) must all use that same loop. The rest of the
program stays synchronous and hands coroutines to the loop with ``run``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="grpc-aio", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


_lock = threading.Lock()
_current: LoopThread | None = None


def event_loop() -> LoopThread:
    """The process's loop thread, started on first use (again in a forked child: a thread
    does not survive a fork)."""
    global _current
    with _lock:
        if _current is None or _current.pid != os.getpid():
            _current = LoopThread()
        return _current
