"""Several server processes on one gRPC port (TACTFUL_WORKERS > 1).

The process `tactful serve` started becomes a supervisor that owns what there is one of: the
embedded redis-server (started before this, stopped after), the metrics directory and the
/metrics endpoint, which sums every process's metrics (prometheus-client multiprocess mode,
``MultiProcessCollector``). It never creates a gRPC object. It starts:

* N workers, each a gRPC server bound to the same port with ``grpc.so_reuseport=1``: the
  kernel hands each new *connection* to one of them (calls on a connection stay on its
  worker), as in grpc's ``examples/python/multiprocessing``;
* with TACTFUL_EMBEDDED_LEARNER, one learner process, so exactly one learner runs whatever
  N is (its Redis lease would make several safe, but they would only wait on each other),
  and its CPU is not taken from a worker's GIL.

Children are *spawned* (a fresh interpreter each), not forked. grpc's example forks before
any gRPC object exists; that holds at the first start, but a child restarted later would be
forked from a supervisor that runs threads (the /metrics server) and has imported grpc.
Spawning makes every start, first or restart, the same safe one; each child also imports
prometheus-client afresh, after PROMETHEUS_MULTIPROC_DIR is set (the value class is chosen at
import). The settings are passed whole, so a random TACTFUL_PSEUDONYM_KEY is the same in
every process.

A child that exits while serving is restarted with exponential backoff (0.5 s doubling to
30 s; the count resets once a child has run 30 s). A child that fails before it first served
stops everything (exit 1): a bad TLS file or a port in use would otherwise restart forever.
SIGTERM or SIGINT: every child gets SIGTERM, workers report NOT_SERVING and drain in-flight
RPCs for TACTFUL_SHUTDOWN_GRACE_SECONDS; the supervisor exits 0 once all have exited cleanly.

Only the supervisor orchestrates that stop. Each child runs in a session of its own, as the
embedded redis-server does, so a terminal's Ctrl-C (SIGINT to its whole foreground process
group) reaches the supervisor alone: a child that got it too would stop on its own at once,
and get the supervisor's SIGTERM on top of it. A child starts with SIGINT and SIGTERM
blocked (the signal mask survives fork and exec; multiprocessing's resource tracker starts
the same way) and unblocks them once it has left the terminal's process group and installed
its handlers: a SIGTERM meanwhile waits for it, a Ctrl-C meanwhile is the supervisor's.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from tactful import runtime
from tactful.settings import Settings

log = logging.getLogger("tactful.workers")

BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
#: A child that ran this long before it exited starts its backoff from the beginning again.
STABLE_SECONDS = 30.0
#: Beyond the drain's grace period: the learner's last checkpoint, interpreter shutdown.
STOP_MARGIN_SECONDS = 10.0
POLL_SECONDS = 0.2
#: Blocked in a child until it has its own session and handlers.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


# --- the children ----------------------------------------------------------------------------


def _child_setup(settings: Settings, supervisor: int) -> threading.Event:
    """First thing in every child (started with STOP_SIGNALS blocked): die with the
    supervisor, leave the terminal's process group, log like the supervisor, handle signals."""
    from tactful.embedded_redis import die_with_parent

    die_with_parent()  # a SIGKILLed supervisor leaves no worker serving on its own
    if os.getppid() != supervisor:  # it died before the line above
        os._exit(1)
    os.setsid()  # a Ctrl-C is the supervisor's to act on (see the module's doc)
    # Drops a Ctrl-C that came before the line above (ignoring a pending signal discards it):
    # the supervisor got it too, and sends SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=settings.server.log_level.upper(), format=runtime.PROCESS_LOG_FORMAT)
    stop = threading.Event()
    runtime.stop_on_signals(stop)  # first: a SIGTERM during start-up still stops cleanly
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    return stop


def run_worker(settings: Settings, url: str, ready: Connection, supervisor: int) -> None:
    """One gRPC server on the shared port, until SIGTERM; then NOT_SERVING and drain."""
    stop = _child_setup(settings, supervisor)
    from tactful.transport.server import build_server

    running = build_server(settings, runtime.redis_store(settings, url), reuse_port=True)
    ready.send(running.port)
    ready.close()
    runtime.serve_until_stopped(running, settings, stop)


def run_learner(settings: Settings, url: str, ready: Connection, supervisor: int) -> None:
    """The one learner, until SIGTERM; then it saves its state (the supervisor stops the
    embedded redis-server only after this process has exited)."""
    stop = _child_setup(settings, supervisor)
    thread = runtime.start_learner(settings, url, stop)
    ready.send(0)
    ready.close()
    runtime.wait_for_stop(stop)
    thread.join(timeout=STOP_MARGIN_SECONDS)


