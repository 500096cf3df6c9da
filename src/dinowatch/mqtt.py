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
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dinowatch.config import ConfigError, MqttSettings
from dinowatch.errors import DinowatchError, readable
from dinowatch.health import Activity
from dinowatch.match import SearchHit
from dinowatch.store import Match, Message, OutboxMessage, Store, utc_now

log = logging.getLogger(__name__)

WINDOW = 16                 # outbox messages handed to paho and not yet acknowledged
RECONNECT_MAX_SECONDS = 60  # paho retries after 1 s, doubling up to this (also after refusals)
IDLE_POLL_SECONDS = 1.0     # the drain thread looks at the outbox at least this often
DEBUG_PAYLOAD_CHARS = 200   # payloads are cut to this length in debug logs
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason code (OASIS MQTT 5.0, 3.14.2.1)
# A client id clash: the broker drops this many connections within the window, each less
# than CLASH_LIFETIME_SECONDS after accepting it, and every reconnect succeeds at once (a
# broker restart or an outage makes an attempt fail, which starts the count again).
CLASH_DROPS, CLASH_WINDOW_SECONDS, CLASH_LIFETIME_SECONDS = 10, 60.0, 5.0
UNSENT_MAX = 16             # publish_now messages kept while disconnected (the latest)
# Poison messages: an outbox message the broker refuses (negative PUBACK), or that ends the
# connection, is tried again after RETRY_FIRST_SECONDS, doubling up to RETRY_MAX_SECONDS, and
# parked in the dead letters when MAX_ATTEMPTS attempts have failed. One larger than the
# broker's Maximum Packet Size is parked at once (it can never be sent).
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
MAX_ATTEMPTS = 5
BLAME_SECONDS = 5.0  # the connection ended this soon after the oldest unacked one went out
# DISCONNECT reasons that are about the broker or the session, never about a message:
# server busy, shutting down, keep-alive timeout, session taken over, administrative action,
# use another server, server moved.
INNOCENT_DISCONNECTS = frozenset({0x89, 0x8B, 0x8D, 0x8E, 0x98, 0x9C, 0x9D})

_WAKE, _CONNECTED, _ACK, _DISCONNECTED = "wake", "connected", "ack", "disconnected"


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

    @property
    def last_match(self) -> str:
        """Retained: the last gallery match (JSON); `/thumbnail` under it, a JPEG of it."""
        return f"{self.base}/last_match"

    def label(self, slug: str) -> str:
        """`ON` (not retained) when an image matched this label (Home Assistant's binary
        sensor turns itself off after `off_delay`)."""
        return f"{self.base}/label/{slug}"

    def command(self, name: str) -> str:
        return f"{self.base}/cmd/{name}"

    def reply(self, name: str) -> str:
        """Where replies go when the request names no MQTT 5 response topic."""
        return f"{self.command(name)}/reply"


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


