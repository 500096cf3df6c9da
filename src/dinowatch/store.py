"""Record stage: SQLite holds images, vectors and the MQTT outbox.

One writer thread owns every write, so an image's row, its vector and its outgoing messages
commit in one transaction and no two threads ever contend for the write lock. Readers open
their own connections (WAL lets them read while the writer writes).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from dinowatch.errors import DinowatchError
from dinowatch.health import Activity

log = logging.getLogger(__name__)

T = TypeVar("T")

RESUME_FREE_BYTES = 1 << 20  # after the disk was full, writes resume once this much is free
BUSY_TIMEOUT_SECONDS = 30.0  # how long a write waits for a lock another process holds
WRITE_TIMEOUT_SECONDS = 90.0  # a write not done by then is an error (a hung disk, a dead writer)

# Each migration moves the schema one version up; never edit one that has shipped.
MIGRATIONS = [
    """
    CREATE TABLE images (
        path TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        sha256 TEXT,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        width INTEGER,
        height INTEGER,
        status TEXT NOT NULL CHECK (status IN ('done', 'failed', 'deleted')),
        error TEXT,
        model TEXT,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX images_sha256 ON images (sha256);
    CREATE INDEX images_status ON images (status, updated_at);
    CREATE TABLE vectors (
        sha256 TEXT NOT NULL,
        model TEXT NOT NULL,
        vector BLOB NOT NULL,
        PRIMARY KEY (sha256, model)
    );
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: poison messages. A row the broker refuses, or that ends the connection, is retried
    # a bounded number of times (attempts, last_error, next_attempt_at), then parked in
    # dead_letters under its original seq. report_of: this row reports the parking of that
    # seq (a parked report is not reported again).
    """
    ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN next_attempt_at TEXT;
    ALTER TABLE outbox ADD COLUMN last_error TEXT;
    ALTER TABLE outbox ADD COLUMN report_of INTEGER;
    CREATE TABLE dead_letters (
        seq INTEGER PRIMARY KEY,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        error TEXT NOT NULL,
        parked_at TEXT NOT NULL,
        report_of INTEGER
    );
    """,
    # 3: match events. A gallery reference keeps its label on its image row; each event is
    # a row in `matches`, written in the image's transaction (path as in images.path).
    """
    ALTER TABLE images ADD COLUMN label TEXT;
    CREATE TABLE matches (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('gallery', 'duplicate')),
        label TEXT,
        score REAL NOT NULL,
        reference_path TEXT NOT NULL,
        reference_sha256 TEXT NOT NULL,
        ts TEXT NOT NULL
    );
    CREATE INDEX matches_path ON matches (path, sha256);
    CREATE INDEX images_label ON images (label) WHERE label IS NOT NULL;
    """,
]


class StoreError(DinowatchError):
    """The database cannot be opened or is newer than this dinowatch."""


class StoreUnavailable(StoreError):
    """A write could not be done now, through no fault of the data: retry it later."""


class DiskFull(StoreUnavailable):
    """The filesystem holding the database has no room for this write (SQLITE_FULL)."""


class StoreBusy(StoreUnavailable):
    """Another process held the database locked for longer than the busy timeout."""


def path_key(path: str) -> str | bytes:
    """How a file name is keyed in `images.path`: TEXT when it is valid UTF-8, else its BLOB.

    Lossless for any name (Python keeps undecodable bytes as PEP 383 surrogates, which SQLite
    text cannot hold), and ordinary names stay readable in the sqlite3 shell. A TEXT and a
    BLOB never compare equal, and each name has exactly one of the two forms.
    """
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _path(value: str | bytes) -> str:
    return value if isinstance(value, str) else os.fsdecode(value)


@dataclass(frozen=True)
class ImageRecord:
    path: str
    source: str
    size: int
    mtime_ns: int
    status: str  # done | failed | deleted
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    model: str | None = None
    label: str | None = None  # a gallery reference's label


