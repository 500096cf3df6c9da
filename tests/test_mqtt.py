"""Publish stage against a real Mosquitto: delivery, outages, the Will, auth and TLS."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from paho.mqtt.client import MQTTMessageInfo
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from daemon_process import wait_until
from dinowatch import mqtt as mqtt_module
from dinowatch.config import MqttSettings, TlsSettings
from dinowatch.mqtt import Publisher, Topics, embedding_message, error_message, message_id
from dinowatch.store import Message, Store

if TYPE_CHECKING:
    from conftest import Mosquitto, Received, Subscriber, TlsFiles

TIMEOUT = 20.0  # generous: CI has two noisy cores
DEVICE = "test-pi"
TOPICS = Topics("dinowatch", DEVICE)

MakeSubscriber = Callable[..., "Subscriber"]
MakePublisher = Callable[..., Publisher]


pytestmark = pytest.mark.usefixtures("fast_mqtt")




def numbered(start: int, stop: int) -> list[Message]:
    return [Message(TOPICS.embedding, json.dumps({"n": n}).encode(), qos=1)
            for n in range(start, stop)]


def numbers(messages: list[Received]) -> list[int]:
    return [json.loads(m.payload)["n"] for m in messages]


def has_status(payload: bytes) -> Callable[[list[Received]], bool]:
    return lambda messages: bool(messages) and messages[-1].payload == payload


# ---- payloads -----------------------------------------------------------------------------

def _embedding(vector: np.ndarray, encoding: str, path: str = "/srv/camera/a.jpg") -> dict:
    message = embedding_message(
        TOPICS, device_id=DEVICE, path=path, source="front-door", sha256="ab" * 32,
        width=640, height=480,
        model={"name": "dinov2-vits14", "sha256": "4d" * 32, "pinned": True},
        vector=vector, encoding=encoding, qos=1)
    assert (message.topic, message.qos, message.retain) == (TOPICS.embedding, 1, False)
    assert b", " not in message.payload and b": " not in message.payload  # compact JSON
    return json.loads(message.payload)


def test_payloads_follow_the_contract() -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)

    body = _embedding(vector, "base64")
    assert set(body) == {"id", "path", "source", "sha256", "width", "height", "ts", "model",
                         "dim", "vector"}
    decoded = np.frombuffer(base64.b64decode(body["vector"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, vector)
    assert body["dim"] == 384 and body["ts"].endswith("Z")
    assert body["model"] == {"name": "dinov2-vits14", "sha256": "4d" * 32, "pinned": True}
    assert (body["path"], body["source"], body["width"], body["height"]) == (
        "/srv/camera/a.jpg", "front-door", 640, 480)
    np.testing.assert_array_equal(np.array(_embedding(vector, "json")["vector"], "<f4"), vector)
    none = _embedding(vector, "none")
    assert none["vector"] is None and none["dim"] == 384

    same = message_id(DEVICE, "/srv/camera/a.jpg", "ab" * 32)
    assert body["id"] == same == _embedding(vector, "none")["id"]
    assert len(same) == 32 and int(same, 16) >= 0
    assert same != message_id(DEVICE, "/srv/camera/b.jpg", "ab" * 32)
    assert same != message_id(DEVICE, "/srv/camera/a.jpg", "cd" * 32)
    assert same != message_id("other-pi", "/srv/camera/a.jpg", "ab" * 32)

    error = error_message(TOPICS, path=None, error="PermissionError", message="denied", qos=1)
    assert error.topic == "dinowatch/test-pi/error"
    error_body = json.loads(error.payload)
    assert error_body["path"] is None and error_body["error"] == "PermissionError"
    assert error_body["message"] == "denied" and error_body["ts"].endswith("Z")

    assert TOPICS.status == "dinowatch/test-pi/status"
    assert TOPICS.match == "dinowatch/test-pi/match"
    assert TOPICS.stats == "dinowatch/test-pi/stats"
    assert TOPICS.command("search") == "dinowatch/test-pi/cmd/search"


# ---- bookkeeping (a fake client is fine here; delivery is tested on the real broker) -------

class FakeClient:
    """Records publishes; the test plays the broker's PUBACKs."""

    def __init__(self) -> None:
        self.published: list[tuple[int, str, bytes, int]] = []
        self.rc = MQTTErrorCode.MQTT_ERR_SUCCESS

    def connect_async(self, *args: Any, **kwargs: Any) -> None: ...
    def loop_start(self) -> None: ...
    def loop_stop(self) -> None: ...
    def disconnect(self) -> None: ...

    def publish(self, topic: str, payload: Any, qos: int = 0,
                retain: bool = False) -> MQTTMessageInfo:
        info = MQTTMessageInfo(len(self.published) + 1)
        info.rc = self.rc
        self.published.append((info.mid, topic, payload, qos))
        return info

    def connack(self) -> None:
        self.on_connect(self, None, None, ReasonCode(PacketTypes.CONNACK, "Success"), None)

    def puback(self, mid: int) -> None:
        self.on_publish(self, None, mid, ReasonCode(PacketTypes.PUBACK, "Success"), None)


