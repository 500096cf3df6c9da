"""Broker faults under a steady stream: restarts and a long outage while images keep arriving."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from daemon_process import DaemonProcess, wait_until, write_config
from dinowatch.testing import synthetic_photo

pytestmark = pytest.mark.faults

DEVICE = "steady-pi"
DROP_EVERY = 0.25  # seconds between two images, alternating between the two sources
RESTARTS_AT = (5.0, 12.0, 19.0)  # seconds into the stream
OUTAGE = (25.0, 85.0)  # the broker is down from..to: 60 s
STREAM_SECONDS = 90.0


def test_restarts_and_a_long_outage_lose_nothing_and_keep_order(
        tmp_path: Path, tiny_model: Path, mosquitto, subscriber_factory,
        report) -> None:  # type: ignore[no-untyped-def]
    sources = {name: tmp_path / name for name in ("gate", "garden")}
    for folder in sources.values():
        folder.mkdir()
    config = write_config(
        tmp_path / "config.yaml", device_id=DEVICE, data_dir=str(tmp_path / "data"),
        model={"path": str(tiny_model)},
        watch=[{"path": str(path), "source": name, "settle_seconds": 0.3}
               for name, path in sources.items()],
        mqtt={"host": mosquitto.host, "port": mosquitto.port})
    subscriber = subscriber_factory(mosquitto, f"dinowatch/{DEVICE}/embedding")
    dropped: dict[str, list[str]] = {name: [] for name in sources}
    done = threading.Event()

    def camera() -> None:
        started, number = time.monotonic(), 0
        while time.monotonic() - started < STREAM_SECONDS:
            name = list(sources)[number % 2]
            staged = tmp_path / f"staged{number}.jpg"
            synthetic_photo(160, 120, seed=number).save(staged)
            target = sources[name] / f"img{number:04d}.jpg"
            staged.rename(target)
            dropped[name].append(str(target))
            number += 1
            time.sleep(DROP_EVERY)
        done.set()

    with DaemonProcess(config, tmp_path) as daemon:
        daemon.start()
        writer = threading.Thread(target=camera)
        began = time.monotonic()
        writer.start()
        for at in RESTARTS_AT:
            time.sleep(max(0.0, at - (time.monotonic() - began)))
            mosquitto.restart()
        time.sleep(max(0.0, OUTAGE[0] - (time.monotonic() - began)))
        mosquitto.stop()
        time.sleep(max(0.0, OUTAGE[1] - (time.monotonic() - began)))
        mosquitto.start()
        writer.join(STREAM_SECONDS + 30)
        assert done.is_set()
        total = sum(len(paths) for paths in dropped.values())
        subscriber.wait_for(lambda messages: len({json.loads(m.payload)["path"]
                                                  for m in messages}) >= total, timeout=180)
        database = tmp_path / "data" / "dinowatch.db"

        def outbox() -> int:
            with sqlite3.connect(database) as db:
                return db.execute("SELECT count(*) FROM outbox").fetchone()[0]

        wait_until(lambda: outbox() == 0, 60, "the outbox to drain")
        assert daemon.process is not None and daemon.process.poll() is None
        assert daemon.stop() == 0
    payloads = [json.loads(m.payload) for m in subscriber.messages]
    for name, paths in dropped.items():
        first_seen: list[str] = []
        for payload in payloads:
            if payload["source"] == name and payload["path"] not in first_seen:
                first_seen.append(payload["path"])
        assert first_seen == paths, f"{name}: delivered out of order, or something is missing"
    ids = {payload["path"]: {p["id"] for p in payloads if p["path"] == payload["path"]}
           for payload in payloads}
    assert all(len(one) == 1 for one in ids.values()), "one id per image, however often sent"
    report(f"broker faults: {total} images over {STREAM_SECONDS:.0f} s with 3 broker restarts "
           f"and a 60 s outage; {total} delivered in order per source, "
           f"{len(payloads) - total} redeliveries, 0 lost")
