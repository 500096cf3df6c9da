"""Record stage: schema migrations, one-transaction records, the outbox."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from dinowatch.store import MIGRATIONS, ImageRecord, Message, Store, StoreError


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "data" / "dinowatch.db")
    yield store
    store.close()


def _record(path: str, sha256: str = "ab" * 32, status: str = "done") -> ImageRecord:
    return ImageRecord(path=path, source="cam", size=10, mtime_ns=1, status=status,
                       sha256=sha256, width=4, height=3, model="m1")


def test_new_database_is_migrated_and_reopening_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    store = Store(path)
    store.record(_record("/a.jpg"), np.ones(384, np.float32), [])
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = Store(path)
    assert again.image("/a.jpg") == _record("/a.jpg")
    again.close()


def test_database_from_a_newer_dinowatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="upgrade dinowatch"):
        Store(path)


def test_record_commits_row_vector_and_messages_together(store: Store) -> None:
    vector = np.arange(384, dtype=np.float32)
    messages = [Message("t/embedding", b"one"), Message("t/match", b"two", qos=0)]
    store.record(_record("/a.jpg"), vector, messages)
    known = store.known("ab" * 32, "m1")
    assert known is not None
    np.testing.assert_array_equal(known[0], vector)
    assert known[1:] == (4, 3)
    outbox = store.outbox_after(0, 10)
    assert [(m.topic, m.payload, m.qos) for m in outbox] == [("t/embedding", b"one", 1),
                                                             ("t/match", b"two", 0)]


def test_a_failing_record_leaves_nothing_behind(store: Store) -> None:
    bad_message = Message("t/x", None)  # type: ignore[arg-type]  # NOT NULL violation
    with pytest.raises(sqlite3.IntegrityError):
        store.record(_record("/b.jpg"), np.ones(384, np.float32), [Message("t/ok", b"1"),
                                                                   bad_message])
    assert store.image("/b.jpg") is None
    assert store.known("ab" * 32, "m1") is None
    assert store.outbox_depth() == 0
    store.record(_record("/c.jpg"), None, [])  # the writer thread survived
    assert store.image("/c.jpg") is not None


def test_outbox_keeps_order_and_ack_deletes(store: Store) -> None:
    store.enqueue(Message("t", str(i).encode()) for i in range(5))
    first = store.outbox_after(0, 3)
    assert [m.payload for m in first] == [b"0", b"1", b"2"]
    store.ack(first[1].seq)
    store.record(_record("/sync.jpg"), None, [])  # writes are ordered: the ack is done now
    assert [m.payload for m in store.outbox_after(0, 10)] == [b"0", b"2", b"3", b"4"]
    assert [m.payload for m in store.outbox_after(first[2].seq, 10)] == [b"3", b"4"]
    assert store.outbox_depth() == 4


def test_live_paths_deletion_and_counts(store: Store) -> None:
    for name in ("a.jpg", "sub/b.jpg"):
        store.record(_record(f"/cam/{name}"), None, [])
    store.record(_record("/camera2/c.jpg"), None, [])  # a sibling folder with the same prefix
    store.record(_record("/cam/bad.jpg", status="failed"), None, [])
    assert store.live_paths(Path("/cam")) == {"/cam/a.jpg", "/cam/sub/b.jpg", "/cam/bad.jpg"}
    store.record(_record("/cam/a.jpg", status="deleted"), None, [])
    assert store.live_paths(Path("/cam")) == {"/cam/sub/b.jpg", "/cam/bad.jpg"}
    assert store.counts() == {"done": 2, "failed": 1, "deleted": 1}


def test_names_that_are_not_utf8_are_keyed_losslessly(store: Store) -> None:
    latin1 = os.fsdecode(b"/cam/caf\xe9.jpg")  # what os.listdir gives for Latin-1 bytes
    utf8 = "/cam/caf\u00e9.jpg"  # the same word in UTF-8: a different file
    store.record(_record(latin1, sha256="01" * 32), None, [])
    store.record(_record(utf8, sha256="02" * 32), None, [])
    assert store.image(latin1).sha256 == "01" * 32
    assert store.image(utf8).sha256 == "02" * 32
    assert store.live_paths(Path("/cam")) == {latin1, utf8}
    with sqlite3.connect(store.path) as db:  # readable names stay TEXT, the others are BLOBs
        keys = {row[0] for row in db.execute("SELECT path FROM images")}
    assert keys == {b"/cam/caf\xe9.jpg", utf8}
