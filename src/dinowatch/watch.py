"""Intake: watch folders and report each matching file once it is complete.

One `FolderWatcher` per watch entry. A watchdog observer (inotify, or polling for network
mounts) feeds events. A file is complete when it is closed after writing or moved into
place; failing that (polling, SMB), when its size and mtime stay unchanged for
`settle_seconds`. The watcher's own thread settles pending files, runs the catch-up scan and
supervises the folder: a missing or unreadable folder is reported once per outage and
watched again, with a fresh catch-up scan, as soon as it is back.

Events can be lost: the kernel's inotify queue overflows under a burst, and the per-user
watch or instance limits can be reached. An overflow triggers a catch-up scan at once; a
limit makes that folder fall back to polling; and a periodic reconciliation scan
(`rescan_minutes`) catches anything else. A scan never re-embeds what is recorded.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Protocol

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver
from watchdog.observers.inotify import InotifyFullEmitter
from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchCallback,
    WatchDescriptor,
)
from watchdog.observers.polling import PollingObserverVFS

from dinowatch.config import WatchSettings
from dinowatch.errors import readable
from dinowatch.health import Activity

log = logging.getLogger(__name__)

CHECK_INTERVAL = 5.0  # seconds between folder health checks (exists, same inode, observer alive)
SETTLE_TICK = 0.25  # longest pause between looks at pending files (shorter for small settles)
MIN_SETTLE_TICK = 0.02
INOTIFY_QUIET_SECONDS = 60.0  # settle fallback when inotify saw no close (e.g. mmap writers)
POLL_INTERVAL = 1.0  # PollingObserver: seconds between directory snapshots
JOIN_TIMEOUT = 10.0  # stop() gives up waiting (and logs) after this; threads are daemons
REPORTED_MAX = 4096  # recent reports remembered so one write is never reported twice
# inotify(7) limits, by the errno that reaching them gives: the sysctl to raise.
INOTIFY_LIMITS = {errno.ENOSPC: "fs.inotify.max_user_watches",
                  errno.EMFILE: "fs.inotify.max_user_instances"}

# Only what intake acts on: leaves out open/access/close-without-write, which the daemon's
# own reads of every image would otherwise add.
EVENT_TYPES: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]

Signature = tuple[int, int, int]  # (inode, size, mtime_ns): changes with every write or replace


class WatchEvents(Protocol):
    """Receiver of intake events (the daemon). Callbacks must only hand off and return."""

    def file_ready(self, path: Path, watch: WatchSettings) -> None: ...
    def file_deleted(self, path: Path, watch: WatchSettings) -> None: ...
    def folder_scanned(self, watch: WatchSettings, present: set[Path]) -> None: ...
    def folder_error(self, watch: WatchSettings, message: str) -> None: ...


def name_matches(name: str, patterns: list[str]) -> bool:
    """True if the file or folder name matches a glob pattern, ignoring case."""
    name = name.lower()  # cameras write .JPG
    return any(fnmatchcase(name, pattern.lower()) for pattern in patterns)


def is_gone(path: str | Path) -> bool:
    """True only when the name is certainly missing (not merely unreadable right now: a
    network share that fails for a moment must not look like a deletion)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def matches(path: Path, watch: WatchSettings) -> bool:
    """True if the watch takes this file: included, not excluded, not in a skipped sub-folder."""
    try:
        parts = path.relative_to(watch.path).parts
    except ValueError:
        return False
    if not parts or (not watch.recursive and len(parts) > 1):
        return False
    # Exclusions apply to every folder below the root too, so ".*" hides ".thumbnails/a.jpg".
    return name_matches(parts[-1], watch.include) and not any(
        name_matches(part, watch.exclude) for part in parts
    )


def scan(watch: WatchSettings) -> Iterator[Path]:
    """Yield the matching files below the watch folder, depth first, sorted by name.

    An unreadable root raises `OSError`; an unreadable sub-folder is logged and skipped.
    """
    yield from _walk(watch.path, watch, root=True)


def _walk(folder: Path, watch: WatchSettings, *, root: bool) -> Iterator[Path]:
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as err:
        if root:
            raise
        log.warning("Cannot list %s: %s", folder, err)
        return
    for entry in entries:
        path = folder / entry.name
        try:  # symlinked folders are not followed: they could loop
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError as err:
            log.warning("Cannot stat %s: %s", path, err)
            continue
        if is_dir:
            if watch.recursive and not name_matches(entry.name, watch.exclude):
                yield from _walk(path, watch, root=False)
        elif matches(path, watch):
            # Whatever else carries an image's name (a broken or looping link, a FIFO) is
            # handed over too: the pipeline records why it is not an image.
            yield path


