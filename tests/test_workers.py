"""`tactful serve` with TACTFUL_WORKERS=2: two worker processes on one port, /metrics summed
over them, a killed worker restarted, and SIGTERM under load draining without a failed call.

The kernel spreads *connections* over the workers (SO_REUSEPORT), so every call here that
must be free to land on either opens a connection of its own (a channel with a local
subchannel pool: channels to one target otherwise share a connection). Which worker answered
is read from each process's own metrics file (``counter_<pid>.db`` in TACTFUL_METRICS_DIR).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from test_metrics import sample, scrape
from test_serve import alive, free_port, start, stop, wait_serving

from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import decisioning_pb2_grpc

DECIDE_OK = (
    'grpc_server_handled_total{grpc_code="OK",grpc_method="Decide",'
    'grpc_service="tactful.v1.Decisioning",grpc_type="unary"}'
)
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def decide(port: int, user: str) -> d.DecideResponse:
    """One Decide on a connection of its own (the kernel picks the worker)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
        stub = decisioning_pb2_grpc.DecisioningStub(channel)
        return stub.Decide(d.DecideRequest(user_id=user, channel="web"), timeout=5)


def decides_by_pid(
    metrics_dir: Path, metric: str = "grpc_server_handled_total", code: str | None = None
) -> Counter[int]:
    """Decide calls each process counted (of one status, or any), from its own file."""
    counts: Counter[int] = Counter()
    for path in metrics_dir.glob("counter_*.db"):
        if path.stat().st_size == 0:  # a starting process has not sized it yet
            continue
        pid = int(path.stem.split("_")[1])
        for family in MultiProcessCollector.merge([str(path)]):
            for s in family.samples:
                if (
                    s.name == metric
                    and s.labels.get("grpc_method") == "Decide"
                    and code in (None, s.labels.get("grpc_code"))
                ):
                    counts[pid] += s.value
    return counts


def until_served_by(port: int, metrics_dir: Path, pids: int, timeout: float = 30) -> int:
    """Decide on fresh connections until ``pids`` processes have answered some since the
    start; returns the number of calls made."""
    before = decides_by_pid(metrics_dir)
    deadline = time.monotonic() + timeout
    calls = 0
    while True:
        for _ in range(10):
            decide(port, f"user-{calls}")
            calls += 1
        served = decides_by_pid(metrics_dir) - before
        if len(served) >= pids:
            return calls
        assert time.monotonic() < deadline, f"only {dict(served)} answered in {calls} calls"


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str, Path]]:
    """One TACTFUL_WORKERS=2 server for the tests that leave it running: (port, /metrics
    URL, metrics dir)."""
    root = tmp_path_factory.mktemp("workers")
    port, metrics_port = free_port(), free_port()
    process = start(
        root / "data",
        port,
        TACTFUL_WORKERS="2",
        TACTFUL_METRICS_PORT=str(metrics_port),
        TACTFUL_METRICS_DIR=str(root / "metrics"),
    )
    try:
        wait_serving(port, process)
        yield port, f"http://127.0.0.1:{metrics_port}/metrics", root / "metrics"
    finally:
        output = stop(process)
    assert "worker processes" in output


def test_two_workers_answer_on_one_port_and_metrics_add_them_up(workers):
    port, metrics_url, metrics_dir = workers
    scraped_before = sample(scrape(metrics_url), DECIDE_OK)
    by_pid_before = decides_by_pid(metrics_dir)
    calls = until_served_by(port, metrics_dir, pids=2)
    served = decides_by_pid(metrics_dir) - by_pid_before

    assert len(served) == 2  # two processes answered, on one port
    assert sum(served.values()) == calls
    # The supervisor's /metrics sums the processes' files.
    assert sample(scrape(metrics_url), DECIDE_OK) == scraped_before + calls


def test_a_killed_worker_is_restarted_and_service_goes_on(workers):
    port, _, metrics_dir = workers
    until_served_by(port, metrics_dir, pids=2)
    known = set(decides_by_pid(metrics_dir))
    victim = max(decides_by_pid(metrics_dir).items(), key=lambda item: item[1])[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive(victim):  # until the supervisor reaped it
        assert time.monotonic() < deadline
        time.sleep(0.02)

    for i in range(10):  # the other worker answers every new connection meanwhile
        assert decide(port, f"meanwhile-{i}").choices
    # The replacement (a new pid) answers too.
    deadline = time.monotonic() + 30
    while not set(decides_by_pid(metrics_dir)) - known:
        assert time.monotonic() < deadline, "no new worker answered"
        decide(port, "after")


def test_sigterm_under_load_drains_every_call_and_exits_0(tmp_path: Path):
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    process = start(
        tmp_path / "data", port, TACTFUL_WORKERS="2", TACTFUL_METRICS_DIR=str(metrics_dir)
    )
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    try:
        wait_serving(port, process)
        warm_up = until_served_by(port, metrics_dir, pids=2)

        def load(n: int) -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
                call = decisioning_pb2_grpc.DecisioningStub(channel).Decide
                while process.poll() is None:
                    try:
                        call(d.DecideRequest(user_id=f"load-{n}", channel="web"), timeout=5)
                        code = "OK"
                    except grpc.RpcError as error:
                        code = error.code().name
                        time.sleep(0.01)
                    with lock:
                        codes[code] += 1

        threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        output = stop(process)  # asserts exit status 0
        for thread in threads:
            thread.join(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert "SIGTERM to 3 processes" in output  # two workers and the learner

    # Calls either completed or were refused before any handler started them: UNAVAILABLE
    # once a worker's listener closed, or CANCELLED by gRPC for a call that reached a worker
    # after its stop() began. None was cut off in flight: every call a worker started, it
    # finished OK, and every OK it counted reached the client.
    assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, codes
    started = sum(decides_by_pid(metrics_dir, "grpc_server_started_total").values())
    handled = sum(decides_by_pid(metrics_dir).values())
    handled_ok = sum(decides_by_pid(metrics_dir, code="OK").values())
    assert codes["OK"] > 0
    assert started == handled == handled_ok == warm_up + codes["OK"]
