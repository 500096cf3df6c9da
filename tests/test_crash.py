"""Crash suite: SIGKILL the real daemon again and again through a backlog; nothing is lost.

300 JPEGs wait in the watched folder before the first start. The daemon is started 20 times
and each time killed with SIGKILL a seeded random moment after READY=1 (catch-up scan,
connecting, decoding, inference, commits, outbox draining), then run to the end once more
(model loading and WAL recovery come before READY=1 and are not hit). Every file
must end with exactly one `done` row and one vector, the outbox must be empty, the database
intact, and every file must have reached the broker with one stable `id`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import sqlite3
import time
from collections import defaultdict
from contextlib import closing
from pathlib import Path

import pytest

from daemon_process import DaemonProcess, wait_until, write_config
from dinowatch.testing import synthetic_photo

DEVICE = "crash-pi"
TOPIC = f"dinowatch/{DEVICE}"
IMAGES = 300
KILLS = 20
SEED = 20_240_611
# Seconds between READY=1 and SIGKILL, log-uniform: as many kills early (catch-up scan,
# connecting, the first decodes) as deep into a batch and the outbox drain. With 800x600
# pictures (~60 images/s on 2 cores) the backlog spans nearly all 20 kills.
MIN_DELAY, MAX_DELAY = 0.05, 0.6
MIN_KILLS_MID_BACKLOG = 10  # fewer: the machine outran the kills and little was tested
DRAIN_SECONDS = 180.0
LOG_TAIL_LINES = 80


def query(database: Path, sql: str) -> list[tuple]:
    """Read-only, closed at once: the test must not checkpoint the WAL of a killed daemon."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as db:
        return db.execute(sql).fetchall()


