"""Field failures replayed against the real `dinowatch run` process and Mosquitto.

Each test is one row of issue 6's table: the input that lost a file, and the visible end
state it must reach now (done, failed with an `error` message, or deleted), without a restart.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import random
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon_process import DaemonProcess, wait_until, write_config
from dinowatch import DinoEmbedder
from dinowatch.imaging import ImagingOptions
from dinowatch.mqtt import message_id
from dinowatch.testing import synthetic_photo, write_png_header

pytestmark = pytest.mark.faults

DEVICE = "faults-pi"
TOPIC = f"dinowatch/{DEVICE}"


class Rig:
    """A configured daemon, its folders, and a subscriber on its topics."""

    def __init__(self, tmp_path: Path, broker, subscriber, model: Path) -> None:  # type: ignore[no-untyped-def]
        self.tmp = tmp_path
        self.inbox = tmp_path / "inbox"
        self.staging = tmp_path / "staging"  # same filesystem: os.rename is atomic
        self.data = tmp_path / "data"
        for folder in (self.inbox, self.staging):
            folder.mkdir()
        self.broker, self.subscriber, self.model = broker, subscriber, model

    def daemon(self, watch: dict | None = None, **settings: object) -> DaemonProcess:
        config = write_config(
            self.tmp / "config.yaml", device_id=DEVICE, data_dir=str(self.data),
            model={"path": str(self.model)},
            watch=[{"path": str(self.inbox), "source": "cam", "settle_seconds": 0.5,
                    **(watch or {})}],
            mqtt={"host": self.broker.host, "port": self.broker.port}, **settings)
        return DaemonProcess(config, self.tmp)

    def rows(self, sql: str, *args: object) -> list[tuple]:
        db = sqlite3.connect(self.data / "dinowatch.db")
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def row(self, path: Path) -> tuple | None:
        """(status, sha256, width, height, error) of a file, keyed as the store keys it."""
        raw = os.fsencode(path)
        try:
            key: str | bytes = raw.decode()
        except UnicodeDecodeError:
            key = raw
        found = self.rows("SELECT status, sha256, width, height, error FROM images "
                          "WHERE path = ?", key)
        return found[0] if found else None

    def payloads(self, kind: str) -> list[dict]:
        return [json.loads(m.payload) for m in self.subscriber.messages
                if m.topic == f"{TOPIC}/{kind}"]


@pytest.fixture
def rig(tmp_path: Path, mosquitto, subscriber_factory, tiny_model: Path) -> Rig:  # type: ignore[no-untyped-def]
    return Rig(tmp_path, mosquitto, subscriber_factory(mosquitto, f"{TOPIC}/#"), tiny_model)


def jpeg(seed: int, size: tuple[int, int] = (320, 240), **save: object) -> bytes:
    buffer = io.BytesIO()
    synthetic_photo(*size, seed=seed).save(buffer, "JPEG", quality=88, **save)
    return buffer.getvalue()


def drop(rig: Rig, name: str | bytes, data: bytes) -> Path:
    """Write in staging, then move into the watched folder (how cameras and rsync deliver)."""
    relative = os.fsdecode(name)  # bytes that are not UTF-8 survive as PEP 383 surrogates
    staged, target = rig.staging / relative, rig.inbox / relative
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_bytes(data)
    return staged.rename(target)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---- row 1: malformed EXIF next to Orientation 6 -------------------------------------------

def exif_with_bad_rational(orientation: int) -> bytes:
    """APP1 Exif: Orientation, and XResolution as a SIGNED rational -1/0. Pillow parses it,
    but re-serialising it (as ImageOps.exif_transpose does) raises struct.error."""
    entries = [(0x0112, 3, 1, struct.pack("<HH", orientation, 0)),
               (0x011A, 10, 1, struct.pack("<I", 8 + 2 + 12 * 2 + 4))]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + value for tag, kind, count, value in entries)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + \
        struct.pack("<ii", -1, 0)


def test_malformed_exif_rational_is_embedded_upright(rig: Rig, tiny_model: Path) -> None:
    picture = synthetic_photo(320, 240, seed=11)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=95, exif=exif_with_bad_rational(6))
    with rig.daemon() as daemon:
        daemon.start()
        path = drop(rig, "exif.jpg", buffer.getvalue())
        wait_until(lambda: rig.row(path) is not None, 30, "a row for exif.jpg")
        status, _, width, height, error = rig.row(path)
        assert (status, error) == ("done", None), daemon.log()
        assert (width, height) == (240, 320)  # Orientation 6: stored landscape, shown portrait
        rig.subscriber.wait_for(lambda ms: any(m.topic == f"{TOPIC}/embedding" for m in ms))
        [message] = rig.payloads("embedding")
        assert message["path"] == str(path) and (message["width"], message["height"]) == (240, 320)
        assert daemon.stop() == 0
    # The vector is the upright picture's: the same as embedding a copy turned by hand.
    vector = np.frombuffer(base64.b64decode(message["vector"]), "<f4")
    upright = rig.tmp / "upright.jpg"
    Image.open(io.BytesIO(buffer.getvalue())).transpose(Image.Transpose.ROTATE_270).save(
        upright, quality=95)
    with DinoEmbedder(tiny_model, imaging=ImagingOptions(fast_jpeg=True)) as embedder:
        assert cosine(vector, embedder.embed(upright)) > 0.999
    # The backfill command counts it as recorded, not as "already in the store".
    config = write_config(rig.tmp / "index.yaml", data_dir=str(rig.tmp / "index-data"),
                          model={"path": str(tiny_model)}, watch=[{"path": str(rig.inbox)}],
                          mqtt=None)
    index = subprocess.run([sys.executable, "-m", "dinowatch.cli", "index", str(rig.inbox),
                            "-c", str(config)], capture_output=True, text=True, timeout=120,
                           check=False)
    assert index.returncode == 0, index.stderr
    assert "1 files: 1 recorded, 0 already in the store, 0 failed" in index.stdout


# ---- row 2: a file name that is not UTF-8 ----------------------------------------------------

def test_latin1_file_names_are_stored_published_and_logged(rig: Rig) -> None:
    good_data, broken_data = jpeg(21), b"not a picture at all"
    with rig.daemon() as daemon:
        daemon.start()
        good = drop(rig, b"caf\xe9.jpg", good_data)
        broken = drop(rig, b"na\xefve \xff.jpg", broken_data)
        utf8 = drop(rig, "café.jpg", jpeg(22))  # the same word in UTF-8: another file
        wait_until(lambda: all(rig.row(p) for p in (good, broken, utf8)), 30, "three rows")
        rig.subscriber.wait_for(lambda ms: len([m for m in ms if m.topic.endswith(
            ("/embedding", "/error"))]) >= 3)
        assert daemon.stop() == 0
        log = daemon.log()
    sha256 = hashlib.sha256(good_data).hexdigest()
    assert rig.row(good)[:2] == ("done", sha256)
    assert rig.row(utf8)[0] == "done"
    assert rig.row(broken)[0] == "failed"
    # Stored losslessly: the exact bytes are the key.
    keys = {row[0] for row in rig.rows("SELECT path FROM images")}
    assert os.fsencode(good) in keys and str(utf8) in keys
    # Published as readable text plus the exact bytes, under a stable id.
    by_path = {m["path"]: m for m in rig.payloads("embedding")}
    message = by_path[f"{rig.inbox}/caf\\xe9.jpg"]
    assert base64.b64decode(message["path_bytes"]) == os.fsencode(good)
    assert message["id"] == message_id(DEVICE, str(good), sha256)
    assert "path_bytes" not in by_path[str(utf8)]
    [error] = rig.payloads("error")
    assert error["path"] == f"{rig.inbox}/na\\xefve \\xff.jpg"
    assert base64.b64decode(error["path_bytes"]) == os.fsencode(broken)
    assert error["error"] == "UnidentifiedImageError"
    assert f"{rig.inbox}/na\\xefve \\xff.jpg" in error["message"]
    assert "na\\xefve \\xff.jpg" in log  # logged readably, not as surrogates
    # A restart finds everything recorded: nothing is published again, ids stay stable.
    before = len(rig.subscriber.messages)
    with rig.daemon() as daemon:
        daemon.start()
        time.sleep(3)
        assert daemon.stop() == 0
    again = [json.loads(m.payload) for m in rig.subscriber.messages[before:]
             if m.topic.endswith(("/embedding", "/error"))]
    assert again == []


# ---- row 3: our pixel limit is the only one -------------------------------------------------

def test_max_pixels_above_pillows_limit_decides_alone(rig: Rig) -> None:
    panorama = rig.tmp / "panorama.png"
    Image.new("L", (20_000, 10_000), 90).save(panorama, compress_level=1)  # 200 MP
    with rig.daemon(imaging={"max_pixels": 300_000_000}) as daemon:
        daemon.start()
        wide = drop(rig, "panorama.png", panorama.read_bytes())
        header = write_png_header(rig.tmp / "bomb.png", 20_000, 16_000)  # 320 MP: over ours
        bomb = drop(rig, "bomb.png", header.read_bytes())
        wait_until(lambda: rig.row(wide) and rig.row(bomb), 120, "both rows")
        assert rig.row(wide)[0] == "done", rig.row(wide)
        assert rig.row(wide)[2:4] == (20_000, 10_000)
        status, _, _, _, error = rig.row(bomb)
        assert status == "failed"
        assert error.startswith("ImageTooLarge: ") and "imaging.max_pixels" in error
        assert "300,000,000" in error
        assert daemon.stop() == 0


# ---- row 4: an inotify queue overflow --------------------------------------------------------

QUEUE_SYSCTL = Path("/proc/sys/fs/inotify/max_queued_events")


@contextlib.contextmanager
def small_inotify_queue() -> Iterator[int]:
    """Lower fs.inotify.max_queued_events for as long as the daemon starts (the kernel reads it
    when an inotify instance is made), then restore it. Yields the burst size that overflows
    the daemon's queue: 3 000 files with the lowered queue, else 30 000 as reported."""
    try:
        original = QUEUE_SYSCTL.read_text()
        QUEUE_SYSCTL.write_text("64\n")
    except OSError:
        yield 30_000  # the default queue holds 16 384 events
        return
    try:
        yield 3_000
    finally:
        QUEUE_SYSCTL.write_text(original)


