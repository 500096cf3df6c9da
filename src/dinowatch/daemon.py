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

from dinowatch import models
from dinowatch.config import ConfigError, MqttSettings, Settings, WatchSettings, load_settings
from dinowatch.embedder import DinoEmbedder
from dinowatch.imaging import ImagingOptions
from dinowatch.mqtt import (
    Publisher,
    Topics,
    deleted_message,
    embedding_message,
    error_message,
)
from dinowatch.pipeline import DELETED, Messages, Pipeline
from dinowatch.store import DiskFull, ImageRecord, Message, Store, StoreUnavailable
from dinowatch.watch import FolderWatcher

log = logging.getLogger(__name__)

DATABASE_NAME = "dinowatch.db"
STATS_INTERVAL_SECONDS = 30.0
TICK_SECONDS = 0.5
STOP_SECONDS = 9.0  # SIGTERM to exit, all stages together (systemd's TimeoutStopSec is 15)
LOAD_SECONDS = 600  # the first start may fetch the model: systemd is asked to wait this long


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
                        imaging=ImagingOptions(**settings.imaging.model_dump()),
                        cache_dir=models.model_dir(settings.data_dir))


class MqttMessages(Messages):
    """Builds the outbox rows for the topics and encoding the settings ask for."""

    def __init__(self, mqtt: MqttSettings, device_id: str, embedder: DinoEmbedder) -> None:
        self.mqtt = mqtt
        self.device_id = device_id
        self.embedder = embedder
        self.topics = Topics(mqtt.topic_prefix, device_id)

    def embedding(self, record: ImageRecord, vector: np.ndarray) -> list[Message]:
        return [embedding_message(
            self.topics, device_id=self.device_id, path=record.path, source=record.source,
            sha256=record.sha256 or "", width=record.width, height=record.height,
            model_name=self.embedder.model_name, model_sha256=self.embedder.model_sha256,
            vector=vector, encoding=self.mqtt.vector_encoding, qos=self.mqtt.qos)]

    def deleted(self, record: ImageRecord) -> list[Message]:
        return [deleted_message(self.topics, device_id=self.device_id, path=record.path,
                                source=record.source, sha256=record.sha256 or "",
                                qos=self.mqtt.qos)]

    def error(self, path: str | None, kind: str, message: str) -> list[Message]:
        return [error_message(self.topics, path=path, error=kind, message=message,
                              qos=self.mqtt.qos)]


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

    # -- WatchEvents: called on watcher threads; they only hand off -------------------------
    def file_ready(self, path: Path, watch: WatchSettings) -> None:
        self.pipeline.submit(path, watch.source_name)

    def file_deleted(self, path: Path, watch: WatchSettings) -> None:
        self.pipeline.submit(path, watch.source_name, gone=True)

    def folder_scanned(self, watch: WatchSettings, present: set[Path]) -> None:
        # The pipeline ends a row `deleted` only if its file is really gone: the scan skips
        # excluded or unreadable sub-folders, and files may have arrived since the listing.
        recorded = self.store.live_paths(watch.path)
        if recorded and not present:
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
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        settings = self.settings
        self.store = open_store(settings)
        notify("STATUS=loading model", f"EXTEND_TIMEOUT_USEC={LOAD_SECONDS * 1_000_000}")
        self.embedder = open_embedder(settings)
        self.embedder.warm_up()  # a slow first inference must not count against the watchdog
        self.messages = build_messages(settings, self.embedder)
        self.publisher = (Publisher(settings.mqtt, settings.device_id, self.store)
                          if settings.mqtt else None)
        self.pipeline = Pipeline(self.embedder, self.store, self.messages,
                                 normalize=settings.model.normalize,
                                 on_recorded=self.publisher_wake, on_paused=self.paused)
        self.pipeline.start()
        if self.publisher:
            self.publisher.start()
        self._apply_watch_list(settings.watch)
        notify("READY=1", "STATUS=watching")
        log.info("dinowatch running: %d folders, model %s, device %s", len(settings.watch),
                 self.embedder.model_path, settings.device_id)
        try:
            self._main_loop()
        finally:
            self._shutdown()
        return 0

    def publisher_wake(self) -> None:
        if self.publisher:
            self.publisher.wake()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        (self._reload if signum == signal.SIGHUP else self._stop).set()

    def _main_loop(self) -> None:
        ping_every = watchdog_interval()
        last_ping = last_stats = -math.inf
        was_connected = False
        while not self._stop.wait(TICK_SECONDS):
            now = time.monotonic()
            connected = bool(self.publisher and self.publisher.connected)
            if connected and not was_connected:
                last_stats = -math.inf  # a fresh connection gets the retained stats at once
            was_connected = connected
            if self._reload.is_set():
                self._reload.clear()
                self._reload_settings()
            # Ping only while the workers live, so systemd restarts a wedged daemon.
            if ping_every and now - last_ping >= ping_every and self._healthy():
                notify("WATCHDOG=1")
                last_ping = now
            if now - last_stats >= STATS_INTERVAL_SECONDS:
                self._publish_stats()
                last_stats = now

    def _healthy(self) -> bool:
        return self.pipeline.alive and (self.publisher is None or self.publisher.alive)

    def _shutdown(self) -> None:
        """Finish work in flight and say goodbye, all within STOP_SECONDS."""
        notify("STOPPING=1")
        log.info("stopping: finishing work in flight")
        deadline = time.monotonic() + STOP_SECONDS
        for watcher in self._watchers.values():
            watcher.stop()
        if not self.pipeline.stop(max(1.0, deadline - time.monotonic() - 2)):
            log.warning("workers did not finish in time; the rest is redone at next start")
        if self.publisher:
            self.publisher.stop(timeout=max(0.5, min(3.0, deadline - time.monotonic())))
        self.store.close()
        self.embedder.close()
        log.info("stopped")

    def _apply_watch_list(self, watches: list[WatchSettings]) -> None:
        wanted = {watch.path: watch for watch in watches}
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
        self.settings = settings
        self._apply_watch_list(settings.watch)
        log.info("configuration reloaded from %s", self.config_path)
        notify("READY=1", "STATUS=watching")

    def stats(self) -> dict[str, object]:
        """The retained `stats` payload (DESIGN's names, `images/s` included)."""
        return {
            "processed": self.pipeline.processed,
            "failed": self.pipeline.failed,
            "deleted": self.pipeline.outcomes[DELETED],
            "queue": self.pipeline.queued,
            "disk_full": isinstance(self.pipeline.paused, DiskFull),
            "outbox": self.store.outbox_depth(),
            "images/s": round(self.pipeline.rate(), 3),
            "uptime": round(time.monotonic() - self._started),
            "connected": bool(self.publisher and self.publisher.connected),
        }

    def _publish_stats(self) -> None:
        stats = self.stats()
        if self.pipeline.paused is None:  # no writes then; `status` checks the disk itself
            self.store.put_meta("stats", json.dumps(stats))
        if self.publisher:
            self.publisher.publish_stats(stats)
        notify(f"STATUS=processed {stats['processed']}, queue {stats['queue']}, "
               f"outbox {stats['outbox']}")
