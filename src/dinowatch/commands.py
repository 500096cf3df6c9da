"""Requests over MQTT: `search`, `enroll` and `rescan` on `<prefix>/<device>/cmd/<name>`.

The paho thread only hands a request over (`submit`); one worker thread answers them in
order. Every request gets exactly one reply, an answer or an error, on the MQTT 5 response
topic with the request's correlation data, else on `…/cmd/<name>/reply` (MQTT 5.0, 4.10
"Request / Response"). Replies are JSON: `{"ok": true, …}` or `{"ok": false, "error": KIND,
"message": …}`, and echo the request's `id` when it has one (MQTT 3.1.1 clients have no
correlation data).

Paths in requests must resolve, symbolic links followed, to a file inside a watched folder
or the gallery; a path with a `..` part is refused before it is looked at.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import paho.mqtt.client as paho

from dinowatch.config import CommandSettings
from dinowatch.embedder import EMBED_ERRORS, DinoEmbedder
from dinowatch.errors import DinowatchError, readable
from dinowatch.imaging import ImageTooLarge
from dinowatch.match import GalleryError, Matcher, add_reference, check_label
from dinowatch.mqtt import Topics, path_fields, search_fields

log = logging.getLogger(__name__)

NAMES = ("search", "enroll", "rescan")
QUEUE_SIZE = 16  # requests waiting for the worker (at least `burst`); more are rate-limited
DEFAULT_K = 5
REFUSAL_REPLY_SECONDS = 1.0  # at most one "rate limited" reply this often
MAX_ID_CHARS = 128  # a request's `id` (text or integer) longer than this is not echoed


class CommandError(DinowatchError):
    """A request that cannot be answered; `kind` is the reply's `error`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Request:
    name: str
    payload: bytes
    response_topic: str | None = None  # MQTT 5
    correlation_data: bytes | None = None  # MQTT 5, echoed in the reply
    too_large: int = 0  # the payload's size when it was over the cap (and dropped)


@dataclass(frozen=True)
class Reply:
    topic: str
    payload: bytes
    correlation_data: bytes | None


