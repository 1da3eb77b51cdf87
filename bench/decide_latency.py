"""Decide latency next to a bare gRPC echo server, measured in the same run.

Three rows (four with ``--aio-echo``), each measured one call at a time from this process
through real gRPC stubs:

* ``grpc echo``: a bare Python grpc sync server (same grpcio, same ThreadPoolExecutor style as
  tactful) whose one unary method returns its request bytes unchanged. The client sends the same
  DecideRequest messages as the Decide rows, so the payload and the client-side protobuf work
  are alike: this is the floor that Python gRPC alone costs on this machine.
* ``Decide``: tactful's Decide with 50 candidate offers for users who have likes, dislikes,
  consent and inferred signals (the full scoring path), cycling over many users so every
  profile read is real; two Redis round trips (read, then log the decision).
* ``Decide dry_run``: the same requests with ``dry_run``: one Redis round trip.
* ``grpc.aio echo`` (with ``--aio-echo``): the same echo on grpc.aio's server (one event
  loop, no thread pool), in its own subprocess: how much of echo's cost is the sync
  server's own, against the other server grpcio ships.

Both servers run in their own subprocess (``python -m tactful serve`` with its embedded
redis-server in a temporary directory), on 127.0.0.1 only. The catalog and profiles are loaded
through the gRPC API. The rows are measured in interleaved blocks so drift on the machine
affects them alike. Subprocesses are stopped (SIGTERM, then wait) on exit, Ctrl-C or error.

    .venv/bin/python bench/decide_latency.py [--requests 5000] [--json bench/out/latency.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tactful.embedded_redis import with_parent_death
from tactful.settings import ServerSettings
from tactful.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    decisioning_pb2,
    decisioning_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
)

HOST = "127.0.0.1"
ECHO_SERVICE = "bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
TARGET_P50_MS = 1.0
TARGET_P99_MS = 2.5
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
RPC_TIMEOUT_S = 2.0  # per measured call: a hung server cannot hang the benchmark
SETUP_TIMEOUT_S = 10.0

TOPICS = (
    "running", "yoga", "cycling", "swimming", "hiking", "climbing", "tennis", "football",
    "nutrition", "training", "travel", "camping", "photography", "music", "gaming", "books",
    "cooking", "gardening", "fashion", "beauty", "pets", "kids", "home", "diy",
    "cars", "tech", "movies", "art", "wine", "coffee", "finance", "health",
)  # fmt: skip
SENSITIVE_TOPICS = ("finance", "health")
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


# --- the echo server (runs in its own subprocess: `decide_latency.py --serve-echo PORT`) ------


def serve_echo(port: int, max_workers: int) -> int:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        options=[("grpc.so_reuseport", 0)],
    )
    # No (de)serializers: the handler gets the request bytes and returns them as they are.
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": echo}),)
    )
    if server.add_insecure_port(f"{HOST}:{port}") == 0:
        print(f"echo: could not bind {HOST}:{port}", file=sys.stderr)
        return 1
    server.start()
    print(f"echo serving on {HOST}:{port}", flush=True)  # the parent waits for this line
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop(0.5).wait()
    return 0


def serve_echo_aio(port: int) -> int:
    """The same echo on grpc.aio's server (one event loop, no thread pool): what the sync
    server's own per-call cost is, against the other server grpcio ships."""
    import asyncio

    async def serve() -> int:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])

        async def echo_handler(request: bytes, context: Any) -> bytes:
            return request

        echo = grpc.unary_unary_rpc_method_handler(echo_handler)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": echo}),)
        )
        if server.add_insecure_port(f"{HOST}:{port}") == 0:
            print(f"echo: could not bind {HOST}:{port}", file=sys.stderr)
            return 1
        await server.start()
        print(f"echo serving on {HOST}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await server.stop(0.5)
        return 0

    return asyncio.run(serve())


# --- subprocesses -------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, name: str, args: list[str], env: dict[str, str], workdir: Path) -> Child:
        log_path = workdir / f"{name}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                with_parent_death(args),  # even a SIGKILLed bench leaves no server behind
                env=env,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the bench only; it stops the children
            )
        return cls(name, proc, log_path)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1 (held open together so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]