def test_queue_overflow_triggers_a_rescan_and_nothing_is_missed(
        rig: Rig, report: Callable[[str], None]) -> None:
    with rig.daemon() as daemon:
        with small_inotify_queue() as count:
            daemon.start()
            time.sleep(1)  # the watcher's thread makes its inotify instance after READY
        data = jpeg(31, (64, 48))  # one picture: the test is about intake, not inference
        for i in range(count):
            (rig.staging / f"burst{i:05d}.jpg").write_bytes(data)
        started = time.monotonic()
        for i in range(count):
            name = f"burst{i:05d}.jpg"
            (rig.staging / name).rename(rig.inbox / name)
        burst = time.monotonic() - started
        wait_until(lambda: rig.rows("SELECT count(*) FROM images WHERE status = 'done'")[0][0]
                   == count, 300, f"{count} rows")
        took = time.monotonic() - started
        assert daemon.process.poll() is None
        assert "inotify queue overflowed" in daemon.log()
        assert daemon.stop() == 0
    assert rig.rows("SELECT count(*), count(DISTINCT path) FROM images") == [(count, count)]
    report(f"inotify overflow: {count} files renamed in {burst:.1f} s, all {count} recorded "
           f"{took:.0f} s after the burst began, without a restart")


# ---- row 5: files deleted while waiting, decoding or embedding -------------------------------