def test_window_caps_in_flight_and_rows_go_only_on_ack(store: Store) -> None:
    fake = FakeClient()
    pub = Publisher(MqttSettings(), DEVICE, store, client=fake)  # type: ignore[arg-type]
    store.enqueue(numbered(0, 40))
    pub.start()
    fake.rc = MQTTErrorCode.MQTT_ERR_NO_CONN
    fake.connack()
    wait_until(lambda: len(fake.published) >= 1 + mqtt_module.WINDOW, TIMEOUT, "a full window")
    time.sleep(0.5)
    assert len(fake.published) == 1 + mqtt_module.WINDOW  # `online` + one window, no more
    assert store.outbox_depth() == 40  # nothing is deleted without an acknowledgement
    fake.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
    for mid, topic, _, _ in list(fake.published):
        if topic == TOPICS.embedding:
            fake.puback(mid)
    wait_until(lambda: store.outbox_depth() == 40 - mqtt_module.WINDOW, TIMEOUT, "acks applied")
    wait_until(lambda: len(fake.published) >= 1 + 2 * mqtt_module.WINDOW, TIMEOUT,
               "the next window")
    sent = [json.loads(p)["n"] for _, topic, p, _ in fake.published if topic == TOPICS.embedding]
    assert sent == list(range(2 * mqtt_module.WINDOW))  # in order, no repeats
    pub.stop(timeout=0.1)


# ---- the real broker ----------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_delivers_the_outbox_in_order_exactly_once(
        protocol: str, mosquitto: Mosquitto, store: Store, publisher: MakePublisher,
        subscriber_factory: MakeSubscriber) -> None:
    subscriber = subscriber_factory(mosquitto, TOPICS.embedding)
    store.enqueue(numbered(0, 50))
    pub = publisher(mosquitto, protocol=protocol)
    subscriber.wait_for(lambda messages: len(messages) >= 50)
    wait_until(lambda: store.outbox_depth() == 0, TIMEOUT, "an empty outbox")
    time.sleep(0.3)  # anything extra would show up now
    assert numbers(subscriber.messages) == list(range(50))
    assert pub.connected and pub.last_error is None

    late = subscriber_factory(mosquitto, TOPICS.status)
    status = late.wait_for(lambda messages: bool(messages))
    assert status[0].payload == b"online" and status[0].retain


def test_broker_down_at_start(mosquitto: Mosquitto, store: Store, publisher: MakePublisher,
                              subscriber_factory: MakeSubscriber) -> None:
    subscriber = subscriber_factory(mosquitto, TOPICS.embedding)  # its session outlives this
    mosquitto.stop()
    store.enqueue(numbered(0, 20))
    pub = publisher(mosquitto)  # returns at once
    wait_until(lambda: pub.last_error is not None, TIMEOUT, "a connection error")
    assert not pub.connected and "cannot reach" in (pub.last_error or "")
    assert store.outbox_depth() == 20
    mosquitto.start()
    subscriber.wait_for(lambda messages: set(numbers(messages)) == set(range(20)))
    wait_until(lambda: store.outbox_depth() == 0, TIMEOUT, "an empty outbox")
    assert pub.connected and pub.last_error is None


