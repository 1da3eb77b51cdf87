"""A tactful server in a process of its own, for the tests whose client side is busy enough
to starve an in-process server of the GIL (the fuzzing): with the server apart, the two
cores share the work instead of one core doing all of it."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Event

from tactful.settings import Settings
from tactful.transport.server import build_server

from conftest import make_store


def _serve(url: str, settings: Settings, ports: multiprocessing.Queue, stop: Event) -> None:
    store = make_store(url, settings)
    running = build_server(settings, store, port=0)
    ports.put(running.port)
    stop.wait()
    running.stop(None)  # type: ignore[arg-type]


@contextmanager
def server_process(url: str, settings: Settings) -> Iterator[int]:
    """Serve ``settings`` on the Redis at ``url`` from a spawned process; yields its port."""
    context = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue = context.Queue()
    stop = context.Event()
    process = context.Process(target=_serve, args=(url, settings, ports, stop), daemon=True)
    process.start()
    try:
        yield ports.get(timeout=60)
    finally:
        stop.set()
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
