"""The master's event log on disk: append-only segments, snapshots, bounded retention.

Theory of operation
-------------------
Layout under the log directory (``<data_dir>/eventlog``)::

    current.log                          the open segment
    archive/seg-<n:08d>.log              closed segments, oldest first
    snapshots/snap-<clock>-<master>-<index>.msgpack

A segment is a sequence of records, each a 4-byte big-endian length followed
by msgpack of ``to_wire(record)``; a record is an ``Entry`` (one indexed
event of a session) or a ``SnapshotMark`` (a snapshot of that session at an
index was written to ``snapshots/``). Within a segment entries are dense:
each is the next index of its session, or index 0 of a newer session.

Retention: the open segment is archived when a snapshot is written, when it
grows past ``segment_max_bytes`` and when a session starts; archives are
capped at ``archive_max_files`` files and ``archive_max_bytes`` bytes
(oldest deleted first); the newest ``snapshots_kept`` snapshots are kept.
So a long-lived cluster uses bounded disk, and the newest snapshot plus the
segments after it always replay to the current state.

Failure: on any ``OSError``, or when free space drops under
``min_free_bytes`` (checked at open, at every snapshot and every
``check_every`` appends), the log turns *degraded*: it reports once through
``on_failure`` (the driver feeds ``PersistFailed`` to the core, which logs
the one critical line), drops appends and keeps the node serving. A failure
while the constructor opens the log is *not* reported through ``on_failure``
(its owner is still being assembled, and the callback usually reaches
objects that do not exist yet): the log is returned degraded, with
``degraded_reason`` set, and the owner reports it once it is wired up. It never
leaves a silent gap: it resumes only at a point that is consistent by
itself, the next snapshot (a new segment starting with its ``SnapshotMark``)
or index 0 of a new session.

Durability: records are flushed to the OS after every batch (``flush``);
segments are fsynced when archived and snapshots before they are renamed
into place. Followers hold replicas of the log, so the disk copy is for
recovery of a restarted master and for audits, not for agreement.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
from collections.abc import Callable
from typing import IO
from dataclasses import dataclass
from pathlib import Path

from skulk.core.codec import WireError, decode_msgpack, encode_msgpack
from skulk.core.events import IndexedEvent
from skulk.core.messages import Snapshot
from skulk.core.records import TaggedRecord
from skulk.core.session import Session
from skulk.core.state import EMPTY_STATE, State, apply, decode_state, digest

__all__ = [
    "Entry",
    "SnapshotMark",
    "LogRecord",
    "EventLog",
    "SegmentRead",
    "read_segment",
    "iter_segments",
    "load_snapshot",
    "replay",
    "ReplayResult",
    "archived_segments",
    "GIB",
]

log = logging.getLogger("skulk.eventlog")

GIB = 1024**3
_LEN = struct.Struct(">I")
_MAX_RECORD = 256 * 1024 * 1024
_SEG_RE = re.compile(r"^seg-(\d{8})\.log$")
_SNAP_RE = re.compile(r"^snap-(\d+)-(.+)-(\d+)\.msgpack$")


class Entry(TaggedRecord, frozen=True, kw_only=True):
    session: Session
    indexed: IndexedEvent


class SnapshotMark(TaggedRecord, frozen=True, kw_only=True):
    """A snapshot of ``session`` after ``index`` is in ``snapshots/<file>``."""

    session: Session
    index: int
    digest: str
    file: str


LogRecord = Entry | SnapshotMark


def _frame(record: LogRecord) -> bytes:
    body = encode_msgpack(record)
    assert len(body) <= _MAX_RECORD, f"log record of {len(body)} bytes"
    return _LEN.pack(len(body)) + body


def _snapshot_name(snap: Snapshot) -> str:
    return f"snap-{snap.session.clock}-{snap.session.master}-{snap.index}.msgpack"


class EventLog:
    """Append-only log of one node's master sessions. Not thread-safe: one caller."""

    def __init__(
        self,
        directory: Path,
        *,
        on_failure: Callable[[str], None],
        min_free_bytes: int = 2 * GIB,
        check_every: int = 1024,
        segment_max_bytes: int = 64 * 1024 * 1024,
        archive_max_files: int = 5,
        archive_max_bytes: int = GIB,
        snapshots_kept: int = 2,
        opener: Callable[[Path, str], IO[bytes]] | None = None,
    ) -> None:
        assert check_every > 0 and archive_max_files > 0 and snapshots_kept > 0
        self.directory = directory
        self.on_failure = on_failure
        self.min_free_bytes = min_free_bytes
        self.check_every = check_every
        self.segment_max_bytes = segment_max_bytes
        self.archive_max_files = archive_max_files
        self.archive_max_bytes = archive_max_bytes
        self.snapshots_kept = snapshots_kept
        # How segment files are opened (tests inject a file that fails like a full disk).
        self._opener: Callable[[Path, str], IO[bytes]] = opener or (lambda path, mode: open(path, mode))
        self.degraded = False
        self.degraded_reason = ""
        self.appended = 0
        self.dropped = 0
        self.failures = 0
        self._file: IO[bytes] | None = None
        self._size = 0
        self._since_check = 0
        # The last (session, index) written: the next entry must continue it.
        self._last: tuple[Session, int] | None = None
        # While the constructor runs, a failure is recorded, never reported (module docstring).
        self._opening = True
        try:
            self._open()
        finally:
            self._opening = False

    # --- public ----------------------------------------------------------------------

    def append(self, session: Session, indexed: IndexedEvent) -> None:
        """Record event ``indexed`` of ``session`` (dropped while degraded)."""
        if indexed.index == 0 and (self._last is None or self._last[0] != session):
            # A new session: a consistent starting point by itself.
            self._rotate_or_resume(f"session {session} started")
        if self.degraded:
            self.dropped += 1
            return
        if self._last is not None and self._last[0] == session:
            if indexed.index != self._last[1] + 1:
                # Not ours to judge the core, but never write a log that would not replay.
                self._fail(f"non-consecutive index {indexed.index} after {self._last[1]} in {session}")
                self.dropped += 1
                return
        elif indexed.index != 0:
            self._fail(f"session {session} does not start at index 0 (got {indexed.index})")
            self.dropped += 1
            return
        self._write(Entry(session=session, indexed=indexed))
        if self.degraded:
            self.dropped += 1
            return
        self._last = (session, indexed.index)
        self.appended += 1
        self._since_check += 1
        if self._since_check >= self.check_every:
            self._since_check = 0
            self._check_space()
        if not self.degraded and self._size >= self.segment_max_bytes:
            self._archive_current()

    def write_snapshot(self, snapshot: Snapshot) -> None:
        """Persist ``snapshot`` atomically, archive the open segment, apply retention.

        While degraded this is also the attempt to resume: on success the new
        segment starts at this snapshot.
        """
        if not self._has_space():
            if not self.degraded:
                self._fail(self._space_message())
            return
        try:
            snap_dir = self.directory / "snapshots"
            snap_dir.mkdir(parents=True, exist_ok=True)
            name = _snapshot_name(snapshot)
            tmp = snap_dir / f".{name}.tmp"
            with open(tmp, "wb") as f:
                f.write(encode_msgpack(snapshot))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, snap_dir / name)
        except OSError as exc:
            self._fail(f"snapshot: {exc}")
            return
        if self.degraded:
            self._resume(f"snapshot at index {snapshot.index} of {snapshot.session}")
            if self.degraded:
                return
        else:
            self._archive_current()
            if self.degraded:
                return
        self._write(SnapshotMark(session=snapshot.session, index=snapshot.index, digest=snapshot.digest, file=name))
        if not self.degraded:
            self._last = (snapshot.session, snapshot.index)
        self._prune_snapshots()

    def flush(self) -> None:
        """Hand buffered records to the OS (called after every batch of effects)."""
        if self.degraded or self._file is None:
            return
        try:
            self._file.flush()
        except OSError as exc:
            self._fail(f"flush: {exc}")

    def close(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            pass
        finally:
            try:
                f.close()
            except OSError:
                pass

    # --- internals -------------------------------------------------------------------

    @property
    def current_path(self) -> Path:
        return self.directory / "current.log"

    def _open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / "archive").mkdir(exist_ok=True)
            if self.current_path.exists() and self.current_path.stat().st_size > 0:
                # Left by an earlier run: archive it whole (a torn tail is tolerated by readers).
                self._archive_file(self.current_path)
            self._file = self._opener(self.current_path, "ab")
            self._size = 0
        except OSError as exc:
            self._fail(f"open: {exc}")
            return
        if not self._has_space():
            self._fail(self._space_message())

    def _write(self, record: LogRecord) -> None:
        if self._file is None:
            self._fail("no open segment")
            return
        frame = _frame(record)
        try:
            self._file.write(frame)
        except OSError as exc:
            self._fail(f"write: {exc}")
            return
        self._size += len(frame)

    def _fail(self, reason: str) -> None:
        self.failures += 1
        if self.degraded:
            return
        self.degraded = True
        self.degraded_reason = reason
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass  # the buffered tail may be lost; readers tolerate a torn tail
        if not self._opening:
            self.on_failure(reason)

    def _has_space(self) -> bool:
        try:
            return shutil.disk_usage(self.directory).free >= self.min_free_bytes
        except OSError:
            return False

    def _space_message(self) -> str:
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError as exc:
            return f"cannot check free space: {exc}"
        return f"only {free / GIB:.2f} GiB free under {self.directory} (need {self.min_free_bytes / GIB:.2f} GiB)"

    def _check_space(self) -> None:
        if not self._has_space():
            self._fail(self._space_message())

    def _rotate_or_resume(self, why: str) -> None:
        if self.degraded:
            self._resume(why)
        else:
            self._archive_current()
        self._last = None

    def _resume(self, why: str) -> None:
        """Leave degraded mode with a fresh segment, if the disk allows it now."""
        assert self.degraded
        if not self._has_space():
            return
        try:
            if self.current_path.exists() and self.current_path.stat().st_size > 0:
                self._archive_file(self.current_path)
            self._file = self._opener(self.current_path, "ab")
            self._size = 0
        except OSError:
            self._file = None
            return
        self.degraded = False
        self.degraded_reason = ""
        self._last = None
        log.warning("event log resumed at %s (%d event(s) not on disk)", why, self.dropped)

    def _archive_current(self) -> None:
        f = self._file
        if f is None or self._size == 0:
            return
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._file = None
            self._archive_file(self.current_path)
            self._file = self._opener(self.current_path, "ab")
            self._size = 0
        except OSError as exc:
            self._fail(f"rotate: {exc}")

    def _archive_file(self, path: Path) -> None:
        archive = self.directory / "archive"
        archive.mkdir(exist_ok=True)
        numbers = [int(m.group(1)) for p in archive.iterdir() if (m := _SEG_RE.match(p.name))]
        target = archive / f"seg-{max(numbers, default=0) + 1:08d}.log"
        os.replace(path, target)
        self._enforce_archive_caps()

    def _enforce_archive_caps(self) -> None:
        segments = archived_segments(self.directory)
        total = sum(p.stat().st_size for p in segments)
        while segments and (len(segments) > self.archive_max_files or total > self.archive_max_bytes):
            oldest = segments.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink()

    def _prune_snapshots(self) -> None:
        snap_dir = self.directory / "snapshots"
        snaps = sorted(
            (p for p in snap_dir.iterdir() if _SNAP_RE.match(p.name)), key=lambda p: (p.stat().st_mtime_ns, p.name)
        )
        for old in snaps[: -self.snapshots_kept]:
            try:
                old.unlink()
            except OSError:
                pass