@dataclass(frozen=True)
class Match:
    """A match event as stored: `path` (sha256) matched `reference_path` with `score`."""

    path: str
    sha256: str
    kind: str  # gallery | duplicate
    label: str | None
    score: float
    reference_path: str
    reference_sha256: str
    ts: str = ""


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class OutboxMessage(Message):
    seq: int = 0


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Store:
    """The dinowatch database at `path` (created and migrated on open)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._ack_lock = threading.Lock()
        self._acked: list[int] = []
        self.activity = Activity("store writer")
        self.broken: str | None = None  # why the writer stopped, if it did
        self._ack_flush_queued = False
        self._jobs: queue.Queue[tuple[Callable[[sqlite3.Connection], Any], Future] | None] = (
            queue.Queue())
        writer = self._connect()
        self._migrate(writer)
        self._writer = threading.Thread(target=self._write_loop, args=(writer,),
                                        name="store-writer", daemon=True)
        self._writer.start()

    # -- plumbing -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS,
                                         isolation_level=None,
                                         check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives a power cut, which the outbox's promise depends on.
            connection.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as err:
            raise StoreError(f"cannot open database {self.path}: {err}") from err
        connection.row_factory = sqlite3.Row
        return connection

    def _migrate(self, connection: sqlite3.Connection) -> None:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(f"{self.path} has schema version {version}; this dinowatch knows "
                             f"up to {len(MIGRATIONS)}: upgrade dinowatch")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            connection.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
            log.info("database %s migrated to schema version %d", self.path, number)

    def _write_loop(self, connection: sqlite3.Connection) -> None:
        while (job := self._jobs.get()) is not None:
            work, future = job
            with self.activity.working():
                try:
                    connection.execute("BEGIN IMMEDIATE")
                    result = work(connection)
                    connection.execute("COMMIT")
                except BaseException as err:  # the caller gets it through the future
                    future.set_exception(_unavailable(self.path, err) or err)
                    if not self._rolled_back(connection):
                        break
                else:
                    future.set_result(result)
        self._fail_waiting()
        connection.close()

    def _rolled_back(self, connection: sqlite3.Connection) -> bool:
        """Undo a failed transaction; False if that failed too (the writer must stop: its
        connection is in a state nothing can vouch for)."""
        try:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
        except sqlite3.Error as err:
            self.broken = f"ROLLBACK failed: {err}"
            log.critical("database writer for %s stopped: %s", self.path, self.broken)
            return False
        return True

    def _fail_waiting(self) -> None:
        """Writes queued behind a stopped writer fail now instead of waiting for ever."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job[1].set_exception(StoreError(f"{self.path}: the database writer stopped"))

    @property
    def alive(self) -> bool:
        """The writer thread runs (False after close() or a failed ROLLBACK)."""
        return self._writer.is_alive()

    def _write(self, work: Callable[[sqlite3.Connection], T], wait: bool = True) -> T | None:
        if not self._writer.is_alive():
            raise StoreError(f"{self.path}: the database writer stopped"
                             + (f" ({self.broken})" if self.broken else ""))
        future: Future[T] = Future()
        self._jobs.put((work, future))
        if not wait:
            future.add_done_callback(_log_failure)
            return None
        try:
            return future.result(WRITE_TIMEOUT_SECONDS)
        except TimeoutError as err:
            raise StoreError(f"{self.path}: a write did not finish in "
                             f"{WRITE_TIMEOUT_SECONDS:.0f} s") from err

    @property
    def _reader(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
        return connection

    def close(self, timeout: float | None = None) -> bool:
        """Finish queued writes, then stop the writer; False if it had not within `timeout`."""
        if self._writer.is_alive():
            self._jobs.put(None)
            self._writer.join(timeout)
        return not self._writer.is_alive()

    # -- writes ---------------------------------------------------------------------------
    def record(self, image: ImageRecord, vector: np.ndarray | None,
               messages: Iterable[Message], matches: Iterable[Match] = ()) -> None:
        """Store an image's row, its vector, its match events and its outgoing messages in
        ONE transaction."""
        messages, matches = list(messages), list(matches)

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO images (path, source, sha256, size, mtime_ns, width, "
                "height, status, error, model, label, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (path_key(image.path), image.source, image.sha256, image.size, image.mtime_ns,
                 image.width, image.height, image.status, image.error, image.model,
                 image.label, utc_now()))
            if vector is not None:
                db.execute("INSERT OR IGNORE INTO vectors (sha256, model, vector) VALUES (?,?,?)",
                           (image.sha256, image.model, vector.astype("<f4").tobytes()))
            _insert_matches(db, matches)
            _insert_messages(db, messages)

        self._write(work)

    def add_matches(self, matches: Iterable[Match], messages: Iterable[Message]) -> None:
        """Match events found after the fact (`gallery rematch`) and their messages."""
        matches, messages = list(matches), list(messages)

        def work(db: sqlite3.Connection) -> None:
            _insert_matches(db, matches)
            _insert_messages(db, messages)

        self._write(work)

    def enqueue(self, messages: Iterable[Message]) -> None:
        """Queue messages that belong to no image (e.g. a folder error)."""
        messages = list(messages)
        self._write(lambda db: _insert_messages(db, messages))

    def writable(self) -> bool:
        """True if there is room again: RESUME_FREE_BYTES free and a small write commits."""
        try:
            if shutil.disk_usage(self.path.parent).free < RESUME_FREE_BYTES:
                return False
            self._write(self._probe)
        except (OSError, StoreError, sqlite3.Error):
            return False
        return True

    def _probe(self, db: sqlite3.Connection) -> None:
        self._flush_acks(db)  # acks that a full disk refused
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", ("writable", utc_now()))

    def ack(self, seq: int) -> None:
        """The broker has the message: drop it from the outbox (does not wait).

        Acks that arrive while the writer is busy are deleted together in one transaction:
        one disk sync per burst instead of one per message.
        """
        with self._ack_lock:
            self._acked.append(seq)
            if self._ack_flush_queued:
                return  # the queued flush takes this one too
            self._ack_flush_queued = True
        self._write(self._flush_acks, wait=False)

    def _flush_acks(self, db: sqlite3.Connection) -> None:
        with self._ack_lock:
            seqs, self._acked, self._ack_flush_queued = self._acked, [], False
        try:
            db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in seqs])
        except BaseException:  # e.g. a full disk: kept for the next flush, never lost
            with self._ack_lock:
                self._acked[:0] = seqs
            raise

    def put_meta(self, key: str, value: str) -> None:
        self._write(lambda db: db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                          (key, value)), wait=False)

    # -- reads ----------------------------------------------------------------------------
    def image(self, path: str) -> ImageRecord | None:
        row = self._reader.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM images WHERE path = ?", (path_key(path),)).fetchone()
        return ImageRecord(**(dict(row) | {"path": path})) if row else None

    def images(self, status: str = "done") -> list[ImageRecord]:
        """Every row with this status, in path order."""
        rows = self._reader.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM images WHERE status = ? ORDER BY path", (status,))
        return [ImageRecord(**(dict(row) | {"path": _path(row["path"])})) for row in rows]

    def recorded_vectors(self, model: str) -> tuple[list[str], list[str], np.ndarray]:
        """Paths, sha256s and vectors (N, dim float32) of the `done` images of `model`."""
        join = ("FROM images i JOIN vectors v ON v.sha256 = i.sha256 AND v.model = i.model "
                "WHERE i.status = 'done' AND i.model = ?")
        reader = self._reader
        reader.execute("BEGIN")  # one snapshot for the count and the rows
        try:
            count = reader.execute(f"SELECT count(*) {join}", (model,)).fetchone()[0]
            paths: list[str] = []
            sha256s: list[str] = []
            vectors = np.zeros((0, 0), dtype=np.float32)
            cursor = reader.execute(f"SELECT i.path, i.sha256, v.vector {join}", (model,))
            cursor.row_factory = None  # plain tuples: no sqlite3.Row per image
            for row, (path, sha256, blob) in enumerate(cursor):
                vector = np.frombuffer(blob, dtype="<f4")
                if row == 0:
                    vectors = np.empty((count, vector.size), dtype=np.float32)
                vectors[row] = vector  # filled in place: no list of blobs, no joined copy
                paths.append(_path(path))
                sha256s.append(sha256)
        finally:
            reader.execute("COMMIT")
        return paths, sha256s, vectors

    def matches(self, path: str | None = None, limit: int = -1) -> list[Match]:
        """Match events of one image (None: all), newest first; at most `limit` (-1: all)."""
        where, args = ("WHERE path = ?", [path_key(path)]) if path is not None else ("", [])
        rows = self._reader.execute(
            "SELECT path, sha256, kind, label, score, reference_path, reference_sha256, ts "
            f"FROM matches {where} ORDER BY id DESC LIMIT ?", (*args, limit))
        return [Match(**(dict(row) | {"path": _path(row["path"]),
                                      "reference_path": _path(row["reference_path"])}))
                for row in rows]

    def known(self, sha256: str, model: str) -> tuple[np.ndarray, int | None, int | None] | None:
        """The stored vector (and picture size) for these bytes under this model, if any."""
        row = self._reader.execute(
            "SELECT v.vector, i.width, i.height FROM vectors v LEFT JOIN images i "
            "ON i.sha256 = v.sha256 AND i.model = v.model AND i.width IS NOT NULL "
            "WHERE v.sha256 = ? AND v.model = ? "
            "LIMIT 1", (sha256, model)).fetchone()
        if row is None:
            return None
        return np.frombuffer(row[0], dtype="<f4").astype(np.float32), row[1], row[2]

    def live_paths(self, root: Path) -> set[str]:
        """Paths below `root` that the store believes still exist."""
        prefix = os.fsencode(root).rstrip(b"/") + b"/"
        rows = self._reader.execute(
            "SELECT path FROM images WHERE status != 'deleted' "
            "AND substr(CAST(path AS BLOB), 1, ?) = ?", (len(prefix), prefix))
        return {_path(row[0]) for row in rows}

    def outbox_after(self, seq: int, limit: int) -> list[OutboxMessage]:
        rows = self._reader.execute(
            "SELECT seq, topic, payload, qos, retain FROM outbox WHERE seq > ? ORDER BY seq "
            "LIMIT ?", (seq, limit))
        return [_outbox_message(row) for row in rows]

    def outbox_depth(self) -> int:
        return self._reader.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def counts(self) -> dict[str, int]:
        rows = self._reader.execute("SELECT status, count(*) FROM images GROUP BY status")
        return {"done": 0, "failed": 0, "deleted": 0} | {row[0]: row[1] for row in rows}

    def label_counts(self) -> dict[str, int]:
        """Gallery label -> references recorded (`done`)."""
        # `+status`: through images_label (the gallery's rows), not through every done image
        rows = self._reader.execute("SELECT label, count(*) FROM images WHERE +status = 'done' "
                                    "AND label IS NOT NULL GROUP BY label ORDER BY label")
        return {row[0]: row[1] for row in rows}

    def last_errors(self, limit: int = 5) -> list[dict[str, str]]:
        rows = self._reader.execute(
            "SELECT path, error, updated_at FROM images WHERE status = 'failed' "
            "ORDER BY updated_at DESC LIMIT ?", (limit,))
        return [dict(row) | {"path": _path(row["path"])} for row in rows]

    def meta(self, key: str) -> str | None:
        row = self._reader.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # -- poison messages: retries and dead letters ------------------------------------------
    def outbox_rows(self, seqs: Iterable[int]) -> list[OutboxMessage]:
        """These outbox rows, those that are still there, in seq order."""
        wanted = sorted(set(seqs))
        rows = self._reader.execute(
            "SELECT seq, topic, payload, qos, retain FROM outbox WHERE seq IN "
            f"({','.join('?' * len(wanted))}) ORDER BY seq", wanted) if wanted else []
        return [_outbox_message(row) for row in rows]

    def outbox_attempts(self, seq: int) -> int | None:
        """Failed attempts so far of outbox row `seq` (None: no such row, e.g. acknowledged)."""
        row = self._reader.execute("SELECT attempts FROM outbox WHERE seq = ?",
                                   (seq,)).fetchone()
        return row[0] if row else None

    def outbox_retries(self) -> dict[int, str]:
        """seq -> next_attempt_at (ISO 8601 UTC) of the rows waiting to be tried again."""
        rows = self._reader.execute(
            "SELECT seq, next_attempt_at FROM outbox WHERE next_attempt_at IS NOT NULL")
        return {row[0]: row[1] for row in rows}

    def note_failure(self, seq: int, attempts: int, error: str, next_attempt_at: str) -> None:
        """Outbox row `seq` failed `attempts` times so far, the last with `error`."""
        self._write(lambda db: db.execute(
            "UPDATE outbox SET attempts = ?, last_error = ?, next_attempt_at = ? WHERE seq = ?",
            (attempts, error, next_attempt_at, seq)))

    def park(self, seq: int, attempts: int, error: str, report: Message | None) -> bool:
        """Move outbox row `seq` to the dead letters, and queue `report` (its one report on
        `error`) in the same transaction, unless the row is itself such a report: a report
        can never poison the outbox. False if there is no such row."""

        def work(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT * FROM outbox WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return False
            db.execute(
                "INSERT INTO dead_letters (seq, topic, payload, qos, retain, created_at, "
                "attempts, error, parked_at, report_of) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (seq, row["topic"], row["payload"], row["qos"], row["retain"],
                 row["created_at"], attempts, error, utc_now(), row["report_of"]))
            db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            if report is not None and row["report_of"] is None:
                _insert_messages(db, [report], report_of=seq)
            return True

        return bool(self._write(work))

    def dead_letter_count(self) -> int:
        return self._reader.execute("SELECT count(*) FROM dead_letters").fetchone()[0]

    def dead_letters(self) -> list[DeadLetter]:
        """The parked messages, oldest seq first."""
        rows = self._reader.execute(f"SELECT {_DEAD_LETTER_COLUMNS} FROM dead_letters "
                                    "ORDER BY seq")
        return [_dead_letter(row) for row in rows]

    def retry_dead_letters(self, seqs: Iterable[int] | None) -> list[tuple[int, int]]:
        """Move parked messages (None: all) back to the end of the outbox as new rows, in the
        order of their original seq, with a fresh retry budget. Returns (old, new) seqs.
        Raises NotParked, changing nothing, if any of `seqs` is not parked."""
        wanted = None if seqs is None else sorted(set(seqs))

        def work(db: sqlite3.Connection) -> list[tuple[int, int]]:
            moved = []
            for row in _parked(db, wanted):
                _insert_messages(db, [_outbox_message(row)], created_at=row["created_at"],
                                 report_of=row["report_of"])
                new = db.execute("SELECT last_insert_rowid()").fetchone()[0]
                db.execute("DELETE FROM dead_letters WHERE seq = ?", (row["seq"],))
                moved.append((row["seq"], new))
            return moved

        return self._write(work) or []

    def drop_dead_letters(self, seqs: Iterable[int] | None) -> list[int]:
        """Delete parked messages (None: all); returns their seqs. Raises NotParked, changing
        nothing, if any of `seqs` is not parked."""
        wanted = None if seqs is None else sorted(set(seqs))

        def work(db: sqlite3.Connection) -> list[int]:
            dropped = [row["seq"] for row in _parked(db, wanted)]
            db.executemany("DELETE FROM dead_letters WHERE seq = ?", [(s,) for s in dropped])
            return dropped

        return self._write(work) or []


