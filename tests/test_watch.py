"""Intake tests: real folders, real files, real watchdog observers."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dinowatch import watch as watch_module
from dinowatch.config import WatchSettings
from dinowatch.watch import FolderWatcher, matches

TIMEOUT = 10.0  # generous: CI has two noisy cores
GRACE = 0.8  # how long we keep listening to be sure nothing else arrives
OLD = time.time() - 3600  # mtime for files that were there "before the daemon started"


class Recorder:
    """WatchEvents that records every call, in order, with a thread-safe wait."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.ready_sizes: list[int] = []
        self.ready_times: list[float] = []
        self._cond = threading.Condition()

    def _add(self, kind: str, value: object) -> None:
        with self._cond:
            self.calls.append((kind, value))
            self._cond.notify_all()

    def file_ready(self, path: Path, watch: WatchSettings) -> None:
        self.ready_times.append(time.monotonic())
        self.ready_sizes.append(path.lstat().st_size)
        self._add("ready", path)

    def file_deleted(self, path: Path, watch: WatchSettings) -> None:
        self._add("deleted", path)

    def folder_scanned(self, watch: WatchSettings, present: set[Path]) -> None:
        self._add("scanned", set(present))

    def folder_error(self, watch: WatchSettings, message: str) -> None:
        self._add("error", message)

    def of(self, kind: str) -> list:
        with self._cond:
            return [value for k, value in self.calls if k == kind]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)


@pytest.fixture
def run() -> Iterator[Callable[..., FolderWatcher]]:
    watchers: list[FolderWatcher] = []

    def start(settings: WatchSettings, events: Recorder, **kwargs: float) -> FolderWatcher:
        watcher = FolderWatcher(settings, events, **kwargs)
        watcher.start()
        watchers.append(watcher)
        return watcher

    yield start
    for watcher in watchers:
        watcher.stop()


def settings(path: Path, **kwargs: object) -> WatchSettings:
    return WatchSettings(path=path, **kwargs)