def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def test_files_deleted_in_flight_end_deleted(rig: Rig) -> None:
    pictures = [noise_png(seed) for seed in range(12)]  # 9 MB each: decoding takes a while
    pace = random.Random(5)
    with rig.daemon() as daemon:
        daemon.start()
        paths = []
        for i, data in enumerate(pictures):
            paths.append(drop(rig, f"large{i:02d}.png", data))
            time.sleep(pace.uniform(0, 0.4))
            paths[-1].unlink()
        wait_until(lambda: all(rig.row(p) and rig.row(p)[0] == "deleted" for p in paths), 60,
                   "12 deleted rows")
        time.sleep(2)  # nothing in flight may still turn one of them `done`
        assert [rig.row(p)[0] for p in paths] == ["deleted"] * 12
        assert daemon.stop() == 0
    # A consumer that saw an embedding also saw it withdrawn.
    published = {m["id"] for m in rig.payloads("embedding")}
    withdrawn = {m["id"] for m in rig.payloads("deleted")}
    assert published <= withdrawn


# ---- row 6: a camera overwriting one file in place ------------------------------------------

def test_a_file_rewritten_in_place_is_never_recorded_mixed(rig: Rig, tiny_model: Path) -> None:
    versions = [jpeg(41, (1600, 1200)), jpeg(42, (1600, 1200))]
    digests = [hashlib.sha256(v).hexdigest() for v in versions]
    snapshot = rig.inbox / "snapshot.jpg"
    stop = threading.Event()

    def camera() -> None:
        pace = random.Random(6)
        for n in range(40):
            data = versions[n % 2]
            with snapshot.open("r+b" if snapshot.exists() else "wb") as file:  # in place
                step = len(data) // 4 + 1
                for start in range(0, len(data), step):
                    file.write(data[start:start + step])
                    file.flush()
                    time.sleep(0.005)
                file.truncate()
            time.sleep(pace.uniform(0, 0.08))
            if stop.is_set():
                return

    with rig.daemon(watch={"settle_seconds": 0.1}) as daemon:
        daemon.start()
        writer = threading.Thread(target=camera)
        writer.start()
        writer.join(60)
        stop.set()
        final = digests[39 % 2]
        wait_until(lambda: (rig.row(snapshot) or ("",))[:2] == ("done", final), 30,
                   "the last version recorded")
        assert daemon.stop() == 0
    stored = dict(rig.rows("SELECT sha256, vector FROM vectors"))
    assert set(stored) <= set(digests), "a vector was stored for bytes no version had"
    assert {m["sha256"] for m in rig.payloads("embedding")} <= set(digests)
    with DinoEmbedder(tiny_model, imaging=ImagingOptions(exif_transpose=True,
                                                         fast_jpeg=True)) as embedder:
        for data, digest in zip(versions, digests, strict=True):
            if digest in stored:  # its vector is that picture's, not the other one's
                expected = embedder.embed_image(Image.open(io.BytesIO(data)))
                assert cosine(np.frombuffer(stored[digest], "<f4"), expected) > 0.9999