def _outbox_message(row: sqlite3.Row) -> OutboxMessage:
    return OutboxMessage(topic=row["topic"], payload=bytes(row["payload"]), qos=row["qos"],
                         retain=bool(row["retain"]), seq=row["seq"])


def _unavailable(path: Path, err: BaseException) -> StoreUnavailable | None:
    """SQLite's transient failures as our own errors (primary result codes, sqlite.org/rescode)."""
    code = getattr(err, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return DiskFull(f"{path}: the disk is full ({err})")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreBusy(f"{path}: locked by another process ({err})")
    return None


def _log_failure(future: Future) -> None:
    if future.exception() is not None:
        log.error("database write failed: %s", future.exception())


_IMAGE_COLUMNS = ("path, source, size, mtime_ns, status, sha256, width, height, error, model, "
                  "label")


def _insert_matches(db: sqlite3.Connection, matches: list[Match]) -> None:
    now = utc_now()
    db.executemany(
        "INSERT INTO matches (path, sha256, kind, label, score, reference_path, "
        "reference_sha256, ts) VALUES (?,?,?,?,?,?,?,?)",
        [(path_key(m.path), m.sha256, m.kind, m.label, m.score, path_key(m.reference_path),
          m.reference_sha256, m.ts or now) for m in matches])


def _insert_messages(db: sqlite3.Connection, messages: list[Message], *,
                     created_at: str | None = None, report_of: int | None = None) -> None:
    """Append `messages` to the outbox. `report_of`: they report the parking of that seq
    (see migration 2)."""
    now = created_at or utc_now()
    db.executemany(
        "INSERT INTO outbox (topic, payload, qos, retain, created_at, report_of) "
        "VALUES (?,?,?,?,?,?)",
        [(m.topic, m.payload, m.qos, int(m.retain), now, report_of) for m in messages])


# ---- dead letters ---------------------------------------------------------------------------

class NotParked(StoreError):
    """Some of the seqs asked for are not in the dead letters."""

    def __init__(self, seqs: list[int]) -> None:
        super().__init__(f"no parked message with seq {', '.join(map(str, seqs))}")
        self.seqs = seqs


@dataclass(frozen=True)
class DeadLetter:
    """An outbox message parked after the broker refused it (or could never take it)."""

    seq: int  # its seq in the outbox
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created_at: str
    attempts: int
    error: str
    parked_at: str


_DEAD_LETTER_COLUMNS = "seq, topic, payload, qos, retain, created_at, attempts, error, parked_at"


def _dead_letter(row: sqlite3.Row) -> DeadLetter:
    return DeadLetter(**(dict(row) | {"payload": bytes(row["payload"]),
                                      "retain": bool(row["retain"])}))


def _parked(db: sqlite3.Connection, seqs: list[int] | None) -> list[sqlite3.Row]:
    """Dead-letter rows by seq (None: all), oldest first; NotParked if any is missing."""
    rows = db.execute("SELECT * FROM dead_letters ORDER BY seq").fetchall()
    if seqs is None:
        return rows
    found = {row["seq"]: row for row in rows}
    missing = [seq for seq in seqs if seq not in found]
    if missing:
        raise NotParked(missing)
    return [found[seq] for seq in seqs]
