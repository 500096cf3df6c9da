"""`dinowatch status` says whether the daemon runs and when it last reported: from the age of
the stats it writes every 30 s (stale after two intervals) and whether its pid still lives."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon_process import DaemonProcess, wait_until, write_config
from dinowatch.config import load_settings
from dinowatch.store import Store
from dinowatch.testing import synthetic_photo

ENV = {key: value for key, value in os.environ.items() if key != "DINOWATCH_CONFIG"}


def status(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinowatch.cli", "status", "-c", str(config),
                           *args], capture_output=True, text=True, timeout=60, env=ENV,
                          check=False)


def status_json(config: Path) -> dict:
    result = status(config, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["daemon"]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    Store(data / "dinowatch.db").close()
    return write_config(tmp_path / "config.yaml", data_dir=str(data),
                        watch=[{"path": str(tmp_path)}], mqtt={"host": "127.0.0.1", "port": 1})


def put_stats(config: Path, **stats: object) -> None:
    with sqlite3.connect(config.parent / "data" / "dinowatch.db") as db:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('stats', ?)",
                   (json.dumps({"processed": 3, "queue": 0, "connected": True, **stats}),))


def stamp(seconds_ago: float) -> str:
    moment = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_fresh_report_from_a_live_pid_is_running(config: Path) -> None:
    put_stats(config, ts=stamp(12), pid=os.getpid())
    line = status(config).stdout.splitlines()[0]
    assert re.fullmatch(rf"daemon: running \(last report 1[234] s ago\), pid {os.getpid()}, "
                        "connected to the broker", line), line
    daemon = status_json(config)
    assert daemon["running"] is True and daemon["pid_alive"] is True
    assert daemon["connected"] is True and 11 <= daemon["last_report_age_seconds"] <= 14


def test_a_stale_report_is_not_running(config: Path) -> None:
    when = stamp(5 * 60)
    put_stats(config, ts=when, pid=dead_pid())
    assert status(config).stdout.splitlines()[0] == (
        f"daemon: not running (last report at {when}, 5 min ago)")
    daemon = status_json(config)
    # the last stats said `connected: true`; a daemon that has gone is connected to nothing
    assert daemon["running"] is False and daemon["connected"] is False
    assert daemon["last_report"] == when


def test_a_fresh_report_from_a_dead_pid_is_not_running(config: Path) -> None:
    put_stats(config, ts=stamp(3), pid=dead_pid())  # e.g. SIGKILLed 3 s ago
    assert status(config).stdout.startswith("daemon: not running (last report at ")
    assert status_json(config)["running"] is False


def test_a_live_pid_that_stopped_reporting_is_not_running(config: Path) -> None:
    put_stats(config, ts=stamp(61), pid=os.getpid())  # two intervals and a bit: stale
    line = status(config).stdout.splitlines()[0]
    assert re.fullmatch(rf"daemon: not running \(last report at \S+Z, 6[1-4] s ago; process "
                        rf"{os.getpid()} still exists but has stopped reporting\)", line), line


def test_no_report_and_an_old_report(config: Path) -> None:
    assert status(config).stdout.startswith("daemon: not running (no report yet")
    assert status_json(config)["running"] is False
    put_stats(config)  # stats of a dinowatch from before the time stamp
    assert status(config).stdout.startswith("daemon: unknown (its last report carries no time")
    assert status_json(config)["running"] is None


def test_status_of_the_real_daemon_before_and_after_stop(tmp_path: Path,
                                                         tiny_model: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = write_config(tmp_path / "config.yaml", data_dir=str(tmp_path / "data"),
                          model={"path": str(tiny_model)}, watch=[{"path": str(inbox)}],
                          mqtt=None)
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.start()
        assert daemon.process is not None
        wait_until(lambda: status(config).stdout.startswith("daemon: running"), 30,
                   "status to see the daemon running")
        text = status(config).stdout
        assert f"pid {daemon.process.pid}, no broker configured" in text.splitlines()[0]
        assert text.splitlines()[1].startswith("model: stand-in:tiny.onnx (sha256 ")
        assert "STAND-IN: random weights" in text.splitlines()[1]
        assert text.splitlines()[2] == "backend: onnx"
        assert text.splitlines()[3] == f"device: {load_settings(config).device_id} (no MQTT)"
        synthetic_photo(160, 120, seed=5).save(inbox / "late.jpg")  # after the last report
        wait_until(lambda: "embedded" in daemon.log(), 30, "the image embedded")
        assert daemon.stop() == 0
    line = status(config).stdout.splitlines()[0]
    assert line.startswith("daemon: not running (last report at "), line
    report = status_json(config)
    assert report["running"] is False
    assert report["processed"] == 1  # its last figures, written as it stopped
