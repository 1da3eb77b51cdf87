"""`tactful serve` as `make serve` runs it: a real process with its own redis-server, the
demo catalog, health, and a clean stop on SIGTERM that keeps the data on disk."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tactful import runtime
from tactful.embedded_redis import with_parent_death
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import profiles_pb2 as p

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 that no earlier call in this test process handed out: the
    kernel may offer a port again as soon as its probe socket is closed, and a test that asks
    for a gRPC port and then a metrics port got the same one twice (its workers then failed
    to bind: Address already in use)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tactful-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(
    data_dir: Path, port: int, *, new_session: bool = False, **env: str
) -> subprocess.Popen[str]:
    """`tactful serve` with output on its stdout. ``new_session``: in a process group of its
    own, as a terminal's foreground job is, so a test can send it a Ctrl-C (``os.killpg``)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TACTFUL_")}
    environment.update(
        TACTFUL_DATA_DIR=str(data_dir),
        TACTFUL_GRPC_PORT=str(port),
        TACTFUL_METRICS_PORT=str(free_port()),
        TACTFUL_GRPC_HOST="127.0.0.1",
        TACTFUL_AUTH_DISABLED="true",  # as `make serve` (tests/test_auth.py runs one with keys)
        # These tests are about behaviour, not a slow store: on a busy CI machine the render
        # path's 10 ms could turn an answer into a fallback (tests/test_breaker.py and
        # bench/faults.py are about that).
        TACTFUL_REDIS_SOCKET_TIMEOUT_MS="1000",
    )
    environment.update(env)
    return subprocess.Popen(
        # A killed test run leaves no server behind.
        with_parent_death([sys.executable, "-m", "tactful", "serve"]),
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )


def wait_serving(port: int, process: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError("tactful did not become SERVING")


def redis_pid(data_dir: Path) -> int:
    return int((data_dir / "redis.pid").read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM, then SIGKILL if it does not stop in time; asserts a clean exit."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    assert process.returncode == 0, output
    assert "Traceback" not in output, output  # a normal stop is not an error
    return output


def stop_all(*processes: subprocess.Popen[str]) -> None:
    """Stop every process, even when stopping one of them fails."""
    errors = []
    for process in processes:
        try:
            stop(process)
        except AssertionError as error:
            errors.append(error)
    if errors:
        raise errors[0]


def test_serve_answers_from_the_demo_catalog_and_stops_cleanly(data_dir: Path):
    port = free_port()
    process = start(data_dir, port)
    try:
        wait_serving(port, process)
        pid = redis_pid(data_dir)
        assert alive(pid)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            decide = decisioning_pb2_grpc.DecisioningStub(channel).Decide
            response = decide(d.DecideRequest(user_id="alice", channel="web", slots=3))
            assert len(response.choices) == 3 and response.arm
            profiles_pb2_grpc.ProfilesStub(channel).SetPreferences(
                p.SetPreferencesRequest(
                    user_id="alice",
                    topic_preferences=[p.TopicPreference(topic="yoga", stance=p.STANCE_LIKE)],
                )
            )
    finally:
        output = stop(process)
    assert "demo catalog" in output
    assert "alice" not in output  # no user id in clear in the logs
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "the embedded redis-server must stop with tactful"

    # Data is kept on disk: a restart finds the profile, and does not reload the demo.
    process = start(data_dir, port)
    try:
        wait_serving(port, process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            profile = profiles_pb2_grpc.ProfilesStub(channel).GetProfile(
                p.GetProfileRequest(user_id="alice")
            )
            assert [t.topic for t in profile.topic_preferences] == ["yoga"]
            # Every eligible offer, listed by score: exploration cannot hide the liked one.
            liked = decisioning_pb2_grpc.DecisioningStub(channel).Decide(
                d.DecideRequest(user_id="alice", channel="web", slots=10)
            )
            assert liked.choices[0].offer_id == "yoga-mat"
    finally:
        output = stop(process)
    assert "demo catalog" not in output


def log_time(line: str) -> datetime.datetime:
    """When tactful wrote a log line (its LOG_FORMAT starts with asctime)."""
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def redis_shutdown_time(data_dir: Path) -> datetime.datetime:
    """When the embedded redis-server began to shut down, from its own log."""
    log = (data_dir / "redis.log").read_text()
    found = re.search(r"(\d\d \w{3} \d{4} [\d:]{8}\.\d{3}) # User requested shutdown", log)
    assert found, log
    return datetime.datetime.strptime(found[1], "%d %b %Y %H:%M:%S.%f")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "signum"),
    [("1", signal.SIGINT), ("2", signal.SIGINT), ("2", signal.SIGTERM)],
    ids=["one-process-ctrl-c", "workers-ctrl-c", "workers-group-sigterm"],
)
def test_a_signal_to_the_process_group_stops_the_redis_server_last(
    data_dir: Path, workers: str, signum: signal.Signals
):
    """Ctrl-C in a terminal sends SIGINT to its whole foreground process group (and some
    process managers send SIGTERM to a group). Only tactful itself may act on it: the servers
    drain and the learner saves what it learned while the embedded redis-server, which they
    all use until then, still runs; tactful stops it last. No traceback on the way out."""
    port = free_port()
    process = start(data_dir, port, new_session=True, TACTFUL_WORKERS=workers)
    try:
        wait_serving(port, process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = decisioning_pb2_grpc.DecisioningStub(channel)
            shown = stub.Decide(d.DecideRequest(user_id="dora", channel="web"), timeout=5)
            stub.ReportOutcome(  # a reward for the learner to apply and save on the way out
                d.ReportOutcomeRequest(
                    decision_id=shown.decision_id,
                    offer_id=shown.choices[0].offer_id,
                    event=d.OUTCOME_EVENT_CLICK,
                    outcome_id="click-1",
                ),
                timeout=5,
            )
        os.killpg(process.pid, signum)  # the terminal's Ctrl-C: every process of the group
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "Traceback" not in output, output
    redis_log = (data_dir / "redis.log").read_text()
    assert "Received SIGINT" not in redis_log, redis_log  # the terminal's signal missed it
    lines = output.splitlines()
    servers = [line for line in lines if "gRPC server stopped" in line]
    learners = [line for line in lines if "learner stopped" in line]
    assert len(servers) == int(workers) and len(learners) == 1, output
    assert "embedded redis-server stopped" in output, output
    # redis-server was asked to stop only once every server and the learner had stopped.
    assert max(log_time(line) for line in servers + learners) <= redis_shutdown_time(data_dir)


@pytest.mark.slow
def test_a_ctrl_c_while_the_workers_start_stops_them_cleanly(data_dir: Path):
    """A Ctrl-C that comes while a worker process is still starting (importing, before its
    handlers exist) is no KeyboardInterrupt in it: it starts with SIGINT and SIGTERM blocked,
    leaves the terminal's process group, and stops on the supervisor's SIGTERM."""
    process = start(data_dir, free_port(), new_session=True, TACTFUL_WORKERS="2")
    head = []
    try:
        assert process.stdout is not None
        for line in process.stdout:  # until the first worker process exists
            head.append(line)
            if "worker 1 started" in line:
                break
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    output = "".join(head) + output
    assert process.returncode == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "embedded redis-server stopped" in output, output


@pytest.mark.slow
def test_a_killed_tactful_takes_its_redis_server_and_workers_with_it(data_dir: Path):
    """Children in sessions of their own (out of reach of a terminal's Ctrl-C) still die with
    a SIGKILLed tactful: each is told to, by the kernel (PR_SET_PDEATHSIG)."""
    port = free_port()
    process = start(data_dir, port, new_session=True, TACTFUL_WORKERS="2")
    try:
        wait_serving(port, process)
        children = psutil.Process(process.pid).children(recursive=True)
        ours = [  # redis-server, two workers and the learner (not multiprocessing's tracker)
            child
            for child in children
            if child.pid == redis_pid(data_dir) or "spawn_main" in " ".join(child.cmdline())
        ]
        assert len(ours) == 4, [child.cmdline() for child in children]
        assert all(os.getsid(child.pid) == child.pid for child in ours)  # sessions of their own
        process.kill()
        process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    _, left = psutil.wait_procs(children, timeout=20)
    assert not [child for child in left if child.status() != psutil.STATUS_ZOMBIE], left


def test_a_stop_signal_taken_by_another_thread_still_ends_the_wait():
    """Python runs signal handlers in the main thread only, and the kernel may hand a signal
    for the process to any of its threads (two at once were seen to both go to a learner or
    gRPC thread). The main thread waiting for a stop must still run the handler."""
    stop = threading.Event()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    runtime.stop_on_signals(stop)
    # Sent by a thread to itself: its C-level handler runs there, not in the main thread.
    other = threading.Timer(0.1, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGTERM))
    watchdog = threading.Timer(5.0, stop.set)  # a bare stop.wait() would only end here
    try:
        other.start()
        watchdog.start()
        started = time.monotonic()
        runtime.wait_for_stop(stop)
        assert time.monotonic() - started < 2.0
    finally:
        watchdog.cancel()
        other.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_serve_on_a_redis_cluster(data_dir: Path, redis_cluster):
    """TACTFUL_REDIS_URL=redis+cluster://: the server (and its embedded learner) on the
    session's three-master cluster: the demo catalog goes in, a click is learned from."""
    port = free_port()
    process = start(data_dir, port, TACTFUL_REDIS_URL=redis_cluster.url, TACTFUL_CONTROL_SHARE="0")
    try:
        wait_serving(port, process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = decisioning_pb2_grpc.DecisioningStub(channel)
            shown = stub.Decide(d.DecideRequest(user_id="carol", channel="web"))
            assert len(shown.choices) == 1 and shown.model_version == "prior"
            stub.ReportOutcome(
                d.ReportOutcomeRequest(
                    decision_id=shown.decision_id,
                    offer_id=shown.choices[0].offer_id,
                    event=d.OUTCOME_EVENT_CLICK,
                    outcome_id="click-1",
                )
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                again = stub.Decide(d.DecideRequest(user_id="carol", channel="web", dry_run=True))
                if again.model_version.startswith("ridge-"):
                    break
                time.sleep(0.05)
            assert again.model_version.startswith("ridge-")
    finally:
        output = stop(process)
        redis_cluster.flush()
    assert "demo catalog" in output and "external Redis" in output


def test_bad_settings_stop_with_a_clear_message(data_dir: Path):
    process = start(
        data_dir,
        free_port(),
        TACTFUL_GRPC_PORT="http",
        TACTFUL_CONTROL_SHARE="2",
        TACTFUL_CHANNEL_CAPS="email=-1",
        TACTFUL_MIN_GAP_SECONDS="push=forever",
        TACTFUL_DAILY_CAP="1000000",
    )
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 2
    for name in (
        "TACTFUL_GRPC_PORT",
        "TACTFUL_CONTROL_SHARE",
        "TACTFUL_CHANNEL_CAPS",
        "TACTFUL_MIN_GAP_SECONDS",
        "TACTFUL_DAILY_CAP",
    ):
        assert name in output


def test_two_server_processes_pick_up_a_new_model_without_restart(
    redis_proc, redisdb, data_dir: Path
):
    """Two `tactful serve` processes on one Redis, the first running the learner: an outcome
    reported to the first changes the model the second decides with."""
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    port_a, port_b = free_port(), free_port()
    a = start(data_dir, port_a, TACTFUL_REDIS_URL=url)
    b = start(data_dir, port_b, TACTFUL_REDIS_URL=url, TACTFUL_EMBEDDED_LEARNER="false")
    try:
        wait_serving(port_a, a)
        wait_serving(port_b, b)
        with (
            grpc.insecure_channel(f"127.0.0.1:{port_a}") as ch_a,
            grpc.insecure_channel(f"127.0.0.1:{port_b}") as ch_b,
        ):
            stub_a = decisioning_pb2_grpc.DecisioningStub(ch_a)
            stub_b = decisioning_pb2_grpc.DecisioningStub(ch_b)
            request = d.DecideRequest(user_id="alice", channel="web", request_id="fixed")
            before = stub_b.Decide(d.DecideRequest(user_id="bob", channel="web", dry_run=True))
            response = stub_a.Decide(request)
            started = time.perf_counter()
            stub_a.ReportOutcome(
                d.ReportOutcomeRequest(
                    decision_id=response.decision_id,
                    offer_id=response.choices[0].offer_id,
                    event=d.OUTCOME_EVENT_CLICK,
                    outcome_id="click-1",
                )
            )
            version = before.model_version
            while version == before.model_version and time.perf_counter() - started < 10:
                version = stub_b.Decide(
                    d.DecideRequest(user_id="bob", channel="web", dry_run=True)
                ).model_version
            delay = time.perf_counter() - started
    finally:
        stop_all(a, b)
    assert before.model_version == "prior"
    assert version.startswith("ridge-")
    print(f"outcome on process A to new model on process B: {delay * 1000:.0f} ms")


def test_learn_on_its_own_exports_its_metrics_and_stops_cleanly(redis_proc, redisdb):
    """`tactful learn` (the learner Deployment of deploy/k8s) serves /metrics like a server
    does, so the learner alerts and dashboard panels work with TACTFUL_EMBEDDED_LEARNER=false."""
    metrics_port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TACTFUL_")}
    environment.update(
        TACTFUL_REDIS_URL=f"redis://{redis_proc.host}:{redis_proc.port}/0",
        TACTFUL_METRICS_PORT=str(metrics_port),
        TACTFUL_GRPC_HOST="127.0.0.1",
    )
    process = subprocess.Popen(
        with_parent_death([sys.executable, "-m", "tactful", "learn"]),
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                url = f"http://127.0.0.1:{metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=1) as response:
                    text = response.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "tactful learn served no /metrics"
                time.sleep(0.1)
    finally:
        stop(process)
    assert "tactful_learner_backlog" in text
    assert "tactful_learner_rewards_applied_total" in text


def test_a_learner_without_redis_logs_one_traceback_then_a_line_now_and_then(caplog, monkeypatch):
    """While Redis stays down the learner retries every second: its first failure is logged
    with the traceback, the next ones as one short line per OUTAGE_LOG_SECONDS, so an
    outage does not bury the log under a traceback a second."""
    from conftest import make_settings

    monkeypatch.setattr(runtime, "OUTAGE_LOG_SECONDS", 1.5)
    stop = threading.Event()
    caplog.set_level("ERROR", logger="tactful")
    thread = runtime.start_learner(make_settings(), f"redis://127.0.0.1:{free_port()}", stop)
    time.sleep(3.6)  # failures at about 0, 1, 2 and 3 s: a traceback, then one line
    stop.set()
    thread.join(10)
    failures = [r for r in caplog.records if r.name == "tactful" and r.levelname == "ERROR"]
    with_traceback = [r for r in failures if r.exc_info]
    assert len(with_traceback) == 1, [r.getMessage() for r in failures]
    assert any("learner still failing" in r.getMessage() for r in failures)
    assert len(failures) <= 3
