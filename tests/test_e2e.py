"""End to end: the real `dinowatch run` process, real folders and a real Mosquitto."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from daemon_process import DaemonProcess, wait_until, write_config
from dinowatch.testing import synthetic_photo

TOPIC = "dinowatch/e2e-pi"


def embeddings(messages: list) -> list[dict]:
    return [json.loads(m.payload) for m in messages if m.topic == f"{TOPIC}/embedding"]


def errors(messages: list) -> list[dict]:
    return [json.loads(m.payload) for m in messages if m.topic == f"{TOPIC}/error"]


def rows(data_dir: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(data_dir / "dinowatch.db") as db:
        return db.execute(sql).fetchall()


@pytest.fixture
def setup(tmp_path: Path, mosquitto, tiny_model: Path) -> Callable[..., DaemonProcess]:
    """`setup(model=...)` -> a DaemonProcess configured for the inbox and the test broker."""
    inbox, data = tmp_path / "inbox", tmp_path / "data"
    inbox.mkdir()

    def make(model: Path = tiny_model) -> DaemonProcess:
        config = write_config(tmp_path / "config.yaml", device_id="e2e-pi", data_dir=str(data),
                              model={"path": str(model)},
                              watch=[{"path": str(inbox), "source": "front-door",
                                      "settle_seconds": 1.0}],
                              mqtt={"host": mosquitto.host, "port": mosquitto.port})
        return DaemonProcess(config, tmp_path)

    make.inbox, make.data = inbox, data  # type: ignore[attr-defined]
    return make


def write_in_chunks(path: Path, data: bytes, seconds: float = 3.0, chunks: int = 6) -> None:
    """A slow writer (a camera over Wi-Fi): one open handle, chunks spread over `seconds`."""
    step = len(data) // chunks + 1
    with path.open("wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start:start + step])
            handle.flush()
            time.sleep(seconds / chunks)


def jpeg_bytes(seed: int, tmp: Path) -> bytes:
    path = tmp / f"src{seed}.jpg"
    synthetic_photo(480, 360, seed=seed).save(path, quality=88)
    return path.read_bytes()


def test_fifty_dropped_jpegs_give_exactly_fifty_embeddings(setup, mosquitto, subscriber_factory,
                                                           tmp_path: Path,
                                                           tiny_model: Path) -> None:
    subscriber = subscriber_factory(mosquitto, f"{TOPIC}/#")
    inbox: Path = setup.inbox
    staging = tmp_path / "staging"
    staging.mkdir()
    with setup() as daemon:
        daemon.start()
        writers = [threading.Thread(target=write_in_chunks,
                                    args=(inbox / f"slow{i}.jpg", jpeg_bytes(i, staging)))
                   for i in range(5)]
        for writer in writers:
            writer.start()
        for i in range(5, 15):  # temporary name, then an atomic rename
            temporary = inbox / f"cam{i}.jpg.tmp"
            temporary.write_bytes(jpeg_bytes(i, staging))
            temporary.rename(inbox / f"cam{i}.jpg")
        for i in range(15, 50):
            (inbox / f"plain{i}.jpg").write_bytes(jpeg_bytes(i, staging))
        for writer in writers:
            writer.join()
        subscriber.wait_for(lambda m: len(embeddings(m)) >= 50, timeout=120)
        running = subscriber_factory(mosquitto, f"{TOPIC}/status")
        running.wait_for(lambda m: any(x.retain for x in m))
        assert [(m.payload, m.retain) for m in running.messages] == [(b"online", True)]
        time.sleep(3)  # late duplicates would arrive now
        assert daemon.stop() == 0
    received = embeddings(subscriber.messages)
    assert len(received) == 50
    assert len({p["id"] for p in received}) == 50
    assert {Path(p["path"]).name for p in received} == (
        {f"slow{i}.jpg" for i in range(5)} | {f"cam{i}.jpg" for i in range(5, 15)}
        | {f"plain{i}.jpg" for i in range(15, 50)})
    model_sha256 = hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    for payload in received:
        vector = np.frombuffer(base64.b64decode(payload["vector"]), dtype="<f4")
        assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-4
        assert payload["dim"] == 384 and payload["source"] == "front-door"
        assert (payload["width"], payload["height"]) == (480, 360)
        assert payload["ts"].endswith("Z") and len(payload["sha256"]) == 64
        # A random-weight model is never passed off as the registry's DINOv2.
        assert payload["model"] == {"name": "stand-in:tiny.onnx", "sha256": model_sha256,
                                    "pinned": False, "stand_in": True}
    slow = next(p for p in received if p["path"].endswith("slow0.jpg"))
    assert slow["sha256"] == hashlib.sha256(jpeg_bytes(0, staging)).hexdigest()
    stats = [json.loads(m.payload) for m in subscriber.messages if m.topic == f"{TOPIC}/stats"]
    assert stats, "retained stats are published as soon as the daemon connects"
    assert set(stats[0]) >= {"processed", "failed", "queue", "outbox", "images/s",
                             "uptime"}
    late = subscriber_factory(mosquitto, f"{TOPIC}/status")
    late.wait_for(lambda m: any(x.retain for x in m))
    assert [(m.payload, m.retain) for m in late.messages] == [(b"offline", True)]


def test_missing_watch_folder_is_reported_on_the_error_topic(setup, mosquitto,
                                                             subscriber_factory) -> None:
    subscriber = subscriber_factory(mosquitto, f"{TOPIC}/error")
    setup.inbox.rmdir()  # an unmounted drive
    with setup() as daemon:
        daemon.start()
        [report] = errors(subscriber.wait_for(lambda m: len(m) >= 1, timeout=30))
        assert report["path"] == str(setup.inbox)
        assert "does not exist" in report["message"] or "No such file" in report["message"]
        assert daemon.stop() == 0


def test_broker_outage_loses_nothing(setup, mosquitto, subscriber_factory,
                                     tmp_path: Path) -> None:
    subscriber = subscriber_factory(mosquitto, f"{TOPIC}/embedding")
    with setup() as daemon:
        daemon.start()
        mosquitto.stop()
        outage_started = time.monotonic()
        for i in range(30):
            synthetic_photo(320, 240, seed=100 + i).save(setup.inbox / f"outage{i}.jpg")
        wait_until(lambda: len(rows(setup.data, "SELECT 1 FROM images")) == 30, 60,
                   "30 images in the store while the broker is down")
        assert rows(setup.data, "SELECT count(*) FROM outbox") == [(30,)]
        time.sleep(max(0.0, 20 - (time.monotonic() - outage_started)))  # a 20 s outage
        mosquitto.start()
        subscriber.wait_for(lambda m: len({json.loads(x.payload)["id"] for x in m}) >= 30,
                            timeout=120)
        wait_until(lambda: rows(setup.data, "SELECT count(*) FROM outbox") == [(0,)], 30,
                   "the outbox to drain")
        assert daemon.stop() == 0
    assert rows(setup.data, "SELECT count(*), count(DISTINCT sha256) FROM images") == [(30, 30)]
    assert rows(setup.data, "SELECT count(*) FROM vectors") == [(30,)]


@pytest.mark.slow
def test_sigkill_mid_backlog_then_restart(setup, mosquitto, subscriber_factory,
                                          full_model: Path) -> None:
    status = subscriber_factory(mosquitto, f"{TOPIC}/status")
    subscriber = subscriber_factory(mosquitto, f"{TOPIC}/embedding")
    names = {f"backlog{i}.jpg" for i in range(40)}
    first = setup(model=full_model)  # the full ViT: slow enough to be caught mid-backlog
    with first:
        first.start()
        for i in range(40):
            synthetic_photo(320, 240, seed=200 + i).save(setup.inbox / f"backlog{i}.jpg")
        wait_until(lambda: len(rows(setup.data, "SELECT 1 FROM images")) >= 3, 60,
                   "a few images stored")
        first.kill()
    stored_before = rows(setup.data, "SELECT path, sha256, updated_at FROM images")
    assert len(stored_before) < 40, "the backlog finished before the kill; nothing was tested"
    status.wait_for(lambda m: any(x.payload == b"offline" for x in m), timeout=30)
    second = setup(model=full_model)
    with second:
        second.start()
        wait_until(lambda: len(rows(setup.data, "SELECT 1 FROM images")) == 40, 120,
                   "all 40 images in the store after the restart")
        subscriber.wait_for(lambda m: {Path(p["path"]).name for p in embeddings(m)} >= names,
                            timeout=60)
        assert second.stop() == 0
    assert rows(setup.data, "SELECT count(*) FROM images WHERE status = 'done'") == [(40,)]
    assert rows(setup.data, "SELECT count(*) FROM vectors") == [(40,)]
    # what was stored before the kill was not embedded again after the restart
    after = {row[0]: row for row in rows(setup.data, "SELECT path, sha256, updated_at FROM images")}
    assert all(after[row[0]] == row for row in stored_before)


def test_bad_files_go_to_the_error_topic(setup, mosquitto, subscriber_factory) -> None:
    subscriber = subscriber_factory(mosquitto, f"{TOPIC}/#")
    inbox: Path = setup.inbox
    with setup() as daemon:
        daemon.start()
        for i in range(3):
            synthetic_photo(320, 240, seed=300 + i).save(inbox / f"good{i}.jpg")
        (inbox / "notes.jpg").write_text("this is not a picture")
        (inbox / "empty.jpg").touch()
        whole = (inbox / "good0.jpg").read_bytes()
        (inbox / "half.jpg").write_bytes(whole[: len(whole) // 2])
        for i in range(3, 5):
            synthetic_photo(320, 240, seed=300 + i).save(inbox / f"good{i}.jpg")
        messages = subscriber.wait_for(
            lambda m: len(errors(m)) >= 3 and len(embeddings(m)) >= 5, timeout=60)
        assert daemon.process.poll() is None
        assert daemon.stop() == 0
    failed = {Path(e["path"]).name: e for e in errors(messages)}
    assert set(failed) == {"notes.jpg", "empty.jpg", "half.jpg"}
    assert failed["notes.jpg"]["error"] == "UnidentifiedImageError"
    assert failed["half.jpg"]["error"] == "ImageError"
    assert "half.jpg" in failed["half.jpg"]["message"]
    assert {Path(p["path"]).name for p in embeddings(messages)} == {f"good{i}.jpg"
                                                                     for i in range(5)}
