"""What every `tactful serve` process builds, one process or several: Redis clients, the
store, the learner thread, the SIGTERM/SIGINT handler and the wait for it."""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

from tactful.settings import Settings

if TYPE_CHECKING:
    from tactful.store.redis_store import RedisStore
    from tactful.transport.server import Running

log = logging.getLogger("tactful")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
#: With several processes, each line says which one wrote it.
PROCESS_LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s %(message)s"
#: How often a main thread waiting for a stop signal wakes up (see ``wait_for_stop``).
WAKE_SECONDS = 0.25
# While Redis is down the learner retries every second; it logs the first failure with its
# traceback, then one line a minute. A learner that ran this long before failing again had
# recovered: that failure starts a new outage.
OUTAGE_LOG_SECONDS = 60.0
RECOVERED_AFTER_SECONDS = 30.0


def client(settings: Settings, url: str) -> Any:
    from tactful.store.wire import connect

    return connect(
        url,
        socket_timeout=settings.redis.socket_timeout_ms / 1000,
        connect_timeout=settings.redis.connect_timeout_ms / 1000,
        max_connections=settings.redis.max_connections,
        retries=0,  # the store retries what may be sent again, within each call's budget
    )


def learner_client(settings: Settings, url: str) -> Any:
    """The learner is not on a render path: it can wait for a busy Redis longer."""
    from tactful.store.wire import connect

    return connect(url, socket_timeout=5.0, connect_timeout=2.0, max_connections=4)


def redis_store(settings: Settings, url: str) -> RedisStore:
    from tactful.store.redis_store import RedisStore

    return RedisStore.for_settings(client(settings, url), settings)


#: How long a bulk command's batch may wait for Redis (retries included): nobody renders a page
#: while it waits, and a batch of 500 profiles is one round trip.
BULK_BUDGET_SECONDS = 10.0


def bulk_store(settings: Settings, url: str) -> RedisStore:
    """A store for a bulk command (import, export): the learner's patient client (a batch of
    500 users is not a render-path call) and no circuit breaker (every error is worth seeing)."""
    from tactful.store.redis_store import RedisStore

    return RedisStore.for_settings(
        learner_client(settings, url),
        settings,
        breaker=False,
        write_budget_seconds=BULK_BUDGET_SECONDS,
    )


def start_learner(settings: Settings, url: str, stop: threading.Event) -> threading.Thread:
    from tactful.features import FeatureSpace
    from tactful.learner import Learner
    from tactful.store.model_store import ModelStore

    learner = Learner(
        ModelStore(learner_client(settings, url)),
        FeatureSpace(settings.learning.hashed_bits, settings.learning.feature_set),
        settings.learning,
    )

    def run() -> None:
        failures = 0  # in a row: an outage
        said = 0.0  # when the outage was last logged
        while not stop.is_set():
            started = time.monotonic()
            try:
                learner.run(stop)
            except Exception as exc:  # a Redis outage must not end learning for good
                if time.monotonic() - started >= RECOVERED_AFTER_SECONDS:
                    failures = 0  # it had been working: a new failure, not the same outage
                failures += 1
                if failures == 1:
                    log.exception("learner failed; retrying every second")
                    said = time.monotonic()
                elif time.monotonic() - said >= OUTAGE_LOG_SECONDS:
                    # One line a minute, not a traceback a second, while Redis stays down.
                    log.error("learner still failing (%d attempts): %s", failures, exc)
                    said = time.monotonic()
                stop.wait(1.0)
        log.info("learner stopped")

    thread = threading.Thread(target=run, name="learner", daemon=True)
    thread.start()
    return thread


def stop_on_signals(stop: threading.Event) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def wait_for_stop(stop: threading.Event) -> None:
    """Block the main thread until a signal handler sets ``stop``.

    Not a bare ``stop.wait()``: Python runs signal handlers in the main thread only, and a main
    thread blocked on a lock runs them only if the kernel interrupts that very thread. A signal
    for the process may be taken by any of its threads: a learner process that got a
    terminal's SIGINT and the supervisor's SIGTERM at once had both taken by another thread,
    and its main thread slept on until the supervisor SIGKILLed it. Waking every
    ``WAKE_SECONDS``, the main thread runs a pending handler within that time."""
    while not stop.wait(WAKE_SECONDS):
        pass


def serve_until_stopped(running: Running, settings: Settings, stop: threading.Event) -> None:
    """Serve until SIGTERM/SIGINT, then report NOT_SERVING and drain (TACTFUL_SHUTDOWN_GRACE_
    SECONDS): what every server process does once it is up."""
    from tactful.transport.server import serve_until_signalled

    wait_for_stop(stop)
    serve_until_signalled(running, settings, stop)  # ``stop`` is set: it drains at once
    log.info("gRPC server stopped")