# ---- inotify's watch limit: polling for that folder -----------------------------------------

WATCHES_SYSCTL = Path("/proc/sys/fs/inotify/max_user_watches")


def inotify_watches_in_use() -> int:
    """Watches held by all processes (the limit is per user; tests run as one user)."""
    count = 0
    for fdinfo in Path("/proc").glob("[0-9]*/fdinfo/*"):
        try:
            count += fdinfo.read_text().count("inotify wd:")
        except OSError:
            continue
    return count


def test_inotify_watch_limit_falls_back_to_polling(rig: Rig) -> None:
    for i in range(20):
        (rig.inbox / f"sub{i:02d}").mkdir()
    try:
        original = WATCHES_SYSCTL.read_text()
        WATCHES_SYSCTL.write_text(f"{inotify_watches_in_use() + 5}\n")
    except OSError as err:
        pytest.skip(f"fs.inotify.max_user_watches is not writable here: {err}")
    try:
        with rig.daemon() as daemon:
            daemon.start()
            wait_until(lambda: "polling it instead" in daemon.log(), 30, "the fallback")
            WATCHES_SYSCTL.write_text(original)
            path = drop(rig, "sub07/late.jpg", jpeg(51))
            wait_until(lambda: rig.row(path) is not None, 30, "a row for the dropped file")
            assert rig.row(path)[0] == "done"
            # Polled now: a file rewritten in place settles in settle_seconds, not in the
            # 60 s that inotify mode allows a writer that has not closed its file yet.
            newer = jpeg(52)
            with path.open("r+b") as file:
                file.write(newer)
                file.truncate()
            digest = hashlib.sha256(newer).hexdigest()
            wait_until(lambda: rig.row(path)[1] == digest, 15, "the rewritten file embedded")
            log = daemon.log()
            assert daemon.stop() == 0
    finally:
        WATCHES_SYSCTL.write_text(original)
    # The gallery's watcher may run out of watches too, depending on which starts first:
    # the inbox's own fallback is said once, with the sysctl to raise.
    [line] = [line for line in log.splitlines()
              if "polling it instead" in line and f"watch {rig.inbox} " in line]
    assert "fs.inotify.max_user_watches" in line


# ---- an unmounted drive is not a mass deletion ----------------------------------------------

def test_an_unmounted_drive_is_not_reported_as_deleted(rig: Rig) -> None:
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(rig.inbox)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        with rig.daemon() as daemon:
            daemon.start()
            paths = [rig.inbox / f"card{i}.jpg" for i in range(3)]
            for i, path in enumerate(paths):  # a card reader: written in place, then closed
                path.write_bytes(jpeg(60 + i))
            wait_until(lambda: all((rig.row(p) or ("",))[0] == "done" for p in paths), 30,
                       "three rows done")
            subprocess.run(["umount", "-l", str(rig.inbox)], check=True)
            wait_until(lambda: "an unmounted drive?" in daemon.log(), 20, "the warning")
            time.sleep(1)
            assert [rig.row(p)[0] for p in paths] == ["done"] * 3
            assert rig.payloads("deleted") == []
            assert daemon.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(rig.inbox)], capture_output=True, check=False)


def test_a_folder_name_that_is_not_utf8_names_the_source(tmp_path: Path,
                                                          tiny_model: Path) -> None:
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/r\xe9sum\xe9s"))
    folder.mkdir()
    synthetic_photo(160, 120, seed=70).save(folder / "a.jpg")
    config = write_config(tmp_path / "config.yaml", data_dir=str(tmp_path / "data"),
                          model={"path": str(tiny_model)}, watch=[{"path": str(tmp_path)}],
                          mqtt=None)
    index = subprocess.run([sys.executable, "-m", "dinowatch.cli", "index", os.fsencode(folder),
                            "-c", str(config)], capture_output=True, text=True, timeout=120,
                           check=False)
    assert index.returncode == 0, index.stderr
    assert "1 files: 1 recorded" in index.stdout
    with sqlite3.connect(tmp_path / "data" / "dinowatch.db") as db:
        assert db.execute("SELECT source, status FROM images").fetchall() == [
            ("r\\xe9sum\\xe9s", "done")]
