"""`dinowatch run`: wires watch -> pipeline -> store -> publisher, and talks to systemd."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType

import numpy as np
import paho.mqtt.client as paho

from dinowatch import models
from dinowatch.commands import Commands, Reply, Request
from dinowatch.config import (
    ConfigError,
    MqttSettings,
    Settings,
    WatchSettings,
    load_settings,
    topic_hostname,
)
from dinowatch.embedder import EMBED_ERRORS, DinoEmbedder
from dinowatch.errors import readable
from dinowatch.homeassistant import Discovery
from dinowatch.imaging import thumbnail
from dinowatch.match import GALLERY, Matcher, gallery_watch
from dinowatch.mqtt import (
    Publisher,
    Topics,
    deleted_message,
    embedding_message,
    error_message,
    last_match_message,
    match_message,
)
from dinowatch.pipeline import DELETED, FAILED, PER_IMAGE_LOG_LIMIT, RECORDED, Messages, Pipeline
from dinowatch.store import (
    WRITE_TIMEOUT_SECONDS,
    DiskFull,
    ImageRecord,
    Match,
    Message,
    Store,
    StoreUnavailable,
    utc_now,
)
from dinowatch.watch import FolderWatcher

log = logging.getLogger(__name__)

DATABASE_NAME = "dinowatch.db"
STATS_INTERVAL_SECONDS = 30.0
TICK_SECONDS = 0.5
STOP_SECONDS = 9.0  # SIGTERM to exit, all stages together (systemd's TimeoutStopSec is 15)
LOAD_SECONDS = 600  # the first start may fetch the model: systemd is asked to wait this long
STUCK_SECONDS = 120.0  # one image decoded or one batch inferred longer than this: stuck
SILENT_SECONDS = 120.0  # a polling loop (watcher, MQTT drain) silent this long: stuck
SUMMARY_SECONDS = 60.0
ANNOUNCED_KEY = "homeassistant_labels"  # meta: the labels Home Assistant was told of


class StopRequested(Exception):  # a request, raised from the signal handler
    """SIGTERM or SIGINT arrived before the daemon was ready."""


def notify(*fields: str) -> None:
    """sd_notify: one datagram to $NOTIFY_SOCKET (no-op outside systemd)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as err:
        log.warning("sd_notify to %s failed: %s", os.environ["NOTIFY_SOCKET"], err)


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec, if this process is the one being watched."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def open_store(settings: Settings) -> Store:
    return Store(settings.data_dir / DATABASE_NAME)


def open_embedder(settings: Settings) -> DinoEmbedder:
    return DinoEmbedder(settings.model.path, model_name=settings.model.name,
                        backend=settings.backend,
                        imaging=settings.imaging.options(),
                        cache_dir=models.model_dir(settings.data_dir))


def open_matcher(settings: Settings, store: Store, embedder: DinoEmbedder) -> Matcher:
    """The match stage, its indexes loaded with the store's images of this model."""
    matcher = Matcher(settings.matching, settings.gallery_dir, settings.watch, dim=embedder.dim)
    started = time.monotonic()
    count = matcher.load(store, embedder.model_sha256)
    log.info("match index: %d images, %d gallery labels, loaded in %.2f s", count,
             len(matcher.labels()), time.monotonic() - started)
    return matcher




