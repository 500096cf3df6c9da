"""Day-to-day operation with the real `dinowatch run` process: a watchdog that sees progress,
a dead writer that ends the daemon, a bounded stop, and device ids that never collide."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from daemon_process import DaemonProcess, wait_until, write_config
from dinowatch.config import default_device_id
from dinowatch.testing import synthetic_photo

FAULTS = Path(__file__).parent / "faultinject"


def config(tmp_path: Path, model: Path, broker, **settings: object) -> Path:  # type: ignore[no-untyped-def]
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    return write_config(tmp_path / "config.yaml", data_dir=str(tmp_path / "data"),
                        model={"path": str(model)},
                        watch=[{"path": str(inbox), "settle_seconds": 0.3}],
                        mqtt={"host": broker.host, "port": broker.port}, **settings)


def with_fault(monkeypatch: pytest.MonkeyPatch, fault: str, trigger: Path) -> None:
    """The daemon processes started after this carry the fault (see faultinject/)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(FAULTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("DINOWATCH_FAULT", fault)
    monkeypatch.setenv("DINOWATCH_FAULT_TRIGGER", str(trigger))


def test_a_dead_store_writer_ends_the_daemon_with_exit_1(
        tmp_path: Path, tiny_model: Path, mosquitto, monkeypatch: pytest.MonkeyPatch) -> None:
    trigger = tmp_path / "break-the-disk"
    with_fault(monkeypatch, "writer", trigger)
    with DaemonProcess(config(tmp_path, tiny_model, mosquitto, device_id="w"), tmp_path) as daemon:
        daemon.start()
        synthetic_photo(160, 120, seed=1).save(tmp_path / "inbox" / "before.jpg")
        wait_until(lambda: "embedded" in daemon.log(), 30, "the first image")
        trigger.touch()  # the next write fails and its ROLLBACK too
        synthetic_photo(160, 120, seed=2).save(tmp_path / "inbox" / "after.jpg")
        assert daemon.process is not None
        code = daemon.process.wait(30)  # not a hang that keeps telling systemd all is well
        assert code == 1, daemon.log()
    log = daemon.log()
    assert "database writer" in log and "ROLLBACK failed" in log
    assert "stopping with exit code 1 so systemd restarts dinowatch" in log


def test_a_stuck_stage_stops_the_watchdog_pings(tmp_path: Path, tiny_model: Path, mosquitto,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    trigger = tmp_path / "hang-now"
    with_fault(monkeypatch, "hang", trigger)
    with DaemonProcess(config(tmp_path, tiny_model, mosquitto, device_id="h"), tmp_path) as daemon:
        daemon.start(watchdog_usec=1_000_000)  # a ping every 0.5 s while healthy
        time.sleep(2)
        healthy = daemon.wait_notification("WATCHDOG=1").count("WATCHDOG=1")
        assert healthy >= 1
        trigger.touch()
        synthetic_photo(160, 120, seed=3).save(tmp_path / "inbox" / "hang.jpg")
        wait_until(lambda: "decoding has been on one item" in daemon.log(), 20,
                   "the stall to be noticed")
        daemon.collect(0.2)  # a ping already on its way
        later = [n for n in daemon.collect(3) if "WATCHDOG=1" in n.splitlines()]
        assert later == [], "pings went on while decoding was stuck"
        daemon.kill()


def test_sigterm_while_the_model_loads_exits_0_in_time(tmp_path: Path, full_model: Path,
                                                       mosquitto) -> None:
    with DaemonProcess(config(tmp_path, full_model, mosquitto, device_id="s"), tmp_path) as daemon:
        with pytest.raises(AssertionError):  # never READY: stopped while loading
            daemon.start(ready_timeout=0.01)
        daemon.wait_notification("STATUS=loading model", 60)
        stopped = time.monotonic()
        assert daemon.stop(timeout=15) == 0
        took = time.monotonic() - stopped
    assert took < 10, f"SIGTERM while loading took {took:.1f} s (TimeoutStopSec is 15)"
    assert "stopped while starting" in daemon.log()
    assert not any("READY=1" in n.splitlines() for n in daemon.notifications)


def test_default_device_id_is_unique_on_stock_hostnames(tmp_path: Path) -> None:
    first, second = tmp_path / "machine-id-1", tmp_path / "machine-id-2"
    first.write_text("0123456789abcdef0123456789abcdef\n")
    second.write_text("fedcba9876543210fedcba9876543210\n")
    assert default_device_id("garage-pi", first) == "garage-pi"  # a chosen name stays
    assert default_device_id("garage-pi.lan", first) == "garage-pi"
    ids = {default_device_id("raspberrypi", first), default_device_id("raspberrypi", second)}
    assert len(ids) == 2 and all(i.startswith("raspberrypi-") and len(i) == 18 for i in ids)
    assert default_device_id("raspberrypi", first) == default_device_id("raspberrypi", first)
    assert "0123456789abcdef" not in default_device_id("raspberrypi", first)  # hashed
    assert default_device_id("raspberrypi", tmp_path / "none") == "raspberrypi"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is missing")
def test_two_stock_pis_share_one_broker(tmp_path: Path, tiny_model: Path, mosquitto,
                                        subscriber_factory) -> None:
    """Two daemons, each in its own UTS and mount namespace with hostname `raspberrypi` and
    its own /etc/machine-id, as two Pis fresh from the same image would be."""
    subscriber = subscriber_factory(mosquitto, "dinowatch/#")
    daemons = []
    for number in (1, 2):
        home = tmp_path / f"pi{number}"
        home.mkdir()
        machine_id = home / "machine-id"
        machine_id.write_text(f"{number:032x}\n")
        wrapper = ["unshare", "--uts", "--mount", "--", "sh", "-c",
                   f'hostname raspberrypi && mount --bind "{machine_id}" /etc/machine-id '
                   '&& exec "$@"', "sh"]
        probe = subprocess.run([*wrapper, "true"], capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            pytest.skip(f"cannot make namespaces here: {probe.stderr.strip()}")
        daemon = DaemonProcess(config(home, tiny_model, mosquitto), home, wrapper=wrapper)
        daemon.start()
        daemons.append(daemon)
        synthetic_photo(160, 120, seed=number).save(home / "inbox" / f"from{number}.jpg")
    try:
        embeddings = subscriber.wait_for(lambda ms: len(
            [m for m in ms if m.topic.endswith("/embedding")]) >= 2)
        time.sleep(2)  # long enough for a takeover loop to show
        online = {m.topic for m in subscriber.messages
                  if m.topic.endswith("/status") and m.payload == b"online"}
        devices = {topic.split("/")[1] for topic in online}
        assert len(devices) == 2 and all(d.startswith("raspberrypi-") for d in devices)
        by_device = {m.topic.split("/")[1]: json.loads(m.payload)["path"]
                     for m in embeddings if m.topic.endswith("/embedding")}
        assert sorted(Path(p).name for p in by_device.values()) == ["from1.jpg", "from2.jpg"]
        assert "already connected" not in mosquitto.log  # no session takeover
        assert all(d.process is not None and d.process.poll() is None for d in daemons)
    finally:
        for daemon in daemons:
            daemon.stop()


def test_a_paused_store_is_not_a_stuck_daemon(tmp_path: Path, tiny_model: Path, mosquitto,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """While the database is locked by another process (or its disk is full) intake waits on
    purpose: systemd must not restart the daemon for that."""
    with_fault(monkeypatch, "short-limits", tmp_path / "unused")
    cfg = config(tmp_path, tiny_model, mosquitto, device_id="p")
    with DaemonProcess(cfg, tmp_path) as daemon:
        daemon.start(watchdog_usec=1_000_000)
        other = sqlite3.connect(tmp_path / "data" / "dinowatch.db", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # a backup tool, say
        try:
            synthetic_photo(160, 120, seed=7).save(tmp_path / "inbox" / "waiting.jpg")
            wait_until(lambda: "intake paused" in daemon.log(), 30, "the pause")
            daemon.collect(0.5)
            pings = [n for n in daemon.collect(5) if "WATCHDOG=1" in n.splitlines()]
            assert len(pings) >= 5, "the watchdog stopped during a deliberate pause"
            assert "not telling systemd's watchdog" not in daemon.log()
        finally:
            other.execute("COMMIT")
            other.close()
        wait_until(lambda: "embedded" in daemon.log(), 30, "the image after the pause")
        assert daemon.stop() == 0
