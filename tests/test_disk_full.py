"""A full disk under data_dir, against the real daemon: reported once on `error` and in
`status`/`stats`, intake pauses (nothing is marked failed for it), and everything that
arrived meanwhile is embedded once space returns, without a restart.

data_dir lives on a small filesystem of its own (tmpfs, else a loop-mounted ext4 image) that
the test fills to ENOSPC; the model, the watched folder and the broker live elsewhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon_process import DaemonProcess, wait_until, write_config
from dinowatch.pipeline import STORE_PROBE_SECONDS
from dinowatch.store import RESUME_FREE_BYTES
from dinowatch.testing import synthetic_photo

DEVICE = "disk-pi"
TOPIC = f"dinowatch/{DEVICE}"
SMALL_FS_MIB = 24
BEFORE, DURING = 3, 10  # images embedded before the disk fills, and dropped while it is full


@dataclass(frozen=True)
class SmallFilesystem:
    path: Path
    kind: str


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    """Run a mount tool; a missing binary or a hang is a failed attempt, not an error."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return subprocess.CompletedProcess(command, 1, "", str(err))


def _why(result: subprocess.CompletedProcess[str]) -> str:
    text = (result.stderr or result.stdout).strip().splitlines()
    return f"exit {result.returncode}: {text[-1] if text else 'no output'}"


@pytest.fixture
def small_fs(tmp_path: Path, request: pytest.FixtureRequest) -> SmallFilesystem:
    """A filesystem of SMALL_FS_MIB for data_dir: tmpfs, else a loop-mounted ext4 image,
    else the test is skipped. Unmounted at teardown whatever happened."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()

    def unmount() -> None:
        if os.path.ismount(mount_point) and _run("umount", str(mount_point)).returncode != 0:
            _run("umount", "-l", str(mount_point))  # still busy: detach lazily

    request.addfinalizer(unmount)
    attempts = []
    tmpfs = _run("mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_MIB}m,mode=0755", "tmpfs",
                 str(mount_point))
    if tmpfs.returncode == 0 and os.path.ismount(mount_point):
        return SmallFilesystem(mount_point, f"tmpfs of {SMALL_FS_MIB} MiB")
    attempts.append(f"mount -t tmpfs ({_why(tmpfs)})")
    image = tmp_path / "small.img"
    with open(image, "wb") as handle:
        handle.truncate(SMALL_FS_MIB << 20)
    mkfs = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    if mkfs.returncode != 0:
        attempts.append(f"mkfs.ext4 for a loop image ({_why(mkfs)})")
    else:
        loop = _run("mount", "-o", "loop", str(image), str(mount_point))
        if loop.returncode == 0 and os.path.ismount(mount_point):
            return SmallFilesystem(mount_point, f"loop-mounted ext4 image of {SMALL_FS_MIB} MiB")
        attempts.append(f"mount -o loop of an ext4 image ({_why(loop)})")
    pytest.skip("no small filesystem to fill: " + "; ".join(attempts))


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem says ENOSPC; returns the filler."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096):
            try:
                while True:
                    handle.write(chunk)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
        try:
            os.fsync(handle.fileno())
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
    return filler


def drop(inbox: Path, staging: Path, name: str, seed: int) -> str:
    """A distinct picture, written beside the inbox and renamed in (an atomic arrival)."""
    temporary = staging / name
    synthetic_photo(320, 240, seed=seed).save(temporary, quality=88)
    target = inbox / name
    temporary.rename(target)
    return str(target)


def query(database: Path, sql: str) -> list[tuple]:
    """Read-only: the test must not be the one that writes to the full disk."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def statuses(database: Path) -> dict[str, str]:
    return dict(query(database, "SELECT path, status FROM images"))


def payloads(messages: list, topic: str) -> list[dict]:
    return [json.loads(m.payload) for m in messages if m.topic == f"{TOPIC}/{topic}"]


def embedded(messages: list) -> set[str]:
    return {p["path"] for p in payloads(messages, "embedding")}


def status_command(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dinowatch.cli", "status", "-c", str(config),
                           *extra], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.faults