class RateLimit:
    """A token bucket: `burst` at once, then `per_minute` (RFC 2697's single-rate idea)."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class Commands:
    """Answers requests. `roots()` gives the folders a request's path may point into,
    `rescan(folder)` starts a scan of the watched folders (all when None) and returns those
    scanned, `send(reply)` publishes a reply."""

    def __init__(self, settings: CommandSettings, topics: Topics, *, embedder: DinoEmbedder,
                 matcher: Matcher,
                 gallery_dir: Path, roots: Callable[[], list[Path]],
                 rescan: Callable[[Path | None], list[Path]],
                 send: Callable[[Reply], None], normalize: bool = True,
                 refused_prefixes: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.topics = topics
        self.embedder = embedder
        self.matcher = matcher
        self.gallery_dir = gallery_dir
        self.roots = roots
        self.rescan = rescan
        self.send = send
        self.normalize = normalize
        self.refused_prefixes = refused_prefixes  # e.g. Home Assistant's discovery prefix
        self._queue: queue.Queue[Request | None] = queue.Queue(max(QUEUE_SIZE, settings.burst))
        self._limit = RateLimit(settings.per_minute, settings.burst)
        self._refused_at = -math.inf
        self._worker = threading.Thread(target=self._serve, name="mqtt-commands", daemon=True)

    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout: float = 2.0) -> None:
        with contextlib.suppress(queue.Full):  # full: the worker is stuck, it dies with us
            self._queue.put_nowait(None)
        self._worker.join(timeout)

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    # -- paho's thread: hand over, never block ----------------------------------------------
    def submit(self, request: Request) -> None:
        if len(request.payload) > self.settings.max_payload_bytes:
            request = Request(request.name, b"", request.response_topic,
                              request.correlation_data, too_large=len(request.payload))
        if not self._limit.take():
            self._refuse(request)
            return
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            self._refuse(request)

    def _refuse(self, request: Request) -> None:
        """Over the rate: one error reply a second at most, the rest are dropped."""
        now = time.monotonic()
        if now - self._refused_at < REFUSAL_REPLY_SECONDS:
            log.debug("dropped a %s request: over the rate limit", request.name)
            return
        self._refused_at = now
        log.warning("MQTT requests over the rate limit (%d a minute, %d at once): refusing "
                    "some", self.settings.per_minute, self.settings.burst)
        self.send(self._error(request, None, CommandError(
            "RateLimited", f"more than {self.settings.per_minute} requests a minute; "
                           "try again later")))

    # -- the worker -------------------------------------------------------------------------
    def _serve(self) -> None:
        while (request := self._queue.get()) is not None:
            try:
                self.send(self.answer(request))
            except Exception:  # a reply that cannot be sent must not end the worker
                log.exception("answering a %s request failed", request.name)

    def answer(self, request: Request) -> Reply:
        """The reply to one request (never raises for anything the request contains)."""
        body: dict[str, Any] | None = None
        try:
            if request.too_large:
                raise CommandError("PayloadTooLarge", f"the request is {request.too_large:,} "
                                   f"bytes; at most {self.settings.max_payload_bytes:,} "
                                   "(mqtt.commands.max_payload_bytes)")
            body = self._body(request)
            if request.name == "search":
                result = self._search(body)
            elif request.name == "enroll":
                result = self._enroll(body)
            elif request.name == "rescan":
                result = self._rescan(body)
            else:
                raise CommandError("UnknownCommand", f"no command {readable(request.name)!r};"
                                                     f" commands: {', '.join(NAMES)}")
        except CommandError as err:
            return self._error(request, body, err)
        except Exception as err:  # a bug: still one reply, and the worker goes on
            log.exception("the %s request failed", request.name)
            return self._error(request, body, CommandError(type(err).__name__, str(err)))
        return self._reply(request, body, {"ok": True, **result})

    def _body(self, request: Request) -> dict[str, Any]:
        """The request as a JSON object; a search may also be the image's bytes alone."""
        text = request.payload.lstrip()
        if request.name == "search" and text[:1] != b"{":
            if not text:
                raise CommandError("BadRequest", "empty request: send a JSON object, or an "
                                                 "image's bytes to search with")
            return {"image_bytes": request.payload}
        if not text:
            return {}
        try:
            body = json.loads(request.payload)
        except (ValueError, RecursionError) as err:
            raise CommandError("InvalidJSON", f"the request is not valid JSON: {err}") from err
        if not isinstance(body, dict):
            raise CommandError("BadRequest", f"the request must be a JSON object, not a "
                                             f"{type(body).__name__}")
        return body

    # -- search ---------------------------------------------------------------------------
    def _search(self, body: dict[str, Any]) -> dict[str, Any]:
        k = body.get("k", DEFAULT_K)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.settings.max_k:
            raise CommandError("BadRequest", f"k must be an integer from 1 to "
                                             f"{self.settings.max_k}, not {_shown(k)}")
        vector = self._query_vector(body)
        hits = self.matcher.search(vector, k)
        return {"k": k, "results": [search_fields(hit) for hit in hits]}

    def _query_vector(self, body: dict[str, Any]) -> np.ndarray:
        given = [key for key in ("vector", "image", "path", "image_bytes") if key in body]
        if len(given) != 1:
            raise CommandError("BadRequest", "give exactly one of 'vector' (base64 float32), "
                                             "'image' (base64) or 'path'")
        if given[0] == "vector":
            return self._vector(body["vector"])
        if given[0] == "path":
            path = self.resolve(body["path"])
            return self._embed(io.BytesIO(self._read(path)), str(path))
        data = body["image_bytes"] if given[0] == "image_bytes" else _base64(body["image"],
                                                                              "image")
        return self._embed(io.BytesIO(data), "the request's image")

    def _vector(self, value: object) -> np.ndarray:
        raw = _base64(value, "vector")
        dim = self.embedder.dim
        if len(raw) != 4 * dim:
            raise CommandError("BadRequest", f"vector: {len(raw)} bytes; a vector is {dim} "
                                             f"float32 values ({4 * dim} bytes)")
        vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(vector)) or not np.any(vector):
            raise CommandError("BadRequest", "vector: values must be finite, not all zero")
        return vector

    def _read(self, path: Path) -> bytes:
        """The file's bytes, if no larger than an image within `imaging.max_pixels` can be
        (what the pipeline takes too): a request must not fill the Pi's memory."""
        imaging = self.embedder.imaging
        try:
            with open(path, "rb") as file:
                imaging.check_file_size(os.fstat(file.fileno()).st_size, path)
                return file.read(imaging.max_file_bytes + 1)
        except OSError as err:
            raise CommandError("OSError", f"{readable(path)}: {err.strerror}") from err
        except ImageTooLarge as err:
            raise CommandError("ImageTooLarge", str(err)) from err

    def _embed(self, image: BinaryIO, name: str) -> np.ndarray:
        try:
            return self.embedder.embed(image, self.normalize, name=name)
        except EMBED_ERRORS as err:
            raise CommandError(type(err).__name__, readable(str(err))) from err

    # -- enroll ---------------------------------------------------------------------------
    def _enroll(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            label = check_label(body.get("label"))
        except GalleryError as err:
            raise CommandError("BadRequest", str(err)) from err
        given = [key for key in ("image", "path") if key in body]
        if len(given) != 1:
            raise CommandError("BadRequest", "give a 'label' and exactly one of 'image' "
                                             "(base64) or 'path'")
        if given[0] == "path":
            source = self.resolve(body["path"])
            data, name = self._read(source), source.name
        else:
            data, name = _base64(body["image"], "image"), None
        try:
            target = add_reference(self.gallery_dir, label, data, name, self.embedder.imaging)
        except EMBED_ERRORS as err:
            raise CommandError(type(err).__name__, readable(str(err))) from err
        log.info("enrolled %s as a reference for %r (MQTT request)", readable(target), label)
        return {"label": label, **path_fields(str(target))}

    # -- rescan ---------------------------------------------------------------------------
    def _rescan(self, body: dict[str, Any]) -> dict[str, Any]:
        folder = self.resolve(body["path"], folder=True) if "path" in body else None
        scanned = self.rescan(folder)
        if folder is not None and not scanned:
            raise CommandError("NotWatched", f"{readable(folder)} is not a watched folder")
        return {"folders": [path_fields(str(path))["path"] for path in scanned]}

    # -- paths ----------------------------------------------------------------------------
    def resolve(self, value: object, *, folder: bool = False) -> Path:
        """`value` as a path inside a watched folder or the gallery, symbolic links followed.

        Refused: what is not an absolute path in text, a `..` part, a NUL byte, and anything
        that resolves outside the allowed folders (a symbolic link out included).
        """
        if not isinstance(value, str) or not value:
            raise CommandError("BadRequest", f"path must be text, not {_shown(value)}")
        if "\0" in value or not Path(value).is_absolute() or ".." in Path(value).parts:
            raise CommandError("Forbidden", f"{readable(value)}: only absolute paths without "
                                            "'..' are taken")
        real = Path(os.path.realpath(value))
        roots = [Path(os.path.realpath(root)) for root in [*self.roots(), self.gallery_dir]]
        if not any(real == root or real.is_relative_to(root) for root in roots):
            raise CommandError("Forbidden", f"{readable(value)} is outside the watched folders "
                                            "and the gallery")
        if folder:
            if not real.is_dir():
                raise CommandError("NotFound", f"{readable(value)}: no such folder")
        elif not real.is_file():
            raise CommandError("NotFound", f"{readable(value)}: no such file")
        return real

    # -- replies --------------------------------------------------------------------------
    def _error(self, request: Request, body: dict[str, Any] | None,
               err: CommandError) -> Reply:
        log.info("%s request refused: %s: %s", readable(request.name), err.kind, err)
        return self._reply(request, body, {"ok": False, "error": err.kind,
                                           "message": readable(str(err))})

    def _reply(self, request: Request, body: dict[str, Any] | None,
               answer: dict[str, Any]) -> Reply:
        request_id = body.get("id") if body else None
        if isinstance(request_id, str | int) and not isinstance(request_id, bool) and \
                len(str(request_id)) <= MAX_ID_CHARS:  # an id, not a payload to plant
            answer = {"id": request_id, **answer}
        # ASCII: a lone surrogate in a request (\ud800) can still be written
        payload = json.dumps(answer, separators=(",", ":"), default=str).encode()
        return Reply(self.reply_topic(request), payload, request.correlation_data)

    def reply_topic(self, request: Request) -> str:
        """The request's response topic, else `…/cmd/<name>/reply`. Refused: wildcards, and
        topics under the dinowatch prefix or Home Assistant's discovery prefix (a reply must
        not pose as a device's message or a discovery config, nor reach any dinowatch as a
        request) except this device's own `cmd/<name>/reply/…` tree."""
        wanted = request.response_topic
        if not wanted or {"+", "#", "\0"} & set(wanted):
            return self.topics.reply(request.name)
        if paho.topic_matches_sub(self.topics.command("+/+/#"), wanted):
            return wanted  # …/cmd/<name>/reply/<whatever>: ours, and never a request
        if any(wanted == prefix or wanted.startswith(f"{prefix}/")
               for prefix in (self.topics.prefix, *self.refused_prefixes)):
            return self.topics.reply(request.name)
        return wanted


def _base64(value: object, key: str) -> bytes:
    if not isinstance(value, str):
        raise CommandError("BadRequest", f"{key} must be base64 text, not {_shown(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise CommandError("BadRequest", f"{key} is not valid base64: {err}") from err


def _shown(value: object) -> str:
    text = json.dumps(value, default=str)
    return f"{type(value).__name__} {text[:40]}{'…' if len(text) > 40 else ''}"
