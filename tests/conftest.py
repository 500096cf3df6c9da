"""Shared fixtures: seeded models (built once per session), images, a real Mosquitto."""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from dinowatch import mqtt as mqtt_module
from dinowatch.config import MqttSettings
from dinowatch.mqtt import Publisher
from dinowatch.store import Store
from dinowatch.testing import synthetic_photo, write_model

MEASUREMENTS: list[str] = []


@pytest.fixture
def report() -> Callable[[str], None]:
    """`report(line)`: a measurement shown in the test run's summary (e.g. seed parity)."""
    return MEASUREMENTS.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if MEASUREMENTS:
        terminalreporter.section("dinowatch measurements")
        for line in MEASUREMENTS:
            terminalreporter.line(line)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_dir: Path) -> Path:
    """One-block ViT with the real input and output shapes: fast."""
    return write_model(model_dir / "tiny.onnx", "tiny")


@pytest.fixture(scope="session")
def full_model(model_dir: Path) -> Path:
    """The full ViT-S/14 graph (12 blocks, 22 M parameters) with seeded weights."""
    return write_model(model_dir / "full.onnx", "full")


@pytest.fixture(scope="session")
def tiny_all_tokens_model(model_dir: Path) -> Path:
    """Same weights as `tiny_model`, exported with every token: [B, 257, 384]."""
    return write_model(model_dir / "tiny_tokens.onnx", "tiny", all_tokens=True)


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    synthetic_photo(640, 480, seed=1).save(path, quality=90)
    return path


# ---- a real Mosquitto broker --------------------------------------------------------------

BROKER_START_SECONDS = 10.0


def _mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(found).is_file():
        pytest.fail("mosquitto is not installed (apt-get install mosquitto): the MQTT tests run "
                    "against a real broker", pytrace=False)
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class TlsFiles:
    """A test CA, a server certificate for localhost/127.0.0.1 and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


class Mosquitto:
    """A mosquitto process on 127.0.0.1 with persistence in `directory`; restartable."""

    host = "127.0.0.1"

    def __init__(self, directory: Path, *, users: dict[str, str] | None = None,
                 tls: TlsFiles | None = None, require_certificate: bool = False,
                 extra_config: list[str] | None = None) -> None:
        self.binary = _mosquitto_binary()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.log_file = directory / "mosquitto.log"
        self.conf = directory / "mosquitto.conf"
        self.process: subprocess.Popen[bytes] | None = None
        lines = [f"listener {self.port} {self.host}",
                 f"allow_anonymous {'false' if users is not None else 'true'}",
                 "persistence true", f"persistence_location {directory}/",
                 f"log_dest file {self.log_file}", "log_type all",
                 f"user {getpass.getuser()}"]  # as root mosquitto would switch to `mosquitto`
        if users is not None:
            lines.append(f"password_file {self._password_file(users)}")
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.server_cert}",
                      f"keyfile {tls.server_key}",
                      f"require_certificate {'true' if require_certificate else 'false'}"]
        lines += extra_config or []  # e.g. max_packet_size, acl_file
        self.conf.write_text("\n".join(lines) + "\n")

    def _password_file(self, users: dict[str, str]) -> Path:
        path = self.directory / "passwords"
        path.write_text("")
        path.chmod(0o600)
        tool = shutil.which("mosquitto_passwd")
        if tool is None:
            pytest.fail("mosquitto_passwd is missing (it ships with the mosquitto package)",
                        pytrace=False)
        for user, password in users.items():
            subprocess.run([tool, "-b", str(path), user, password], check=True,
                           capture_output=True)
        return path

    @property
    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def start(self) -> None:
        assert self.process is None, "already running"
        self.process = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + BROKER_START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.communicate()[1].decode(errors="replace")
                self.process = None
                pytest.fail(f"mosquitto exited at start:\n{stderr}\n{self.log}", pytrace=False)
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
            except OSError:
                time.sleep(0.05)
            else:
                return
        self.kill()
        pytest.fail(f"mosquitto did not listen on {self.port} in time:\n{self.log}",
                    pytrace=False)

    def stop(self) -> None:
        """SIGTERM: mosquitto saves sessions and queued messages, then exits."""
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """`mosquitto_factory(users={...}, tls=..., extra_config=[...], start=True)` -> a broker,
    killed at teardown."""
    brokers: list[Mosquitto] = []

    def make(*, start: bool = True, **options: Any) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto{len(brokers)}", **options)
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.kill()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """An anonymous broker, running."""
    return mosquitto_factory()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """An anonymous broker, running, shared by a module's tests (for one daemon that serves
    several tests; `mosquitto` is a fresh one per test)."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.kill()


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl") or "/usr/bin/openssl"
    result = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed:\n{result.stderr}", pytrace=False)


