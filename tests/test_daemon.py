"""The real `dinowatch run` process without a broker: config errors, systemd, signals."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_process import DaemonProcess, wait_until, write_config
from dinowatch.testing import synthetic_photo


def check_config(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinowatch.cli", "check-config", "-c",
                           str(config)], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("watch:\n  - path: /tmp\nmqtt:\n  hots: x\n",
     "4: mqtt.hots: unknown key; did you mean 'host'?"),
    ("watch:\n  - path: /tmp\nmatching:\n  top_k: many\n", "4: matching.top_k:"),
    ("watch:\n  - path: /tmp\nmqtt:\n  port: 70000\n", "4: mqtt.port:"),
    ("watch:\n  - path: /tmp\nmatching:\n  threshold: 1.5\n", "4: matching.threshold:"),
    ("device_id: pi\nwatch: []\n", "2: watch:"),
])
def test_invalid_configs_exit_78_naming_key_and_line(tmp_path: Path, yaml_text: str,
                                                     expected: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    for command in ("check-config", "run"):
        result = subprocess.run([sys.executable, "-m", "dinowatch.cli", command, "-c",
                                 str(config)], capture_output=True, text=True, timeout=60,
                                check=False)
        assert result.returncode == 78, result.stderr
        assert f"bad.yaml:{expected}" in result.stderr


def test_check_config_lists_every_error_at_once(tmp_path: Path) -> None:
    config = tmp_path / "two.yaml"
    config.write_text("watch:\n  - path: /tmp\n    polling: maybe\nmqtt:\n  port: 0\n")
    result = check_config(config)
    assert result.returncode == 78
    assert "two.yaml:3: watch[0].polling" in result.stderr
    assert "two.yaml:5: mqtt.port" in result.stderr


def test_valid_config_with_missing_folder_is_a_warning(tmp_path: Path) -> None:
    config = write_config(tmp_path / "ok.yaml", watch=[{"path": str(tmp_path / "later")}],
                          mqtt=None)
    result = check_config(config)
    assert result.returncode == 0
    assert "later" in result.stderr and "does not exist yet" in result.stderr


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("inbox", "data", "run")}
    for name in ("inbox", "run"):
        paths[name].mkdir()
    return paths


def daemon_config(folders: dict[str, Path], tiny_model: Path, watch: list[Path]) -> Path:
    return write_config(folders["run"] / "config.yaml", device_id="test-pi",
                        data_dir=str(folders["data"]), model={"path": str(tiny_model)},
                        watch=[{"path": str(p), "settle_seconds": 0.5} for p in watch],
                        mqtt=None, logging={"level": "DEBUG"})


def done_paths(data_dir: Path) -> set[str]:
    with sqlite3.connect(data_dir / "dinowatch.db") as db:
        return {r[0] for r in db.execute("SELECT path FROM images WHERE status = 'done'")}


def test_ready_watchdog_and_clean_stop(folders: dict[str, Path], tiny_model: Path) -> None:
    config = daemon_config(folders, tiny_model, [folders["inbox"]])
    with DaemonProcess(config, folders["run"]) as daemon:
        daemon.start(watchdog_usec=1_000_000)
        daemon.wait_notification("WATCHDOG=1", timeout=10)
        synthetic_photo(320, 240, seed=1).save(folders["inbox"] / "one.jpg")
        wait_until(lambda: done_paths(folders["data"]), 30, "the image to be stored")
        started = time.monotonic()
        assert daemon.stop(timeout=10) == 0
        assert time.monotonic() - started < 10
        assert any("STOPPING=1" in n for n in daemon.notifications)
    assert done_paths(folders["data"]) == {str(folders["inbox"] / "one.jpg")}


def test_sighup_reloads_the_watch_list(folders: dict[str, Path], tiny_model: Path,
                                       tmp_path: Path) -> None:
    second = tmp_path / "second"
    second.mkdir()
    synthetic_photo(320, 240, seed=2).save(second / "waiting.jpg")
    config = daemon_config(folders, tiny_model, [folders["inbox"]])
    with DaemonProcess(config, folders["run"]) as daemon:
        daemon.start()
        time.sleep(1)
        assert done_paths(folders["data"]) == set()
        daemon_config(folders, tiny_model, [folders["inbox"], second])
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: done_paths(folders["data"]) == {str(second / "waiting.jpg")}, 30,
                   "the new folder's file after SIGHUP")
        assert daemon.process.poll() is None
        assert daemon.stop() == 0
    assert "configuration reloaded" in daemon.log()


def test_folder_that_appears_later_is_watched(folders: dict[str, Path], tiny_model: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    drive = tmp_path / "usb-drive"
    config = daemon_config(folders, tiny_model, [drive])
    with DaemonProcess(config, folders["run"]) as daemon:
        daemon.start()
        drive.mkdir()
        synthetic_photo(320, 240, seed=3).save(drive / "late.jpg")
        # the watcher re-checks a missing folder every few seconds (watch.CHECK_INTERVAL)
        wait_until(lambda: done_paths(folders["data"]) == {str(drive / "late.jpg")}, 60,
                   "the file in the folder that appeared")
        assert daemon.stop() == 0
    assert f"watch[0].path: {drive} does not exist yet" in daemon.log()


def test_index_backfills_store_and_outbox_and_status_reports_it(tmp_path: Path,
                                                                 tiny_model: Path) -> None:
    photos = tmp_path / "old photos"
    (photos / "2023").mkdir(parents=True)
    for i in range(6):
        synthetic_photo(320, 240, seed=400 + i).save(photos / "2023" / f"p{i}.jpg")
    (photos / "broken.jpg").write_text("no")
    config = write_config(tmp_path / "config.yaml", device_id="idx", data_dir=str(tmp_path / "d"),
                          model={"path": str(tiny_model)}, watch=[{"path": str(photos)}],
                          mqtt={"host": "127.0.0.1", "port": 1})  # queued for the daemon
    cli = [sys.executable, "-m", "dinowatch.cli"]

    def dinowatch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args, "-c", str(config)], capture_output=True, text=True,
                              timeout=120, check=False)

    first = dinowatch("index", str(photos))
    assert first.returncode == 1  # one file failed
    assert ("7 files: 6 recorded, 0 already in the store, 1 failed, 0 deleted meanwhile; "
            "7 messages") in first.stdout
    again = dinowatch("index", str(photos))
    assert ("7 files: 0 recorded, 7 already in the store, 0 failed, 0 deleted meanwhile; "
            "7 messages") in again.stdout
    status = dinowatch("status", "--json")
    assert status.returncode == 0
    report = json.loads(status.stdout)
    assert report["images"] == {"done": 6, "failed": 1, "deleted": 0}
    assert report["outbox"] == 7
    assert report["last_errors"][0]["path"] == str(photos / "broken.jpg")
    human = dinowatch("status")
    assert "images: 6 embedded, 1 failed, 0 deleted" in human.stdout
    assert "broken.jpg" in human.stdout