def write(path: Path, data: bytes = b"x" * 1000, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def drop(staging: Path, target: Path) -> Path:
    """Put a complete file in place atomically, the way a careful uploader does."""
    staging.mkdir(exist_ok=True)
    write(staging / target.name).replace(target)
    return target


def test_matches(tmp_path: Path) -> None:
    w = settings(tmp_path)
    assert matches(tmp_path / "a.jpg", w)
    assert matches(tmp_path / "IMG_0001.JPG", w)
    assert matches(tmp_path / "sub" / "deep" / "b.Png", w)
    assert not matches(tmp_path / "notes.txt", w)
    assert not matches(tmp_path / ".hidden.jpg", w)
    assert not matches(tmp_path / ".thumbnails" / "a.jpg", w)
    assert not matches(tmp_path / "a.jpg.part", w)
    assert not matches(tmp_path / "a.jpg.tmp", w)
    assert not matches(tmp_path / "A.JPG.TMP", w)
    assert not matches(tmp_path / "a.jpg~", w)
    assert not matches(tmp_path.parent / "elsewhere.jpg", w)
    assert not matches(tmp_path, w)
    flat = settings(tmp_path, recursive=False)
    assert matches(tmp_path / "a.jpg", flat)
    assert not matches(tmp_path / "sub" / "a.jpg", flat)
    custom = settings(tmp_path, include=["*.JPG"], exclude=["raw"])
    assert matches(tmp_path / "a.jpg", custom)
    assert not matches(tmp_path / "a.png", custom)
    assert not matches(tmp_path / "raw" / "a.jpg", custom)
    assert matches(tmp_path / ".x" / "a.jpg", custom)  # hidden only excluded by ".*"


def test_catch_up_scan_at_start(tmp_path: Path, run: Callable[..., FolderWatcher]) -> None:
    folder = tmp_path / "cam"
    for name in ["a.jpg", "B.JPG", "sub/c.png", ".hidden/d.jpg", "notes.txt", "e.jpg.part"]:
        write(folder / name, mtime=OLD)
    top = [folder / "B.JPG", folder / "a.jpg"]  # sorted by name: upper case first
    nested = [folder / "sub" / "c.png"]

    deep, flat = Recorder(), Recorder()
    run(settings(folder, settle_seconds=0.5), deep)
    run(settings(folder, settle_seconds=0.5, recursive=False), flat)
    for events, expected in [(deep, top + nested), (flat, top)]:
        assert events.wait_for(lambda e=events: bool(e.of("scanned")))
        time.sleep(GRACE)
        assert events.calls == [*(("ready", p) for p in expected), ("scanned", set(expected))]


def test_file_written_slowly_is_reported_once_complete(
    tmp_path: Path, run: Callable[..., FolderWatcher]
) -> None:
    events = Recorder()
    run(settings(tmp_path, settle_seconds=2.0), events)
    assert events.wait_for(lambda: bool(events.of("scanned")))
    path, chunk = tmp_path / "slow.jpg", b"\xff" * 20_000
    with open(path, "wb") as handle:
        for _ in range(6):  # ~1.5 s, handle open throughout
            handle.write(chunk)
            handle.flush()
            time.sleep(0.25)
        assert events.of("ready") == []
    assert events.wait_for(lambda: bool(events.of("ready")))
    time.sleep(GRACE)
    assert events.of("ready") == [path]
    assert events.ready_sizes == [6 * len(chunk)]


def test_temporary_name_renamed(tmp_path: Path, run: Callable[..., FolderWatcher]) -> None:
    events = Recorder()
    run(settings(tmp_path, settle_seconds=0.3), events)
    assert events.wait_for(lambda: bool(events.of("scanned")))
    tmp = write(tmp_path / "x.jpg.tmp", b"y" * 5000)
    time.sleep(0.3)
    tmp.rename(tmp_path / "x.jpg")
    assert events.wait_for(lambda: bool(events.of("ready")))
    time.sleep(GRACE)
    assert events.calls == [("scanned", set()), ("ready", tmp_path / "x.jpg")]
    assert events.ready_sizes == [5000]


def test_polling_waits_until_file_settles(
    tmp_path: Path, run: Callable[..., FolderWatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch_module, "POLL_INTERVAL", 0.3)
    events = Recorder()
    run(settings(tmp_path, polling=True, settle_seconds=0.5), events)
    assert events.wait_for(lambda: bool(events.of("scanned")))
    path = tmp_path / "nas.jpg"
    with open(path, "wb") as handle:
        for _ in range(12):  # ~1.2 s of growth, gaps well below settle_seconds
            handle.write(b"z" * 1000)
            handle.flush()
            time.sleep(0.1)
        last_write = time.monotonic()
        assert events.of("ready") == []
    assert events.wait_for(lambda: bool(events.of("ready")))
    time.sleep(GRACE)
    assert events.of("ready") == [path]
    assert events.ready_sizes == [12_000]
    assert events.ready_times[0] >= last_write + 0.4


def test_deleted_and_moved_away(tmp_path: Path, run: Callable[..., FolderWatcher]) -> None:
    folder, outside = tmp_path / "cam", tmp_path / "archive"
    a, b = write(folder / "a.jpg", mtime=OLD), write(folder / "b.jpg", mtime=OLD)
    outside.mkdir()
    events = Recorder()
    run(settings(folder, settle_seconds=0.3), events)
    assert events.wait_for(lambda: bool(events.of("scanned")))
    a.unlink()
    assert events.wait_for(lambda: events.of("deleted") == [a])
    b.rename(outside / "b.jpg")
    assert events.wait_for(lambda: events.of("deleted") == [a, b])
    time.sleep(GRACE)
    assert events.of("deleted") == [a, b]
    assert events.of("ready") == [a, b]


def test_missing_folder_then_appears(tmp_path: Path, run: Callable[..., FolderWatcher]) -> None:
    folder = tmp_path / "usb"
    events = Recorder()
    run(settings(folder, settle_seconds=0.3), events, check_interval=0.2)
    assert events.wait_for(lambda: bool(events.of("error")))
    time.sleep(0.6)  # several more checks, still one report
    [message] = events.of("error")
    assert str(folder) in message
    assert "No such file" in message
    folder.mkdir()
    photo = drop(tmp_path / "staging", folder / "p.jpg")
    assert events.wait_for(lambda: bool(events.of("ready")))
    time.sleep(GRACE)
    assert events.of("ready") == [photo]
    assert len(events.of("error")) == 1


def test_folder_removed_and_recreated(tmp_path: Path, run: Callable[..., FolderWatcher]) -> None:
    folder = tmp_path / "cam"
    old = write(folder / "old.jpg", mtime=OLD)
    events = Recorder()
    run(settings(folder, settle_seconds=0.3), events, check_interval=0.2)
    assert events.wait_for(lambda: events.of("scanned") == [{old}])
    shutil.rmtree(folder)
    assert events.wait_for(lambda: bool(events.of("error")))
    folder.mkdir()
    new = drop(tmp_path / "staging", folder / "new.jpg")
    assert events.wait_for(lambda: events.of("ready") == [old, new])
    assert events.wait_for(lambda: len(events.of("scanned")) == 2)
    time.sleep(GRACE)
    assert events.of("ready") == [old, new]
    assert len(events.of("error")) == 1
    assert events.of("scanned")[-1] in ({new}, set())  # depends on which came first


def test_failing_callback_does_not_stop_watching(
    tmp_path: Path, run: Callable[..., FolderWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    class Flaky(Recorder):
        def file_ready(self, path: Path, watch: WatchSettings) -> None:
            super().file_ready(path, watch)
            if path.name == "first.jpg":
                raise RuntimeError("queue full")

    events = Flaky()
    run(settings(tmp_path, settle_seconds=0.3), events)
    assert events.wait_for(lambda: bool(events.of("scanned")))
    with caplog.at_level(logging.ERROR, logger="dinowatch.watch"):
        first = write(tmp_path / "first.jpg")
        assert events.wait_for(lambda: events.of("ready") == [first])
        second = write(tmp_path / "second.jpg")
        assert events.wait_for(lambda: events.of("ready") == [first, second])
    assert "file_ready callback failed" in caplog.text
    assert "queue full" in caplog.text


# watchdog itself warns when it meets a just-created folder twice (2024/ and 2024/05/ at once).
@pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
def test_new_sub_folder_is_watched(tmp_path: Path, run: Callable[..., FolderWatcher]) -> None:
    events = Recorder()
    run(settings(tmp_path, settle_seconds=0.3), events)
    assert events.wait_for(lambda: bool(events.of("scanned")))
    photo = write(tmp_path / "2024" / "05" / "a.jpg")
    hidden = write(tmp_path / ".trash" / "b.jpg")
    assert events.wait_for(lambda: bool(events.of("ready")))
    photo.read_bytes()  # the daemon reading a file must not report it again
    time.sleep(GRACE)
    assert events.of("ready") == [photo]
    hidden.unlink()
    photo.unlink()
    assert events.wait_for(lambda: events.of("deleted") == [photo])


def test_writer_pausing_longer_than_settle_is_reported_only_at_close(
        tmp_path: Path, run: Callable[..., FolderWatcher]) -> None:
    events = Recorder()
    run(settings(tmp_path, settle_seconds=0.3), events)
    assert events.wait_for(lambda: bool(events.of("scanned")))
    path = tmp_path / "upload.jpg"
    with path.open("wb") as handle:
        handle.write(b"a" * 1000)
        handle.flush()
        time.sleep(1.5)  # a stalled upload, five times settle_seconds, file still open
        assert events.of("ready") == []
        handle.write(b"b" * 1000)
    assert events.wait_for(lambda: events.of("ready") == [path])
    assert path.stat().st_size == 2000
    time.sleep(GRACE)
    assert events.of("ready") == [path]


def test_periodic_reconciliation_scan(tmp_path: Path, run: Callable[..., FolderWatcher]) -> None:
    folder = tmp_path / "cam"
    present = write(folder / "a.jpg", mtime=OLD)
    periodic, off = Recorder(), Recorder()
    run(settings(folder, rescan_minutes=0.01), periodic)  # every 0.6 s
    run(settings(folder, rescan_minutes=0), off)
    assert periodic.wait_for(lambda: len(periodic.of("scanned")) >= 3)
    # Each scan hands every file over again; the pipeline skips what is recorded.
    assert periodic.of("ready").count(present) >= 3
    assert off.of("scanned") == [{present}] and off.of("ready") == [present]


def test_polling_follows_no_symlinked_folder_and_reports_broken_links(
        tmp_path: Path, run: Callable[..., FolderWatcher]) -> None:
    folder = tmp_path / "share"
    folder.mkdir()
    (folder / "loop").symlink_to(".")  # a link back up: followed, it never ends
    (folder / "elsewhere").symlink_to(tmp_path.parent)
    events = Recorder()
    run(settings(folder, polling=True, settle_seconds=0.2), events)
    assert events.wait_for(lambda: bool(events.of("scanned")))
    photo = write(folder / "a.jpg")
    dangling = folder / "gone.jpg"
    dangling.symlink_to(folder / "nothing-here.jpg")
    assert events.wait_for(lambda: {photo, dangling} <= set(events.of("ready")))
    time.sleep(GRACE)
    assert sorted(events.of("ready")) == sorted([photo, dangling])  # once each, no loop/…
