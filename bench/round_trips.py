"""A Decide's two store round trips, by the client's CPU: the pooled round trip against the
lane each serving thread keeps (``tactful.store.wire.Lanes``), same commands, same run.

It starts an embedded redis-server (Unix socket, as ``make serve``), writes one user's
profile the way the bench workloads shape it (3 likes, 2 dislikes, 6 signals, a day's
contact counters), and times, alternately in rounds:

* ``read``: the commands of Decide's read (the profile's five hashes, the catalog and model
  versions, the request id's claim), in one round trip;
* ``write``: a round trip shaped like Decide's log write (a record of ~2 KB, its owner, the
  reward window, and two hash updates standing in for the user's scripts);
* ``PING``: one command on a bare socket, the floor of a round trip on this machine.

For each it prints the median over rounds of wall time and of the calling thread's CPU per
round trip (``time.thread_time``: what the server's thread spends; Redis's own time is not in
it), and the lane's share of the pooled figure.

    .venv/bin/python bench/round_trips.py [--calls 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from tactful import keys
from tactful.embedded_redis import EmbeddedRedis
from tactful.store import codecs, wire

Command = tuple[Any, ...]


def commands(client: Any) -> tuple[list[Command], list[Command]]:
    k = keys.UserKeys.of("user-000001")
    client.hset(k.profile, mapping={"t:sports": "LIKE|1", "t:travel": "LIKE|1", "t:food": "LIKE|1",
                                    "t:news": "DISLIKE|1", "t:games": "DISLIKE|1",
                                    "consent:inferred": "1|1"})  # fmt: skip
    client.hset(k.signals, mapping={f"topic{i}": f"{i + 0.5}|{1.7e9 + i}" for i in range(6)})
    day = "1764892800"
    client.hset(k.contacts, mapping={f"{day}|web|offer-{i:04d}": 1 for i in range(9)})
    read = [
        *codecs.profile_reads(k),
        ("GET", keys.CATALOG_VERSION),
        ("GET", keys.MODEL_CURRENT),
        ("HGET", k.requests, "request-1"),
    ]
    record = b'{"decision_id":"' + b"0" * 32 + b'","features":' + b"[1,0.25]," * 220 + b"0}"
    write = [
        ("SET", "tactful:{d:x}:record", record, "EX", 86400),
        ("SET", "tactful:{d:x}:owner", k.digest, "EX", 86400),
        ("ZADD", "tactful:awaiting", time.time() + 3600, "x"),
        ("HINCRBY", k.contacts, f"{day}|web|", 1),
        ("HSET", k.requests, "request-1", "x|1764892800.0"),
    ]
    return read, write


def measure(call: Callable[[], Any], calls: int) -> tuple[float, float]:
    """Wall and thread CPU microseconds per call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        call()
    return (
        (time.perf_counter() - wall) / calls * 1e6,
        (time.thread_time() - cpu) / calls * 1e6,
    )


def ping(path: str) -> Callable[[], Any]:
    bare = socket.socket(socket.AF_UNIX)
    bare.connect(path)

    def call() -> bytes:
        bare.sendall(b"*1\r\n$4\r\nPING\r\n")
        return bare.recv(64)

    return call


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000, help="round trips per row a round")
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as data, EmbeddedRedis(data) as server:
        client = wire.connect(
            server.url, socket_timeout=1.0, connect_timeout=1.0, max_connections=4
        )
        read, write = commands(client)
        pooled, lanes = wire.round_trip(client), wire.decide_round_trip(client)
        rows: dict[str, Callable[[], Any]] = {
            "read, pooled": lambda: pooled(read),
            "read, lane": lambda: lanes(read),
            "write, pooled": lambda: pooled(write),
            "write, lane": lambda: lanes(write),
            "PING, bare socket": ping(str(server.socket)),
        }
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
        for call in rows.values():
            measure(call, args.calls // 10)  # warm up
        for _ in range(args.rounds):
            for name, call in rows.items():
                figures[name].append(measure(call, args.calls))
        client.close()
    print(f"{args.rounds} rounds of {args.calls} round trips; median per round trip (µs)")
    print(f"{'row':<20}{'wall':>8}{'client CPU':>12}{'of pooled':>11}")
    medians = {
        name: (
            statistics.median(wall for wall, _ in runs),
            statistics.median(cpu for _, cpu in runs),
        )
        for name, runs in figures.items()
    }
    for name, (wall, cpu) in medians.items():
        kind, _, way = name.partition(", ")
        share = ""
        if way == "lane":
            share = f"{cpu / medians[f'{kind}, pooled'][1]:.0%}"
        print(f"{name:<20}{wall:>8.1f}{cpu:>12.1f}{share:>11}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