@pytest.fixture
def tls_ca(tmp_path: Path) -> TlsFiles:
    """CA, server (localhost, 127.0.0.1) and client certificates made with the openssl CLI."""
    folder = tmp_path / "tls"
    folder.mkdir()
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=dinowatch test CA", cwd=folder)
    for name, extensions in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (folder / f"{name}.ext").write_text(extensions + "\n")
        _openssl("req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={'localhost' if name == 'server' else 'dinowatch'}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=folder)
    return TlsFiles(ca=folder / "ca.crt", server_cert=folder / "server.crt",
                    server_key=folder / "server.key", client_cert=folder / "client.crt",
                    client_key=folder / "client.key")


class Received(NamedTuple):
    topic: str
    payload: bytes
    retain: bool


class Subscriber:
    """A paho client that records what it receives. 3.1.1 with a persistent session and a
    fixed client id, so QoS 1 messages queued while it is away survive broker restarts."""

    def __init__(self, broker: Mosquitto, topics: tuple[str, ...], *,
                 client_id: str | None = None, tls: TlsFiles | None = None) -> None:
        self.topics = topics
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"test-sub-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv311, clean_session=False)
        if tls is not None:
            self.client.tls_set(ca_certs=str(tls.ca), certfile=str(tls.client_cert),
                                keyfile=str(tls.client_key))
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(BROKER_START_SECONDS):
            self.close()
            pytest.fail(f"subscriber could not subscribe to {topics}:\n{broker.log}",
                        pytrace=False)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if not reason.is_failure:
            client.subscribe([(topic, 1) for topic in self.topics])

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self._messages.append(Received(message.topic, message.payload, bool(message.retain)))

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)

    def wait_for(self, predicate: Callable[[list[Received]], bool],
                 timeout: float = 20.0) -> list[Received]:
        """Poll until `predicate(messages)` holds; returns the messages, else fails."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages
            if predicate(messages):
                return messages
            if time.monotonic() > deadline:
                shown = [(m.topic, m.payload[:80], m.retain) for m in messages[-10:]]
                pytest.fail(f"timed out after {timeout} s; {len(messages)} messages, "
                            f"last: {shown}", pytrace=False)
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber_factory() -> Iterator[Callable[..., Subscriber]]:
    """`subscriber_factory(broker, *topics, tls=None)` -> a subscribed Subscriber."""
    subscribers: list[Subscriber] = []

    def make(broker: Mosquitto, *topics: str, **options: Any) -> Subscriber:
        subscriber = Subscriber(broker, topics, **options)
        subscribers.append(subscriber)
        return subscriber

    yield make
    for subscriber in subscribers:
        subscriber.close()


# ---- a real Publisher on a real Store -------------------------------------------------------

PUBLISHER_DEVICE = "test-pi"


@pytest.fixture
def fast_mqtt(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Publisher's timing knobs shrunk for in-process tests (a daemon process keeps its
    defaults)."""
    monkeypatch.setattr(mqtt_module, "RECONNECT_MAX_SECONDS", 1)
    monkeypatch.setattr(mqtt_module, "IDLE_POLL_SECONDS", 0.2)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    db = Store(tmp_path / "dinowatch.db")
    yield db
    db.close()


@pytest.fixture
def publisher(store: Store) -> Iterator[Callable[..., Publisher]]:
    """`publisher(broker, *, start=True, **mqtt_settings)` -> a Publisher (started unless
    told otherwise) for anything with `host` and `port`; stopped at teardown."""
    started: list[Publisher] = []

    def make(broker: Any, *, start: bool = True, **options: Any) -> Publisher:
        settings = MqttSettings(host=broker.host, port=broker.port, **options)
        pub = Publisher(settings, PUBLISHER_DEVICE, store)
        started.append(pub)
        if start:
            pub.start()
        return pub

    yield make
    for pub in started:
        pub.stop(timeout=1.0)