def tail(daemon: DaemonProcess, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(daemon.log().splitlines()[-lines:])


def progress(database: Path) -> tuple[int, int]:
    """(images done, outbox rows); (0, 0) before the database exists."""
    if not database.exists():
        return 0, 0
    [(done,)] = query(database, "SELECT count(*) FROM images WHERE status = 'done'")
    [(outbox,)] = query(database, "SELECT count(*) FROM outbox")
    return done, outbox


@pytest.mark.faults
def test_twenty_sigkills_lose_no_image(tmp_path: Path, mosquitto, subscriber_factory,
                                       tiny_model: Path, report) -> None:
    inbox, data = tmp_path / "inbox", tmp_path / "data"
    inbox.mkdir()
    database = data / "dinowatch.db"
    files: dict[str, str] = {}  # path -> sha256 of its bytes
    for i in range(IMAGES):
        path = inbox / f"img{i:03d}.jpg"
        synthetic_photo(800, 600, seed=10_000 + i).save(path, quality=85)
        files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(set(files.values())) == IMAGES, "the backlog must be 300 distinct images"
    config = write_config(tmp_path / "config.yaml", device_id=DEVICE, data_dir=str(data),
                          model={"path": str(tiny_model)},
                          watch=[{"path": str(inbox), "source": "crash", "settle_seconds": 0.2}],
                          mqtt={"host": mosquitto.host, "port": mosquitto.port})
    subscriber = subscriber_factory(mosquitto, f"{TOPIC}/#")
    rng = random.Random(SEED)
    began = time.monotonic()

    at_kill: list[tuple[float, int, int]] = []  # (delay, done, outbox) after each SIGKILL
    for attempt in range(KILLS):
        delay = MIN_DELAY * (MAX_DELAY / MIN_DELAY) ** rng.random()
        with DaemonProcess(config, tmp_path) as daemon:  # one object per start: fresh notes
            daemon.start()
            time.sleep(delay)
            assert daemon.process is not None
            assert daemon.process.poll() is None, (
                f"the daemon exited on its own (code {daemon.process.returncode}) before "
                f"kill {attempt + 1}; log tail:\n{tail(daemon)}")
            daemon.kill()
        at_kill.append((delay, *progress(database)))
    killed_at = time.monotonic()

    embedding_topic = f"{TOPIC}/embedding"

    def published_paths() -> set[str]:
        return {json.loads(m.payload)["path"] for m in subscriber.messages
                if m.topic == embedding_topic}

    with DaemonProcess(config, tmp_path) as daemon:
        daemon.start()
        try:
            wait_until(lambda: progress(database) == (IMAGES, 0), DRAIN_SECONDS,
                       f"{IMAGES} images done and an empty outbox")
            wait_until(lambda: published_paths() >= set(files), 30,
                       f"an embedding message for each of the {IMAGES} files")
        except AssertionError as err:
            raise AssertionError(f"{err}; store (done, outbox) = {progress(database)}, "
                                 f"{len(published_paths())} files published; log tail:\n"
                                 f"{tail(daemon)}") from None
        time.sleep(1)  # a late redelivery would arrive now
        code = daemon.stop()
        assert code == 0, f"SIGTERM exit code {code}; log tail:\n{tail(daemon)}"
    finished = time.monotonic()
    log_tail = tail(daemon)

    # -- the store: one done row per file, one vector per picture, nothing left to send ----
    rows = query(database, "SELECT path, status, sha256, error FROM images")
    bad = [row for row in rows if row[0] not in files or row[1] != "done"
           or row[2] != files[row[0]]]
    assert not bad, (f"rows that are not a done row of a backlog file: {bad[:10]}; "
                     f"log tail:\n{log_tail}")
    assert sorted(row[0] for row in rows) == sorted(files), "not exactly one row per file"
    vectors = dict(query(database, "SELECT sha256, vector FROM vectors"))
    assert query(database, "SELECT count(*) FROM vectors") == [(IMAGES,)]
    assert set(vectors) == set(files.values())
    assert query(database, "SELECT count(*) FROM outbox") == [(0,)], (
        f"orphan outbox rows: {query(database, 'SELECT seq, topic FROM outbox')[:10]}")
    assert query(database, "PRAGMA integrity_check") == [("ok",)]

    # -- the broker: every file published, redeliveries identical, ids stable -------------
    messages = subscriber.messages
    unexpected = [(m.topic, m.payload[:200]) for m in messages
                  if m.topic in (f"{TOPIC}/error", f"{TOPIC}/deleted")]
    assert not unexpected, f"error or deleted messages for a backlog of good files: {unexpected}"
    by_path: defaultdict[str, list[dict]] = defaultdict(list)
    payloads: defaultdict[str, set[bytes]] = defaultdict(set)
    for message in messages:
        if message.topic == embedding_topic:
            payload = json.loads(message.payload)
            by_path[payload["path"]].append(payload)
            payloads[payload["path"]].add(message.payload)
    assert set(by_path) == set(files), "embeddings for files that are not in the backlog"
    for path, received in by_path.items():
        ids = {payload["id"] for payload in received}
        assert len(ids) == 1, f"{path}: {len(received)} messages with ids {ids}"
        assert {payload["sha256"] for payload in received} == {files[path]}, path
        vector = base64.b64decode(received[0]["vector"])
        assert vector == vectors[files[path]], f"{path}: published vector != stored vector"
    assert len({payload["id"] for got in by_path.values() for payload in got}) == IMAGES
    twice_embedded = {path: len(p) for path, p in payloads.items() if len(p) > 1}
    assert not twice_embedded, (
        f"files published with different payloads (embedded again, not redelivered): "
        f"{dict(list(twice_embedded.items())[:10])}")

    lost = len(set(files) - ({path for path, status, _, _ in rows if status == "done"}
                             & set(by_path)))  # not done, or never published
    total = sum(len(received) for received in by_path.values())
    mid_backlog = sum(1 for _, done, _ in at_kill if done < IMAGES)
    mid_work = sum(1 for _, done, outbox in at_kill if done < IMAGES or outbox > 0)
    report(f"crash suite: {KILLS} SIGKILLs, {IMAGES} images, {lost} lost, {total} embedding "
           f"messages ({total - IMAGES} redeliveries); {mid_work} kills landed with work "
           f"pending; kills took {killed_at - began:.0f} s, the final drain "
           f"{finished - killed_at:.0f} s")
    report("crash suite, after each SIGKILL (delay s: done/outbox): "
           + ", ".join(f"{delay:.2f}: {done}/{outbox}" for delay, done, outbox in at_kill))
    assert mid_backlog >= MIN_KILLS_MID_BACKLOG, (
        f"only {mid_backlog} kills landed before the backlog was done: nothing was tested")