# --- the supervisor --------------------------------------------------------------------------


@dataclass
class _Child:
    name: str
    target: Callable[[Settings, str, Connection, int], None]
    process: SpawnProcess | None = None
    ready: Connection | None = None  # our end of its pipe, until it says it serves
    serving: bool = False  # has served at least once since this start
    started_at: float = 0.0
    quick_exits: int = 0
    restart_at: float | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class Supervisor:
    def __init__(
        self, settings: Settings, url: str, metrics_dir: Path | None, ctx: SpawnContext
    ) -> None:
        self._settings = settings
        self._url = url
        self._metrics_dir = metrics_dir
        self._ctx = ctx
        self._wakeup: socket.socket
        self._writer: socket.socket
        self._previous_wakeup_fd = -1
        self.children = [
            _Child(f"worker {i}", run_worker) for i in range(1, settings.server.workers + 1)
        ]
        if settings.learning.embedded_learner:
            self.children.append(_Child("learner", run_learner))

    def __enter__(self) -> Supervisor:
        # A signal wakes the supervisor's wait at once (its handler only sets a flag).
        self._wakeup, writer = socket.socketpair()
        for end in (self._wakeup, writer):
            end.setblocking(False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(writer.fileno())
        self._writer = writer
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        self._writer.close()
        self._wakeup.close()

    def run(self, stop: threading.Event, store_name: str) -> int:
        server = self._settings.server
        if stop.is_set():  # stopped during start-up, before any child
            return 0
        for child in self.children:
            self._start(child)
        # Start-up: every child must come up once; one that cannot (a TLS file it cannot
        # read, Redis it cannot reach) would fail the same way on every restart.
        while not stop.is_set() and not all(c.serving for c in self.children):
            self._wait(POLL_SECONDS)
            for child in self.children:
                if not child.alive and not child.serving:
                    assert child.process is not None
                    log.error(
                        "%s (pid %d) exited during start-up (%s): stopping",
                        child.name,
                        child.process.pid,
                        _exit_reason(child.process.exitcode),
                    )
                    self._forget(child.process.pid)
                    child.process = None  # said: _stop_all need not say it again
                    self._stop_all()
                    return 1
        if not stop.is_set():
            log.info(
                "tactful serving gRPC on %s:%d, metrics on :%d, store %s; %d worker processes "
                "(pids %s)%s",
                server.host,
                server.grpc_port,
                server.metrics_port,
                store_name,
                server.workers,
                " ".join(str(c.process.pid) for c in self.children[: server.workers] if c.process),
                ", one learner process" if self._settings.learning.embedded_learner else "",
            )
        while not stop.is_set():
            restarts = [c.restart_at for c in self.children if c.restart_at is not None]
            soonest = min(restarts, default=time.monotonic() + POLL_SECONDS)
            self._wait(max(0.0, min(POLL_SECONDS, soonest - time.monotonic())))
            if stop.is_set():
                break
            now = time.monotonic()
            for child in self.children:
                if child.process is not None and not child.alive:
                    self._exited(child, now)
                if child.restart_at is not None and now >= child.restart_at:
                    self._start(child)
        return self._stop_all()

    def _start(self, child: _Child) -> None:
        receive, send = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=child.target,
            args=(self._settings, self._url, send, os.getpid()),
            name=f"tactful {child.name}",
        )
        # The child inherits this thread's signal mask: it starts with STOP_SIGNALS blocked
        # (and unblocks them in _child_setup). A signal for the supervisor meanwhile goes to
        # another of its threads, or waits: its handler runs either way. The resource tracker
        # every spawn needs is started first: starting it ends with SIG_UNBLOCK of these
        # very signals (CPython 3.11), which would undo the block for the first child.
        resource_tracker.ensure_running()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        send.close()  # the child holds the only writer: its exit shows as end of file
        child.process, child.ready, child.serving = process, receive, False
        child.started_at, child.restart_at = time.monotonic(), None
        log.info("%s started (pid %d)", child.name, process.pid)

    def _wait(self, timeout: float) -> None:
        """Until a child exits or reports ready, or ``timeout`` (signals only set a flag)."""
        objects: list[Any] = [c.ready for c in self.children if c.ready is not None]
        objects += [c.process.sentinel for c in self.children if c.alive and c.process]
        if self._wakeup in wait([self._wakeup, *objects], timeout):
            with contextlib.suppress(OSError):
                self._wakeup.recv(4096)
        for child in self.children:
            if child.ready is not None and child.ready.poll():
                with contextlib.suppress(EOFError, OSError):
                    child.ready.recv()
                    child.serving = True
                child.ready.close()
                child.ready = None

    def _exited(self, child: _Child, now: float) -> None:
        process = child.process
        assert process is not None
        child.process = None
        if child.ready is not None:
            child.ready.close()
            child.ready = None
        self._forget(process.pid)
        uptime = now - child.started_at
        child.quick_exits = child.quick_exits + 1 if uptime < STABLE_SECONDS else 1
        delay = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (child.quick_exits - 1))
        child.restart_at = now + delay
        log.warning(
            "%s (pid %d) exited unexpectedly (%s) after %.1f s; restarting it in %.1f s",
            child.name,
            process.pid,
            _exit_reason(process.exitcode),
            uptime,
            delay,
        )

    def _forget(self, pid: int | None) -> None:
        """A dead process's ``live*`` gauges leave /metrics; its counters stay in the sums."""
        if self._metrics_dir is not None and pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]

    def _stop_all(self) -> int:
        """SIGTERM to every child; 0 once all have exited cleanly within the grace period. A
        child that had exited already, not yet seen by the loop, counts too: one that died
        of the signal that stops us (it should not get any but ours) is no clean stop."""
        grace = self._settings.server.shutdown_grace_seconds
        started = [c for c in self.children if c.process is not None]
        running = [c for c in started if c.alive]
        for child in running:
            assert child.process is not None and child.process.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.process.pid, signal.SIGTERM)
        log.info(
            "stopping: SIGTERM to %d processes; in-flight RPCs drain for up to %.1fs",
            len(running),
            grace,
        )
        deadline = time.monotonic() + grace + STOP_MARGIN_SECONDS
        status = 0
        for child in started:
            process = child.process
            assert process is not None
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("%s (pid %d) did not stop in time: SIGKILL", child.name, process.pid)
                process.kill()
                process.join()
            if process.exitcode != 0:
                log.error("%s stopped with %s", child.name, _exit_reason(process.exitcode))
                status = 1
            self._forget(process.pid)
            child.process = None
        for child in self.children:
            if child.ready is not None:
                child.ready.close()
                child.ready = None
        return status


