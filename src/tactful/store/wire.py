"""The wire: how the store reaches Redis, and how long it waits.

A client (``connect``) whose connections take their socket timeout from the store attempt in
progress (``ATTEMPT_DEADLINE``), the budgets that set it (``Budget``, ``RenderBudget``), the
errors that mean the store is down or refusing writes, and ``round_trip``: how the Decide
path sends its commands, on one Redis server or on a Redis Cluster.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import hiredis
import redis
import redis.exceptions
from redis._parsers import BaseParser
from redis.backoff import NoBackoff
from redis.client import NEVER_DECODE
from redis.cluster import RedisCluster
from redis.retry import Retry

from tactful import deadline

#: A client of one Redis server, or of a Redis Cluster (TACTFUL_REDIS_URL redis+cluster://).
Client = redis.Redis | RedisCluster

#: The "+cluster" URL scheme that names a Redis Cluster (redis-py is given the rest).
CLUSTER_SUFFIX = "+cluster"


# Errors that mean "the store is unreachable or too slow", as opposed to a bug.
STORE_DOWN_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,  # maxmemory reached: writes refused, reads still fine
    redis.exceptions.ClusterDownError,  # a cluster without a master for some slot
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.TryAgainError,  # a multi-key command during a slot migration
    OSError,
)

# Of those, the ones that say Redis is up and answering but refuses writes (maxmemory reached,
# a replica that was promoted away): reads still work, so they must not open the breaker.
WRITE_REFUSED_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
)


def write_refused(error: BaseException | None) -> bool:
    """Redis refused a write (full, or read-only), directly or inside a Lua script, where it
    comes back as a plain "Error running script ... -OOM ..." ResponseError."""
    if isinstance(error, WRITE_REFUSED_ERRORS):
        return True
    text = str(error) if isinstance(error, redis.exceptions.ResponseError) else ""
    return "OOM command not allowed" in text or "READONLY You can't write" in text


#: What the operating system says when nothing listens where Redis should be: evidence that no
#: slow moment explains. (A reset is not: one dropped connection is counted in the rate.)
_REFUSALS = (ConnectionRefusedError, FileNotFoundError)


def connection_refused(error: BaseException) -> bool:
    """The connection was refused (redis-py wraps the OSError; a timeout, even one
    connecting, is not a refusal: a busy machine is slow to accept too)."""
    seen: BaseException | None = error
    for _ in range(5):  # redis-py's wrappers, the OSError under them
        if seen is None:
            return False
        if isinstance(seen, _REFUSALS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


#: Waits between attempts of an idempotent operation: the first, doubled each time.
RETRY_FIRST_WAIT_SECONDS = 0.002
RETRY_MAX_WAIT_SECONDS = 0.05
#: Errors after which an idempotent operation is tried again (within its budget).
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # NotSent and BusyLoadingError among them
    redis.exceptions.TimeoutError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    OSError,
)


class NotSent(redis.exceptions.ConnectionError):
    """No connection to Redis could be made: the command was never sent, so even a call
    that must not run twice can be tried again."""


#: ``time.monotonic()`` by which the store attempt in progress must have its reply (a
#: ``ContextVar``: each serving thread has its own); None: the client's own socket timeout.
ATTEMPT_DEADLINE: ContextVar[float | None] = ContextVar("tactful_attempt_deadline", default=None)
#: The least time an attempt is given: a socket timeout of 0 would mean "non-blocking".
MIN_ATTEMPT_SECONDS = 0.0005


class _Budgeted:
    """Mixed into a redis-py connection class: its socket timeout is the current attempt's
    budget (what is left until ``ATTEMPT_DEADLINE``), set on every send, so one pool serves
    calls with different budgets: a render-time read, a write that may wait a second. A
    failure to connect is ``NotSent``."""

    _sock: Any
    socket_timeout: float | None

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise NotSent(str(exc)) from exc

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            self.connect_check_health(check_health=False)
        if self._sock is not None:
            deadline = ATTEMPT_DEADLINE.get()
            if deadline is None:
                self._sock.settimeout(self.socket_timeout)
            else:
                self._sock.settimeout(max(MIN_ATTEMPT_SECONDS, deadline - time.monotonic()))
        super().send_packed_command(command, check_health)  # type: ignore[misc]


class _BudgetedConnection(_Budgeted, redis.Connection):
    pass


class _BudgetedUnixConnection(_Budgeted, redis.UnixDomainSocketConnection):
    pass


class _BudgetedSSLConnection(_Budgeted, redis.SSLConnection):
    pass


_CONNECTION_CLASSES = {
    "unix": _BudgetedUnixConnection,
    "rediss": _BudgetedSSLConnection,
    "redis": _BudgetedConnection,
}


@dataclass(frozen=True, slots=True)
class Budget:
    """How long one store operation may wait for Redis, retries included: ``seconds``, or
    what is left of the call's deadline, less a margin to answer without the store (a
    fallback, an error), if that is sooner."""

    seconds: float

    def deadline(self) -> float:
        return _within_call(time.monotonic(), self.seconds)

    def observe(self, seconds: float) -> None:
        """An attempt succeeded in ``seconds`` (only an adaptive budget learns from it)."""


def _within_call(now: float, seconds: float, share: float = 1.0) -> float:
    """``now + seconds``, or sooner: ``share`` of what is left of the call's deadline, less
    a margin to answer without the store (a fallback, an error)."""
    at = now + seconds
    left = deadline.seconds_left()
    if left is not None:
        margin = max(DEADLINE_MARGIN_SECONDS, DEADLINE_MARGIN_SHARE * left)
        at = min(at, now + min(share * left, left - margin))
    return max(at, now + MIN_ATTEMPT_SECONDS)


class RenderBudget:
    """The budget of Decide's read: tight, so a store that does not answer still leaves time
    for a fast fallback, yet not tighter than this machine's Redis round trips are now.

    At least ``floor`` (TACTFUL_REDIS_SOCKET_TIMEOUT_MS). Like TCP's retransmission timeout,
    it follows the round trips it sees: ``RENDER_P99_FACTOR`` times the 99th percentile of the
    last ``RENDER_SAMPLES`` successful reads, up to ``ceiling``
    (TACTFUL_REDIS_RENDER_TIMEOUT_MAX_MS) and to half of what is left of the call's deadline.
    On a quiet machine (round trips well under a millisecond) it is the floor, and a frozen
    Redis costs a Decide that much; on a machine so loaded that Redis itself waits for a CPU,
    a read that would have answered in 20 ms is waited for rather than turned into a
    fallback. Only successes are sampled: a Redis that stopped answering does not stretch it."""

    def __init__(self, floor: float, ceiling: float) -> None:
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self.seconds = floor
        self._samples: list[float] = []
        self._next = 0
        self._lock = threading.Lock()

    def deadline(self) -> float:
        return _within_call(time.monotonic(), self.seconds, share=RENDER_DEADLINE_SHARE)

    def observe(self, seconds: float) -> None:
        with self._lock:
            if len(self._samples) < RENDER_SAMPLES:
                self._samples.append(seconds)
            else:
                self._samples[self._next] = seconds
            self._next = (self._next + 1) % RENDER_SAMPLES
            if self._next % RENDER_REFRESH_EVERY:
                return
            ordered = sorted(self._samples)
        p99 = ordered[int(0.99 * (len(ordered) - 1))]
        self.seconds = min(self.ceiling, max(self.floor, RENDER_P99_FACTOR * p99))


#: The render budget (``RenderBudget``): how many recent reads it follows, how often it looks
#: again, how many times their 99th percentile it allows, and at most what share of the call's
#: deadline.
RENDER_SAMPLES = 512
RENDER_REFRESH_EVERY = 32
RENDER_P99_FACTOR = 4.0
RENDER_DEADLINE_SHARE = 0.5
#: What a call keeps of its deadline to answer once the store has failed it: this share of what
#: is left, and at least this long (an answer still has to be built, and the machine may be busy).
DEADLINE_MARGIN_SHARE = 0.1
DEADLINE_MARGIN_SECONDS = 0.002


def connect(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int,
    retries: int = 1,
    **options: Any,
) -> Client:
    """A client whose commands time out after ``socket_timeout``, or after the budget a
    ``RedisStore`` operation sets for its attempt (``_BudgetedConnection``). redis-py itself
    retries a command ``retries`` times on a broken connection (a timeout is never retried
    by it); the server's store passes 0 and retries by itself, knowing which operations are
    idempotent and how long each may wait.

    ``redis+cluster://host:port`` (or ``rediss+cluster://``) names a Redis Cluster by any
    one of its nodes: redis-py's ``RedisCluster`` finds the others and routes each command
    by its key's slot (following MOVED and ASK), with the same timeouts, ``max_connections``
    per node, and ``retries`` retries of its own (after refreshing its slot map), which cover
    timeouts too: the server's store passes 0, so nothing that must not run twice is sent
    again behind its back."""
    scheme, _, rest = url.partition("://")
    base_scheme = scheme.removesuffix(CLUSTER_SUFFIX)
    connection_class = options.pop("connection_class", None)
    if connection_class is None:
        connection_class = _CONNECTION_CLASSES.get(base_scheme, _BudgetedConnection)
    elif not issubclass(connection_class, _Budgeted):  # a caller's own (tests observe trips)
        connection_class = type(connection_class.__name__, (_Budgeted, connection_class), {})
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "max_connections": max_connections,
        "health_check_interval": 0,
        "connection_class": connection_class,
    }
    if scheme.endswith(CLUSTER_SUFFIX):
        return RedisCluster.from_url(
            f"{base_scheme}://{rest}",
            retry=Retry(NoBackoff(), retries),
            **common,
            **options,
        )
    return redis.Redis.from_url(
        url,
        retry=Retry(NoBackoff(), retries, supported_errors=(redis.exceptions.ConnectionError,)),
        retry_on_error=[redis.exceptions.ConnectionError] if retries else [],
        **common,
        **options,
    )


def undecoded(client: Client, *command: Any) -> Any:
    """A command's reply left as bytes (model snapshots and the learner's state are bytes),
    on the decoding client: one pool serves both, and a cluster needs no second client."""
    return client.execute_command(*command, **{NEVER_DECODE: []})  # type: ignore[no-untyped-call]


class LaterReply:
    """A command sent now on a pooled connection, its reply read later, as the server sent
    it (bytes in nested lists, without redis-py's response callback): the caller works
    meanwhile, and Redis on another core. The connection is out of the pool until then.
    Not retried: a command that must not run twice (a consumer group read moves the group
    on) fails instead."""

    def __init__(self, client: redis.Redis, *command: Any) -> None:
        self._pool = client.connection_pool
        conn: Any = self._pool.get_connection()
        try:
            conn.send_command(*command)
        except BaseException:
            conn.disconnect()
            self._pool.release(conn)
            raise
        self._conn: Any = conn

    def read(self) -> Any:
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("reply already read")
        try:
            return conn.read_response(disable_decoding=True)
        except redis.exceptions.ResponseError:
            raise  # an error reply, read whole
        except BaseException:
            conn.disconnect()  # a reply half read must not be read by the next command
            raise
        finally:
            self._pool.release(conn)


def raw_reply(client: redis.Redis, *command: Any) -> Any:
    """A command's reply as the server sent it (``LaterReply``, read at once)."""
    return LaterReply(client, *command).read()


RoundTrip = Callable[[Sequence[tuple[Any, ...]]], list[Any]]


def round_trip(client: Client) -> RoundTrip:
    """How the store sends several commands in one round trip, chosen here, once, by the
    client: on one Redis server, a hand-packed write on one pooled connection (less client
    time than a pipeline: ``_single_node_round_trip``); on a Redis Cluster, redis-py's
    ClusterPipeline, which sends each node its commands together and follows MOVED/ASK.
    Either way, error replies are raised only after every reply is read, and HGETALL replies
    may be raw (``codecs.as_dict``)."""
    if isinstance(client, RedisCluster):
        return functools.partial(_cluster_round_trip, client)
    return functools.partial(_single_node_round_trip, client.connection_pool)


def decide_round_trip(client: Client) -> RoundTrip:
    """``round_trip`` for the two round trips of every Decide (its read and its log write):
    on one Redis server, on the calling thread's own connection (``Lanes``); on a cluster,
    as ``round_trip``. Only for idempotent commands: a lane finds out that Redis closed its
    connection (a restart) by failing a round trip, which the store then sends again."""
    if isinstance(client, RedisCluster):
        return round_trip(client)
    return Lanes(client.connection_pool).round_trip


def _cluster_round_trip(client: RedisCluster, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    pipe = client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
    for command in commands:
        pipe.execute_command(*command)
    replies: list[Any] = pipe.execute()
    return replies


def _single_node_round_trip(
    pool: redis.ConnectionPool, commands: Sequence[tuple[Any, ...]]
) -> list[Any]:
    """The commands in one write, then their replies: one round trip on one pooled
    connection, what a non-transactional pipeline sends, minus a pipeline's per-command
    bookkeeping (command stack, options, response callbacks, observability hooks), which
    costs more client time than Redis spends on the commands. Not retried here: the
    store's ``_run`` knows whether the commands may be sent again, and for how long."""
    conn = pool.get_connection()
    try:
        return _exchange(conn, commands)
    finally:
        pool.release(conn)


def _exchange(conn: redis.Connection, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    # Packed by hiredis (a dependency: redis[hiredis]), as redis-py packs them, minus its
    # per-command Python layer, which only matters for commands written as one string.
    packed = b"".join([hiredis.pack_command(command) for command in commands])
    conn.send_packed_command([packed])  # type: ignore[no-untyped-call]
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except redis.exceptions.ResponseError as error:
            replies.append(error)
    for reply in replies:
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply
    return replies


#: The reader's "no whole reply yet" (hiredis returns False by default; RESP3 has booleans).
_MORE = object()
#: Bytes read from the socket at a time (a Decide's replies are a few KB).
_READ_SIZE = 65536


class Lanes:
    """Round trips on a connection that each thread keeps (its lane), replies read by hiredis
    straight from the socket.

    Why: taking a connection from redis-py's pool and giving it back on every round trip,
    and reading each reply through redis-py's reply layers, cost the Decide path about as
    much client CPU as the round trip itself (the pool's lock, fork check, connection events
    and metrics, a readiness poll on every checkout, per reply a few calls deep;
    bench/README.md, "Store round trips"). A lane is a connection of the pool's own class
    and settings (its handshake, TLS, the attempt's budget as socket timeout), made outside
    the pool so that serving threads cannot starve it. A thread's lane goes with the thread,
    and every lane with this object; a forked child makes its own."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool
        self._local = threading.local()
        self._pid = os.getpid()
        options = pool.connection_kwargs
        self._decoding = (
            {"encoding": options.get("encoding", "utf-8"),
             "errors": options.get("encoding_errors", "strict")}
            if options.get("decode_responses") else {}
        )  # fmt: skip

    def round_trip(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """The commands in one write, then their replies (as ``_single_node_round_trip``)."""
        lane: _Lane | None = getattr(self._local, "lane", None)
        if lane is None or self._pid != os.getpid():
            lane = self._local.lane = self._new_lane()
        return lane.exchange(commands)

    def _new_lane(self) -> _Lane:
        self._pid = os.getpid()
        pool = self._pool
        conn = pool.connection_class(**pool.connection_kwargs)
        return _Lane(conn, self._decoding)


class _Lane:
    """One connection, its reply reader and its read buffer (``Lanes``)."""

    def __init__(self, conn: Any, decoding: dict[str, str]) -> None:
        self._conn = conn
        self._decoding = decoding
        self._reader = self._fresh_reader()
        self._buffer = bytearray(_READ_SIZE)
        # Closed with the thread that keeps it (redis-py closes a connection it collects too,
        # but not before the garbage collector gets to it).
        weakref.finalize(self, conn.disconnect)

    def _fresh_reader(self) -> hiredis.Reader:
        return hiredis.Reader(
            protocolError=redis.exceptions.InvalidResponse,
            replyError=BaseParser.parse_error,  # NOSCRIPT, OOM, READONLY...: redis-py's classes
            notEnoughData=_MORE,
            **self._decoding,
        )

    def exchange(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        conn = self._conn
        # Sent by the connection (``_Budgeted``: the attempt's budget as socket timeout, a
        # connection made if there is none, NotSent if that fails), read here.
        packed = b"".join([hiredis.pack_command(command) for command in commands])
        conn.send_packed_command([packed], check_health=False)
        try:
            replies = self._read(conn._sock, len(commands))
        except BaseException as error:
            # A reply half read must not be read by the next round trip: start afresh.
            conn.disconnect()
            self._reader = self._fresh_reader()
            if isinstance(error, socket.timeout):
                raise redis.exceptions.TimeoutError("Timeout reading from socket") from error
            if isinstance(error, OSError):
                reason = f"Error reading from socket: {error}"
                raise redis.exceptions.ConnectionError(reason) from error
            raise
        for reply in replies:
            if isinstance(reply, redis.exceptions.RedisError):
                raise reply  # after every reply was read: the connection stays in step
        return replies

    def _read(self, sock: socket.socket, count: int) -> list[Any]:
        reader, buffer = self._reader, self._buffer
        replies: list[Any] = []
        while len(replies) < count:
            reply = reader.gets()
            if reply is _MORE:
                received = sock.recv_into(buffer)
                if not received:
                    raise redis.exceptions.ConnectionError("Connection closed by server.")
                reader.feed(buffer, 0, received)  # type: ignore[arg-type]  # takes any buffer
            else:
                replies.append(reply)
        return replies