def _signature(st: os.stat_result) -> Signature:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _probe(path: Path) -> Signature | None:
    """The file's signature; a link that cannot be followed is described by the link itself.
    None: the name is gone."""
    try:
        return _signature(path.stat())
    except OSError:
        try:
            return _signature(path.lstat())
        except OSError:
            return None


@dataclass(slots=True)
class _Pending:
    signature: Signature | None  # None: not looked at yet
    since: float  # monotonic time the signature last changed
    quiet: float  # seconds unchanged that make it complete


class _ReportingFD(InotifyFD):
    """watchdog's inotify reader, plus callbacks for the events that watchdog (7.x) only logs
    or swallows: a kernel queue overflow (events were dropped: a scan must find the files),
    and reaching a watch limit below the root (that sub-folder would go unwatched).
    """

    def __init__(self, on_overflow: Callable[[], None],
                 on_limit: Callable[[OSError], None]) -> None:
        super().__init__()
        self._on_overflow = on_overflow
        self._on_limit = on_limit

    def handle_event(self, event: InotifyEvent) -> None:
        super().handle_event(event)
        if event.is_queue_overflow:
            self._on_overflow()

    def add_callback(self, path: bytes, mask: Mask, callback: WatchCallback,
                     id_: CallbackId) -> WatchDescriptor:
        try:
            return super().add_callback(path, mask, callback, id_)
        except OSError as err:
            if err.errno in INOTIFY_LIMITS:
                self._on_limit(err)
            raise


class _InotifyObserver(BaseObserver):
    """watchdog's InotifyObserver with full move events, reading through `_ReportingFD`.

    Full events report moves into and out of the tree as moves, not create/delete, so a file
    moved in counts as complete at once instead of having to settle.
    """

    def __init__(self, on_overflow: Callable[[], None],
                 on_limit: Callable[[OSError], None]) -> None:
        self._inotify_fd = _ReportingFD(on_overflow, on_limit)  # one instance per folder
        self._inotify_fd.start()
        super().__init__(InotifyFullEmitter, timeout=DEFAULT_OBSERVER_TIMEOUT,
                         inotify_fd=self._inotify_fd)

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._inotify_fd.stop()
        self._inotify_fd.join()


class _Handler(FileSystemEventHandler):
    """Adapter for the observer thread; nothing may escape into watchdog's thread."""

    def __init__(self, watcher: FolderWatcher) -> None:
        self._watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._watcher._on_event(event)
        except Exception:
            log.exception("Handling %s failed", event)