def wait_ready(child: Child, marker: str, probe: Callable[[], bool]) -> None:
    """Wait until the child logs ``marker`` (proof that it, not some other process that took
    the port in the meantime, bound it) and then answers ``probe``."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if child.proc.poll() is not None:
            raise RuntimeError(
                f"{child.name} exited with {child.proc.returncode} during start-up:\n"
                f"{child.log_tail()}"
            )
        with contextlib.suppress(grpc.RpcError, OSError):
            if marker in child.log_path.read_text(errors="replace") and probe():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{child.name} not ready within {STARTUP_TIMEOUT_S:.0f}s:\n{child.log_tail()}"
            )
        time.sleep(0.05)


def tactful_env(grpc_port: int, metrics_port: int, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TACTFUL_")}
    env.update(
        TACTFUL_GRPC_HOST=HOST,
        TACTFUL_GRPC_PORT=str(grpc_port),
        TACTFUL_METRICS_PORT=str(metrics_port),
        TACTFUL_DATA_DIR=str(data_dir),
        TACTFUL_LOAD_DEMO_CATALOG="false",
        TACTFUL_CONTROL_SHARE="0",  # every user on the personalised arm: the full scoring path
        TACTFUL_SHUTDOWN_GRACE_SECONDS="1",
        TACTFUL_LOG_LEVEL="INFO",  # the default; the "serving gRPC on" line proves the port
        TACTFUL_AUTH_DISABLED="true",  # a local server for the bench, as `make serve`
    )
    return env


# --- workload -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    offers: list[catalog_pb2.Offer]
    preferences: list[profiles_pb2.SetPreferencesRequest]
    signals: list[profiles_pb2.RecordSignalsRequest]
    decide: list[decisioning_pb2.DecideRequest]
    dry_run: list[decisioning_pb2.DecideRequest]


def make_workload(*, offers: int, users: int, candidates: int, slots: int, seed: int) -> Workload:
    rng = random.Random(seed)
    catalog: list[catalog_pb2.Offer] = []
    for i in range(offers):
        topics = rng.sample(TOPICS, rng.randint(1, 3))
        channels = ["web", "app"] + (["email"] if rng.random() < 0.5 else [])
        catalog.append(
            catalog_pb2.Offer(
                offer_id=f"offer-{i:04d}",
                title=f"Offer {i}: {' and '.join(topics)}",
                topics=topics,
                channels=channels,
                priority=round(rng.uniform(0.0, 1.0), 3),
                sensitive=any(t in SENSITIVE_TOPICS for t in topics),
            )
        )
    offer_ids = [o.offer_id for o in catalog]
    now = time.time()
    preferences, signals, decide, dry_run = [], [], [], []
    for u in range(users):
        user_id = f"user-{u:06d}"
        stated = rng.sample(TOPICS, 5)
        preferences.append(
            profiles_pb2.SetPreferencesRequest(
                user_id=user_id,
                topic_preferences=[
                    profiles_pb2.TopicPreference(topic=topic, stance=stance)
                    for topic, stance in zip(
                        stated,
                        [profiles_pb2.STANCE_LIKE] * 3 + [profiles_pb2.STANCE_DISLIKE] * 2,
                        strict=True,
                    )
                ],
                channel_preferences=[
                    profiles_pb2.ChannelPreference(channel="web", opted_in=True),
                    profiles_pb2.ChannelPreference(channel="sms", opted_in=False),
                ],
                consent=profiles_pb2.Consent(inferred_personalization=True),
            )
        )
        signals.append(
            profiles_pb2.RecordSignalsRequest(
                user_id=user_id,
                signals=[
                    profiles_pb2.Signal(
                        topic=topic,
                        weight=round(rng.uniform(0.2, 5.0), 3),
                        observed_at=Timestamp(seconds=int(now - rng.uniform(0, 72 * 3600))),
                    )
                    for topic in rng.sample(TOPICS, 6)
                ],
            )
        )
        request = decisioning_pb2.DecideRequest(
            user_id=user_id,
            channel="web",
            placement="home_hero",
            numeric_context={
                "cart_value": round(rng.uniform(0, 250), 2),
                "session_seconds": float(rng.randint(5, 1800)),
            },
            categorical_context={
                "device": rng.choice(("mobile", "desktop", "tablet")),
                "country": rng.choice(("FR", "DE", "GB", "US")),
            },
            candidate_offer_ids=rng.sample(offer_ids, min(candidates, len(offer_ids))),
            slots=slots,
        )
        decide.append(request)
        dry = decisioning_pb2.DecideRequest()
        dry.CopyFrom(request)
        dry.dry_run = True
        dry_run.append(dry)
    return Workload(catalog, preferences, signals, decide, dry_run)


def load(channel: grpc.Channel, workload: Workload) -> None:
    catalog = catalog_pb2_grpc.CatalogStub(channel)
    profiles = profiles_pb2_grpc.ProfilesStub(channel)
    for offer in workload.offers:
        catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer), timeout=SETUP_TIMEOUT_S)
    for prefs, sigs in zip(workload.preferences, workload.signals, strict=True):
        profiles.SetPreferences(prefs, timeout=SETUP_TIMEOUT_S)
        profiles.RecordSignals(sigs, timeout=SETUP_TIMEOUT_S)


# --- measuring ----------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    call: Callable[..., Any]
    requests: Sequence[Any]
    tactful: bool = False  # keep the answers for the checks; read handler time from /metrics
    samples_ns: list[int] = field(default_factory=list)
    responses: list[Any] = field(default_factory=list)
    server_seconds: float = 0.0  # time in tactful's handler, from its /metrics
    server_calls: int = 0
    _next: int = 0

    def run(self, n: int, *, record: bool) -> None:
        call, requests, size = self.call, self.requests, len(self.requests)
        samples: list[int] = []
        responses: list[Any] = []
        clock = time.perf_counter_ns
        for i in range(self._next, self._next + n):
            request = requests[i % size]
            start = clock()
            response = call(request, timeout=RPC_TIMEOUT_S)
            samples.append(clock() - start)
            responses.append(response)
        self._next += n
        if record:
            self.samples_ns += samples
            if self.tactful:
                self.responses += responses

    def stats_ms(self) -> dict[str, float]:
        ms = np.asarray(self.samples_ns, dtype=np.float64) / 1e6
        out = {name: float(np.percentile(ms, q)) for name, q in PERCENTILES}
        out["mean"] = float(ms.mean())
        return out


def decide_handling(metrics_port: int) -> tuple[float, int]:
    """Seconds spent in tactful's Decide handler so far and the number of calls (from the
    grpc_server_handling_seconds histogram its interceptor keeps)."""
    url = f"http://{HOST}:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    total, count = 0.0, 0
    for line in text.splitlines():
        if 'grpc_method="Decide"' not in line:
            continue
        if line.startswith("grpc_server_handling_seconds_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith("grpc_server_handling_seconds_count"):
            count = int(float(line.rsplit(" ", 1)[1]))
    return total, count


def measure(rows: list[Row], *, requests: int, warmup: int, blocks: int, metrics_port: int) -> None:
    """Warm every row up, then measure them in interleaved blocks."""
    for row in rows:
        row.run(warmup, record=False)
    blocks = max(1, min(blocks, requests))
    for b in range(blocks):
        n = requests // blocks + (1 if b < requests % blocks else 0)
        for row in rows:
            before = decide_handling(metrics_port) if row.tactful else (0.0, 0)
            row.run(n, record=True)
            if row.tactful:
                after = decide_handling(metrics_port)
                row.server_seconds += after[0] - before[0]
                row.server_calls += after[1] - before[1]


def check_decisions(row: Row) -> str:
    """What the Decide answers were made of: proof that the full scoring path ran."""
    arms: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    held = 0
    for response in row.responses:
        arms[decisioning_pb2.Arm.Name(response.arm)] += 1
        held += not response.choices
        for choice in response.choices:
            for reason in choice.reasons:
                reasons[decisioning_pb2.ReasonCode.Name(reason.code)] += 1
    arm_text = ", ".join(f"{k.removeprefix('ARM_')} {v}" for k, v in arms.most_common())
    reason_text = ", ".join(
        f"{k.removeprefix('REASON_CODE_')} {v}" for k, v in reasons.most_common()
    )
    return f"{row.name}: arms {arm_text}; held {held}; reasons {reason_text}"


# --- report -------------------------------------------------------------------------------


def report(rows: list[Row], args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    stats = {row.name: row.stats_ms() for row in rows}
    echo, decide = rows[0], rows[1]
    columns = [name for name, _ in PERCENTILES] + ["mean"]
    width = max(len(f"{r.name} / echo") for r in rows) + 2
    request_bytes = int(np.mean([r.ByteSize() for r in workload.decide]))
    response_bytes = int(np.mean([r.ByteSize() for r in decide.responses]))

    lines = [
        f"Decide latency, one call at a time: {args.requests} calls per row after "
        f"{args.warmup} warm-up calls, {args.blocks} interleaved blocks",
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}; client, servers and redis-server share them",
        f"workload: {len(workload.offers)} offers, {len(workload.decide)} users, "
        f"{args.candidates} candidates, {args.slots} slots; DecideRequest ~{request_bytes} B, "
        f"DecideResponse ~{response_bytes} B",
        "",
        "latency (ms)".ljust(width) + "".join(f"{c:>9}" for c in columns),
    ]
    for row in rows:
        s = stats[row.name]
        lines.append(row.name.ljust(width) + "".join(f"{s[c]:9.3f}" for c in columns))
    ratios: dict[str, dict[str, float]] = {}
    for row in rows[1:]:
        ratio = {c: stats[row.name][c] / stats[echo.name][c] for c in columns}
        ratios[row.name] = ratio
        label = f"{row.name} / echo"
        lines.append(label.ljust(width) + "".join(f"{ratio[c]:8.2f}x" for c in columns))
    lines.append("")
    server_ms: dict[str, float] = {}
    for row in rows[1:]:
        if row.tactful and row.server_calls:
            in_handler = row.server_seconds / row.server_calls * 1e3
            server_ms[row.name] = in_handler
            lines.append(
                f"{row.name}: mean {in_handler:.3f} ms in tactful's handler (its /metrics), "
                f"{stats[row.name]['mean'] - in_handler:.3f} ms in gRPC, network and client"
            )
    for row in rows[1:]:
        if row.tactful:
            lines.append("check " + check_decisions(row))
    lines.append("")
    p50, p99 = stats[decide.name]["p50"], stats[decide.name]["p99"]
    met_p50, met_p99 = p50 <= TARGET_P50_MS, p99 <= TARGET_P99_MS
    verdict = "MET" if met_p50 and met_p99 else "NOT MET"
    lines.append(
        f"targets: Decide p50 {p50:.3f} ms <= {TARGET_P50_MS} ms "
        f"({'ok' if met_p50 else 'missed'}), p99 {p99:.3f} ms <= {TARGET_P99_MS} ms "
        f"({'ok' if met_p99 else 'missed'}): {verdict}"
    )
    print("\n".join(lines), flush=True)
    return {
        "config": {
            "requests": args.requests,
            "warmup": args.warmup,
            "blocks": args.blocks,
            "offers": len(workload.offers),
            "users": len(workload.decide),
            "candidates": args.candidates,
            "slots": args.slots,
            "seed": args.seed,
            "request_bytes": request_bytes,
            "response_bytes": response_bytes,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        },
        "latency_ms": stats,
        "ratio_to_echo": ratios,
        "server_handler_mean_ms": server_ms,
        "targets": {
            "p50_ms": TARGET_P50_MS,
            "p99_ms": TARGET_P99_MS,
            "p50_met": met_p50,
            "p99_met": met_p99,
            "met": met_p50 and met_p99,
        },
    }


# --- main ---------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the clean-up below


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Clean-up must not be cut short by a second Ctrl-C."""
    previous = (
        signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.signal(signal.SIGTERM, signal.SIG_IGN),
    )
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def run(args: argparse.Namespace) -> int:
    workload = make_workload(
        offers=args.offers,
        users=args.users,
        candidates=args.candidates,
        slots=args.slots,
        seed=args.seed,
    )
    max_workers = ServerSettings().max_workers
    echo_port, grpc_port, metrics_port, aio_port = free_ports(4)
    workdir = Path(tempfile.mkdtemp(prefix="tactful-bench-", dir="/tmp"))
    children: list[Child] = []

    def clean_up() -> None:
        with no_interrupts():
            for child in children:
                child.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    try:
        progress(f"starting the echo server and tactful (data in {workdir})")
        children.append(
            Child.start(
                "echo",
                [sys.executable, __file__, "--serve-echo", str(echo_port)],
                {**os.environ, "BENCH_ECHO_WORKERS": str(max_workers)},
                workdir,
            )
        )
        if args.aio_echo:
            children.append(
                Child.start(
                    "echo-aio",
                    [sys.executable, __file__, "--serve-echo-aio", str(aio_port)],
                    dict(os.environ),
                    workdir,
                )
            )
        children.append(
            Child.start(
                "tactful",
                [sys.executable, "-m", "tactful", "serve"],
                tactful_env(grpc_port, metrics_port, workdir / "data"),
                workdir,
            )
        )
        with (
            grpc.insecure_channel(f"{HOST}:{echo_port}") as echo_channel,
            grpc.insecure_channel(f"{HOST}:{grpc_port}") as tactful_channel,
            grpc.insecure_channel(f"{HOST}:{aio_port}") as aio_channel,
        ):
            echo = echo_channel.unary_unary(
                ECHO_METHOD,
                request_serializer=decisioning_pb2.DecideRequest.SerializeToString,
                response_deserializer=decisioning_pb2.DecideRequest.FromString,
            )
            health = health_pb2_grpc.HealthStub(tactful_channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            wait_ready(
                children[0],
                f"echo serving on {HOST}:{echo_port}",
                lambda: echo(workload.decide[0], timeout=1.0) is not None,
            )
            aio_echo = aio_channel.unary_unary(
                ECHO_METHOD,
                request_serializer=decisioning_pb2.DecideRequest.SerializeToString,
                response_deserializer=decisioning_pb2.DecideRequest.FromString,
            )
            if args.aio_echo:
                wait_ready(
                    children[1],
                    f"echo serving on {HOST}:{aio_port}",
                    lambda: aio_echo(workload.decide[0], timeout=1.0) is not None,
                )
            wait_ready(
                children[-1],
                f"serving gRPC on {HOST}:{grpc_port},",
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == serving
                ),
            )
            progress(
                f"loading {len(workload.offers)} offers and {len(workload.preferences)} "
                "profiles through the gRPC API"
            )
            load(tactful_channel, workload)
            decide = decisioning_pb2_grpc.DecisioningStub(tactful_channel).Decide
            rows = [
                Row("grpc echo", echo, workload.decide),
                Row("Decide", decide, workload.decide, tactful=True),
                Row("Decide dry_run", decide, workload.dry_run, tactful=True),
            ]
            if args.aio_echo:
                rows.append(Row("grpc.aio echo", aio_echo, workload.decide))
            progress(f"warming up ({args.warmup} calls per row), then measuring")
            measure(
                rows,
                requests=args.requests,
                warmup=args.warmup,
                blocks=args.blocks,
                metrics_port=metrics_port,
            )
            for child in children:  # a server that died mid-run makes the figures worthless
                if child.proc.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with {child.proc.returncode}")
        figures = report(rows, args, workload)
    except Exception:
        for child in children:
            progress(f"{child.name} log (last lines):\n{child.log_tail()}")
        raise
    finally:
        clean_up()
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")
        progress(f"figures written to {path}")
    return 0


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def run_until_stopped(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a bench so that SIGTERM and Ctrl-C still stop every server it started."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args)
    except KeyboardInterrupt:
        progress("interrupted; servers stopped")
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=positive, default=5000, help="measured calls per row")
    parser.add_argument("--warmup", type=non_negative, default=500, help="warm-up calls per row")
    parser.add_argument("--blocks", type=positive, default=5, help="interleaved blocks per row")
    parser.add_argument("--offers", type=positive, default=200, help="offers in the catalog")
    parser.add_argument("--users", type=positive, default=2000, help="distinct users cycled")
    parser.add_argument("--candidates", type=positive, default=50, help="candidates per Decide")
    parser.add_argument("--slots", type=int, default=3, choices=range(11), help="offers asked")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated workload")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--serve-echo", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-echo-aio", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--aio-echo",
        action="store_true",
        help="also measure the echo on grpc.aio's server (the sync server's own cost)",
    )
    args = parser.parse_args(argv)
    if args.serve_echo_aio is not None:
        return serve_echo_aio(args.serve_echo_aio)
    if args.serve_echo is not None:
        return serve_echo(args.serve_echo, int(os.environ.get("BENCH_ECHO_WORKERS", "16")))
    return run_until_stopped(run, args)


if __name__ == "__main__":
    sys.exit(main())