def json_payload(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, as every dinowatch payload is written."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def image_fields(device_id: str, path: str, source: str, sha256: str) -> dict[str, Any]:
    """How payloads name an image: `id`, `path` (and `path_bytes`), `source`, `sha256`."""
    return {"id": message_id(device_id, path, sha256), **path_fields(path), "source": source,
            "sha256": sha256}


def search_fields(hit: SearchHit) -> dict[str, Any]:
    """One search result, as `dinowatch search --json` and the `search` request give it."""
    return {**path_fields(hit.reference.path), "label": hit.reference.label,
            "score": hit.score, "sha256": hit.reference.sha256}


def embedding_message(topics: Topics, *, device_id: str, path: str, source: str, sha256: str,
                      width: int | None, height: int | None, model: dict[str, object],
                      vector: np.ndarray, encoding: str, qos: int) -> Message:
    """DESIGN's `embedding` payload; `model` is `ModelIdentity.payload()`."""
    values = np.asarray(vector, dtype="<f4").reshape(-1)
    if encoding == "base64":
        encoded: str | list[float] | None = base64.b64encode(values.tobytes()).decode("ascii")
    elif encoding == "json":
        encoded = values.tolist()
    elif encoding == "none":
        encoded = None
    else:
        raise ValueError(f"unknown vector encoding {encoding!r}")
    payload = {**image_fields(device_id, path, source, sha256), "width": width,
               "height": height, "ts": utc_now(), "model": model,
               "dim": int(values.size), "vector": encoded}
    return Message(topics.embedding, json_payload(payload), qos=qos)


def error_message(topics: Topics, *, path: str | None, error: str, message: str,
                  qos: int) -> Message:
    payload = {**path_fields(path), "error": error, "message": readable(message),
               "ts": utc_now()}
    return Message(topics.error, json_payload(payload), qos=qos)


def deleted_message(topics: Topics, *, device_id: str, path: str, source: str, sha256: str,
                    qos: int) -> Message:
    """A recorded file is gone: `id` is the one its embedding carried."""
    payload = {**image_fields(device_id, path, source, sha256), "ts": utc_now()}
    return Message(topics.deleted, json_payload(payload), qos=qos)


def match_message(topics: Topics, *, device_id: str, path: str, source: str,
                  event: Match, qos: int) -> Message:
    """DESIGN's `match` payload. `id` is stable per image, kind and label (gallery) or
    reference (duplicate)."""
    about = event.label if event.kind == "gallery" else event.reference_path
    key = b"\0".join((message_id(device_id, path, event.sha256).encode(), event.kind.encode(),
                      os.fsencode(about or "")))
    payload = {"id": hashlib.sha256(key).hexdigest()[:32], "kind": event.kind,
               "image": image_fields(device_id, path, source, event.sha256),
               "label": event.label, "score": event.score,
               "reference": {**path_fields(event.reference_path),
                             "sha256": event.reference_sha256},
               "ts": utc_now()}
    return Message(topics.match, json_payload(payload), qos=qos)


def last_match_message(topics: Topics, *, path: str, source: str, event: Match,
                       qos: int) -> Message:
    """Retained: what a late subscriber (Home Assistant's sensors) shows as the last match."""
    payload = {"label": event.label, "score": event.score, **path_fields(path),
               "source": source, "ts": utc_now()}
    return Message(topics.last_match, json_payload(payload), qos=qos, retain=True)


def _preview(payload: bytes) -> str:
    head = payload[:DEBUG_PAYLOAD_CHARS]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the end: a JPEG, say
            return f"<{len(payload)} bytes, binary>"
        text = head[:err.start].decode("utf-8")
    return text + "…" if len(payload) > DEBUG_PAYLOAD_CHARS else text


# ---- client -------------------------------------------------------------------------------

class _Client(paho.Client):
    """paho's client, keeping why the last connection attempt failed: paho's loop swallows
    the exception (a refused TCP connect, a TLS certificate that does not verify) and calls
    on_connect_fail without it."""

    connect_error: OSError | None = None

    def reconnect(self) -> MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as err:
            self.connect_error = err
            raise


def build_client(settings: MqttSettings, device_id: str) -> paho.Client:
    """A configured, unconnected paho client (the Will is set; connecting is the caller's)."""
    protocol = paho.MQTTv5 if settings.protocol == "5" else paho.MQTTv311
    client = _Client(CallbackAPIVersion.VERSION2, client_id=f"dinowatch-{device_id}",
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
        self.activity = Activity("the MQTT drain")  # beats each time round the drain loop
        self._taken_over = False  # another client took our session (logged once)
        self._drops: deque[float] = deque()  # when the broker dropped a young connection
        self._connected_at = 0.0
        self._connected = False
        self._unsent: deque[Message] = deque(maxlen=UNSENT_MAX)
        self._last_error: str | None = None
        self._logged_error: str | None = None  # each distinct refusal/outage is logged once
        # From the broker's CONNACK (written on paho's thread, read by the drain):
        self._epoch = 0                  # successful connects so far
        self._window = WINDOW            # in flight at most: ours, or the broker's if smaller
        self._max_packet: int | None = None  # the broker's Maximum Packet Size, if it said
        self._direct: set[int] = set()   # mids of publish_now messages awaiting PUBACK
        # Owned by the drain thread (and by stop() once that thread has ended):
        self._ready = 0                  # the connect whose rewind the drain has done
        self._suspect: int | None = None  # outbox seq that may have ended the last connection
        self._cursor = 0                 # highest seq handed to paho since that rewind
        # paho mid -> (outbox seq, monotonic time sent), awaiting PUBACK, in send order:
        self._inflight: dict[int, tuple[int, float]] = {}
        self._retry_at: dict[int, float] = {}  # outbox seq -> monotonic time of its retry
        # topic filter -> handler, subscribed on every connect; handlers run on paho's
        # thread, so they only hand off:
        self._subscriptions: dict[str, Callable[[paho.MQTTMessage], None]] = {}
        self._client.on_message = _guarded(self._on_message)
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

    @property
    def window(self) -> int:
        """Outbox messages in flight at most: WINDOW, or the broker's Receive Maximum."""
        return self._window

    @property
    def max_packet_size(self) -> int | None:
        """The broker's Maximum Packet Size from its last CONNACK (None: it set none)."""
        return self._max_packet

    def start(self) -> None:
        """Connect in the background; returns at once, paho reconnects forever with backoff."""
        now = time.time()  # rows waiting for a retry keep waiting across a restart
        for seq, due in self._store.outbox_retries().items():
            try:
                wait = datetime.fromisoformat(due).timestamp() - now
            except ValueError:
                continue
            self._retry_at[seq] = time.monotonic() + min(max(wait, 0.0), RETRY_MAX_SECONDS)
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
            self.publish_now(Message(self.topics.stats, json_payload(payload), qos=1,
                                     retain=True))

    def publish_now(self, message: Message) -> None:
        """Send past the outbox: for what cannot wait for, or be written to, the database
        (retained stats, a full disk). While disconnected the latest few are kept in memory
        and sent on the next connect."""
        if self._connected:
            self._send_direct(message)
        else:
            self._unsent.append(message)

    def subscribe(self, topic_filter: str, handler: Callable[[paho.MQTTMessage], None]) -> None:
        """Call `handler` (on paho's thread: hand off, never block) for each message on
        `topic_filter`, from now on and after every reconnect. Call before `start`."""
        self._subscriptions[topic_filter] = handler

    def reply(self, topic: str, payload: bytes, correlation_data: bytes | None) -> None:
        """Publish a reply (QoS 1, not retained, past the outbox: a reply is worth nothing
        after a restart). MQTT 5 carries `correlation_data` back as the request's."""
        properties = None
        if self.settings.protocol == "5" and correlation_data is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation_data
        if not self._connected:
            log.debug("reply on %s dropped: not connected", topic)
            return
        if not self._fits(topic, payload, 1):
            log.error("reply of %d bytes on %s is over the broker's Maximum Packet Size",
                      len(payload), topic)
            return
        self._client.publish(topic, payload, qos=1, properties=properties)

    def _send_direct(self, message: Message, *, track: bool = True) -> None:
        """Publish past the outbox if the broker takes the size; `track`: sent once more if
        the connection ends before its acknowledgement (see _on_connect)."""
        if not self._fits(message.topic, message.payload, message.qos):
            log.error("not publishing %d bytes on %s: over the broker's Maximum Packet Size "
                      "(%s bytes)", len(message.payload), message.topic, self._max_packet)
            return
        info = self._client.publish(message.topic, message.payload, qos=message.qos,
                                    retain=message.retain)
        if track and message.qos > 0:
            self._direct.add(info.mid)

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
        # MQTT 5 CONNACK: honour the broker's Maximum Packet Size and Receive Maximum.
        self._max_packet = getattr(properties, "MaximumPacketSize", None)
        window = min(WINDOW, max(1, getattr(properties, "ReceiveMaximum", WINDOW)))
        if window != self._window:
            self._follow_window(client, window)
        # paho would re-send every unacknowledged message itself, again after every reconnect
        # if one of them is what ends the connection. Take them back: the drain sends outbox
        # rows again (it counts their attempts), direct messages go once more below.
        drop = getattr(client, "drop_out_messages", None)  # paho >= 2.2; fakes may lack it
        held = drop() if drop is not None else []
        direct, self._direct = self._direct, set()
        self._connected, self._last_error, self._logged_error = True, None, None
        self._connected_at = time.monotonic()
        self._epoch += 1
        client.publish(self.topics.status, "online", qos=1, retain=True)
        for topic_filter in self._subscriptions:
            client.subscribe(topic_filter, qos=1)
        again = [Message(m.topic, m.payload, m.qos, m.retain) for m in held if m.mid in direct]
        for message in again:  # not tracked: a message is re-sent at most once
            self._send_direct(message, track=False)
        while self._unsent:
            self._send_direct(self._unsent.popleft())
        log.info("connected to MQTT broker %s (MQTT %s)", self._broker, self.settings.protocol)
        if self._max_packet is not None or window < WINDOW:
            log.info("broker limits: packets up to %s bytes, %d messages in flight",
                     self._max_packet or "any", window)
        self._events.put((_CONNECTED, self._epoch, None))

    def _follow_window(self, client: paho.Client, window: int) -> None:
        """paho's own in-flight limit follows the window, so `online`, stats and outbox rows
        together never exceed the broker's Receive Maximum: paho queues the rest. paho's
        setter refuses while connected, and the broker's value only arrives then; the
        attribute it guards is read on every publish and acknowledgement, and nothing is in
        flight yet (held messages were just dropped)."""
        self._window = window
        try:
            client.max_inflight_messages_set(window)
        except RuntimeError:
            client._max_inflight_messages = window

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._drops.clear()  # the broker was away: those drops were an outage, not a clash
        err = getattr(client, "connect_error", None)
        if isinstance(err, ssl.SSLError):  # a setup error, not an outage: say so loudly
            why = (f"certificate verify failed: {err.verify_message}"
                   if isinstance(err, ssl.SSLCertVerificationError) else err.reason or err)
            self._report(f"TLS with MQTT broker {self._broker} failed: {why} (check "
                         "mqtt.tls.ca_certs, certfile and keyfile); retrying")
            return
        self._report(f"cannot reach MQTT broker {self._broker}"
                     f"{f': {err.strerror or err}' if err else ''}; retrying",
                     level=logging.WARNING)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any,
                       reason: Any, properties: Any) -> None:
        was_connected, self._connected = self._connected, False
        stopping = self._stop.is_set()
        if was_connected and not stopping:
            now = time.monotonic()
            lived = now - self._connected_at
            if lived < CLASH_LIFETIME_SECONDS:
                self._drops.append(now)
            elif lived > CLASH_WINDOW_SECONDS:
                self._drops.clear()
                self._taken_over = False  # a later clash is news again
            while self._drops and self._drops[0] < now - CLASH_WINDOW_SECONDS:
                self._drops.popleft()
        # Two instances with one client id take the session from each other for ever. An
        # MQTT 5 broker may say so (reason 0x8E); Mosquitto 2.0 just closes the older
        # connection, so a connection the broker keeps dropping right after accepting it is
        # the other sign. Said once, at ERROR: each reconnect would repeat it.
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER or \
                len(self._drops) >= CLASH_DROPS:
            self._last_error = (f"MQTT broker {self._broker} keeps closing our connection "
                                f"(client id dinowatch-{self.topics.device_id}) right after "
                                "accepting it: most likely two dinowatch instances use the "
                                "same device_id; give each its own (device_id in the config)")
            log.log(logging.DEBUG if self._taken_over else logging.ERROR, "%s",
                    self._last_error)
            self._taken_over = True
        elif was_connected and not stopping:
            self._report(f"lost the connection to MQTT broker {self._broker} ({reason}); "
                         "reconnecting", level=logging.WARNING)
        if was_connected and not stopping:
            self._events.put((_DISCONNECTED, getattr(reason, "value", 0), str(reason)))

    def _on_message(self, client: paho.Client, userdata: Any,
                    message: paho.MQTTMessage) -> None:
        for topic_filter, handler in self._subscriptions.items():
            if paho.topic_matches_sub(topic_filter, message.topic):
                handler(message)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int,
                    reason: Any, properties: Any) -> None:
        self._direct.discard(mid)
        self._events.put((_ACK, mid, str(reason) if reason.is_failure else None))

    def _report(self, error: str, level: int = logging.ERROR) -> None:
        self._last_error = error
        log.log(level if error != self._logged_error else logging.DEBUG, "%s", error)
        self._logged_error = error

    # -- drain thread ---------------------------------------------------------------------
    def _drain(self) -> None:
        more = False
        while not self._stop.is_set():
            self.activity.beat()
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

    def _handle(self, kind: str, mid: int, detail: str | None) -> None:
        if kind == _ACK:
            sent = self._inflight.pop(mid, None)
            if sent is None:  # status, stats or an already settled mid
                return
            if detail:  # a negative PUBACK (e.g. an ACL): tried again later, then parked
                self._failed(sent[0], "Refused", f"the broker refused it: {detail}")
                return
            self._retry_at.pop(sent[0], None)
            log.debug("PUBACK for outbox message %d, %.1f ms after it was sent", sent[0],
                      1000 * (time.monotonic() - sent[1]))
            if sent[0] == self._suspect:  # acknowledged alone: it did not end the connection
                self._suspect = None
            self._store.ack(sent[0])
        elif kind == _DISCONNECTED and mid not in INNOCENT_DISCONNECTS:
            self._blame(detail)
        elif kind == _CONNECTED:
            # on_connect took back what paho held: every unacknowledged row is sent again,
            # from the oldest (at-least-once; ids are stable so consumers de-duplicate). The
            # empty write waits for the store's writer, so acks queued before are committed.
            self._inflight.clear()
            self._store.enqueue([])
            self._cursor = 0
            self._ready = mid

    def _blame(self, reason: str | None) -> None:
        """The connection ended with rows in flight. A broker takes a client's messages in
        order, so if one of them ended it, it is the oldest unacknowledged one, sent just
        before. That row only becomes a suspect: after reconnecting it is sent alone (see
        `_send`), and only an end while it flies alone counts as a failed attempt. So a
        broker restart or a Wi-Fi drop costs no message its retries."""
        if self._stop.is_set() or not self._inflight:
            return
        flying = [seq for seq, _ in self._inflight.values()]
        if self._suspect is not None and flying == [self._suspect]:
            self._failed(self._suspect, "ConnectionClosed",
                         f"the connection ended while it was in flight alone ({reason})")
            return
        seq, sent_at = next(iter(self._inflight.values()))
        if self._suspect is None and time.monotonic() - sent_at <= BLAME_SECONDS:
            self._suspect = seq

    def _failed(self, seq: int, kind: str, why: str) -> None:
        """One more failed attempt for outbox row `seq`: retry after a backoff, or park it
        when MAX_ATTEMPTS are used up. Rows after it keep flowing meanwhile."""
        attempts = self._store.outbox_attempts(seq)
        if attempts is None:  # gone meanwhile
            self._retry_at.pop(seq, None)
            return
        attempts += 1
        if attempts >= MAX_ATTEMPTS:
            for row in self._store.outbox_rows([seq]):
                self._park(row, kind, f"{why}; gave up after {attempts} attempts", attempts)
            return
        delay = min(RETRY_FIRST_SECONDS * 2 ** (attempts - 1), RETRY_MAX_SECONDS)
        self._retry_at[seq] = time.monotonic() + delay
        due = datetime.now(UTC) + timedelta(seconds=delay)
        self._store.note_failure(seq, attempts, f"{kind}: {why}",
                                 due.isoformat(timespec="milliseconds").replace("+00:00", "Z"))
        log.warning("outbox message %d: %s; attempt %d of %d failed, next in %.1f s", seq, why,
                    attempts, MAX_ATTEMPTS, delay)

    def _park(self, row: OutboxMessage, kind: str, why: str, attempts: int | None = None) -> None:
        """Move a row that cannot be delivered to the dead letters, reported once on `error`
        (the report is an outbox row too; if it cannot be delivered either, it is parked
        without a report of its own)."""
        self._retry_at.pop(row.seq, None)
        if row.seq == self._suspect:
            self._suspect = None
        if attempts is None:
            attempts = self._store.outbox_attempts(row.seq) or 0
        report = error_message(
            self.topics, path=self._image_path(row.payload), error=kind, qos=self.settings.qos,
            message=f"outbox message {row.seq} on {row.topic} ({len(row.payload)} bytes) is "
                    f"parked: {why}. `dinowatch outbox retry {row.seq}` sends it again")
        if self._store.park(row.seq, attempts, f"{kind}: {why}", report):
            log.error("parked outbox message %d on %s (%d bytes): %s", row.seq, row.topic,
                      len(row.payload), why)

    @staticmethod
    def _image_path(payload: bytes) -> str | None:
        """The image a message is about (its `path_bytes`, else its `path`), if it names one."""
        try:
            body = json.loads(payload)
            exact = body.get("path_bytes") if isinstance(body, dict) else None
            if isinstance(exact, str):
                return os.fsdecode(base64.b64decode(exact, validate=True))
            path = body.get("path") if isinstance(body, dict) else None
        except ValueError:  # not JSON, not UTF-8, not base64
            return None
        return path if isinstance(path, str) else None

    @staticmethod
    def packet_size(topic: str, payload: bytes, qos: int, mqtt5: bool = True) -> int:
        """Bytes of the PUBLISH packet paho sends for a message: the fixed header byte, the
        remaining length (1-4 bytes), the topic and its length, the packet id (QoS > 0), the
        properties (MQTT 5; we send none: one length byte) and the payload."""
        remaining = 2 + len(topic.encode()) + (2 if qos else 0) + int(mqtt5) + len(payload)
        length = 1 if remaining < 128 else 2 if remaining < 16_384 else \
            3 if remaining < 2_097_152 else 4
        return 1 + length + remaining

    def _fits(self, topic: str, payload: bytes, qos: int) -> bool:
        limit = self._max_packet
        return limit is None or self.packet_size(topic, payload, qos,
                                                 self.settings.protocol == "5") <= limit

    def _send(self) -> bool:
        """Fill the window: rows whose retry is due, then new rows in seq order (a row that
        waits for its retry is passed over, the ones after it go on). True when more rows may
        be waiting and the window has room."""
        if self._ready != self._epoch:
            return False  # the rewind after connecting comes first (see _handle)
        now = time.monotonic()
        if self._suspect is not None and self._retry_at.get(self._suspect, now) <= now:
            return self._send_suspect()
        free = self._window - len(self._inflight)
        if free <= 0:
            return False
        flying = {seq for seq, _ in self._inflight.values()}
        due = sorted(seq for seq, at in self._retry_at.items()
                     if at <= now and seq <= self._cursor and seq not in flying
                     and seq != self._suspect)[:free]
        retries = self._store.outbox_rows(due)
        for seq in set(due) - {row.seq for row in retries}:
            del self._retry_at[seq]  # acknowledged or parked meanwhile
        limit = free - len(retries)
        rows = self._store.outbox_after(self._cursor, limit) if limit else []
        for row in [*retries, *rows]:
            if row.seq == self._suspect or (row.seq > self._cursor
                                            and self._retry_at.get(row.seq, now) > now):
                self._cursor = max(self._cursor, row.seq)  # sent on its own, when it is due
                continue
            if not self._publish(row):
                return False  # not advanced: retried after reconnecting
            self._cursor = max(self._cursor, row.seq)
        return bool(limit) and len(rows) == limit and len(self._inflight) < self._window

    def _send_suspect(self) -> bool:
        """The suspect's turn: once nothing else is in flight, it goes alone."""
        if self._inflight:
            return False  # the window drains first; nothing new goes out meanwhile
        rows = self._store.outbox_rows([self._suspect]) if self._suspect is not None else []
        if not rows:  # acknowledged or parked meanwhile
            self._suspect = None
            return True
        self._retry_at.pop(rows[0].seq, None)
        if self._publish(rows[0]):
            # Rows before it were acknowledged or wait for their retry: the rewind may go on
            # from here, and must not send it twice while its ack is being written.
            self._cursor = max(self._cursor, rows[0].seq)
        return False

    def _publish(self, row: OutboxMessage) -> bool:
        """Hand one row to paho; False if paho cannot take it now."""
        if not self._fits(row.topic, row.payload, row.qos):
            size = self.packet_size(row.topic, row.payload, row.qos,
                                    self.settings.protocol == "5")
            self._park(row, "MessageTooLarge", f"its PUBLISH packet is {size} bytes, the "
                                               f"broker accepts at most {self._max_packet}")
            return True
        try:
            info = self._client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
        except ValueError as err:  # a row paho can never send must not block the rest
            self._park(row, "InvalidMessage", str(err))
            return True
        # NO_CONN for QoS>0: paho has queued it (dropped and sent again after reconnecting).
        held = info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and row.qos > 0
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not held:
            log.debug("publish of outbox message %d deferred: %s", row.seq,
                      paho.error_string(info.rc))
            return False
        if log.isEnabledFor(logging.DEBUG):
            log.debug("sent outbox message %d (mid %d) on %s: %s", row.seq, info.mid,
                      row.topic, _preview(row.payload))
        if row.qos == 0:
            self._retry_at.pop(row.seq, None)
            self._store.ack(row.seq)
        else:
            self._inflight[info.mid] = (row.seq, time.monotonic())
        return True
