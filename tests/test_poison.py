"""Poison messages never block the outbox (issue 7, item 1), against a real Mosquitto.

A message larger than the broker accepts, one the broker refuses (negative PUBACK from an
ACL), one that ends the connection, and one in flight when the connection ends: each is
retried with backoff a bounded number of times or parked in the dead letters, reported once
on `error`, and the rest keeps flowing in order.
"""

from __future__ import annotations

import contextlib
import io
import json
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from daemon_process import DaemonProcess, wait_until, write_config
from dinowatch import mqtt as mqtt_module
from dinowatch.config import MqttSettings
from dinowatch.mqtt import Publisher, Topics, build_client
from dinowatch.store import Message, Store
from dinowatch.testing import synthetic_photo

if TYPE_CHECKING:
    from conftest import Mosquitto, Received, Subscriber

TIMEOUT = 20.0
DEVICE = "test-pi"
TOPICS = Topics("dinowatch", DEVICE)
DINOWATCH = [sys.executable, "-m", "dinowatch.cli"]

MakePublisher = Callable[..., Publisher]


@pytest.fixture(autouse=True)
def _fast_retries(fast_mqtt: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Publisher-level tests shrink the knobs; the daemon test runs with the defaults."""
    monkeypatch.setattr(mqtt_module, "RETRY_FIRST_SECONDS", 0.2)




def numbered(*ns: int, topic: str = TOPICS.embedding) -> list[Message]:
    return [Message(topic, json.dumps({"n": n}).encode(), qos=1) for n in ns]


def numbers(messages: list[Received], topic: str = TOPICS.embedding) -> list[int]:
    return [json.loads(m.payload)["n"] for m in messages if m.topic == topic]


def of(messages: list[Received], topic: str) -> list[dict]:
    return [json.loads(m.payload) for m in messages if m.topic == topic]


def query(store: Store, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(store.path) as db:
        return db.execute(sql, args).fetchall()


def connects(broker: Mosquitto) -> int:
    """CONNECTs of our client that the broker accepted, from its log (`log_type all`)."""
    return sum(1 for line in broker.log.splitlines()
               if "New client connected" in line and " as dinowatch-" in line)


def denied(broker: Mosquitto, topic: str) -> int:
    return sum(1 for line in broker.log.splitlines()
               if "Denied PUBLISH" in line and f"'{topic}'" in line)


def acl_broker(factory: Callable[..., Mosquitto], folder: Path, *deny: str,
               extra: tuple[str, ...] = ()) -> tuple[Mosquitto, Callable[..., None]]:
    """A broker whose ACL denies writing to `deny`, and `set_acl(*deny)` to change it (the
    broker re-reads its ACL file on SIGHUP). A denied QoS 1 PUBLISH gets MQTT 5 PUBACK 0x87."""
    folder.mkdir(exist_ok=True)
    acl = folder / "acl"

    def write(*topics: str) -> None:
        acl.write_text("\n".join(["topic readwrite #", *(f"topic deny {t}" for t in topics)])
                       + "\n")

    write(*deny)
    broker = factory(extra_config=[f"acl_file {acl}", *extra])

    def set_acl(*topics: str) -> None:
        write(*topics)
        assert broker.process is not None
        broker.process.send_signal(signal.SIGHUP)

    return broker, set_acl


# ---- (a) larger than the broker accepts: the real daemon ----------------------------------

def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    synthetic_photo(160, 120, seed=seed).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def test_daemon_parks_an_oversized_embedding_and_delivers_the_rest_in_order(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        subscriber_factory: Callable[..., Subscriber], tiny_model: Path) -> None:
    broker = mosquitto_factory(extra_config=["max_packet_size 3000"])
    topic = f"dinowatch/{DEVICE}"
    subscriber = subscriber_factory(broker, f"{topic}/#")
    inbox, staging, data = tmp_path / "inbox", tmp_path / "staging", tmp_path / "data"
    staging.mkdir()
    # A long path makes this one picture's message ~3.3 KB (base64 vectors: ~2.5 KB each).
    deep = inbox / ("d" * 250) / ("e" * 250) / ("f" * 250)
    deep.mkdir(parents=True)
    config = write_config(
        tmp_path / "config.yaml", device_id=DEVICE, data_dir=str(data),
        model={"path": str(tiny_model)},
        watch=[{"path": str(inbox), "source": "cam", "settle_seconds": 0.5}],
        mqtt={"host": broker.host, "port": broker.port})

    def rows(sql: str) -> list[tuple]:
        with sqlite3.connect(data / "dinowatch.db") as db:
            return db.execute(sql).fetchall()

    def drop_and_record(target: Path, seed: int) -> Path:
        staged = staging / target.name
        staged.write_bytes(jpeg(seed))
        staged.rename(target)
        wait_until(lambda: rows(f"SELECT status FROM images WHERE path = '{target}'")
                   == [("done",)], TIMEOUT, f"{target.name} recorded")
        return target

    with DaemonProcess(config, tmp_path) as daemon:
        daemon.start()
        big = drop_and_record(deep / "big.jpg", 1)
        ordinary = [drop_and_record(inbox / f"small{i}.jpg", 10 + i) for i in range(5)]
        subscriber.wait_for(lambda ms: len(of(ms, f"{topic}/embedding")) >= 5
                            and len(of(ms, f"{topic}/error")) >= 1)
        wait_until(lambda: rows("SELECT count(*) FROM outbox") == [(0,)], TIMEOUT,
                   "an empty outbox")
        time.sleep(1)  # a repeat would show up now
        status = subprocess.run([*DINOWATCH, "status", "--json", "-c", str(config)],
                                capture_output=True, text=True, timeout=60, check=False)
        listing = subprocess.run([*DINOWATCH, "outbox", "list", "-c", str(config)],
                                 capture_output=True, text=True, timeout=60, check=False)
        messages = subscriber.messages
        assert daemon.stop() == 0

    embeddings = of(messages, f"{topic}/embedding")
    assert [e["path"] for e in embeddings] == [str(p) for p in ordinary]  # in order, once
    [report] = of(messages, f"{topic}/error")
    assert report["error"] == "MessageTooLarge" and report["path"] == str(big)
    assert "3000" in report["message"] and "dinowatch outbox retry" in report["message"]
    [(seq, parked_topic, payload, attempts, error)] = rows(
        "SELECT seq, topic, payload, attempts, error FROM dead_letters")
    assert parked_topic == f"{topic}/embedding" and json.loads(payload)["path"] == str(big)
    assert 3000 < len(payload) < 3600 and attempts == 0  # parked at once, never sent
    assert error.startswith("MessageTooLarge: ")
    assert connects(broker) <= 2
    before_stop = [m.payload for m in messages if m.topic == f"{topic}/status"]
    assert before_stop == [b"online"], "the retained status flapped"
    assert status.returncode == 0 and json.loads(status.stdout)["dead_letters"] == 1
    assert "dead_letters" in of(messages, f"{topic}/stats")[-1]  # retained, on connect

    def final_stats(ms: list[Received]) -> list[dict]:  # written as the daemon stopped
        return [s for s in of(ms, f"{topic}/stats") if s.get("connected") is False]

    final = final_stats(subscriber.wait_for(lambda ms: bool(final_stats(ms))))
    assert final[-1]["dead_letters"] == 1
    assert listing.returncode == 0
    [line] = [row for row in listing.stdout.splitlines() if row.startswith(f"{seq} ")]
    assert f"{topic}/embedding" in line and str(len(payload)) in line and "MessageTooLarge" in line


# ---- the exact packet size, and the broker's Receive Maximum ----------------------------

def padded(n: int, packet: int) -> Message:
    """A numbered message whose PUBLISH packet (MQTT 5, QoS 1) is exactly `packet` bytes."""
    pad = 0
    while True:
        payload = json.dumps({"n": n, "pad": "x" * pad}).encode()
        size = Publisher.packet_size(TOPICS.embedding, payload, 1)
        if size == packet:
            return Message(TOPICS.embedding, payload, qos=1)
        assert size < packet
        pad += 1


def test_packet_size_limit_is_exact_and_the_window_follows_receive_maximum(
        mosquitto_factory: Callable[..., Mosquitto], store: Store, publisher: MakePublisher,
        subscriber_factory: Callable[..., Subscriber]) -> None:
    broker = mosquitto_factory(extra_config=["max_packet_size 600", "max_inflight_messages 3"])
    subscriber = subscriber_factory(broker, TOPICS.embedding, TOPICS.error)
    store.enqueue([*numbered(0), padded(100, 600), padded(101, 601), *numbered(*range(1, 30))])
    settings = MqttSettings(host=broker.host, port=broker.port)
    client = build_client(settings, DEVICE)
    lock, published, acked, peak = threading.Lock(), set(), set(), [0]
    pub = Publisher(settings, DEVICE, store, client=client)
    send, settle = client.publish, client.on_publish

    def counting_publish(topic: str, payload: Any = None, qos: int = 0, retain: bool = False,
                         properties: Any = None) -> Any:
        info = send(topic, payload, qos, retain, properties)
        if topic == TOPICS.embedding:
            with lock:
                published.add(info.mid)
                peak[0] = max(peak[0], len(published - acked))
        return info

    def counting_ack(*args: Any) -> None:
        with lock:
            acked.add(args[2])
        settle(*args)

    client.publish, client.on_publish = counting_publish, counting_ack  # type: ignore[method-assign]
    pub.start()
    try:
        subscriber.wait_for(lambda ms: len(numbers(ms)) >= 31)
        wait_until(lambda: store.outbox_depth() == 0, TIMEOUT, "an empty outbox")
        assert (pub.window, client.max_inflight_messages, pub.max_packet_size) == (3, 3, 600)
        assert numbers(subscriber.messages) == [0, 100, *range(1, 30)]
        assert 1 <= peak[0] <= 3, peak
        [letter] = store.dead_letters()
        assert json.loads(letter.payload)["n"] == 101
        assert letter.error.startswith("MessageTooLarge: ") and "601 bytes" in letter.error
        [report] = subscriber.wait_for(lambda ms: bool(of(ms, TOPICS.error)))[-1:]
        assert json.loads(report.payload)["path"] is None  # the message named no image
    finally:
        pub.stop(timeout=1.0)


# ---- (b) refused by the broker (negative PUBACK) ------------------------------------------

def test_refused_message_is_retried_and_delivered_once_the_acl_is_fixed(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, store: Store,
        publisher: MakePublisher, subscriber_factory: Callable[..., Subscriber],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_module, "RETRY_FIRST_SECONDS", 0.5)  # budget: 0.5+1+2+4 s
    broker, set_acl = acl_broker(mosquitto_factory, tmp_path / "broker", TOPICS.deleted)
    subscriber = subscriber_factory(broker, f"dinowatch/{DEVICE}/#")
    store.enqueue([*numbered(0), *numbered(7, topic=TOPICS.deleted), *numbered(1, 2)])
    pub = publisher(broker)
    wait_until(lambda: query(store, "SELECT attempts FROM outbox WHERE seq = 2") == [(1,)],
               TIMEOUT, "the first refusal")
    subscriber.wait_for(lambda ms: numbers(ms) == [0, 1, 2])  # the rest flows meanwhile
    last_error = query(store, "SELECT last_error FROM outbox WHERE seq = 2")[0][0]
    assert last_error.startswith("Refused: ") and "Not authorized" in last_error
    set_acl()
    subscriber.wait_for(lambda ms: numbers(ms, TOPICS.deleted) == [7])
    wait_until(lambda: store.outbox_depth() == 0, TIMEOUT, "an empty outbox")
    assert store.dead_letter_count() == 0 and of(subscriber.messages, TOPICS.error) == []
    assert 1 <= denied(broker, TOPICS.deleted) < mqtt_module.MAX_ATTEMPTS
    assert connects(broker) == 1 and pub.connected


def test_refused_message_is_parked_after_bounded_retries_and_retry_brings_it_back(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, store: Store,
        publisher: MakePublisher, subscriber_factory: Callable[..., Subscriber]) -> None:
    broker, set_acl = acl_broker(mosquitto_factory, tmp_path / "broker", TOPICS.deleted)
    subscriber = subscriber_factory(broker, f"dinowatch/{DEVICE}/#")
    gone = {"id": "ab" * 16, "path": "/srv/camera/gone.jpg", "source": "cam", "n": 50}
    refused = Message(TOPICS.deleted, json.dumps(gone).encode(), qos=1)
    store.enqueue([*numbered(0), refused, *numbered(1, 2)])
    pub = publisher(broker)
    wait_until(lambda: query(store, "SELECT attempts FROM outbox WHERE seq = 2") == [(1,)],
               TIMEOUT, "the first refusal")
    first_refusal = time.monotonic()
    store.enqueue(numbered(*range(3, 10)))  # arrive while it backs off
    pub.wake()
    subscriber.wait_for(lambda ms: numbers(ms) == list(range(10)))
    assert store.dead_letter_count() == 0  # they did not wait for it
    wait_until(lambda: store.dead_letter_count() == 1, TIMEOUT, "the refused message parked")
    took = time.monotonic() - first_refusal
    backoffs = sum(0.2 * 2 ** k for k in range(mqtt_module.MAX_ATTEMPTS - 1))  # 0.2+…+1.6
    assert took >= backoffs - 0.1, f"parked after {took:.2f} s: retries without backoff"
    [letter] = store.dead_letters()
    assert (letter.seq, letter.topic, letter.attempts) == (2, TOPICS.deleted,
                                                           mqtt_module.MAX_ATTEMPTS)
    assert letter.error.startswith("Refused: ") and "Not authorized" in letter.error
    [report] = subscriber.wait_for(lambda ms: bool(of(ms, TOPICS.error)))[-1:]
    body = json.loads(report.payload)
    assert (body["error"], body["path"]) == ("Refused", "/srv/camera/gone.jpg")
    assert "outbox message 2" in body["message"] and body["ts"].endswith("Z")
    wait_until(lambda: store.outbox_depth() == 0, TIMEOUT, "the report delivered")
    time.sleep(1)
    assert denied(broker, TOPICS.deleted) == mqtt_module.MAX_ATTEMPTS  # then never again
    assert len(of(subscriber.messages, TOPICS.error)) == 1  # reported once

    # The user fixes the ACL and sends it again with the real CLI, the daemon still running.
    set_acl()
    config = write_config(tmp_path / "config.yaml", data_dir=str(tmp_path),
                          watch=[{"path": str(tmp_path)}], mqtt=None)
    result = subprocess.run([*DINOWATCH, "outbox", "retry", "--all", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    subscriber.wait_for(lambda ms: of(ms, TOPICS.deleted) == [gone])
    wait_until(lambda: store.outbox_depth() == 0, TIMEOUT, "an empty outbox")
    assert store.dead_letter_count() == 0 and connects(broker) == 1


def test_a_report_that_cannot_be_delivered_is_parked_without_a_report(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, store: Store,
        publisher: MakePublisher, subscriber_factory: Callable[..., Subscriber],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_module, "MAX_ATTEMPTS", 3)
    broker, _ = acl_broker(mosquitto_factory, tmp_path / "broker", TOPICS.deleted,
                           TOPICS.error)
    subscriber = subscriber_factory(broker, TOPICS.embedding)
    store.enqueue([*numbered(5, topic=TOPICS.deleted), *numbered(0, 1)])
    publisher(broker)
    wait_until(lambda: store.dead_letter_count() == 2, TIMEOUT, "the message and its report parked")
    wait_until(lambda: store.outbox_depth() == 0, TIMEOUT, "an empty outbox")
    time.sleep(1.5)  # a report of the report would be queued and parked by now
    letters = store.dead_letters()
    assert [letter.topic for letter in letters] == [TOPICS.deleted, TOPICS.error]
    assert query(store, "SELECT report_of FROM dead_letters ORDER BY seq") == [(None,), (1,)]
    assert store.outbox_depth() == 0 and store.dead_letter_count() == 2
    assert numbers(subscriber.messages) == [0, 1]


# ---- a message that ends the connection (MQTT 3.1.1: no limits in the CONNACK) -----------

def test_message_that_ends_the_connection_is_parked_after_bounded_retries(
        mosquitto_factory: Callable[..., Mosquitto], store: Store, publisher: MakePublisher,
        subscriber_factory: Callable[..., Subscriber],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_module, "MAX_ATTEMPTS", 3)
    broker = mosquitto_factory(extra_config=["max_packet_size 3000"])
    subscriber = subscriber_factory(broker, TOPICS.embedding, TOPICS.error)
    big = {"path": "/srv/camera/huge.jpg", "vector": "A" * 3300}
    store.enqueue([Message(TOPICS.embedding, json.dumps(big).encode()), *numbered(*range(5))])
    pub = publisher(broker, protocol="3.1.1")
    subscriber.wait_for(lambda ms: numbers(ms) == list(range(5)))
    wait_until(lambda: store.dead_letter_count() == 1, TIMEOUT, "the big message parked")
    [report] = subscriber.wait_for(lambda ms: bool(of(ms, TOPICS.error)))[-1:]
    body = json.loads(report.payload)
    assert (body["error"], body["path"]) == ("ConnectionClosed", "/srv/camera/huge.jpg")
    wait_until(lambda: store.outbox_depth() == 0, TIMEOUT, "an empty outbox")
    wait_until(lambda: pub.connected, TIMEOUT, "the last reconnect")
    time.sleep(1.5)  # no further disconnects now
    [letter] = store.dead_letters()
    assert letter.attempts == mqtt_module.MAX_ATTEMPTS
    # bounded: the first end only makes it a suspect, then each try alone counts, then it
    # is parked and the connection stays up
    assert connects(broker) == mqtt_module.MAX_ATTEMPTS + 2
    assert numbers(subscriber.messages) == list(range(5))


# ---- (c) in flight at a reconnect ---------------------------------------------------------

class Relay:
    """A TCP relay in front of the broker. `hold()` stops passing on what the client sends
    (it waits unread, as if still on the way); `cut()` ends every connection."""

    host = "127.0.0.1"

    def __init__(self, broker: Mosquitto) -> None:
        self.target = (broker.host, broker.port)
        self.server = socket.create_server((self.host, 0))
        self.port = self.server.getsockname()[1]
        self.held = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink, outbound in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(source, sink, outbound),
                                 daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, outbound: bool) -> None:
        while source.fileno() != -1:
            if outbound and self.held.is_set():
                time.sleep(0.01)
                continue
            try:
                if not select.select([source], [], [], 0.02)[0]:
                    continue
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
            except (OSError, ValueError):
                break
        self._close(source, sink)

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def hold(self) -> None:
        self.held.set()
        time.sleep(0.2)  # every pump has seen it

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        self._close(*sockets)
        self.held.clear()

    def close(self) -> None:
        self.server.close()
        self.cut()


def test_message_in_flight_at_a_reconnect_is_sent_again(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, store: Store,
        publisher: MakePublisher, subscriber_factory: Callable[..., Subscriber],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_module, "RETRY_FIRST_SECONDS", 1.0)
    broker, set_acl = acl_broker(mosquitto_factory, tmp_path / "broker", TOPICS.deleted)
    subscriber = subscriber_factory(broker, f"dinowatch/{DEVICE}/#")
    relay = Relay(broker)
    try:
        store.enqueue([*numbered(0), *numbered(9, topic=TOPICS.deleted)])
        pub = publisher(relay)
        wait_until(lambda: query(store, "SELECT attempts FROM outbox WHERE seq = 2") == [(1,)],
                   TIMEOUT, "the refusal")
        relay.hold()
        store.enqueue(numbered(1))  # seq 3: sent, never reaches the broker
        pub.wake()
        time.sleep(0.3)
        assert numbers(subscriber.messages) == [0]
        relay.cut()  # reconnect with seq 2 refused and seq 3 in flight
        set_acl()
        wait_until(lambda: not pub.connected, TIMEOUT, "the disconnect")
        subscriber.wait_for(lambda ms: numbers(ms) == [0, 1]
                            and numbers(ms, TOPICS.deleted) == [9])
        # README's promise
        wait_until(lambda: store.outbox_depth() == 0, TIMEOUT, "an empty outbox")
        assert store.dead_letter_count() == 0
        assert pub.connected and connects(broker) == 2
    finally:
        relay.close()
