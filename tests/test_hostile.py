"""Hostile input: a burst of broken, odd and malicious files into the running daemon.

Every file that enters the watched folder ends in exactly one visible state without a
restart (`done`: a vector and an embedding message; `failed`: an error row and an error
message naming the file and the kind; `deleted`), the daemon never exits, its memory stays
flat, and SIGTERM still stops it cleanly. The corpus is described in `hostile_corpus.py`.
"""

from __future__ import annotations

import base64
import json
import os
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from daemon_process import WITHOUT_PERMISSION_OVERRIDE, DaemonProcess, write_config
from dinowatch.errors import readable
from dinowatch.testing import synthetic_photo
from hostile_corpus import (
    ABSENT,
    DELETED,
    DONE,
    FAILED,
    Entry,
    build_corpus,
    bytes_path,
    materialize,
    move_in,
)

pytestmark = pytest.mark.faults

DEVICE = "hostile-pi"
TOPIC = f"dinowatch/{DEVICE}"
MAX_PIXELS = 20_000_000  # the metadata budget is as many bytes: 20 MB
WARMUP_IMAGES = 6
SETTLE_TIMEOUT = 180.0
RSS_GROWTH_LIMIT = 100 << 20
MB = 1 << 20


class Row(NamedTuple):
    status: str
    error: str | None
    vector: bool  # the vectors table holds this image's vector


def stored_rows(data_dir: Path) -> dict[bytes, Row]:
    """images.path, as the exact bytes of the name (TEXT is UTF-8, a BLOB is raw) -> Row."""
    with sqlite3.connect(data_dir / "dinowatch.db") as db:
        found = db.execute(
            "SELECT i.path, i.status, i.error, v.sha256 IS NOT NULL FROM images i LEFT JOIN "
            "vectors v ON v.sha256 = i.sha256 AND v.model = i.model").fetchall()
    return {(path if isinstance(path, bytes) else path.encode("utf-8")):
            Row(status, error, bool(vector)) for path, status, error, vector in found}


def count(data_dir: Path, sql: str) -> int:
    with sqlite3.connect(data_dir / "dinowatch.db") as db:
        return int(db.execute(sql).fetchone()[0])


def payload_path(payload: dict) -> bytes:
    """The exact name a payload speaks of: `path_bytes` when present, else `path`."""
    if "path_bytes" in payload:
        return base64.b64decode(payload["path_bytes"])
    return payload["path"].encode("utf-8")


def by_path(messages: list, kind: str) -> dict[bytes, list[dict]]:
    found: dict[bytes, list[dict]] = {}
    for message in messages:
        if message.topic == f"{TOPIC}/{kind}":
            payload = json.loads(message.payload)
            found.setdefault(payload_path(payload), []).append(payload)
    return found


def outstanding(paths: dict[bytes, Entry], rows: dict, embeddings: dict, errors: dict
                ) -> list[str]:
    """What is still missing before every file of `paths` is in a visible end state."""
    missing = []
    for path, entry in paths.items():
        status = rows[path].status if path in rows else None
        if status is None and ABSENT in entry.expect:
            continue
        if status not in (DONE, FAILED, DELETED):
            missing.append(f"{entry.label}: no end state yet (row {status!r})")
        elif status == DONE and path not in embeddings:
            missing.append(f"{entry.label}: done, no embedding message yet")
        elif status == FAILED and path not in errors:
            missing.append(f"{entry.label}: failed, no error message yet")
    return missing


