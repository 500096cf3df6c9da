"""A real Home Assistant for tests: started from the venv scripts/homeassistant-venv.sh makes,
onboarded over its REST API and joined to a test Mosquitto through the MQTT integration.

What it does follows /work/shared/home-assistant-facts.md (Home Assistant 2025.4.4): a
minimal configuration.yaml (no `default_config`, which pulls integrations that try the
internet), `hass --skip-pip` in its own process group, onboarding (its other steps marked done
in .storage beforehand, then the owner user -> auth code -> bearer token), then the `mqtt`
config flow with the broker's host and port. Ready when its log says the MQTT client sent its
birth message.

    DINOWATCH_HA_VENV   the venv (default ~/.cache/dinowatch/homeassistant-venv, the path the
                        script makes); a missing venv fails the test, naming the script.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

VENV_SCRIPT = "scripts/homeassistant-venv.sh"
DEFAULT_VENV = Path.home() / ".cache" / "dinowatch" / "homeassistant-venv"
READY_LINE = "MQTT client initialized, birth message sent"
HTTP_SECONDS = 60.0   # to the HTTP API (about 2.5 s on 2 cores)
MQTT_SECONDS = 60.0   # to the birth message (about 9 s, 5 s of it discovery cooldown)
STOP_SECONDS = 20.0


def venv() -> Path:
    return Path(os.environ.get("DINOWATCH_HA_VENV") or DEFAULT_VENV)


def hass_binary() -> Path:
    """`hass` in the venv. Missing: a failure in CI (.ci/run sets
    DINOWATCH_REQUIRE_HOMEASSISTANT=1 and makes the venv first), elsewhere a skip that says
    why: Home Assistant 2025 needs a Python 3.13, which Debian 12 and Raspberry Pi OS lack."""
    binary = venv() / "bin" / "hass"
    if not binary.is_file():
        why = (f"no Home Assistant at {binary}: run {VENV_SCRIPT} first (it needs a Python "
               "3.13 and makes the venv with homeassistant==2025.4.4; set DINOWATCH_HA_VENV "
               "to use another one)")
        if os.environ.get("DINOWATCH_REQUIRE_HOMEASSISTANT"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return binary


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CONFIGURATION = """\
homeassistant:
  name: dinowatch test
  latitude: 52.52
  longitude: 13.40
  elevation: 34
  unit_system: metric
  time_zone: UTC
  country: DE
  currency: EUR
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
logger:
  default: info
  logs:
    homeassistant.components.mqtt: debug
