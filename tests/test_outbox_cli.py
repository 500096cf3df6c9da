"""`dinowatch outbox list|retry|drop` and the dead-letter count in `status`: the real command
against a real database whose messages were parked by the store's own `park`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_process import write_config
from dinowatch.store import Message, Store

DINOWATCH = [sys.executable, "-m", "dinowatch.cli"]
TOPIC = "dinowatch/test-pi"


def dinowatch(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*DINOWATCH, *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config whose data_dir holds a database with seqs 1, 2 and 4 parked, 3 waiting."""
    data = tmp_path / "data"
    store = Store(data / "dinowatch.db")
    try:
        store.enqueue([Message(f"{TOPIC}/embedding", b"e" * 3300),
                       Message(f"{TOPIC}/deleted", b'{"n": 2}'),
                       Message(f"{TOPIC}/embedding", b'{"n": 3}'),
                       Message(f"{TOPIC}/match", b'{"n": 4}', qos=0, retain=True)])
        assert store.park(1, 0, "MessageTooLarge: its PUBLISH packet is 3333 bytes, the "
                                "broker accepts at most 3000", None)
        assert store.park(2, 5, "Refused: the broker refused it: Not authorized", None)
        assert store.park(4, 5, "ConnectionClosed: the connection ended", None)
    finally:
        store.close()
    (tmp_path / "inbox").mkdir()
    return write_config(tmp_path / "config.yaml", data_dir=str(data),
                        watch=[{"path": str(tmp_path / "inbox")}], mqtt=None)


def rows(config: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(config.parent / "data" / "dinowatch.db") as db:
        return db.execute(sql).fetchall()


def test_list_shows_each_parked_message(config: Path) -> None:
    result = dinowatch("outbox", "list", "-c", config)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["SEQ", "TOPIC", "SIZE", "ATTEMPTS", "PARKED_AT", "ERROR"]
    assert [line.split()[:4] for line in lines] == [
        ["1", f"{TOPIC}/embedding", "3300", "0"], ["2", f"{TOPIC}/deleted", "8", "5"],
        ["4", f"{TOPIC}/match", "8", "5"]]
    assert lines[0].endswith("MessageTooLarge: its PUBLISH packet is 3333 bytes, the broker "
                             "accepts at most 3000")
    assert lines[1].endswith("Refused: the broker refused it: Not authorized")

    parsed = json.loads(dinowatch("outbox", "list", "--json", "-c", config).stdout)
    assert [(p["seq"], p["size"], p["attempts"], p["qos"], p["retain"]) for p in parsed] == [
        (1, 3300, 0, 1, False), (2, 8, 5, 1, False), (4, 8, 5, 0, True)]
    assert {"topic", "error", "created_at", "parked_at"} <= set(parsed[0])


def test_retry_moves_back_in_original_order_and_drop_deletes(config: Path) -> None:
    result = dinowatch("outbox", "retry", "4", "1", "-c", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1 -> 5", "4 -> 6"]  # by original seq, at the end
    assert rows(config, "SELECT seq, topic, length(payload), qos, retain, attempts, last_error "
                        "FROM outbox ORDER BY seq") == [
        (3, f"{TOPIC}/embedding", 8, 1, 0, 0, None),
        (5, f"{TOPIC}/embedding", 3300, 1, 0, 0, None),  # a fresh retry budget
        (6, f"{TOPIC}/match", 8, 0, 1, 0, None)]
    assert rows(config, "SELECT seq FROM dead_letters") == [(2,)]

    result = dinowatch("outbox", "drop", "2", "-c", config)
    assert (result.returncode, result.stdout.strip()) == (0, "dropped 1 messages: 2")
    assert rows(config, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert dinowatch("outbox", "list", "-c", config).stdout.strip() == "no parked messages"
    assert json.loads(dinowatch("outbox", "list", "--json", "-c", config).stdout) == []
    result = dinowatch("outbox", "retry", "--all", "-c", config)  # nothing parked: fine
    assert result.returncode == 0 and result.stdout == ""
    assert rows(config, "SELECT count(*) FROM outbox") == [(3,)]


def test_retry_all_and_drop_all(config: Path) -> None:
    result = dinowatch("outbox", "retry", "--all", "-c", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1 -> 5", "2 -> 6", "4 -> 7"]
    assert rows(config, "SELECT count(*) FROM dead_letters") == [(0,)]
    with sqlite3.connect(config.parent / "data" / "dinowatch.db") as db:  # park two again
        db.execute("INSERT INTO dead_letters SELECT seq, topic, payload, qos, retain, "
                   "created_at, attempts, 'Refused: x', created_at, report_of FROM outbox "
                   "WHERE seq IN (5, 6)")
    result = dinowatch("outbox", "drop", "--all", "-c", config)
    assert (result.returncode, result.stdout.strip()) == (0, "dropped 2 messages: 5, 6")
    assert rows(config, "SELECT count(*) FROM dead_letters") == [(0,)]


def test_exit_codes(config: Path, tmp_path: Path) -> None:
    for usage in (["outbox"], ["outbox", "resend"], ["outbox", "retry"], ["outbox", "drop"],
                  ["outbox", "retry", "1", "--all"], ["outbox", "drop", "one"]):
        result = dinowatch(*usage, "-c", config)
        assert result.returncode == 2, (usage, result.stderr)
    result = dinowatch("outbox", "retry", "1", "99", "-c", config)
    assert result.returncode == 1 and "99" in result.stderr and "nothing changed" in result.stderr
    result = dinowatch("outbox", "drop", "3", "-c", config)  # waiting in the outbox: not parked
    assert result.returncode == 1 and "3" in result.stderr
    assert rows(config, "SELECT seq FROM dead_letters ORDER BY seq") == [(1,), (2,), (4,)]
    assert rows(config, "SELECT seq FROM outbox") == [(3,)]

    empty = write_config(tmp_path / "empty.yaml", data_dir=str(tmp_path / "nothing-yet"),
                         watch=[{"path": str(tmp_path / "inbox")}], mqtt=None)
    result = dinowatch("outbox", "list", "-c", empty)
    assert result.returncode == 1 and "no database" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("watch: []\nmqtt: {port: 70000}\n")
    assert dinowatch("outbox", "list", "-c", broken).returncode == 78


def test_status_counts_dead_letters(config: Path) -> None:
    result = dinowatch("status", "-c", config)
    assert result.returncode == 0, result.stderr
    assert "dead letters: 3 messages parked" in result.stdout
    assert "outbox: 1 messages waiting" in result.stdout
    report = json.loads(dinowatch("status", "--json", "-c", config).stdout)
    assert (report["dead_letters"], report["outbox"]) == (3, 1)
