"""Publish stage: payload builders, the paho client, and the outbox drain.

The pipeline commits an image's messages to the store's outbox in the image's transaction;
`Publisher` sends them in order and deletes each row only when the broker acknowledged it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from dinowatch.config import ConfigError, MqttSettings
from dinowatch.errors import DinowatchError, readable
from dinowatch.store import Message, Store, utc_now

log = logging.getLogger(__name__)

WINDOW = 16                 # outbox messages handed to paho and not yet acknowledged
RECONNECT_MAX_SECONDS = 60  # paho retries after 1 s, doubling up to this (also after refusals)
IDLE_POLL_SECONDS = 1.0     # the drain thread looks at the outbox at least this often
DEBUG_PAYLOAD_CHARS = 200   # payloads are cut to this length in debug logs
UNSENT_MAX = 16             # publish_now messages kept while disconnected (the latest)

_WAKE, _CONNECTED, _ACK = "wake", "connected", "ack"


class MqttError(DinowatchError):
    """The MQTT client cannot be built (e.g. unreadable TLS files)."""


@dataclass(frozen=True)
class Topics:
    """`<prefix>/<device_id>/…` per DESIGN "MQTT topics"."""

    prefix: str
    device_id: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device_id}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def embedding(self) -> str:
        return f"{self.base}/embedding"

    @property
    def deleted(self) -> str:
        return f"{self.base}/deleted"

    @property
    def match(self) -> str:
        return f"{self.base}/match"

    @property
    def error(self) -> str:
        return f"{self.base}/error"

    @property
    def stats(self) -> str:
        return f"{self.base}/stats"

    def command(self, name: str) -> str:
        return f"{self.base}/cmd/{name}"


# ---- payloads -----------------------------------------------------------------------------

def message_id(device_id: str, path: str, sha256: str) -> str:
    """Stable per image, so consumers can drop a redelivered duplicate (the file name's bytes
    count, so names that are not UTF-8 get ids of their own)."""
    key = b"\0".join((device_id.encode(), os.fsencode(path), sha256.encode()))
    return hashlib.sha256(key).hexdigest()[:32]


def path_fields(path: str | None) -> dict[str, str | None]:
    """DESIGN's `path` (valid UTF-8, undecodable bytes as `\\xNN`), plus `path_bytes` (the
    exact name, base64) when the two differ."""
    if path is None:
        return {"path": None}
    text = readable(path)
    raw = os.fsencode(path)
    if text.encode() == raw:
        return {"path": text}
    return {"path": text, "path_bytes": base64.b64encode(raw).decode("ascii")}


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def embedding_message(topics: Topics, *, device_id: str, path: str, source: str, sha256: str,
                      width: int | None, height: int | None, model_name: str,
                      model_sha256: str | None, vector: np.ndarray, encoding: str,
                      qos: int) -> Message:
    values = np.asarray(vector, dtype="<f4").reshape(-1)
    if encoding == "base64":
        encoded: str | list[float] | None = base64.b64encode(values.tobytes()).decode("ascii")
    elif encoding == "json":
        encoded = values.tolist()
    elif encoding == "none":
        encoded = None
    else:
        raise ValueError(f"unknown vector encoding {encoding!r}")
    payload = {"id": message_id(device_id, path, sha256), **path_fields(path),
               "source": source, "sha256": sha256, "width": width, "height": height,
               "ts": utc_now(), "model": {"name": model_name, "sha256": model_sha256},
               "dim": int(values.size), "vector": encoded}
    return Message(topics.embedding, _json(payload), qos=qos)


def error_message(topics: Topics, *, path: str | None, error: str, message: str,
                  qos: int) -> Message:
    payload = {**path_fields(path), "error": error, "message": readable(message),
               "ts": utc_now()}
    return Message(topics.error, _json(payload), qos=qos)


def deleted_message(topics: Topics, *, device_id: str, path: str, source: str, sha256: str,
                    qos: int) -> Message:
    """A recorded file is gone: `id` is the one its embedding carried."""
    payload = {"id": message_id(device_id, path, sha256), **path_fields(path),
               "source": source, "sha256": sha256, "ts": utc_now()}
    return Message(topics.deleted, _json(payload), qos=qos)


def _preview(payload: bytes) -> str:
    text = payload[:DEBUG_PAYLOAD_CHARS].decode("utf-8", "replace")
    return text + "…" if len(payload) > DEBUG_PAYLOAD_CHARS else text


# ---- client -------------------------------------------------------------------------------

def build_client(settings: MqttSettings, device_id: str) -> paho.Client:
    """A configured, unconnected paho client (the Will is set; connecting is the caller's)."""
    protocol = paho.MQTTv5 if settings.protocol == "5" else paho.MQTTv311
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dinowatch-{device_id}",
                         protocol=protocol)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password())
    if settings.tls.enabled:
        tls = settings.tls
        try:
            client.tls_set(ca_certs=_text(tls.ca_certs), certfile=_text(tls.certfile),
                           keyfile=_text(tls.keyfile))
        except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
            raise MqttError(f"mqtt.tls: cannot load the certificates: {err}") from err
        client.tls_insecure_set(tls.insecure)
    client.will_set(Topics(settings.topic_prefix, device_id).status, "offline", qos=1,
                    retain=True)
    client.reconnect_delay_set(min_delay=1, max_delay=RECONNECT_MAX_SECONDS)
    client.max_inflight_messages_set(WINDOW)
    return client


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _guarded(callback: Callable[..., None]) -> Callable[..., None]:
    """paho callbacks: an exception is logged and never reaches (and kills) paho's thread."""
    @functools.wraps(callback)
    def run(*args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("MQTT callback %s failed", callback.__name__)
    return run


class Publisher:
    """Owns the connection: status and Will, the outbox drain, retained stats."""

    def __init__(self, settings: MqttSettings, device_id: str, store: Store, *,
                 client: paho.Client | None = None) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix, device_id)
        self._store = store
        self._client = client if client is not None else build_client(settings, device_id)
        self._broker = f"{settings.host}:{settings.port}"
        self._events: queue.Queue[tuple[str, int, str | None]] = queue.Queue()
        self._stop = threading.Event()
        self._drainer: threading.Thread | None = None
        self._connected = False
        self._unsent: deque[Message] = deque(maxlen=UNSENT_MAX)
        self._last_error: str | None = None
        self._logged_error: str | None = None  # each distinct refusal/outage is logged once
        # Owned by the drain thread (and by stop() once that thread has ended):
        self._cursor = 0                 # seq of the last row handed to paho
        self._inflight: dict[int, int] = {}  # paho mid -> outbox seq, awaiting PUBACK
        self._client.on_pre_connect = _guarded(self._on_pre_connect)
        self._client.on_connect = _guarded(self._on_connect)
        self._client.on_connect_fail = _guarded(self._on_connect_fail)
        self._client.on_disconnect = _guarded(self._on_disconnect)
        self._client.on_publish = _guarded(self._on_publish)

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def alive(self) -> bool:
        """The drain thread runs (systemd's watchdog depends on it)."""
        return self._drainer is not None and self._drainer.is_alive()

    def start(self) -> None:
        """Connect in the background; returns at once, paho reconnects forever with backoff."""
        self._client.connect_async(self.settings.host, self.settings.port,
                                   keepalive=self.settings.keepalive)
        self._client.loop_start()
        self._drainer = threading.Thread(target=self._drain, name="mqtt-drain", daemon=True)
        self._drainer.start()

    def wake(self) -> None:
        """New outbox rows are committed."""
        self._events.put((_WAKE, 0, None))

    def publish_stats(self, payload: dict[str, Any]) -> None:
        if self._connected:  # else the daemon publishes fresh ones on the next connect
            self.publish_now(Message(self.topics.stats, _json(payload), qos=1, retain=True))

    def publish_now(self, message: Message) -> None:
        """Send past the outbox: for what cannot wait for, or be written to, the database
        (retained stats, a full disk). While disconnected the latest few are kept in memory
        and sent on the next connect."""
        if self._connected:
            self._client.publish(message.topic, message.payload, qos=message.qos,
                                 retain=message.retain)
        else:
            self._unsent.append(message)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop draining, publish a retained `offline`, disconnect cleanly (no Will)."""
        self._stop.set()
        if self._drainer is not None:
            self.wake()
            self._drainer.join(timeout)
        if self._connected:
            info = self._client.publish(self.topics.status, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as err:
                log.warning("could not publish offline status: %s", err)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and not info.is_published():
                log.warning("the broker did not acknowledge the offline status in %s s", timeout)
            if self._drainer is None or not self._drainer.is_alive():
                self._handle_events(0)  # PUBACKs that arrived meanwhile: delete those rows
        self._client.disconnect()
        self._client.loop_stop()

    # -- paho callbacks (paho's thread): bookkeeping and hand-off only ---------------------
    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        # Re-read the password before every attempt: fixing the file recovers, no restart.
        if self.settings.username is not None:
            try:
                client.username_pw_set(self.settings.username, self.settings.password())
            except ConfigError as err:
                self._report(f"cannot read the MQTT password: {err}")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any,
                    reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._connected = False
            user = self.settings.username
            self._report(f"broker {self._broker} refused the connection "
                         f"(user {user!r}): {reason}; retrying")
            return
        self._connected, self._last_error, self._logged_error = True, None, None
        client.publish(self.topics.status, "online", qos=1, retain=True)
        while self._unsent:
            message = self._unsent.popleft()
            client.publish(message.topic, message.payload, qos=message.qos,
                           retain=message.retain)
        log.info("connected to MQTT broker %s (MQTT %s)", self._broker, self.settings.protocol)
        self._events.put((_CONNECTED, 0, None))

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._report(f"cannot reach MQTT broker {self._broker}; retrying", level=logging.WARNING)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any,
                       reason: Any, properties: Any) -> None:
        was_connected, self._connected = self._connected, False
        if was_connected and not self._stop.is_set():
            self._report(f"lost the connection to MQTT broker {self._broker} ({reason}); "
                         "reconnecting", level=logging.WARNING)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int,
                    reason: Any, properties: Any) -> None:
        self._events.put((_ACK, mid, str(reason) if reason.is_failure else None))

    def _report(self, error: str, level: int = logging.ERROR) -> None:
        self._last_error = error
        log.log(level if error != self._logged_error else logging.DEBUG, "%s", error)
        self._logged_error = error

    # -- drain thread ---------------------------------------------------------------------
    def _drain(self) -> None:
        more = False
        while not self._stop.is_set():
            try:
                self._handle_events(0 if more else IDLE_POLL_SECONDS)
                more = self._connected and not self._stop.is_set() and self._send()
            except Exception:  # e.g. the database locked for long: try again, never die
                log.exception("outbox drain failed; retrying")
                more = False
                self._stop.wait(IDLE_POLL_SECONDS)

    def _handle_events(self, timeout: float) -> None:
        try:
            event = self._events.get(timeout=timeout) if timeout else self._events.get_nowait()
            while True:
                self._handle(*event)
                event = self._events.get_nowait()
        except queue.Empty:
            return

    def _handle(self, kind: str, mid: int, failure: str | None) -> None:
        if kind == _ACK:
            seq = self._inflight.pop(mid, None)
            if seq is None:  # status, stats or an already settled mid
                return
            if failure:  # kept: re-sent after the next reconnect, e.g. once an ACL is fixed
                log.warning("broker refused outbox message %d: %s; keeping it", seq, failure)
                return
            self._store.ack(seq)
        elif kind == _CONNECTED and not self._inflight:
            # paho keeps unacknowledged QoS>0 messages across reconnects and re-sends them,
            # so the mid map stays valid and the cursor moves on. When nothing is in flight,
            # rewind to the oldest row instead: a row paho no longer holds is sent again
            # (at-least-once; ids are stable so consumers de-duplicate). The empty write
            # waits for the store's writer, so acks queued before are committed first.
            self._store.enqueue([])
            self._cursor = 0

    def _send(self) -> bool:
        """Fill the window; True when more rows may be waiting and the window has room."""
        free = WINDOW - len(self._inflight)
        if free <= 0:
            return False
        rows = self._store.outbox_after(self._cursor, free)
        for row in rows:
            try:
                info = self._client.publish(row.topic, row.payload, qos=row.qos,
                                            retain=row.retain)
            except ValueError as err:  # a row paho can never send must not block the rest
                log.error("dropping outbox message %d on %s: %s", row.seq, row.topic, err)
                self._store.ack(row.seq)
                self._cursor = row.seq
                continue
            # NO_CONN for QoS>0: paho has queued it and sends it after reconnecting.
            held = info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and row.qos > 0
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not held:
                log.debug("publish of outbox message %d deferred: %s", row.seq,
                          paho.error_string(info.rc))
                return False  # not advanced: retried after reconnecting
            if log.isEnabledFor(logging.DEBUG):
                log.debug("sent outbox message %d (mid %d) on %s: %s", row.seq, info.mid,
                          row.topic, _preview(row.payload))
            self._cursor = row.seq
            if row.qos == 0:
                self._store.ack(row.seq)
            else:
                self._inflight[info.mid] = row.seq
        return len(rows) == free and len(self._inflight) < WINDOW