class MqttMessages(Messages):
    """Builds the outbox rows for the topics and encoding the settings ask for."""

    def __init__(self, mqtt: MqttSettings, device_id: str, embedder: DinoEmbedder) -> None:
        self.mqtt = mqtt
        self.device_id = device_id
        self.embedder = embedder
        self.topics = Topics(mqtt.topic_prefix, device_id)
        self.discovery = Discovery(mqtt.homeassistant, self.topics, device_id, mqtt.qos)

    def embedding(self, record: ImageRecord, vector: np.ndarray) -> list[Message]:
        return [embedding_message(
            self.topics, device_id=self.device_id, path=record.path, source=record.source,
            sha256=record.sha256 or "", width=record.width, height=record.height,
            model=self.embedder.identity.payload(),
            vector=vector, encoding=self.mqtt.vector_encoding, qos=self.mqtt.qos)]

    def deleted(self, record: ImageRecord) -> list[Message]:
        return [deleted_message(self.topics, device_id=self.device_id, path=record.path,
                                source=record.source, sha256=record.sha256 or "",
                                qos=self.mqtt.qos)]

    def error(self, path: str | None, kind: str, message: str) -> list[Message]:
        return [error_message(self.topics, path=path, error=kind, message=message,
                              qos=self.mqtt.qos)]

    def match(self, record: ImageRecord, events: list[Match], *,
              live: bool = True) -> list[Message]:
        """`match` events, then, for a gallery match that just happened (`live`), the
        retained last match, and for Home Assistant the labels' `ON` and a thumbnail."""
        qos = self.mqtt.qos
        messages = [match_message(self.topics, device_id=self.device_id, path=record.path,
                                  source=record.source, event=event, qos=qos)
                    for event in events]
        labelled = [event for event in events if event.kind == GALLERY and event.label]
        if not labelled or not live:
            return messages
        messages.append(last_match_message(self.topics, path=record.path,
                                           source=record.source, event=labelled[0], qos=qos))
        if self.mqtt.homeassistant.enabled:
            messages += [self.discovery.label_on(event.label or "") for event in labelled]
            try:
                picture = thumbnail(record.path, self.embedder.imaging,
                                    self.mqtt.homeassistant.thumbnail_pixels)
                messages.append(Message(self.discovery.thumbnail_topic(), picture, qos,
                                        retain=True))
            except EMBED_ERRORS as err:
                log.warning("no thumbnail of %s: %s", readable(record.path), err)
        return messages


def build_messages(settings: Settings, embedder: DinoEmbedder) -> Messages | None:
    """The outbox's payload builders, or None to run without a broker (`mqtt: null`)."""
    if settings.mqtt is None:
        return None
    return MqttMessages(settings.mqtt, settings.device_id, embedder)


