"""`make loadtest`: a short headless Locust run against a tactful server this script starts.

1. starts ``python -m tactful serve`` on 127.0.0.1 with free gRPC and metrics ports, its own
   embedded redis-server in a fresh temporary directory and no demo catalog (the locustfile
   seeds one);
2. waits until the gRPC health service says SERVING;
3. runs Locust headless (loadtests/locustfile.py with a shape from loadtests/shapes/:
   ``--shape steady`` (default: -u users for -t seconds), ``ramp_to_break`` or ``spike``),
   CSV files and the server log in loadtests/out/;
4. prints Locust's summary (and the locustfile's compact table) and the server-side latency
   from /metrics;
5. always stops the server with SIGTERM (SIGKILL if it hangs) and removes its data.

Exits non-zero if the server did not come up or stop cleanly, or if Locust failed (see
``--max-fail-ratio`` and ``--max-p99-ms``). Every step is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tactful.embedded_redis import with_parent_death

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
LOCUSTFILE = HERE / "locustfile.py"
SHAPES = HERE / "shapes"
# Each named shape stops by itself; these are its planned lengths (the steady one is -t).
SHAPE_SECONDS = {"steady": None, "ramp_to_break": 60, "spike": 40}
HOST = "127.0.0.1"
STARTUP_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 20.0  # above the server's default 5 s shutdown grace
LOCUST_EXTRA_SECONDS = 60.0  # start-up, stop timeout and reports on top of the run time


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (held together, so they are distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


def start_server(
    grpc_port: int, metrics_port: int, data_dir: str, log_path: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TACTFUL_GRPC_HOST": HOST,
        "TACTFUL_GRPC_PORT": str(grpc_port),
        "TACTFUL_METRICS_PORT": str(metrics_port),
        "TACTFUL_DATA_DIR": data_dir,
        "TACTFUL_REDIS_URL": "",  # always the embedded redis-server, never a shared Redis
        "TACTFUL_LOAD_DEMO_CATALOG": "false",
        # A local server for the load test, as `make serve`: no keys, plaintext, whatever
        # this shell's environment says.
        "TACTFUL_AUTH_DISABLED": "true",
        "TACTFUL_API_KEYS": "",
        "TACTFUL_TLS_CERT_FILE": "",
        "TACTFUL_TLS_KEY_FILE": "",
        "TACTFUL_TLS_CLIENT_CA_FILE": "",
    }
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            # If this script is killed outright, the server still gets a SIGTERM.
            with_parent_death([sys.executable, "-m", "tactful", "serve"]),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches this script, which stops it in order
        )


def wait_until_serving(server: subprocess.Popen[bytes], target: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"tactful exited with {server.returncode}:\n{tail(log_path)}")
            with contextlib.suppress(grpc.RpcError):
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"tactful not SERVING within {STARTUP_TIMEOUT_SECONDS:.0f}s:\n{tail(log_path)}"
                )
            time.sleep(0.1)


def stop_server(server: subprocess.Popen[bytes]) -> int:
    """SIGTERM (graceful drain, stops its redis-server); SIGKILL the group if it hangs."""
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        print(f"tactful did not stop within {STOP_TIMEOUT_SECONDS:.0f}s: killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        return -signal.SIGKILL


def run_locust(target: str, args: argparse.Namespace) -> int:
    run_seconds = SHAPE_SECONDS[args.shape] or args.seconds
    command = [
        sys.executable, "-m", "locust",
        "-f", f"{LOCUSTFILE},{SHAPES / args.shape}.py",
        "--headless",
        "--host", target,
        "-u", str(args.users),
        "-r", str(args.spawn_rate),
        "-t", f"{args.seconds}s",
        "--stop-timeout", "5",
        "--only-summary",
        "--csv", str(OUT / "tactful"),
        "--max-fail-ratio", str(args.max_fail_ratio),
        "--max-p99-ms", str(args.max_p99_ms),
    ]  # fmt: skip
    print("$", " ".join(command[1:]), flush=True)
    try:
        return subprocess.run(
            command, cwd=REPO, stdin=subprocess.DEVNULL, timeout=run_seconds + LOCUST_EXTRA_SECONDS
        ).returncode
    except subprocess.TimeoutExpired:
        print("locust did not finish in time: killed")
        return 1


def print_server_metrics(metrics_port: int) -> None:
    """Server-side handling time per RPC (bucket upper bounds) and degraded answers."""
    try:
        url = f"http://{HOST}:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError as error:
        print(f"\n(no server metrics: {error})")
        return
    buckets: dict[str, list[tuple[float, float]]] = {}
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "grpc_server_handling_seconds_bucket":
                method = sample.labels["grpc_method"]
                le = float(sample.labels["le"])
                buckets.setdefault(method, []).append((le, sample.value))
            elif sample.name in (
                "tactful_store_fallbacks_total",
                "tactful_decision_log_failures_total",
            ):
                counters[sample.name] = counters.get(sample.name, 0.0) + sample.value

    def quantile(points: list[tuple[float, float]], q: float) -> str:
        total = points[-1][1]
        le = next(le for le, count in points if count >= q * total)
        return f"<= {le * 1000:g}" if le != float("inf") else "> 5000"

    print("\nserver side (grpc_server_handling_seconds: the bucket the quantile falls in)")
    print(f"{'RPC':<16} {'handled':>9} {'p50 ms':>10} {'p99 ms':>10}")
    for method, points in sorted(buckets.items()):
        points.sort()
        if points[-1][1]:
            print(
                f"{method:<16} {points[-1][1]:>9.0f} "
                f"{quantile(points, 0.5):>10} {quantile(points, 0.99):>10}"
            )
    for name, value in sorted(counters.items()):
        print(f"{name} {value:g}")


def tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: the server is stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 10 users: about 300 requests/s, what one default server process answers here with
    # Locust on the same two cores (20 users offer ~480/s: past it, ~7% are shed).
    parser.add_argument("-u", "--users", type=int, default=10, help="concurrent Locust users")
    parser.add_argument("-r", "--spawn-rate", type=float, default=10, help="users started per s")
    parser.add_argument(
        "-t", "--seconds", type=int, default=20, help="run time in seconds (steady shape)"
    )
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPE_SECONDS),
        default="steady",
        help="load shape from loadtests/shapes/ (steady uses -u, -r and -t; "
        "ramp_to_break 60 s, spike 40 s)",
    )
    parser.add_argument(
        "--max-fail-ratio", type=float, default=0.01, help="fail the run above this share"
    )
    parser.add_argument(
        "--max-p99-ms",
        type=float,
        default=0.0,
        help="fail the run when Decide's client-side p99 is above this (0: no check)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)

    OUT.mkdir(parents=True, exist_ok=True)
    for stale in OUT.glob("tactful_*.csv"):
        stale.unlink()
    log_path = OUT / "server.log"
    grpc_port, metrics_port = free_ports(2)
    target = f"{HOST}:{grpc_port}"
    # Short and under /tmp: the embedded redis-server puts its Unix socket there.
    data_dir = tempfile.mkdtemp(prefix="tactful-lt-", dir="/tmp")
    server: subprocess.Popen[bytes] | None = None
    failed = True
    try:
        server = start_server(grpc_port, metrics_port, data_dir, log_path)
        wait_until_serving(server, target, log_path)
        print(f"tactful serving on {target} (pid {server.pid}, log {log_path})", flush=True)
        locust_code = run_locust(target, args)
        print(f"locust exit code {locust_code}")
        if server.poll() is not None:
            print(f"tactful died during the run ({server.returncode}):\n{tail(log_path)}")
        else:
            print_server_metrics(metrics_port)
            failed = locust_code != 0
    except (RuntimeError, TimeoutError) as error:
        print(f"loadtest: {error}", file=sys.stderr)
    finally:
        if server is not None and server.poll() is None:
            code = stop_server(server)
            if code != 0:
                print(f"tactful exited with {code} on SIGTERM:\n{tail(log_path)}")
                failed = True
        shutil.rmtree(data_dir, ignore_errors=True)
    print("loadtest FAILED" if failed else "loadtest passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
