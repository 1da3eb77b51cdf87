"""Bulk import and export of profiles: ``tactful import FILE`` and
``tactful export --profiles FILE`` (``-`` for stdin / stdout), one profile a line in the
format of ``profile_line``. A bad line is reported as ``line N: <field>: <problem>`` and
skipped, and the import goes on.

The semantics are the API's, by the store's own code: attributes go through SetAttributes'
script (an ``IMPORTED`` value never replaces or removes a ``STATED`` one; at most
``MAX_ATTRIBUTES_PER_USER`` per user), signals through RecordSignals' script (kept only for a
user whose stored or imported consent is given; withdrawing consent deletes them).

Idempotent: importing a file twice leaves the same state. RecordSignals *adds* observations
(a weight decayed to the newest one), so an import that added would double the signals on a
second run; a line's signals are instead the user's signal *state* (weight at observed_at,
what GetProfile and the export show, undecayed), and each replaces the stored value of its
topic (a topic given twice in a line is refused). Everything else is set, not added. Times
the file gives are kept, so a re-run is byte-for-byte the same; times it leaves out are the
run's start, so only they move.

The export writes every profile in this format, every time included, so export -> import
into an empty Redis gives the same profiles. Contact counters, cooldowns and decisions are
operational state and are not carried. User ids are kept (field ``user_id`` of the profile
hash, written by SetPreferences, SetAttributes and the import) because keys only hold a
digest: a profile whose hash has no such field has no user id and is counted, not
exported (any write through the API or an import gives it one).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TextIO

from tactful import validation
from tactful.domain import ProfileRecord
from tactful.errors import FieldViolation, InvalidArgument, Unavailable
from tactful.profile_line import parse_line, to_line
from tactful.store import ProfileWrite
from tactful.store.redis_store import RedisStore
from tactful.store.wire import STORE_DOWN_ERRORS

__all__ = [
    "DEFAULT_BATCH",
    "STORE_ERRORS",
    "BadLine",
    "ExportSummary",
    "ImportSummary",
    "Progress",
    "export_profiles",
    "import_lines",
    "parse_line",
    "report_to",
    "show_progress",
]

#: Users per pipeline, one round trip each: batches of 100 to 2,000 load at about the same
#: rate, and 500 typical users are a few hundred kB of commands.
DEFAULT_BATCH = 500

#: What a bulk command reports as "the store is unavailable" (the store's own and the client's).
STORE_ERRORS: tuple[type[Exception], ...] = (Unavailable, *STORE_DOWN_ERRORS)


class Progress:
    """A one-line counter with its rate on a terminal, redrawn at most every 0.2 s; silent
    when off. ``clear`` before writing anything else to the same stream."""

    def __init__(self, stream: TextIO, *, enabled: bool, what: str) -> None:
        self.stream = stream
        self.enabled = enabled
        self.what = what
        self.started = time.monotonic()
        self._drawn = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn < 0.2:
            return
        self._drawn = now
        rate = done / max(now - self.started, 1e-9)
        self.stream.write(f"\r\x1b[K{done:,} {self.what}  {rate:,.0f}/s")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = 0.0


@dataclass
class ImportSummary:
    lines: int = 0  # non-blank lines read
    imported: int = 0
    bad: int = 0
    signals_not_kept: int = 0  # lines with signals for a user without consent
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.imported / self.seconds if self.seconds else 0.0


BadLine = Callable[[int, Sequence[FieldViolation]], None]


def report_to(stream: TextIO, progress: Progress | None = None) -> BadLine:
    """Writes each problem of a bad line as ``line N: <field>: <problem>``."""

    def report(number: int, violations: Sequence[FieldViolation]) -> None:
        if progress is not None:
            progress.clear()
        for v in violations:
            stream.write(
                f"line {number}: {v.field}: {v.description}\n"
                if v.field
                else f"line {number}: {v.description}\n"
            )

    return report


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Python's cycle collector off for the import: what a line becomes (decoded JSON, frozen
    dataclasses, command tuples) holds no reference cycle and is freed by reference counting
    as its batch goes, so the collector would only walk each batch's young objects again and
    again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _BatchWriter:
    """Writes a batch of records by a thread of ``pool`` while the next batch is read, one
    batch at a time, and counts what the store did with each line of it."""

    def __init__(
        self,
        store: RedisStore,
        pool: ThreadPoolExecutor,
        now: float,
        summary: ImportSummary,
        bad_line: BadLine,
        progress: Progress | None,
    ) -> None:
        self._store = store
        self._pool = pool
        self._now = now
        self._summary = summary
        self._bad_line = bad_line
        self._progress = progress
        self._writing: tuple[Future[list[ProfileWrite]], list[int]] | None = None

    def write(self, records: list[ProfileRecord], numbers: list[int]) -> None:
        """Start writing ``records`` (the lines ``numbers``), once the batch before is done."""
        self.finish()
        future = self._pool.submit(
            self._store.write_profiles,
            records,
            limit=validation.MAX_ATTRIBUTES_PER_USER,
            started=self._now,
        )
        self._writing = (future, numbers)

    def finish(self) -> None:
        """Wait for the batch being written (raising the writer's error, if it had one) and
        count what the store did with it."""
        if self._writing is None:
            return
        future, numbers = self._writing
        self._writing = None
        self._count(numbers, future.result())
        if self._progress is not None:
            self._progress.update(self._summary.lines)

    def _count(self, numbers: Sequence[int], results: Sequence[ProfileWrite]) -> None:
        """Count each written line; report those the store refused."""
        for number, result in zip(numbers, results, strict=True):
            if result.erased:
                self._summary.bad += 1
                problem = "the profile was erased while the import ran: nothing of this line "
                self._bad_line(number, [FieldViolation("user_id", problem + "was written")])
                continue
            if result.over_bound is not None:
                self._summary.bad += 1
                field, bound = result.over_bound
                problem = f"a user holds at most {bound}; this would leave more"
                self._bad_line(
                    number, [FieldViolation(field, f"{problem} (nothing of this line was written)")]
                )
                continue
            if result.attributes_refused:
                self._summary.bad += 1
                problem = (
                    f"a user holds at most {validation.MAX_ATTRIBUTES_PER_USER}; this would "
                    f"leave {result.attributes_refused} (nothing of this line was written)"
                )
                self._bad_line(number, [FieldViolation("attributes", problem)])
                continue
            self._summary.imported += 1
            if result.signals_kept is False:
                self._summary.signals_not_kept += 1


def import_lines(
    store: RedisStore,
    lines: Iterable[bytes | str],
    *,
    bad_line: BadLine,
    now: float | None = None,
    batch: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> ImportSummary:
    """Read, check and write the lines, ``batch`` users per round trip, holding at most two
    batches: a file of any size streams through. One batch is written (by a thread that
    mostly waits for Redis, the GIL released) while the next is read and checked, so Redis
    and this process work at the same time. Bad lines go to ``bad_line`` as they are found
    (one refused by the store's attribute cap, when its batch is written), and the import
    goes on."""
    now = time.time() if now is None else now
    summary = ImportSummary()
    started = time.perf_counter()
    records: list[ProfileRecord] = []
    numbers: list[int] = []
    writer_pool = ThreadPoolExecutor(1, thread_name_prefix="import-writer")
    with _no_cycle_collection(), writer_pool as pool:
        writer = _BatchWriter(store, pool, now, summary, bad_line, progress)
        try:
            for number, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                summary.lines += 1
                try:
                    records.append(parse_line(raw, now))
                except InvalidArgument as exc:
                    summary.bad += 1
                    bad_line(number, exc.violations)
                    continue
                numbers.append(number)
                if len(records) >= batch:
                    writer.write(records, numbers)
                    records, numbers = [], []
            if records:
                writer.write(records, numbers)
        finally:
            writer.finish()
    summary.seconds = time.perf_counter() - started
    if progress is not None:
        progress.update(summary.lines, force=True)
        progress.clear()
    return summary


@dataclass
class ExportSummary:
    written: int = 0
    without_user_id: int = 0  # profiles whose hash holds no user id: not exported


def export_profiles(
    store: RedisStore, out: TextIO, *, progress: Progress | None = None
) -> ExportSummary:
    summary = ExportSummary()
    for user_id, profile in store.scan_profiles():
        if user_id is None:
            summary.without_user_id += 1
            continue
        out.write(to_line(profile))
        out.write("\n")
        summary.written += 1
        if progress is not None:
            progress.update(summary.written)
    if progress is not None:
        progress.clear()
    return summary


def show_progress(quiet: bool, stream: TextIO = sys.stderr) -> bool:
    return not quiet and stream.isatty()