class _Collector(MultiProcessCollector):
    """MultiProcessCollector without the file a starting process has created but not yet
    sized: prometheus-client would read 4 bytes that are not there yet and fail the scrape
    (seen when a restarted worker starts while /metrics is read)."""

    def __init__(self, registry: CollectorRegistry, path: Path) -> None:
        super().__init__(registry, path=str(path))  # type: ignore[no-untyped-call]
        self._dir = path

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in self._dir.glob("*.db"):
            with contextlib.suppress(OSError):  # a live gauge's file removed meanwhile
                if path.stat().st_size > 0:
                    files.append(str(path))
        return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call,no-any-return]


@contextlib.contextmanager
def _held_port(host: str, port: int) -> Iterator[None]:
    """Refuse a port something already listens on (with SO_REUSEPORT the workers would
    silently share it with, say, a second tactful), then hold it for the supervisor's
    lifetime, bound with SO_REUSEPORT but never listening, as grpc's multiprocessing example
    does: no other program takes it while the workers restart."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        probe.bind(address)
    with socket.socket(family, kind, proto) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(address)
        yield


def _fresh_metrics_dir(configured: str, stack: contextlib.ExitStack) -> Path:
    """The multiprocess metrics directory, without files of an earlier run (their counters
    would be summed in, and a reused pid would continue another process's values)."""
    if not configured:
        path = Path(tempfile.mkdtemp(prefix="tactful-metrics-"))
        stack.callback(shutil.rmtree, path, ignore_errors=True)
        return path
    path = Path(configured)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return path


def supervise(settings: Settings, url: str, store_name: str, stop: threading.Event) -> int:
    """Run TACTFUL_WORKERS workers (and the learner) until ``stop`` is set (by the SIGTERM/
    SIGINT handler, ``runtime.stop_on_signals``); the exit status."""
    server = settings.server
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_held_port(server.host, server.grpc_port))
        except OSError as exc:
            log.error("gRPC port %s:%d is not free: %s", server.host, server.grpc_port, exc)
            return 1
        metrics_dir = None
        if server.metrics_port:
            metrics_dir = _fresh_metrics_dir(server.metrics_dir, stack)
            # Inherited by the children, which import prometheus-client after it is set.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
            registry = CollectorRegistry()
            _Collector(registry, metrics_dir)
            http, thread = start_http_server(
                server.metrics_port, addr=server.host, registry=registry
            )
            stack.callback(thread.join, 5.0)
            stack.callback(http.shutdown)
        else:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        ctx = multiprocessing.get_context("spawn")
        with Supervisor(settings, url, metrics_dir, ctx) as supervisor:
            return supervisor.run(stop, store_name)
