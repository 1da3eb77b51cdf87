"""Capacity: throughput against latency at increasing offered load, tactful next to a bare
gRPC echo server, measured in the same run on this machine.

Open loop: for each offered rate the client sends calls on a fixed schedule (one asyncio
grpc.aio client in this process), whether or not earlier calls have come back, each with a
50 ms deadline (a render-time Decide). Latency is measured from the *scheduled* send time,
so a client or server that falls behind shows it (no coordinated omission). A call that did
not come back OK counts as slower than any OK call in the percentiles (">50" when a
percentile lands on one). Achieved rps counts OK answers only.

* ``grpc echo``: decide_latency.py's echo server (imported, run in its own process): the
  same DecideRequest bytes, sent back unchanged. The ceiling Python gRPC alone allows here.
* ``tactful``: ``python -m tactful serve`` (its embedded redis-server, default settings, so
  TACTFUL_MAX_CONCURRENT_RPCS sheds load past its limit), loaded with 200 offers and 2,000
  users with preferences and signals; Decide with 50 candidates and 3 slots. Then
  ``tactful x2``: the same server and data with TACTFUL_WORKERS=2 (two worker processes on
  the port; see --workers).

The client spreads its calls over CHANNELS connections of their own: SO_REUSEPORT hands each
*connection* to one worker, so one connection would load one worker only.

Everything runs on 127.0.0.1 and stops by itself (default: well under 5 minutes).

    .venv/bin/python bench/capacity.py [--rates 250,500,1000,...] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from decide_latency import (
    ECHO_METHOD,
    HOST,
    Child,
    free_ports,
    load,
    make_workload,
    no_interrupts,
    progress,
    run_until_stopped,
    tactful_env,
    wait_ready,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tactful.settings import ServerSettings
from tactful.v1 import decisioning_pb2

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
DEADLINE_S = 0.05
DEFAULT_RATES = "250,500,750,1000,1500,2000,3000,4000,6000"
TARGET_RPS = 1000
TARGET_P99_MS = 8.0
TARGET_P999_MS = 20.0
TARGET_PEAK_SHARE = 0.40
TARGET_SCALE_RPS = 2000  # with 2 processes, before p99 passes TARGET_SCALE_P99_MS
TARGET_SCALE_P99_MS = 25.0
DECIDE_METHOD = "/tactful.v1.Decisioning/Decide"
QUANTILES = (("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9))
CHANNELS = 8


@dataclass
class Step:
    server: str
    offered: float
    seconds: float
    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)  # inf for a call that was not OK
    client_cpu: float = 0.0  # share of one core this client process used
    server_cpu: float = 0.0  # cores the server used: its processes and its redis-server
    redis_cpu: float = 0.0  # of which its redis-server (tactful's embedded store)
    send_lag_ms: float = 0.0  # how late the last send was against its schedule

    @property
    def achieved(self) -> float:
        return self.codes["OK"] / self.seconds

    @property
    def cpu_us_per_answer(self) -> float:
        """Server CPU (all its processes) per OK answer: what one Decide costs the machine."""
        return self.server_cpu * self.seconds / self.codes["OK"] * 1e6 if self.codes["OK"] else 0.0

    @property
    def redis_us_per_answer(self) -> float:
        """The redis-server's share of ``cpu_us_per_answer``."""
        return self.redis_cpu * self.seconds / self.codes["OK"] * 1e6 if self.codes["OK"] else 0.0

    def quantile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("inf")
        return float(np.percentile(np.asarray(self.latencies_ms), q, method="higher"))


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds used so far by a process and every process under it (tactful's workers
    and its embedded redis-server), user and system: (all of them, the redis-server alone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    total = redis = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
            if proc.name().startswith("redis-server"):
                redis += times.user + times.system
    return total, redis


async def offer_load(
    calls: list[Any], requests: list[Any], step: Step, server_pid: int | None = None
) -> None:
    """Send ``step.offered`` calls per second for ``step.seconds``, on schedule."""
    total = int(step.offered * step.seconds)
    interval = 1.0 / step.offered
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int, scheduled: float) -> None:
        try:
            await calls[i % len(calls)](requests[i % len(requests)], timeout=DEADLINE_S)
            step.latencies_ms.append((time.perf_counter() - scheduled) * 1e3)
            step.codes["OK"] += 1
        except grpc.aio.AioRpcError as error:
            step.latencies_ms.append(float("inf"))
            step.codes[error.code().name] += 1

    server0, redis0 = tree_cpu_seconds(server_pid) if server_pid else (0.0, 0.0)
    cpu0, start = time.process_time(), time.perf_counter()
    i = 0
    while i < total:
        now = time.perf_counter()
        due = min(total, int((now - start) / interval) + 1)
        while i < due:
            task = loop.create_task(one(i, start + i * interval))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        step.send_lag_ms = max(0.0, (now - (start + (i - 1) * interval)) * 1e3)
        await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
    step.sent = total
    if pending:
        await asyncio.wait(pending, timeout=DEADLINE_S * 20)
    elapsed = time.perf_counter() - start
    step.client_cpu = (time.process_time() - cpu0) / elapsed
    if server_pid:
        server1, redis1 = tree_cpu_seconds(server_pid)
        step.server_cpu = (server1 - server0) / elapsed
        step.redis_cpu = (redis1 - redis0) / elapsed