"""


class HomeAssistant:
    """One Home Assistant process with its config in `directory`, on a free loopback port."""

    host = "127.0.0.1"

    def __init__(self, directory: Path) -> None:
        self.binary = hass_binary()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://{self.host}:{self.port}"
        self.log_file = directory / "home-assistant.log"
        self.output = directory / "hass.out"
        self.token: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        (directory / "configuration.yaml").write_text(CONFIGURATION.format(port=self.port))
        # Onboarding's other steps done beforehand: finishing `core_config` over REST would
        # set up the weather, radio and text-to-speech integrations, which try the internet.
        storage = directory / ".storage"
        storage.mkdir(exist_ok=True)
        (storage / "onboarding").write_text(json.dumps({
            "version": 4, "minor_version": 1, "key": "onboarding",
            "data": {"done": ["integration", "core_config", "analytics"]}}))

    # -- process ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the process (returns at once; `wait_http` waits for the API)."""
        assert self.process is None, "already running"
        with self.output.open("ab") as out:
            self.process = subprocess.Popen(
                [str(self.binary), "-c", str(self.directory), "--skip-pip",
                 "--log-file", str(self.log_file)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def stop(self) -> None:
        """SIGTERM to its process group; SIGKILL if it does not stop in time."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            self.process.wait()
        self.process = None

    @property
    def log(self) -> str:
        parts = [path.read_text(errors="replace") for path in (self.log_file, self.output)
                 if path.exists()]
        return "\n".join(parts)

    def _alive(self, what: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"Home Assistant exited ({self.process.returncode}) while "
                                 f"waiting for {what}:\n{self.log[-6000:]}")

    def wait_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            self._alive(repr(text))
            if time.monotonic() > deadline:
                raise AssertionError(f"Home Assistant never logged {text!r} in {timeout} s:\n"
                                     f"{self.log[-6000:]}")
            time.sleep(0.1)

    def wait_http(self) -> None:
        deadline = time.monotonic() + HTTP_SECONDS
        while True:
            self._alive("its HTTP API")
            try:
                with urllib.request.urlopen(f"{self.url}/api/onboarding", timeout=2) as reply:
                    reply.read()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"Home Assistant's HTTP API did not answer in "
                                         f"{HTTP_SECONDS} s:\n{self.log[-6000:]}") from None
                time.sleep(0.1)

    # -- REST ---------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *,
                form: dict[str, str] | None = None, auth: bool = True) -> bytes:
        """One HTTP request; returns the body, raises AssertionError on an HTTP error."""
        headers: dict[str, str] = {}
        data: bytes | None = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            assert self.token, "not onboarded yet"
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.read()
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{method} {path}: HTTP {err.code} "
                                 f"{err.read()[:500]!r}") from None

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post_json(self, path: str, body: Any, *, auth: bool = True) -> Any:
        return json.loads(self.request("POST", path, body, auth=auth))

    def onboard(self) -> None:
        """The owner user (onboarding's last step left), then a bearer token."""
        client_id = f"{self.url}/"
        created = self.post_json("/api/onboarding/users", {
            "client_id": client_id, "name": "Test Owner", "username": "owner",
            "password": "dinowatch-test-password", "language": "en"}, auth=False)
        token = json.loads(self.request("POST", "/auth/token", form={
            "grant_type": "authorization_code", "code": created["auth_code"],
            "client_id": client_id}, auth=False))
        self.token = token["access_token"]

    def add_mqtt(self, broker_host: str, broker_port: int) -> None:
        """The MQTT integration, through its config flow (it has no YAML broker setup)."""
        flow = self.post_json("/api/config/config_entries/flow", {"handler": "mqtt"})
        assert flow.get("type") == "form" and flow.get("step_id") == "broker", flow
        done = self.post_json(f"/api/config/config_entries/flow/{flow['flow_id']}",
                              {"broker": broker_host, "port": broker_port})
        assert done.get("type") == "create_entry", done

    def start_with_mqtt(self, broker_host: str, broker_port: int) -> None:
        """Start, onboard, add MQTT, and wait for its birth message."""
        if self.process is None:
            self.start()
        self.wait_http()
        self.onboard()
        self.add_mqtt(broker_host, broker_port)
        self.wait_log(READY_LINE, MQTT_SECONDS)

    # -- reading back ---------------------------------------------------------------------------
    def states(self) -> list[dict[str, Any]]:
        return self.get_json("/api/states")

    def template(self, text: str) -> str:
        return self.request("POST", "/api/template", {"template": text}).decode()

    def mqtt_entities(self) -> list[str]:
        """The MQTT integration's entity ids (from the entity registry, via a template)."""
        return json.loads(self.template("{{ integration_entities('mqtt') | tojson }}"))

    def image(self, entity_id: str) -> bytes:
        return self.request("GET", f"/api/image_proxy/{entity_id}")

    def log_lines(self, *levels: str) -> list[str]:
        """Log lines at these levels (e.g. "ERROR", "WARNING"), each with its continuation
        lines (a traceback)."""
        found: list[str] = []
        current: list[str] | None = None
        for line in (self.log_file.read_text(errors="replace").splitlines()
                     if self.log_file.exists() else []):
            if line[:4].isdigit() and line[4:5] == "-":  # a new record: "2025-04-... LEVEL"
                if current:
                    found.append("\n".join(current))
                parts = line.split(maxsplit=3)
                current = [line] if len(parts) > 2 and parts[2] in levels else None
            elif current is not None:
                current.append(line)
        if current:
            found.append("\n".join(current))
        return found

    def __enter__(self) -> HomeAssistant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