@pytest.mark.timeout(240)
def test_full_data_dir_pauses_intake_reports_once_and_resumes(
        small_fs: SmallFilesystem, tmp_path: Path, mosquitto, subscriber_factory,
        tiny_model: Path, report: Callable[[str], None]) -> None:
    started = time.monotonic()
    data = small_fs.path / "data"
    database = data / "dinowatch.db"
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    assert not tiny_model.resolve().is_relative_to(small_fs.path)
    config = write_config(tmp_path / "config.yaml", device_id=DEVICE, data_dir=str(data),
                          model={"path": str(tiny_model)},
                          watch=[{"path": str(inbox), "source": "porch",
                                  "settle_seconds": 0.5}],
                          mqtt={"host": mosquitto.host, "port": mosquitto.port})
    subscriber = subscriber_factory(mosquitto, f"{TOPIC}/#")

    with DaemonProcess(config, tmp_path) as daemon:
        daemon.start()

        # -- a few images while there is room ------------------------------------------------
        before = {drop(inbox, staging, f"before{i}.jpg", seed=700 + i) for i in range(BEFORE)}
        wait_until(lambda: {p for p, s in statuses(database).items() if s == "done"} >= before,
                   60, f"the first {BEFORE} images done in the store")
        subscriber.wait_for(lambda m: embedded(m) >= before, timeout=30)
        # Acks of these are deleted from the outbox before the disk fills.
        wait_until(lambda: query(database, "SELECT count(*) FROM outbox") == [(0,)], 30,
                   "the outbox to drain before the disk fills")

        # -- fill the disk, then drop more ---------------------------------------------------
        filler = fill(small_fs.path)
        free = shutil.disk_usage(small_fs.path).free
        assert free < RESUME_FREE_BYTES, f"{small_fs.kind}: still {free} bytes free after ENOSPC"
        filled_at = time.monotonic()
        during = {drop(inbox, staging, f"during{i}.jpg", seed=800 + i) for i in range(DURING)}

        subscriber.wait_for(lambda m: payloads(m, "error"), timeout=30)
        reported_after = time.monotonic() - filled_at
        [disk_error] = payloads(subscriber.messages, "error")
        assert disk_error["error"] == "DiskFull", disk_error
        assert disk_error["path"] == str(data / "dinowatch.db"), disk_error
        assert disk_error["message"], disk_error
        time.sleep(STORE_PROBE_SECONDS + 2)  # at least one probe of the still-full disk
        assert payloads(subscriber.messages, "error") == [disk_error], (
            "the full disk must be reported exactly once")

        retained = subscriber_factory(mosquitto, f"{TOPIC}/stats")
        [current] = payloads(retained.wait_for(lambda m: any(x.retain for x in m), timeout=10),
                             "stats")
        assert current["disk_full"] is True, current

        text = status_command(config)
        assert text.returncode == 0, text.stderr
        assert "DISK FULL" in text.stdout, text.stdout
        as_json = status_command(config, "--json")
        assert as_json.returncode == 0, as_json.stderr
        disk = json.loads(as_json.stdout)["disk"]
        assert disk["full"] is True and disk["free_bytes"] < RESUME_FREE_BYTES, disk

        try:
            rows_while_full: dict[str, str] | None = statuses(database)
        except sqlite3.Error:  # not even readable on this full filesystem: checked below
            rows_while_full = None
        if rows_while_full is not None:
            assert "failed" not in rows_while_full.values(), (
                f"files marked failed because the disk was full: {rows_while_full}")
            assert rows_while_full == dict.fromkeys(before, "done"), rows_while_full
        assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
        assert not embedded(subscriber.messages) & during, "embedded with no room to record it"

        # -- room again: everything that waited is embedded, no restart ----------------------
        filler.unlink()
        freed_at = time.monotonic()
        wait_until(lambda: {p for p, s in statuses(database).items() if s == "done"} >= during,
                   60, f"the {DURING} images dropped while the disk was full done in the store")
        messages = subscriber.wait_for(lambda m: embedded(m) >= before | during, timeout=30)
        resumed_after = time.monotonic() - freed_at
        first_full = next((i for i, m in enumerate(messages) if m.topic == f"{TOPIC}/stats"
                           and json.loads(m.payload)["disk_full"]), None)
        assert first_full is not None, "no stats with disk_full true in the message stream"
        subscriber.wait_for(lambda m: any(
            x.topic == f"{TOPIC}/stats" and json.loads(x.payload)["disk_full"] is False
            for x in m[first_full:]), timeout=15)
        assert daemon.process.poll() is None, "the daemon was restarted or died"

        assert query(database, "SELECT path, error FROM images WHERE status = 'failed'") == []
        assert statuses(database) == dict.fromkeys(before | during, "done")
        assert query(database, "SELECT count(*) FROM vectors") == [(BEFORE + DURING,)]
        assert query(database, "PRAGMA integrity_check") == [("ok",)]
        wait_until(lambda: query(database, "SELECT count(*) FROM outbox") == [(0,)], 30,
                   "the outbox to drain after the disk had room again")
        time.sleep(1)  # a late duplicate would arrive now
        assert daemon.stop() == 0, daemon.log()

    final = subscriber.messages
    assert payloads(final, "error") == [disk_error]
    names = [p["path"] for p in payloads(final, "embedding")]
    assert sorted(names) == sorted(before | during), "each image embedded exactly once"
    log = daemon.log()
    assert log.count("intake paused") == 1 and log.count("intake resumed") == 1, log
    report(f"disk full on a {small_fs.kind}: DiskFull reported {reported_after:.1f} s after "
           f"the fill; {DURING} waiting images embedded {resumed_after:.1f} s after space "
           f"returned; test {time.monotonic() - started:.0f} s")