async def sweep(
    name: str,
    target: str,
    method: str,
    requests: list[Any],
    args: argparse.Namespace,
    server_pid: int,
) -> list[Step]:
    steps: list[Step] = []
    # A connection each (a local subchannel pool: channels to one target otherwise share one).
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]
    try:
        calls = [
            channel.unary_unary(
                method,
                request_serializer=decisioning_pb2.DecideRequest.SerializeToString,
                response_deserializer=lambda data: data,  # the client does not parse answers
            )
            for channel in channels
        ]
        warm = Step(name, min(args.rates), args.warmup)
        await offer_load(calls, requests, warm)
        saturated = 0
        for rate in args.rates:
            step = Step(name, rate, args.seconds)
            await offer_load(calls, requests, step, server_pid)
            steps.append(step)
            progress(
                f"{name:>9} offered {rate:>6.0f}/s: ok {step.achieved:>7.1f}/s "
                f"p99 {fmt(step.quantile(99))} ms  {dict(step.codes)}"
            )
            saturated = saturated + 1 if step.achieved < 0.5 * rate else 0
            if saturated >= 2:  # well past its peak: higher rates only add noise and time
                break
            await asyncio.sleep(0.5)  # let the queues drain between steps
    finally:
        for channel in channels:
            await channel.close()
    return steps


def fmt(ms: float) -> str:
    return f">{DEADLINE_S * 1e3:.0f}" if ms == float("inf") else f"{ms:.2f}"


def table(steps: list[Step]) -> list[str]:
    header = (
        f"{'server':<10} {'offered/s':>9} {'ok/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'p99.9 ms':>9} {'deadline':>9} {'shed':>7} {'client cpu':>10} {'server cpu':>10} "
        f"{'µs/answer':>9} {'of redis':>8}"
    )
    lines = [header, "-" * len(header)]
    for s in steps:
        lines.append(
            f"{s.server:<10} {s.offered:>9.0f} {s.achieved:>8.1f} {fmt(s.quantile(50)):>8} "
            f"{fmt(s.quantile(99)):>8} {fmt(s.quantile(99.9)):>9} "
            f"{s.codes['DEADLINE_EXCEEDED']:>9} {s.codes['RESOURCE_EXHAUSTED']:>7} "
            f"{s.client_cpu:>9.0%} {s.server_cpu:>9.0%} {s.cpu_us_per_answer:>9.0f} "
            f"{s.redis_us_per_answer:>8.0f}"
        )
    return lines