class Daemon:
    """The long-running process. Signal handlers only set flags; the main loop acts."""

    def __init__(self, settings: Settings, config_path: Path) -> None:
        self.settings = settings
        self.config_path = config_path
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._watchers: dict[Path, FolderWatcher] = {}
        self._started = time.monotonic()
        self.ready_seconds: float | None = None
        self._starting = True  # until READY=1: SIGTERM interrupts the start itself
        self._opened: list[Store | DinoEmbedder] = []  # closed if a stop interrupts the start
        self.commands: Commands | None = None
        self._discovery_due = threading.Event()  # Home Assistant (re)started: announce again
        self._announced: list[str] | None = None  # labels Home Assistant was told of

    # -- WatchEvents: called on watcher threads; they only hand off -------------------------
    def file_ready(self, path: Path, watch: WatchSettings) -> None:
        self.pipeline.submit(path, watch.source_name)

    def file_deleted(self, path: Path, watch: WatchSettings) -> None:
        self.pipeline.submit(path, watch.source_name, gone=True)

    def folder_scanned(self, watch: WatchSettings, present: set[Path]) -> None:
        # The pipeline ends a row `deleted` only if its file is really gone: the scan skips
        # excluded or unreadable sub-folders, and files may have arrived since the listing.
        recorded = self.store.live_paths(watch.path)
        if recorded and not present and watch.path != self.gallery_dir:
            # An unmounted drive or a dropped share leaves an empty mount point: withdrawing
            # every picture (and re-publishing all of them when it returns) would be wrong.
            # Files deleted one by one are still seen through their events.
            log.warning("%s is empty but %d files are recorded below it: an unmounted drive? "
                        "Not marking them deleted.", watch.path, len(recorded))
            return
        for path in sorted(recorded - {str(p) for p in present}):
            self.pipeline.submit(Path(path), watch.source_name, gone=True)

    def folder_error(self, watch: WatchSettings, message: str) -> None:
        if self.messages is not None:
            self.store.enqueue(self.messages.error(str(watch.path), "OSError", message))
            self.publisher_wake()

    def paused(self, error: StoreUnavailable | None) -> None:
        """Pipeline: the store takes no writes (error) or takes them again (None). The outbox
        is in that store, so the report goes to the broker directly."""
        if error is not None and self.messages is not None and self.publisher is not None:
            message = f"{error}; intake paused until the database takes writes again"
            for report in self.messages.error(str(self.store.path), type(error).__name__,
                                              message):
                self.publisher.publish_now(report)
        self._publish_stats()

    # -- lifecycle ------------------------------------------------------------------------
    def run(self) -> int:
        """Start, serve until SIGTERM, stop. Exit code: 0, or 1 when a worker died."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        try:
            self._start()
        except StopRequested:
            log.info("stopped while starting")
            for part in self._opened:
                part.close()
            return 0
        finally:
            self._starting = False
        code = 0
        try:
            code = self._main_loop()
        finally:
            self._shutdown()
        return code

    def _start(self) -> None:
        """Open everything; SIGTERM meanwhile (a model fetch may take minutes) raises
        StopRequested at once instead of waiting for the start to finish."""
        settings = self.settings
        hostname = topic_hostname()
        if "device_id" not in settings.model_fields_set and settings.device_id != hostname:
            log.warning("device_id is %s: the hostname %s is a distribution default, so a "
                        "suffix from /etc/machine-id keeps two such devices apart (dinowatch "
                        "before 0.2 used %s: set device_id: %s to keep those topics)",
                        settings.device_id, hostname, hostname, hostname)
        self.store = open_store(settings)
        self._opened.append(self.store)
        notify("STATUS=loading model", f"EXTEND_TIMEOUT_USEC={LOAD_SECONDS * 1_000_000}")
        loading = time.monotonic()
        self.embedder = open_embedder(settings)
        self._opened.append(self.embedder)
        self.embedder.warm_up()  # a slow first inference must not count against the watchdog
        model_seconds = time.monotonic() - loading
        identity = self.embedder.identity
        if identity.stand_in:
            log.warning("model %s is a STAND-IN with random weights (built by dinowatch.testing)"
                        ": its vectors mean nothing. Provision the real model: README, Models.",
                        self.embedder.model_path)
        self.gallery_dir = settings.gallery_dir  # a change needs a restart
        self.matcher = open_matcher(settings, self.store, self.embedder)
        self.messages = build_messages(settings, self.embedder)
        self.publisher = (Publisher(settings.mqtt, settings.device_id, self.store)
                          if settings.mqtt else None)
        self.pipeline = Pipeline(self.embedder, self.store, self.messages, matcher=self.matcher,
                                 normalize=settings.model.normalize,
                                 on_recorded=self.publisher_wake, on_paused=self.paused)
        self.pipeline.start()
        if self.publisher:
            self._subscribe(self.publisher)
            self.publisher.start()
        self._apply_watch_list(settings.watch)
        self._starting = False
        notify("READY=1", "STATUS=watching")
        self.ready_seconds = round(time.monotonic() - self._started, 2)
        log.info("dinowatch running: %d folders, model %s (%s, sha256 %s…) on %s, device %s; "
                 "ready in %.2f s, of which %.2f s loading the model", len(settings.watch),
                 identity.name, self.embedder.model_path, identity.sha256[:12],
                 self.embedder.backend.type_key + (" (the fallback)" if self.embedder.fallback
                                                   else ""),
                 settings.device_id, self.ready_seconds, model_seconds)

    def publisher_wake(self) -> None:
        if self.publisher:
            self.publisher.wake()

    # -- requests and Home Assistant --------------------------------------------------------
    def _subscribe(self, publisher: Publisher) -> None:
        mqtt = self.settings.mqtt
        assert mqtt is not None
        topics = publisher.topics
        if mqtt.commands.enabled:
            self.commands = Commands(
                mqtt.commands, topics, embedder=self.embedder, matcher=self.matcher,
                gallery_dir=self.settings.gallery_dir,
                roots=lambda: [watch.path for watch in self.settings.watch],
                rescan=self.rescan, send=self._send_reply,
                normalize=self.settings.model.normalize,
                refused_prefixes=(mqtt.homeassistant.discovery_prefix,))
            self.commands.start()
            publisher.subscribe(topics.command("+"), self._on_request)
        if mqtt.homeassistant.enabled:
            assert isinstance(self.messages, MqttMessages)
            publisher.subscribe(self.messages.discovery.status_topic,
                                self._on_homeassistant_status)

    def _on_request(self, message: paho.MQTTMessage) -> None:
        """paho's thread: hand the request to the command worker."""
        properties = getattr(message, "properties", None)
        if message.retain:  # a request left retained would run again at every connect
            log.warning("ignoring a retained request on %s: publish requests without retain",
                        message.topic)
            return
        if self.commands is not None:
            self.commands.submit(Request(
                name=message.topic.rsplit("/", 1)[-1], payload=bytes(message.payload),
                response_topic=getattr(properties, "ResponseTopic", None),
                correlation_data=getattr(properties, "CorrelationData", None)))

    def _send_reply(self, reply: Reply) -> None:
        if self.publisher is not None:
            self.publisher.reply(reply.topic, reply.payload, reply.correlation_data)

    def _on_homeassistant_status(self, message: paho.MQTTMessage) -> None:
        if message.payload.strip() == b"online":  # its birth message: it forgot nothing
            self._discovery_due.set()             # retained, but may have restarted fresh

    def rescan(self, folder: Path | None) -> list[Path]:
        """Scan the watched folders again (only `folder`'s watcher when given)."""
        chosen = [watcher for path, watcher in self._watchers.items()
                  if folder is None or Path(os.path.realpath(path)) == folder]
        for watcher in chosen:
            watcher.rescan()
        return [watcher.watch.path for watcher in chosen]

    def _announce(self, *, everything: bool) -> None:
        """Home Assistant discovery: every config (`everything`, e.g. after connecting),
        or only what the labels changed; a label gone is removed from Home Assistant."""
        if not (self.publisher and self.publisher.connected and self.settings.mqtt
                and self.settings.mqtt.homeassistant.enabled
                and isinstance(self.messages, MqttMessages)):
            return
        discovery = self.messages.discovery
        labels = sorted(self.matcher.labels())
        if self._announced is None:
            self._announced = json.loads(self.store.meta(ANNOUNCED_KEY) or "[]")
        announced = self._announced
        # A label still recorded but not indexed (references being re-embedded after a model
        # change) is kept: removing it would delete the entity and its user settings.
        if set(announced) - set(labels):
            labels = sorted(set(labels) | (set(announced) & set(self.store.label_counts())))
        if not everything and labels == announced:
            return  # nothing changed for Home Assistant (kept labels included)
        messages = discovery.configs(labels) if everything else discovery.label_configs(labels)
        messages += [discovery.label_off(label) for label in labels if label not in announced]
        for gone in sorted(set(announced) - set(labels)):
            messages += discovery.removals(gone)
            log.info("label %r has no references left: removed from Home Assistant", gone)
        for message in messages:
            self.publisher.publish_now(message)
        self._announced = labels
        self.store.put_meta(ANNOUNCED_KEY, json.dumps(labels))
        if not everything:
            self._publish_stats()  # `labels` in stats is current too

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload.set()
            return
        self._stop.set()
        if self._starting:
            raise StopRequested

    def _main_loop(self) -> int:
        """Until SIGTERM: watchdog pings, reloads, stats. Returns 1 if a worker died."""
        ping_every = watchdog_interval()
        last_ping = last_stats = -math.inf
        last_summary, summarized = time.monotonic(), dict(self.pipeline.outcomes)
        said_stuck: str | None = None
        was_connected = False
        backend_state = self._backend_state()
        while not self._stop.wait(TICK_SECONDS):
            now = time.monotonic()
            dead = self._dead_worker()
            if dead:
                log.critical("%s: stopping with exit code 1 so systemd restarts dinowatch", dead)
                return 1
            connected = bool(self.publisher and self.publisher.connected)
            if connected and not was_connected:
                last_stats = -math.inf  # a fresh connection gets the retained stats at once
                self._discovery_due.set()
            was_connected = connected
            if backend_state != self._backend_state():  # a device failed, came back, or
                backend_state = self._backend_state()  # gave way to the fallback: say so now
                last_stats = -math.inf
            everything = self._discovery_due.is_set()
            self._discovery_due.clear()
            self._announce(everything=everything)
            if self._reload.is_set():
                self._reload.clear()
                self._reload_settings()
            # Ping only while every stage with work is moving: systemd restarts a wedged
            # daemon (a hung network mount, a store write that never returns).
            if ping_every and now - last_ping >= ping_every:
                stuck = self._stuck_stage()
                if stuck is None:
                    notify("WATCHDOG=1")
                    last_ping, said_stuck = now, None
                elif stuck[0] != said_stuck:  # once per stall, not at every tick
                    log.error("%s; not telling systemd's watchdog all is well", stuck[1])
                    said_stuck = stuck[0]
            if now - last_stats >= STATS_INTERVAL_SECONDS:
                self._publish_stats()
                last_stats = now
            if now - last_summary >= SUMMARY_SECONDS:
                self._log_summary(summarized)
                last_summary, summarized = now, dict(self.pipeline.outcomes)
        return 0

    def _dead_worker(self) -> str | None:
        """A worker thread that ended: the daemon cannot go on without it."""
        if not self.store.alive:
            return f"the database writer stopped ({self.store.broken or 'no reason given'})"
        if not self.pipeline.alive:
            return "a pipeline worker thread ended"
        if self.publisher is not None and not self.publisher.alive:
            return "the MQTT drain thread ended"
        if self.commands is not None and not self.commands.alive:
            return "the MQTT request worker ended"
        return None

    def _stuck_stage(self) -> tuple[str, str] | None:
        """The first stage with work that has not moved for its limit: (name, description)."""
        activities = [(self.store.activity, WRITE_TIMEOUT_SECONDS)]
        if self.pipeline.paused is None:  # a worker waiting for the store is not stuck
            activities += [(self.pipeline.decode_activity, STUCK_SECONDS),
                           (self.pipeline.inference_activity, STUCK_SECONDS),
                           (self.pipeline.record_activity, STUCK_SECONDS)]
        for activity, limit in activities:
            if activity.stuck_for() > limit:
                return activity.name, (f"{activity.name} has been on one item for "
                                       f"{activity.stuck_for():.0f} s")
        polling = [watcher.activity for watcher in self._watchers.values()]
        if self.publisher is not None:
            polling.append(self.publisher.activity)
        for activity in polling:
            if activity.silent_for() > SILENT_SECONDS:
                return activity.name, (f"{activity.name} has not come round for "
                                       f"{activity.silent_for():.0f} s")
        return None

    def _log_summary(self, before: dict[str, int]) -> None:
        """One INFO line a minute during a backlog; at low rates each image has its own."""
        done = {key: count - before.get(key, 0) for key, count in self.pipeline.outcomes.items()}
        if done.get(RECORDED, 0) > PER_IMAGE_LOG_LIMIT or done.get(FAILED, 0) or \
                done.get(DELETED, 0):
            log.info("last minute: %d embedded, %d failed, %d deleted; %d queued, %d in the "
                     "outbox", done.get(RECORDED, 0), done.get(FAILED, 0), done.get(DELETED, 0),
                     self.pipeline.queued, self.store.outbox_depth())

    def _shutdown(self) -> None:
        """Finish work in flight and say goodbye, all within STOP_SECONDS."""
        notify("STOPPING=1")
        log.info("stopping: finishing work in flight")
        deadline = time.monotonic() + STOP_SECONDS
        for watcher in self._watchers.values():  # all at once, then wait within the deadline
            watcher.stop(timeout=0)
        for watcher in self._watchers.values():
            watcher.stop(timeout=max(0.0, deadline - time.monotonic() - 5))
        if not self.pipeline.stop(max(1.0, deadline - time.monotonic() - 3)):
            log.warning("workers did not finish in time; the rest is redone at next start")
        final = self.stats() | {"connected": False}  # the figures `status` shows from now on
        self.store.put_meta("stats", json.dumps(final))
        if self.commands is not None:
            self.commands.stop(timeout=0.5)
        if self.publisher:
            self.publisher.publish_stats(final)  # retained: goes out before `offline`
            self.publisher.stop(timeout=max(0.5, min(3.0, deadline - time.monotonic() - 1)))
        if not self.store.close(timeout=max(0.5, deadline - time.monotonic())):
            log.warning("the database writer did not finish in time; SQLite's journal keeps "
                        "the database consistent")
        self.embedder.close()
        log.info("stopped")

    def _apply_watch_list(self, watches: list[WatchSettings]) -> None:
        gallery = gallery_watch(self.gallery_dir)
        try:
            gallery.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            log.error("cannot create the gallery folder %s: %s", gallery.path, err.strerror)
        wanted = {watch.path: watch for watch in [gallery, *watches]}
        for path in list(self._watchers):
            if path not in wanted or self._watchers[path].watch != wanted[path]:
                self._watchers.pop(path).stop()
        for path, watch in wanted.items():
            if path not in self._watchers:
                self._watchers[path] = FolderWatcher(watch, self)
                self._watchers[path].start()

    def _reload_settings(self) -> None:
        """SIGHUP: new watch list and log level; no work is dropped."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")
        try:
            settings = load_settings(self.config_path)
        except ConfigError as err:
            log.error("reload refused, keeping the running configuration:\n%s", err)
            notify("READY=1")
            return
        restart_only = ("data_dir", "model", "backend", "imaging", "mqtt", "device_id")
        for key in restart_only:
            if getattr(settings, key) != getattr(self.settings, key):
                log.warning("reload: %s changed; restart dinowatch to apply it", key)
        logging.getLogger("dinowatch").setLevel(settings.logging.level)
        if settings.gallery_dir != self.gallery_dir:
            log.warning("reload: matching.gallery_dir changed; restart dinowatch to apply it")
        self.settings = settings
        self.matcher.settings, self.matcher.watches = settings.matching, list(settings.watch)
        self._apply_watch_list(settings.watch)
        log.info("configuration reloaded from %s", self.config_path)
        notify("READY=1", "STATUS=watching")

    def _backend_state(self) -> tuple[str, str | None, str | None]:
        return (self.embedder.backend.type_key, self.embedder.fallback,
                self.pipeline.backend_error)

    def stats(self) -> dict[str, object]:
        """The retained `stats` payload (DESIGN's names, `images/s` included)."""
        return {
            "processed": self.pipeline.processed,
            "failed": self.pipeline.failed,
            "deleted": self.pipeline.outcomes[DELETED],
            "queue": self.pipeline.queued,
            "disk_full": isinstance(self.pipeline.paused, DiskFull),
            "outbox": self.store.outbox_depth(),
            "dead_letters": self.store.dead_letter_count(),
            "images/s": round(self.pipeline.rate(), 3),
            "model": self.embedder.identity.payload(),
            "backend": self.embedder.backend.type_key,  # the one running: maybe the fallback
            **({"backend_fallback": self.embedder.fallback} if self.embedder.fallback else {}),
            **({"backend_error": self.pipeline.backend_error}
               if self.pipeline.backend_error else {}),
            "last_seen": self.pipeline.last_recorded,
            "inferred": self.pipeline.inferred,
            "cpu_seconds": self.pipeline.cpu.seconds(),
            "ready_seconds": self.ready_seconds,  # Daemon() (imports done) -> READY=1
            "matches": self.pipeline.matched,
            "labels": len(self.matcher.labels()),
            "uptime": round(time.monotonic() - self._started),
            "connected": bool(self.publisher and self.publisher.connected),
            # When and by whom: `dinowatch status` tells a running daemon from a gone one.
            "ts": utc_now(),
            "pid": os.getpid(),
        }

    def _publish_stats(self) -> None:
        stats = self.stats()
        if self.pipeline.paused is None:  # no writes then; `status` checks the disk itself
            self.store.put_meta("stats", json.dumps(stats))
        if self.publisher:
            self.publisher.publish_stats(stats)
        notify(f"STATUS=processed {stats['processed']}, queue {stats['queue']}, "
               f"outbox {stats['outbox']}")