def test_broker_restart_mid_stream_loses_nothing(
        mosquitto: Mosquitto, store: Store, publisher: MakePublisher,
        subscriber_factory: MakeSubscriber) -> None:
    subscriber = subscriber_factory(mosquitto, TOPICS.embedding)
    pub = publisher(mosquitto)
    wait_until(lambda: pub.connected, TIMEOUT, "the connection")
    store.enqueue(numbered(0, 300))
    pub.wake()
    subscriber.wait_for(lambda messages: len(messages) >= 5)
    mosquitto.stop()
    store.enqueue(numbered(300, 330))
    pub.wake()
    wait_until(lambda: not pub.connected, TIMEOUT, "the publisher to notice")
    time.sleep(2)
    assert store.outbox_depth() >= 30
    mosquitto.start()
    # At-least-once: a message in flight during the stop may arrive twice, none may be lost.
    subscriber.wait_for(lambda messages: set(numbers(messages)) == set(range(330)))
    wait_until(lambda: store.outbox_depth() == 0, TIMEOUT, "an empty outbox")


WILL_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dinowatch.config import MqttSettings
    from dinowatch.mqtt import Publisher
    from dinowatch.store import Store
    settings = MqttSettings(host="127.0.0.1", port=int(sys.argv[2]), protocol=sys.argv[3])
    Publisher(settings, sys.argv[4], Store(Path(sys.argv[1]))).start()
    time.sleep(120)