# --- reading and replay ---------------------------------------------------------------


def archived_segments(directory: Path) -> list[Path]:
    """Archived segments, oldest first."""
    archive = directory / "archive"
    if not archive.is_dir():
        return []
    return sorted((p for p in archive.iterdir() if _SEG_RE.match(p.name)), key=lambda p: p.name)


def iter_segments(directory: Path) -> list[Path]:
    """Every segment in write order: the archives, then the open segment."""
    segments = archived_segments(directory)
    current = directory / "current.log"
    if current.is_file():
        segments.append(current)
    return segments


@dataclass(frozen=True)
class SegmentRead:
    records: list[LogRecord]
    torn: bool  # the file ended inside a record (a crash or a full disk mid-write)
    bytes_read: int


def read_segment(path: Path) -> SegmentRead:
    """Every whole record in ``path``; a torn last record is reported, not raised.

    Raises ``WireError`` when a whole record does not decode (corruption, not
    a torn tail).
    """
    data = path.read_bytes()
    records: list[LogRecord] = []
    pos = 0
    while pos + 4 <= len(data):
        (n,) = _LEN.unpack_from(data, pos)
        if n > _MAX_RECORD:
            raise WireError(f"{path}: record at byte {pos} claims {n} bytes")
        if pos + 4 + n > len(data):
            break
        records.append(decode_msgpack(LogRecord, data[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return SegmentRead(records=records, torn=pos != len(data), bytes_read=pos)


def load_snapshot(path: Path) -> Snapshot:
    snap = decode_msgpack(Snapshot, path.read_bytes())
    assert isinstance(snap, Snapshot)
    return snap


@dataclass(frozen=True)
class ReplayResult:
    state: State
    session: Session | None
    events_applied: int
    from_snapshot: int | None  # the snapshot index replay started from, if any
    torn_segments: int


def replay(directory: Path) -> ReplayResult:
    """Rebuild the newest session's state from the snapshots and segments in ``directory``.

    Starts from the newest ``SnapshotMark`` of the newest session whose
    snapshot file exists (checking its digest), else from that session's
    index 0, and applies every later entry with the strict ``apply``; raises
    ``AssertionError`` if the log does not replay (a gap, a conflict).
    """
    records: list[LogRecord] = []
    torn = 0
    for seg in iter_segments(directory):
        got = read_segment(seg)
        records += got.records
        torn += int(got.torn)
    if not records:
        return ReplayResult(EMPTY_STATE, None, 0, None, torn)
    newest = max(r.session for r in records)
    mine = [r for r in records if r.session == newest]
    state = EMPTY_STATE
    start_after = -1
    from_snapshot = None
    for rec in reversed(mine):
        if isinstance(rec, SnapshotMark):
            path = directory / "snapshots" / rec.file
            if path.is_file():
                snap = load_snapshot(path)
                state = decode_state(snap.state)
                assert digest(state) == snap.digest == rec.digest, f"snapshot {path} does not match its digest"
                start_after = snap.index
                from_snapshot = snap.index
                break
    applied = 0
    for rec in mine:
        if isinstance(rec, Entry) and rec.indexed.index > start_after:
            state = apply(state, rec.indexed)
            applied += 1
    return ReplayResult(state, newest, applied, from_snapshot, torn)