def wait_for_end_states(daemon: DaemonProcess, subscriber, data_dir: Path,
                        paths: dict[bytes, Entry], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        messages = subscriber.messages
        missing = outstanding(paths, stored_rows(data_dir), by_path(messages, "embedding"),
                              by_path(messages, "error"))
        if not missing:
            return
        if daemon.process is not None and daemon.process.poll() is not None:
            raise AssertionError(f"the daemon exited with {daemon.process.returncode}; "
                                 f"log:\n{daemon.log()[-6000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"after {timeout:.0f} s, {len(missing)} of {len(paths)} files have no visible "
                "end state:\n" + "\n".join(missing[:60]) + f"\nlog tail:\n{daemon.log()[-6000:]}")
        time.sleep(0.25)


def check_payload_names(entry: Entry, path: bytes, payloads: list[dict]) -> list[str]:
    """`path` is the readable form; `path_bytes` exactly when the name is not UTF-8."""
    problems = []
    try:
        path.decode("utf-8")
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    for payload in payloads:
        if payload["path"] != readable(os.fsdecode(path)):
            problems.append(f"{entry.label}: payload path {payload['path']!r}")
        if utf8 == ("path_bytes" in payload):
            problems.append(f"{entry.label}: path_bytes {'present' if utf8 else 'missing'}")
    return problems


def test_hostile_corpus_ends_in_visible_states(tmp_path: Path, mosquitto, subscriber_factory,
                                               tiny_model: Path,
                                               report: Callable[[str], None]) -> None:
    inbox, data, staging = tmp_path / "inbox", tmp_path / "data", tmp_path / "staging"
    for folder in (inbox, data, staging):
        folder.mkdir()
    corpus = build_corpus()
    hostile = [entry for entry in corpus if not entry.good]
    assert len(hostile) >= 200 and len(corpus) - len(hostile) >= 15
    random.Random(11).shuffle(corpus)  # one burst, kinds interleaved
    expected = {bytes_path(inbox, entry.name): entry for entry in corpus}

    config = write_config(tmp_path / "config.yaml", device_id=DEVICE, data_dir=str(data),
                          model={"path": str(tiny_model)},
                          imaging={"max_pixels": MAX_PIXELS},
                          watch=[{"path": str(inbox), "source": "hostile",
                                  "settle_seconds": 0.5}],
                          mqtt={"host": mosquitto.host, "port": mosquitto.port},
                          logging={"level": "INFO"})
    subscriber = subscriber_factory(mosquitto, f"{TOPIC}/#")
    with DaemonProcess(config, tmp_path, wrapper=WITHOUT_PERMISSION_OVERRIDE) as daemon:
        daemon.start()

        # Warm up on good images, then take the baseline for memory.
        warmup = {}
        for i in range(WARMUP_IMAGES):
            name = f"warmup{i}.{'jpg' if i % 2 else 'png'}"
            synthetic_photo(640 - 40 * i, 480, seed=9000 + i).save(staging / name)
            warmup[os.fsencode(inbox / name)] = Entry(name.encode(), "good",
                                                      frozenset({DONE}))
            (staging / name).rename(inbox / name)
        wait_for_end_states(daemon, subscriber, data, warmup, 60)
        rss_warm = daemon.rss_bytes()

        materialize(corpus, staging)
        started = time.monotonic()
        move_in(corpus, staging, inbox)
        wait_for_end_states(daemon, subscriber, data, expected, SETTLE_TIMEOUT)
        settled_after = time.monotonic() - started
        first = stored_rows(data)
        time.sleep(2.0)  # nothing changes afterwards: each file has one end state
        rows = stored_rows(data)
        changed = {path: (first[path], rows.get(path)) for path in first
                   if rows.get(path) != first[path]}
        assert not changed, f"end states changed: {changed}"
        rss_after = daemon.rss_bytes()
        assert daemon.process is not None and daemon.process.poll() is None, \
            "the daemon exited"
        for _ in range(100):  # the outbox drains
            if count(data, "SELECT count(*) FROM outbox") == 0:
                break
            time.sleep(0.1)
        assert count(data, "SELECT count(*) FROM outbox") == 0
        assert daemon.stop() == 0, daemon.log()[-4000:]

    log = daemon.log()
    messages = subscriber.messages
    embeddings, errors = by_path(messages, "embedding"), by_path(messages, "error")
    problems: list[str] = []

    # No row for anything that never was in the folder (the staging names, say).
    extra = set(rows) - set(expected) - set(warmup)
    problems += [f"unexpected row for {path!r}" for path in sorted(extra)]

    states: Counter[str] = Counter()
    for path, entry in expected.items():
        status, error, vector = rows.get(path, Row(ABSENT, None, False))
        states[status] += 1
        if status not in entry.expect:
            problems.append(f"{entry.label} ({entry.group}): ended {status!r} ({error}), "
                            f"expected {sorted(entry.expect)}")
        if status == DONE:
            sent = embeddings.get(path, [])
            problems += check_payload_names(entry, path, sent)
            problems += [f"{entry.label}: embedded as {p['width']}x{p['height']}, not "
                         f"{entry.dims}" for p in sent
                         if entry.dims and (p["width"], p["height"]) != entry.dims]
            problems += [f"{entry.label}: source {p['source']!r}, dim {p['dim']}"
                         for p in sent if (p["source"], p["dim"]) != ("hostile", 384)]
            if not vector:
                problems.append(f"{entry.label}: done without a vector")
            if path in errors:
                problems.append(f"{entry.label}: done, but also reported as an error")
        elif status == FAILED:
            reported = errors.get(path, [])
            if not error:
                problems.append(f"{entry.label}: failed with an empty error column")
            if not reported:
                problems.append(f"{entry.label}: failed, no error message")
            problems += check_payload_names(entry, path, reported)
            for payload in reported:
                if entry.errors and payload["error"] not in entry.errors:
                    problems.append(f"{entry.label}: error kind {payload['error']!r}, "
                                    f"expected one of {sorted(entry.errors)}")
                if error and not error.startswith(f"{payload['error']}: "):
                    problems.append(f"{entry.label}: row error {error!r} does not start "
                                    f"with the message's kind {payload['error']!r}")
                if readable(entry.name.decode("utf-8", "surrogateescape")) not in \
                        payload["message"]:
                    problems.append(f"{entry.label}: error message does not name the file: "
                                    f"{payload['message']!r}")
            if path in embeddings:
                problems.append(f"{entry.label}: failed, but an embedding was published")
        elif status == DELETED and path in embeddings:
            problems.append(f"{entry.label}: deleted, but an embedding was published")
    overflowed = "yes" if "inotify queue overflowed" in log else "no"
    duplicates = sum(len(sent) - 1 for sent in errors.values() if len(sent) > 1)
    if "unexpected error on" in log:
        problems.append("the pipeline hit its last-resort handler (a bug path):\n"
                        + "\n".join(line for line in log.splitlines()
                                    if "unexpected error" in line))

    report(f"hostile corpus: {len(corpus)} files ({len(hostile)} hostile), "
           f"{states[DONE]} done, {states[FAILED]} failed, {states[DELETED]} deleted, "
           f"{states[ABSENT]} absent (left unseen), inotify overflow: {overflowed}, "
           f"settled in {settled_after:.1f} s; {duplicates} duplicate error messages; "
           f"RSS warm {rss_warm / MB:.0f} MB, after {rss_after / MB:.0f} MB "
           f"(+{(rss_after - rss_warm) / MB:.0f} MB)")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)
    assert rss_after - rss_warm <= RSS_GROWTH_LIMIT, \
        f"RSS grew from {rss_warm / MB:.0f} MB to {rss_after / MB:.0f} MB"