""")


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_will_publishes_offline_when_the_process_dies(
        protocol: str, mosquitto: Mosquitto, tmp_path: Path,
        subscriber_factory: MakeSubscriber) -> None:
    subscriber = subscriber_factory(mosquitto, TOPICS.status)
    child = subprocess.Popen([sys.executable, "-c", WILL_CHILD, str(tmp_path / "child.db"),
                              str(mosquitto.port), protocol, DEVICE])
    try:
        subscriber.wait_for(has_status(b"online"))
    finally:
        child.kill()  # SIGKILL: no DISCONNECT, so the broker sends the Will
        child.wait()
    subscriber.wait_for(has_status(b"offline"))
    late = subscriber_factory(mosquitto, TOPICS.status)
    assert late.wait_for(lambda messages: bool(messages))[0] == (TOPICS.status, b"offline", True)


def test_clean_stop_publishes_retained_offline(
        mosquitto: Mosquitto, publisher: MakePublisher,
        subscriber_factory: MakeSubscriber) -> None:
    subscriber = subscriber_factory(mosquitto, TOPICS.status)
    pub = publisher(mosquitto)
    subscriber.wait_for(has_status(b"online"))
    pub.stop()
    assert not pub.connected
    subscriber.wait_for(has_status(b"offline"))
    late = subscriber_factory(mosquitto, TOPICS.status)
    assert late.wait_for(lambda messages: bool(messages))[0] == (TOPICS.status, b"offline", True)


def test_refused_credentials_recover_when_the_password_file_is_fixed(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, store: Store,
        publisher: MakePublisher, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    right, wrong = "right-Pa55word-xyzzy", "wrong-Pa55word-plugh"
    broker = mosquitto_factory(users={"dino": right})
    password_file = tmp_path / "mqtt_password"
    password_file.write_text(wrong + "\n")
    store.enqueue(numbered(0, 3))
    pub = publisher(broker, username="dino", password_file=password_file)
    wait_until(lambda: pub.last_error is not None, TIMEOUT, "the refusal")
    error = (pub.last_error or "").lower()
    assert "not authorized" in error or "bad user name" in error, error
    assert f"{broker.host}:{broker.port}" in error
    time.sleep(2.5)  # a few more refused attempts (1 s backoff in tests)
    assert not pub.connected and store.outbox_depth() == 3
    refusals = [r for r in caplog.records if r.levelno == logging.ERROR
                and "refused" in r.getMessage()]
    assert len(refusals) == 1, "the refusal is logged once, not on every retry"

    password_file.write_text(right + "\n")
    wait_until(lambda: pub.connected, TIMEOUT, "the connection with the fixed password")
    wait_until(lambda: store.outbox_depth() == 0, TIMEOUT, "an empty outbox")
    assert pub.last_error is None
    for record in caplog.records:
        text = record.getMessage() + str(record.exc_text or "")
        assert right not in text and wrong not in text


def test_tls_with_client_certificates(
        mosquitto_factory: Callable[..., Mosquitto], tls_ca: TlsFiles, store: Store,
        publisher: MakePublisher, subscriber_factory: MakeSubscriber) -> None:
    broker = mosquitto_factory(tls=tls_ca, require_certificate=True)
    subscriber = subscriber_factory(broker, TOPICS.embedding, tls=tls_ca)
    store.enqueue(numbered(0, 5))
    tls = TlsSettings(enabled=True, ca_certs=tls_ca.ca, certfile=tls_ca.client_cert,
                      keyfile=tls_ca.client_key)
    pub = publisher(broker, tls=tls)
    subscriber.wait_for(lambda messages: numbers(messages) == list(range(5)))
    wait_until(lambda: store.outbox_depth() == 0, TIMEOUT, "an empty outbox")
    assert pub.connected


def test_stats_are_retained_json(mosquitto: Mosquitto, publisher: MakePublisher,
                                 subscriber_factory: MakeSubscriber) -> None:
    pub = publisher(mosquitto)
    pub.publish_stats({"processed": 1})  # before the connection: skipped, no error
    subscriber = subscriber_factory(mosquitto, TOPICS.stats)
    wait_until(lambda: pub.connected, TIMEOUT, "the connection")
    stats = {"processed": 3, "failed": 0, "queue": 0, "outbox": 0, "images/s": 1.5,
             "uptime": 12.0}
    pub.publish_stats(stats)
    subscriber.wait_for(lambda messages: bool(messages))
    late = subscriber_factory(mosquitto, TOPICS.stats)
    received = late.wait_for(lambda messages: bool(messages))[0]
    assert received.retain and json.loads(received.payload) == stats


def test_a_certificate_from_another_ca_is_refused_and_said_clearly(
        mosquitto_factory: Callable[..., Mosquitto], tls_ca: TlsFiles, tmp_path: Path,
        store: Store, publisher: MakePublisher, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    broker = mosquitto_factory(tls=tls_ca)
    other = tmp_path / "other-ca"
    other.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key", "-out",
                    "ca.crt", "-days", "2", "-subj", "/CN=someone else's CA"], cwd=other,
                   capture_output=True, check=True)
    store.enqueue(numbered(0, 2))
    pub = publisher(broker, tls=TlsSettings(enabled=True, ca_certs=other / "ca.crt"))
    wait_until(lambda: pub.last_error is not None, TIMEOUT, "the refusal")
    time.sleep(2.5)  # a few more attempts (1 s backoff in tests)
    assert not pub.connected and store.outbox_depth() == 2
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and "TLS" in r.getMessage()]
    assert len(said) == 1, said  # once, however often it is retried
    assert "certificate verify failed" in said[0] and "mqtt.tls.ca_certs" in said[0]
    assert f"{broker.host}:{broker.port}" in said[0]


def test_a_second_instance_with_the_same_device_id_is_named_once(
        mosquitto: Mosquitto, store: Store, publisher: MakePublisher,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    first = publisher(mosquitto)
    wait_until(lambda: first.connected, TIMEOUT, "the first connection")
    publisher(mosquitto)  # the same device_id, so the same client id: the broker swaps them

    def clashes() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.levelno == logging.ERROR
                and "use the same device_id" in r.getMessage()]

    wait_until(lambda: bool(clashes()), 40, "the clash to be named")
    time.sleep(3)  # more swaps, each instance says it once at most (both log here)
    assert 1 <= len(clashes()) <= 2, [r.getMessage() for r in clashes()]
    assert f"client id dinowatch-{DEVICE}" in clashes()[0].getMessage()


def test_broker_restarts_are_not_taken_for_a_device_id_clash(
        mosquitto: Mosquitto, store: Store, publisher: MakePublisher,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    pub = publisher(mosquitto)
    for _ in range(6):
        wait_until(lambda: pub.connected, TIMEOUT, "a connection")
        mosquitto.restart()
    wait_until(lambda: pub.connected, TIMEOUT, "the last reconnect")
    assert not [r for r in caplog.records if "same device_id" in r.getMessage()]