def plot(steps: list[Step], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install -e '.[dev]')"
    fig, ax = plt.subplots(figsize=(8, 5))
    for server, marker in (("grpc echo", "o"), ("tactful", "s"), ("tactful x2", "^")):
        rows = [s for s in steps if s.server == server]
        for q, style in (("p50", ":"), ("p99", "-")):
            pct = dict(QUANTILES)[q]
            xs = [s.achieved for s in rows]
            ys = [min(s.quantile(pct), DEADLINE_S * 1e3) for s in rows]
            ax.plot(xs, ys, style, marker=marker, label=f"{server} {q}")
    ax.axhline(TARGET_P99_MS, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("achieved rps (OK answers within the 50 ms deadline)")
    ax.set_ylabel("latency ms (capped at the deadline)")
    ax.set_yscale("log")
    ax.set_title("Throughput vs latency, open-loop, 127.0.0.1, one client process")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"plot: {path}"


def peak(steps: list[Step]) -> float:
    """Sustained peak: the best OK rate at a step where 99% came back OK in time."""
    return max((s.achieved for s in steps if s.quantile(99) <= DEADLINE_S * 1e3), default=0.0)


def verdict(echo: list[Step], by_workers: dict[int, list[Step]]) -> list[str]:
    """The issue's targets, each with MET / NOT MET: p99 and p99.9 at 1,000 rps (every
    tactful row), the sustained peak against echo's (the best tactful row), and the rate two
    processes reach before their p99 passes 25 ms."""
    lines = []
    for workers, steps in by_workers.items():
        name = "tactful" if workers == 1 else f"tactful x{workers}"
        at = [s for s in steps if s.offered == TARGET_RPS]
        if not at:
            lines.append(f"{name} at {TARGET_RPS} rps: not measured (add it to --rates)")
            continue
        p99, p999 = at[0].quantile(99), at[0].quantile(99.9)
        ok = p99 <= TARGET_P99_MS and p999 <= TARGET_P999_MS
        lines.append(
            f"{name} at {TARGET_RPS} rps: Decide p99 {fmt(p99)} ms <= {TARGET_P99_MS:g}, "
            f"p99.9 {fmt(p999)} ms <= {TARGET_P999_MS:g}: {'MET' if ok else 'NOT MET'}"
        )

    echo_peak = peak(echo)
    peaks = {workers: peak(steps) for workers, steps in by_workers.items()}
    best_workers = max(peaks, key=lambda w: peaks[w], default=1)
    best = peaks.get(best_workers, 0.0)
    share = best / echo_peak if echo_peak else 0.0
    raw_echo = max((s.achieved for s in echo), default=0.0)
    lines.append(
        f"sustained peak (p99 within the deadline): echo {echo_peak:.0f} rps; tactful "
        + ", ".join(f"{peaks[w]:.0f} rps with {w} process{'es' if w > 1 else ''}" for w in peaks)
        + f"; best = {share:.0%} of echo (target >= {TARGET_PEAK_SHARE:.0%}): "
        f"{'MET' if share >= TARGET_PEAK_SHARE else 'NOT MET'}"
    )
    lines.append(
        f"most OK answers at any step: echo {raw_echo:.0f}/s; tactful "
        + ", ".join(
            f"{max((s.achieved for s in steps), default=0.0):.0f}/s with {w}"
            for w, steps in by_workers.items()
        )
    )
    if echo and max(s.offered for s in echo) <= raw_echo * 1.05:
        lines.append(
            "  (echo never saturated at the highest offered rate: its true peak is higher)"
        )
    if 2 in by_workers:
        within = [s.achieved for s in by_workers[2] if s.quantile(99) <= TARGET_SCALE_P99_MS]
        reached = max(within, default=0.0)
        lines.append(
            f"TACTFUL_WORKERS=2 before p99 passes {TARGET_SCALE_P99_MS:g} ms: {reached:.0f} rps "
            f"(target >= {TARGET_SCALE_RPS}): {'MET' if reached >= TARGET_SCALE_RPS else 'NOT MET'}"
        )
    return lines


def serving(channel: grpc.Channel) -> Callable[[], bool]:
    health = health_pb2_grpc.HealthStub(channel)

    def probe() -> bool:
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
        return bool(status == health_pb2.HealthCheckResponse.SERVING)

    return probe


def run(args: argparse.Namespace) -> int:
    workload = make_workload(offers=200, users=2000, candidates=50, slots=3, seed=1)
    server = ServerSettings()
    echo_port, grpc_port, metrics_port = free_ports(3)
    workdir = Path(tempfile.mkdtemp(prefix="tactful-cap-", dir="/tmp"))
    children: list[Child] = []
    try:
        progress(f"starting the echo server and tactful (data in {workdir})")
        children.append(
            Child.start(
                "echo",
                [sys.executable, str(HERE / "decide_latency.py"), "--serve-echo", str(echo_port)],
                {**os.environ, "BENCH_ECHO_WORKERS": str(server.max_workers)},
                workdir,
            )
        )
        echo_probe = f"{HOST}:{echo_port}"

        def echo_ready() -> bool:
            with grpc.insecure_channel(echo_probe) as ch:
                ch.unary_unary(ECHO_METHOD)(b"", timeout=1.0)
            return True

        wait_ready(children[0], f"echo serving on {echo_probe}", echo_ready)
        echo = asyncio.run(
            sweep(
                "grpc echo",
                f"{HOST}:{echo_port}",
                ECHO_METHOD,
                workload.decide,
                args,
                children[0].proc.pid,
            )
        )
        # One tactful at a time, on the same data and port: they would share the CPUs.
        by_workers: dict[int, list[Step]] = {}
        for workers in args.workers:
            name = "tactful" if workers == 1 else f"tactful x{workers}"
            env = tactful_env(grpc_port, metrics_port, workdir / "data")
            env["TACTFUL_WORKERS"] = str(workers)
            env.update(args.server_env)
            child = Child.start(
                name.replace(" ", "-"), [sys.executable, "-m", "tactful", "serve"], env, workdir
            )
            children.append(child)
            with grpc.insecure_channel(f"{HOST}:{grpc_port}") as channel:
                wait_ready(child, f"serving gRPC on {HOST}:{grpc_port},", serving(channel))
                if not by_workers:
                    progress("loading 200 offers and 2,000 profiles through the gRPC API")
                    load(channel, workload)
            by_workers[workers] = asyncio.run(
                sweep(
                    name,
                    f"{HOST}:{grpc_port}",
                    DECIDE_METHOD,
                    workload.decide,
                    args,
                    child.proc.pid,
                )
            )
            for running in (children[0], child):
                if running.proc.poll() is not None:
                    raise RuntimeError(f"{running.name} exited with {running.proc.returncode}")
            child.stop()
    except Exception:
        for child in children:
            progress(f"{child.name} log (last lines):\n{child.log_tail()}")
        raise
    finally:
        with no_interrupts():
            for child in children:
                child.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    steps = echo + [s for rows in by_workers.values() for s in rows]
    lines = [
        f"Capacity, open loop: {args.seconds:g} s per offered rate, {DEADLINE_S * 1e3:.0f} ms "
        "deadline, latency from the scheduled send time; percentiles count a non-OK call as "
        "slower than any OK one",
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, grpcio "
        f"{grpc.__version__}; tactful: TACTFUL_WORKERS={','.join(map(str, args.workers))} "
        f"processes, {server.max_workers} threads and TACTFUL_MAX_CONCURRENT_RPCS="
        f"{server.max_concurrent_rpcs} each, embedded redis-server; the client spreads calls "
        f"over {CHANNELS} connections",
        "",
        *table(steps),
        "",
        *verdict(echo, by_workers),
        "",
        "skew: the client (this process, one asyncio grpc.aio loop), the server and tactful's "
        "redis-server share these CPUs; 'client cpu' is the share of one core the client used, "
        "'server cpu' the cores the server used (all its processes and its redis-server), "
        "'µs/answer' that CPU per OK answer: what one call costs the machine, the figure that "
        "bounds the peak (2 cores = 2,000,000 µs of CPU a second, shared with the client), "
        "and 'of redis' the redis-server's part of it. "
        "Near saturation the client takes CPU from the server, and its own event loop adds "
        "queueing to the measured latency, so peaks are lower and tail latencies higher than a "
        "server would show with the client on another machine. Both rows are skewed alike "
        "(the echo row more, its server needs less CPU).",
        plot(steps, OUT / "capacity.png"),
    ]
    print("\n".join(lines), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                [
                    {
                        "server": s.server,
                        "offered": s.offered,
                        "achieved": s.achieved,
                        "codes": dict(s.codes),
                        "client_cpu": s.client_cpu,
                        "server_cpu": s.server_cpu,
                        "server_cpu_us_per_answer": s.cpu_us_per_answer,
                        "redis_cpu_us_per_answer": s.redis_us_per_answer,
                        **{
                            q: (None if s.quantile(p) == float("inf") else s.quantile(p))
                            for q, p in QUANTILES
                        },
                    }
                    for s in steps
                ],
                indent=2,
            )
            + "\n"
        )
    return 0


def rates(text: str) -> list[float]:
    values = sorted(float(v) for v in text.split(",") if v.strip())
    if not values or values[0] <= 0:
        raise argparse.ArgumentTypeError("comma-separated positive rates")
    return values


def workers_list(text: str) -> list[int]:
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("comma-separated worker counts >= 1")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=rates, default=rates(DEFAULT_RATES), help="offered rps")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per offered rate")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per server")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--workers",
        type=workers_list,
        default=workers_list("1,2"),
        help="TACTFUL_WORKERS of each tactful run (default 1,2)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="TACTFUL_X=VALUE",
        type=lambda text: tuple(text.split("=", 1)),
        help="a setting for the tactful servers (repeatable), e.g. TACTFUL_GRPC_MAX_WORKERS=4",
    )
    args = parser.parse_args(argv)
    args.server_env = dict(args.server_env)
    if not 0.5 <= args.seconds <= 30:
        parser.error("--seconds must be between 0.5 and 30 (the run must stay bounded)")
    return run_until_stopped(run, args)


if __name__ == "__main__":
    sys.exit(main())
