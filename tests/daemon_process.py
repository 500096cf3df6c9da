"""Run the real `dinowatch run` process in tests, with a systemd-style notify socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml


def write_config(path: Path, **settings: object) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


# Run as root without the capabilities that bypass file permissions, so a chmod 000 file is
# as unreadable to the daemon as it would be to the `dinowatch` service user.
WITHOUT_PERMISSION_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                               "--inh-caps=-all", "--"] if os.geteuid() == 0 else []


class DaemonProcess:
    """`python -m dinowatch.cli run -c CONFIG` with NOTIFY_SOCKET pointing at a test socket.

    `wrapper` goes before the command (e.g. WITHOUT_PERMISSION_OVERRIDE)."""

    def __init__(self, config: Path, workdir: Path, wrapper: list[str] | None = None) -> None:
        self.wrapper = wrapper or []
        self.config = config
        self.log_path = workdir / "daemon.log"
        self.notify_path = workdir / "notify.sock"
        self.notifications: list[str] = []
        self.process: subprocess.Popen | None = None

    def start(self, *, watchdog_usec: int | None = None, ready_timeout: float = 120) -> None:
        self.notify_path.unlink(missing_ok=True)
        self.notifications = []  # a restart waits for its own READY=1
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(self.notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), "PYTHONUNBUFFERED": "1"}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen([*self.wrapper, sys.executable, "-m", "dinowatch.cli",
                                         "run", "-c", str(self.config)], stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env)
        self.wait_notification("READY=1", ready_timeout)

    def wait_notification(self, field: str, timeout: float = 30) -> list[str]:
        """Collect notify datagrams until one carries `field`; returns all seen so far."""
        deadline = time.monotonic() + timeout
        while not any(field in n.splitlines() for n in self.notifications):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.process and self.process.poll() is not None):
                raise AssertionError(f"no {field} from the daemon; log:\n{self.log()}")
            self._socket.settimeout(min(remaining, 0.5))
            try:
                self.notifications.append(self._socket.recv(4096).decode())
            except TimeoutError:
                continue
        return self.notifications

    def collect(self, seconds: float) -> list[str]:
        """Notify datagrams that arrive within the next `seconds`."""
        deadline, received = time.monotonic() + seconds, []
        while (remaining := deadline - time.monotonic()) > 0:
            self._socket.settimeout(remaining)
            try:
                received.append(self._socket.recv(4096).decode())
            except TimeoutError:
                break
        self.notifications += received
        return received

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self._close()

    def _close(self) -> None:
        self._socket.setblocking(False)
        while True:  # keep what the daemon said while stopping
            try:
                self.notifications.append(self._socket.recv(4096).decode())
            except BlockingIOError:
                break
        self._log.close()
        self._socket.close()

    def rss_bytes(self) -> int:
        """The daemon's resident set size now (VmRSS)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS for the daemon")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.kill()


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