class FolderWatcher:
    """Watches one folder and reports complete files to `events`."""

    def __init__(
        self, watch: WatchSettings, events: WatchEvents, *, check_interval: float = CHECK_INTERVAL
    ) -> None:
        self.watch = watch
        self._events = events
        self._check_interval = check_interval
        self._tick = max(MIN_SETTLE_TICK, min(SETTLE_TICK, watch.settle_seconds / 4))
        self._lock = threading.Lock()  # guards _pending and _reported (observer vs own thread)
        self._pending: dict[Path, _Pending] = {}
        self._reported: OrderedDict[Path, Signature] = OrderedDict()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._rescan = True
        self._polling = watch.polling  # also set when inotify's limits are reached
        self._inotify_limit: OSError | None = None
        self.activity = Activity(f"the watcher of {readable(watch.path)}")
        # Owned by the watcher thread alone:
        self._observer: BaseObserver | None = None
        self._identity: tuple[int, int] | None = None
        self._outage = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching without blocking; the catch-up scan runs on the watcher's thread."""
        if self._thread is not None:
            raise RuntimeError(f"watcher for {self.watch.path} already started")
        self._thread = threading.Thread(
            target=self._run, name=f"watch-{self.watch.source_name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Stop the observer and the watcher thread; wait up to `timeout` s (0: do not wait)."""
        self._stopping.set()
        self._wake.set()
        if timeout and self._thread is not None and \
                self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("Watcher for %s did not stop within %.0f s", self.watch.path,
                            timeout)

    def rescan(self) -> None:
        """Scan the folder again soon (from any thread): new files are reported, files
        gone are told to the daemon through `folder_scanned`."""
        self._rescan = True
        self._wake.set()

    # -- watcher thread --------------------------------------------------------------------

    def _run(self) -> None:
        next_check = 0.0
        rescan_every = self.watch.rescan_minutes * 60
        next_rescan = time.monotonic() + rescan_every
        while not self._stopping.is_set():
            self.activity.beat()
            try:
                if rescan_every and time.monotonic() >= next_rescan:
                    log.debug("Reconciliation scan of %s", self.watch.path)
                    self._rescan = True
                    self._wake.set()
                    next_rescan = time.monotonic() + rescan_every
                if self._wake.is_set() or time.monotonic() >= next_check:
                    self._wake.clear()
                    self._supervise()
                    next_check = time.monotonic() + self._check_interval
                self._settle()
            except Exception:  # a bug here must not end watching for good
                log.exception("Watcher for %s failed; retrying", self.watch.path)
            self._wake.wait(self._tick)
        self._teardown()

    def _supervise(self) -> None:
        """Check the folder; (re)start the observer and catch up when needed."""
        try:
            with os.scandir(self.watch.path):  # exists, is a folder, and is readable
                pass
            st = self.watch.path.stat()
        except OSError as err:
            self._fail(err)
            return
        # A new inode or device means removed and recreated, or (un)mounted: inotify watches
        # the old one. The emitter also ends by itself when inotify drops its watch.
        identity = (st.st_dev, st.st_ino)
        if identity != self._identity or not self._observer_alive():
            self._teardown()
            try:
                self._observer = self._start_observer()
            except OSError as err:
                if self._polling or err.errno not in INOTIFY_LIMITS:
                    self._fail(err)
                    return
                self._inotify_limit = err  # at the root, or no instance left (EMFILE)
            self._identity = identity
            self._rescan = True
        if self._inotify_limit is not None and not self._polling:
            self._poll_instead(self._inotify_limit)
            return
        if self._outage:
            self._outage = False
            log.info("Watch folder %s is available again", self.watch.path)
        if self._rescan:
            self._rescan = False
            self._catch_up()

    def _fail(self, err: OSError) -> None:
        """Stop watching an unusable folder; report it once per outage."""
        self._teardown()
        self._identity = None
        with self._lock:
            self._pending.clear()
        if not self._outage:
            self._outage = True
            log.warning("Cannot watch %s: %s", self.watch.path, err.strerror or err)
            message = f"cannot watch {self.watch.path}: {err.strerror or err}"
            self._call(self._events.folder_error, self.watch, message)

    def _observer_alive(self) -> bool:
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        emitters = list(observer.emitters)
        return bool(emitters) and all(emitter.is_alive() for emitter in emitters)

    def _start_observer(self) -> BaseObserver:
        observer: BaseObserver
        if self._polling:
            # lstat: symlinked folders are not followed (they could loop, or lead anywhere),
            # and a broken or looping link is still seen, as a file to report.
            observer = PollingObserverVFS(os.lstat, os.scandir, polling_interval=POLL_INTERVAL)
        else:
            observer = _InotifyObserver(self._overflowed, self._limit_reached)
        try:
            observer.schedule(
                _Handler(self),
                str(self.watch.path),
                recursive=self.watch.recursive,
                event_filter=EVENT_TYPES,
            )
            observer.start()
        except BaseException:
            observer.stop()  # the inotify observer already runs a reader thread
            raise
        log.info("Watching %s (%s)", self.watch.path, "polling" if self._polling else "events")
        return observer

    @property
    def _write_quiet(self) -> float:
        """Seconds a file being written must stay unchanged to count as complete. inotify
        reports the writer's close, so there quiet is only a fallback (a slow upload may
        pause longer than settle_seconds, still open); polling has nothing else."""
        return (self.watch.settle_seconds if self._polling
                else max(self.watch.settle_seconds, INOTIFY_QUIET_SECONDS))

    def _poll_instead(self, err: OSError) -> None:
        """inotify's watch or instance limit is reached: poll this folder from now on."""
        log.warning("Cannot watch %s with inotify (%s): polling it instead. Raise the sysctl "
                    "%s and restart dinowatch to use inotify again.", self.watch.path,
                    err.strerror or err, INOTIFY_LIMITS.get(err.errno or 0, "fs.inotify.*"))
        self._teardown()
        self._polling, self._identity = True, None
        with self._lock:  # files waiting for inotify's close would wait for 60 s
            for entry in self._pending.values():
                entry.quiet = min(entry.quiet, self._write_quiet)
        self._wake.set()  # the next pass starts the polling observer and scans

    def _limit_reached(self, err: OSError) -> None:
        """inotify's reader (or our own thread, at start): a watch could not be added."""
        self._inotify_limit = err
        self._wake.set()

    def _overflowed(self) -> None:
        """inotify's reader thread: the kernel dropped events for this folder's watches."""
        log.warning("inotify queue overflowed on %s (fs.inotify.max_queued_events): "
                    "rescanning it", self.watch.path)
        self.rescan()

    def _teardown(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            try:
                observer.stop()
                observer.join(JOIN_TIMEOUT)
            except Exception:
                log.exception("Stopping the observer of %s failed", self.watch.path)

    def _catch_up(self) -> None:
        """List the folder: report complete files; fresh ones (maybe half written) settle."""
        present: set[Path] = set()
        try:
            for path in scan(self.watch):
                self.activity.beat()  # a scan of 100 000 files is progress, not a hang
                if self._stopping.is_set():
                    return
                signature = _probe(path)
                if signature is None:
                    continue  # gone since the listing
                present.add(path)
                fresh = time.time_ns() - signature[2] < self.watch.settle_seconds * 1e9
                with self._lock:
                    if path in self._pending:
                        continue  # being written: reported when complete
                    if fresh:
                        self._pending[path] = _Pending(None, time.monotonic(),
                                                       self.watch.settle_seconds)
                        continue
                self._emit_ready(path, signature, force=True)
        except OSError as err:
            self._fail(err)
            return
        try:  # a folder gone or replaced meanwhile makes the listing partial: don't report it
            st = self.watch.path.stat()
        except OSError as err:
            self._fail(err)
            return
        if (st.st_dev, st.st_ino) != self._identity:
            self._wake.set()  # the supervisor re-watches and scans again
            return
        log.info("Catch-up scan of %s: %d files", self.watch.path, len(present))
        self._call(self._events.folder_scanned, self.watch, present)

    def _settle(self) -> None:
        """Report pending files whose size and mtime stayed unchanged for settle_seconds."""
        with self._lock:
            pending = list(self._pending.items())
        for path, entry in pending:
            now = time.monotonic()
            signature = _probe(path)  # None: vanished; its delete event follows
            with self._lock:
                if self._pending.get(path) is not entry:
                    continue  # touched again or reported meanwhile
                if signature is None:
                    del self._pending[path]
                    continue
                if signature != entry.signature:
                    entry.signature, entry.since = signature, now
                    continue
                if now - entry.since < entry.quiet:
                    continue
            self._emit_ready(path, signature)

    # -- both threads ------------------------------------------------------------------------

    def _on_event(self, event: FileSystemEvent) -> None:
        """Observer thread: classify one event and hand off."""
        src = Path(os.fsdecode(event.src_path)) if event.src_path else None
        dest = Path(os.fsdecode(event.dest_path)) if event.dest_path else None
        if event.is_directory:
            if src == self.watch.path and isinstance(event, DirDeletedEvent | DirMovedEvent):
                self._wake.set()  # the folder itself is gone: the supervisor handles it now
            elif (
                isinstance(event, DirMovedEvent)
                and src is not None
                and (dest is None or not dest.is_relative_to(self.watch.path))
            ):
                # A folder left the tree without per-file events; a rescan's folder_scanned
                # tells the daemon what is still present.
                self._rescan = True
                self._wake.set()
            return
        if isinstance(event, FileMovedEvent):
            if src is not None and matches(src, self.watch):
                self._deleted(src)
            if dest is not None and matches(dest, self.watch):
                self._emit_ready(dest)
        elif src is None or not matches(src, self.watch):
            return
        elif isinstance(event, FileClosedEvent):
            self._emit_ready(src)
        elif isinstance(event, FileDeletedEvent):
            self._deleted(src)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            # A file found in a just-created folder arrives as "created" only (its close
            # came before the folder was watched): settle it. A write in progress is
            # "modified": under inotify its close will come, so quiet is only a fallback.
            quiet = (self.watch.settle_seconds if isinstance(event, FileCreatedEvent)
                     else self._write_quiet)
            with self._lock:
                self._pending[src] = _Pending(None, time.monotonic(), quiet)

    def _emit_ready(
        self, path: Path, signature: Signature | None = None, *, force: bool = False
    ) -> None:
        """Report a complete file, unless this very write was reported already."""
        if signature is None:
            signature = _probe(path)
            if signature is None:
                log.debug("Not reporting %s: gone", path)
                return
        with self._lock:
            self._pending.pop(path, None)
            if not force and self._reported.get(path) == signature:
                return
            self._reported[path] = signature
            self._reported.move_to_end(path)
            if len(self._reported) > REPORTED_MAX:
                self._reported.popitem(last=False)
        self._call(self._events.file_ready, path, self.watch)

    def _deleted(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)
            self._reported.pop(path, None)
        self._call(self._events.file_deleted, path, self.watch)

    def _call(self, callback: Callable[..., None], *args: object) -> None:
        """Run a callback; its failure is logged and never ends a watcher thread."""
        try:
            callback(*args)
        except Exception:
            name = getattr(callback, "__name__", repr(callback))
            log.exception("%s callback failed for %s", name, self.watch.path)
