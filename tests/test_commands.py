"""MQTT requests (issue 8, item 5): `search`, `enroll` and `rescan` on `<base>/cmd/<name>`.

End to end, against the real `dinowatch run` process (tiny stand-in model) and a real
Mosquitto, with paho clients of the test's own speaking MQTT 5 and MQTT 3.1.1:

* a search over MQTT 5 gets exactly one reply, on its response topic, with its correlation
  data; it searches by raw image bytes, a base64 image, a base64 float32 vector (taken from
  the image's `embedding` message) and a path inside a watched folder; over MQTT 3.1.1 the
  reply comes on `<base>/cmd/search/reply` and echoes the request's `id`;
* paths outside the watched folders and the gallery (absolute elsewhere, relative, with a
  `..` part, a symbolic link out, a NUL byte) are refused with `Forbidden` for search and
  enroll; the file is not read (its access time stays) and nothing lands in the gallery;
* a file `dinowatch index` recorded in a watched folder before the daemon read it (the
  daemon paused meanwhile) is found by a search once the watcher reports it, and a copy
  of it gets a duplicate event naming it;
* oversized, malformed and wrong-typed requests, an unknown command and a response topic
  under the device's own topics each get one error reply (on the default reply topic
  where that applies), and the daemon keeps working; a response topic under any
  dinowatch device's topics or Home Assistant's discovery prefix gets nothing published
  on it; a lone surrogate (JSON "\\ud800") in an id or label still gets exactly one reply;
* enroll writes a reference into `<gallery>/<label>/`, which the daemon embeds and later
  matches (a `match` event with the label); bad labels are refused;
* rescan lists the watched folders and the gallery, and refuses a folder it does not watch;
* a daemon with `mqtt.commands {burst: 3, per_minute: 6}` answers 3 of 10 requests sent
  at once, refuses with `RateLimited`, and stays up.

Then direct tests of `Commands.resolve`, `Commands.reply_topic`, `Commands.answer` and
`RateLimit` on a real embedder (tiny stand-in model) and a real `Matcher`; a search or
enroll by a path larger than `imaging.max_pixels` allows is refused before it is read.

Thresholds for the tiny stand-in model (measured): a 320x240 scene against itself re-encoded
at JPEG quality 60 scores >= 0.995; different scenes at most ~0.94. The gallery threshold
here is 0.98.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image, PngImagePlugin

from conftest import Mosquitto, Subscriber
from daemon_process import DaemonProcess, wait_until, write_config
from dinowatch.commands import CommandError, Commands, RateLimit, Reply, Request
from dinowatch.config import CommandSettings, MatchingSettings
from dinowatch.embedder import DinoEmbedder
from dinowatch.imaging import ImagingOptions
from dinowatch.match import Matcher
from dinowatch.mqtt import Topics
from dinowatch.testing import synthetic_photo

DEVICE = "cmd-pi"
BASE = f"dinowatch/{DEVICE}"
TIMEOUT = 30.0  # generous: CI has two noisy cores
THRESHOLD = 0.98  # gallery threshold for the tiny stand-in (see the module docstring)
OLD = 946_684_800  # 2000-01-01: an access time any read updates (relatime included)
QUIET = 1.0  # seconds to wait for a reply that must not come


def jpeg(seed: int, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    synthetic_photo(320, 240, seed=seed).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.exists() else set()


# ---- a requesting client of the test's own --------------------------------------------------

class Answer(NamedTuple):
    topic: str
    body: dict[str, Any]
    correlation: bytes | None


class Requester:
    """A paho client (MQTT 5 or 3.1.1) that publishes requests and records what arrives on
    `topics`, with the MQTT 5 correlation data."""

    def __init__(self, broker: Mosquitto, protocol: int, *topics: str) -> None:
        self.protocol = protocol
        self.name = f"test-req-{uuid.uuid4().hex[:8]}"
        self.inbox = f"test/{self.name}/answers"  # the MQTT 5 response topic
        self.topics = (*topics, self.inbox) if protocol == paho.MQTTv5 else topics
        self._lock = threading.Lock()
        self._answers: list[Answer] = []
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.name,
                                  protocol=protocol)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self._subscribed.wait(TIMEOUT), f"{self.name} could not subscribe"

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        client.subscribe([(topic, 1) for topic in self.topics])

    def subscribe(self, topic: str) -> None:
        """One more topic, once the broker has acknowledged it."""
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(TIMEOUT), f"{self.name} could not subscribe to {topic}"

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        properties = getattr(message, "properties", None)
        try:
            body = json.loads(message.payload)
        except ValueError:
            body = {"not json": message.payload[:200].decode(errors="replace")}
        with self._lock:
            self._answers.append(Answer(message.topic, body,
                                        getattr(properties, "CorrelationData", None)))

    @property
    def answers(self) -> list[Answer]:
        with self._lock:
            return list(self._answers)

    def send(self, name: str, payload: bytes | dict[str, Any], *,
             response_topic: str | None = None, correlation: bytes | None = None) -> None:
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        properties = None
        if response_topic is not None or correlation is not None:
            assert self.protocol == paho.MQTTv5, "MQTT 3.1.1 has no response topic"
            properties = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
        info = self.client.publish(f"{BASE}/cmd/{name}", data, qos=1, properties=properties)
        info.wait_for_publish(TIMEOUT)

    def wait(self, predicate: Callable[[Answer], bool], count: int = 1,
             timeout: float = TIMEOUT) -> list[Answer]:
        """The answers matching `predicate` once there are at least `count`."""
        deadline = time.monotonic() + timeout
        while len(found := [a for a in self.answers if predicate(a)]) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: {len(found)} of {count} answers after {timeout} s;"
                            f" last answers: {self.answers[-5:]}", pytrace=False)
            time.sleep(0.05)
        return found

    def ask(self, name: str, payload: bytes | dict[str, Any], *,
            response_topic: str | None = None) -> Answer:
        """Send one request and return its reply: MQTT 5 pairs them by correlation data
        (the reply goes to our response topic unless `response_topic` says otherwise),
        MQTT 3.1.1 by the JSON request's `id`."""
        if self.protocol == paho.MQTTv5:
            correlation = uuid.uuid4().bytes
            self.send(name, payload, correlation=correlation,
                      response_topic=self.inbox if response_topic is None else response_topic)
            [answer] = self.wait(lambda a: a.correlation == correlation)
            return answer
        assert isinstance(payload, dict), "MQTT 3.1.1 replies are paired by the JSON id"
        request_id = uuid.uuid4().hex
        self.send(name, {**payload, "id": request_id})
        [answer] = self.wait(lambda a: a.body.get("id") == request_id)
        return answer

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---- one daemon for most checks ---------------------------------------------------------------

@dataclass
class Site:
    broker: Mosquitto
    daemon: DaemonProcess
    inbox: Path
    gallery: Path
    outside: Path
    secret: Path
    staging: Path
    linked: Path  # a watched folder configured by a symbolic link's name
    everything: Subscriber  # <base>/#
    v5: Requester
    v311: Requester
    dropped: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> embedding

    def embeddings(self) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.everything.messages
                if m.topic == f"{BASE}/embedding"]

    def matches(self) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.everything.messages
                if m.topic == f"{BASE}/match"]

    def embedding_of(self, path: Path) -> dict[str, Any]:
        self.everything.wait_for(lambda _: any(e["path"] == str(path)
                                               for e in self.embeddings()), TIMEOUT)
        return next(e for e in self.embeddings() if e["path"] == str(path))

    def drop(self, name: str, data: bytes) -> dict[str, Any]:
        """Put an image into the inbox at once (a rename) and wait for its embedding."""
        staged = self.staging / name
        staged.write_bytes(data)
        staged.replace(self.inbox / name)
        self.dropped[name] = self.embedding_of(self.inbox / name)
        return self.dropped[name]


def wait_for_commands(broker: Mosquitto, device: str) -> None:
    """Until the daemon has subscribed to its requests (after READY=1: it connects in the
    background), seen in the broker's log (`log_type all`)."""
    line = f": dinowatch-{device} 1 dinowatch/{device}/cmd/+"
    wait_until(lambda: any(x.endswith(line) for x in broker.log.splitlines()), TIMEOUT,
               f"dinowatch-{device} to subscribe to its requests")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto,
         tiny_model: Path) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("commands")
    inbox, data, outside, staging = (root / name for name in ("inbox", "data", "outside",
                                                              "staging"))
    for folder in (inbox, data, outside, staging, inbox / "sub", root / "cameras"):
        folder.mkdir()
    linked = root / "cameras-link"  # e.g. /home/pi/cameras -> /mnt/usb/cameras
    linked.symlink_to(root / "cameras", target_is_directory=True)
    secret = outside / "secret.jpg"  # a real image, so only the rule keeps it out
    secret.write_bytes(jpeg(99))
    os.utime(secret, (OLD, OLD))
    config = write_config(root / "config.yaml", device_id=DEVICE, data_dir=str(data),
                          model={"path": str(tiny_model)},
                          watch=[{"path": str(inbox), "source": "inbox",
                                  "settle_seconds": 0.5}, {"path": str(linked)}],
                          matching={"threshold": THRESHOLD},
                          mqtt={"host": broker.host, "port": broker.port,
                                # generous: this module's requests must not be rate-limited
                                "commands": {"burst": 200, "per_minute": 6000}})
    everything = Subscriber(broker, (f"{BASE}/#",))
    v5 = Requester(broker, paho.MQTTv5, f"{BASE}/cmd/+/reply")
    v311 = Requester(broker, paho.MQTTv311, f"{BASE}/cmd/+/reply")
    daemon = DaemonProcess(config, root)
    try:
        daemon.start()
        wait_for_commands(broker, DEVICE)
        yield Site(broker, daemon, inbox, data / "gallery", outside, secret, staging, linked,
                   everything, v5, v311)
        assert daemon.stop() == 0, daemon.log()[-3000:]
    finally:
        if daemon.process and daemon.process.poll() is None:
            daemon.kill()
        for client in (v5, v311, everything):
            client.close()


@pytest.fixture(scope="module")
def scenes(site: Site) -> dict[str, bytes]:
    """Three different scenes dropped into the inbox (and embedded) before searching."""
    images = {f"scene{seed}.jpg": jpeg(seed) for seed in (11, 12, 13)}
    for name, data in images.items():
        site.drop(name, data)
    return images


def assert_search_results(body: dict[str, Any], site: Site, best: Path) -> None:
    assert body["ok"] is True, body
    results = body["results"]
    assert 1 <= len(results) <= body["k"]
    scores = [hit["score"] for hit in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["path"] == str(best)
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert results[0]["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    assert results[0]["label"] is None
    for hit in results:  # only indexed images: the inbox's and the gallery's
        path = Path(hit["path"])
        assert path.is_relative_to(site.inbox) or path.is_relative_to(site.gallery), hit
        assert -1.0 <= hit["score"] <= 1.0


# ---- 1. search over MQTT 5 ------------------------------------------------------------------

def test_search_over_mqtt5_replies_once_on_the_response_topic_with_the_correlation_data(
        site: Site, scenes: dict[str, bytes]) -> None:
    correlation = b"\x00\xffcorrelation-" + uuid.uuid4().bytes  # binary, not text
    best = site.inbox / "scene11.jpg"
    site.v5.send("search", scenes["scene11.jpg"], response_topic=site.v5.inbox,
                 correlation=correlation)
    [answer] = site.v5.wait(lambda a: a.correlation == correlation)
    time.sleep(QUIET)  # a second reply would arrive now
    assert [a for a in site.v5.answers if a.correlation == correlation] == [answer]
    assert answer.topic == site.v5.inbox
    assert answer.body["k"] == 5  # the default
    assert_search_results(answer.body, site, best)
    # nothing on the default reply topic for it
    assert not [a for a in site.v5.answers if a.topic == f"{BASE}/cmd/search/reply"
                and a.correlation == correlation]


@pytest.mark.parametrize("form", ["image", "vector", "path"])
def test_search_by_base64_image_vector_and_path(site: Site, scenes: dict[str, bytes],
                                                form: str) -> None:
    best = site.inbox / "scene12.jpg"
    query: dict[str, Any] = {
        "image": {"image": b64(scenes["scene12.jpg"])},
        "vector": {"vector": site.dropped["scene12.jpg"]["vector"]},  # as published
        "path": {"path": str(best)},
    }[form]
    answer = site.v5.ask("search", {**query, "k": 50})
    assert answer.topic == site.v5.inbox
    body = answer.body
    assert body["k"] == 50
    assert_search_results(body, site, best)
    found = {hit["path"]: hit["score"] for hit in body["results"]}
    assert {str(site.inbox / name) for name in scenes} <= set(found)
    # different scenes score lower than the image itself
    assert found[str(site.inbox / "scene11.jpg")] < 0.97
    assert found[str(site.inbox / "scene13.jpg")] < 0.97


def test_search_with_k_returns_at_most_k_results(site: Site, scenes: dict[str, bytes]) -> None:
    body = site.v5.ask("search", {"image": b64(scenes["scene13.jpg"]), "k": 2}).body
    assert body["ok"] is True and body["k"] == 2 and len(body["results"]) == 2
    assert body["results"][0]["path"] == str(site.inbox / "scene13.jpg")


def test_search_results_name_a_file_whose_name_is_not_utf8_exactly(site: Site) -> None:
    data = jpeg(15)
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes from an old camera or SMB share
    exact = base64.b64encode(os.fsencode(site.inbox / name)).decode()
    (site.staging / name).write_bytes(data)
    (site.staging / name).replace(site.inbox / name)
    site.everything.wait_for(lambda _: any(e.get("path_bytes") == exact
                                           for e in site.embeddings()), TIMEOUT)
    [hit] = site.v5.ask("search", {"image": b64(data), "k": 1}).body["results"]
    assert hit["path"] == f"{site.inbox}/caf\\xe9.jpg"  # valid UTF-8, as DESIGN says
    assert hit["path_bytes"] == exact
    assert hit["score"] == pytest.approx(1.0, abs=1e-3)


def test_search_finds_a_file_dinowatch_index_recorded_in_a_watched_folder(site: Site) -> None:
    """`dinowatch index` on a watched folder while the daemon runs may record a file before
    the daemon reads it (here the daemon is paused with SIGSTOP meanwhile, as a busy one
    would be). When the watcher then reports the file, the daemon finds it recorded and
    unchanged: it must still join the daemon's index, for searches and duplicates."""
    folder = site.inbox / "by-cli"
    folder.mkdir()
    data = jpeg(71)
    recorded = folder / "recorded.jpg"
    site.daemon.signal(signal.SIGSTOP)
    try:
        recorded.write_bytes(data)
        result = subprocess.run([sys.executable, "-m", "dinowatch.cli", "index", "-c",
                                 str(site.daemon.config), str(folder)],
                                capture_output=True, text=True, timeout=120, check=False)
    finally:
        site.daemon.signal(signal.SIGCONT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 files: 1 recorded"), result.stdout

    def found() -> list[dict[str, Any]]:
        body = site.v5.ask("search", {"image": b64(data), "k": 3}).body
        return [hit for hit in body["results"] if hit["path"] == str(recorded)]

    wait_until(found, TIMEOUT, f"a search to find {recorded}")
    [hit] = found()
    assert hit["score"] == pytest.approx(1.0, abs=1e-3)
    assert hit["sha256"] == hashlib.sha256(data).hexdigest()
    copy = site.inbox / "recorded-copy.jpg"
    site.drop(copy.name, data)
    site.everything.wait_for(lambda _: any(m["image"]["path"] == str(copy)
                                           for m in site.matches()), TIMEOUT)
    duplicates = [m for m in site.matches()
                  if m["image"]["path"] == str(copy) and m["kind"] == "duplicate"]
    assert [(m["reference"]["path"], m["score"]) for m in duplicates] == [(str(recorded), 1.0)]


# ---- 2. search over MQTT 3.1.1 ----------------------------------------------------------------

def test_search_over_mqtt311_replies_on_the_reply_topic_echoing_the_id(
        site: Site, scenes: dict[str, bytes]) -> None:
    request_id = f"req-{uuid.uuid4().hex}"
    site.v311.send("search", {"id": request_id, "image": b64(scenes["scene13.jpg"]), "k": 3})
    [answer] = site.v311.wait(lambda a: a.body.get("id") == request_id)
    assert answer.topic == f"{BASE}/cmd/search/reply"
    assert answer.correlation is None
    assert answer.body["k"] == 3 and len(answer.body["results"]) == 3
    assert_search_results(answer.body, site, site.inbox / "scene13.jpg")
    # an error reply echoes the id too (text or an integer)
    number_id = int(uuid.uuid4().hex[:12], 16)
    site.v311.send("search", {"id": number_id, "k": 0})
    [error] = site.v311.wait(lambda a: a.body.get("id") == number_id)
    assert (error.body["ok"], error.body["error"]) == (False, "BadRequest")
    # an id that is an object, or too long, is not echoed: a reply carries no planted payload
    def unnamed(answer: Answer) -> bool:
        return answer.body.get("error") == "BadRequest" and "id" not in answer.body

    before = len([a for a in site.v311.answers if unnamed(a)])
    for planted in ({"state_topic": "x"}, "x" * 129):
        site.v311.send("search", {"id": planted, "k": 0})
    site.v311.wait(unnamed, count=before + 2)


# ---- 3. paths that are refused ----------------------------------------------------------------

def refused_paths(site: Site) -> dict[str, str]:
    """Each a path that must be refused; the comment says why."""
    inbox = site.inbox
    (inbox / "escape.txt").unlink(missing_ok=True)  # not an image name: the watcher skips it
    (inbox / "escape.txt").symlink_to(site.secret)
    (inbox / "outlink").unlink(missing_ok=True)  # a symbolic link to a folder outside
    (inbox / "outlink").symlink_to(site.outside, target_is_directory=True)
    return {
        "elsewhere": "/etc/passwd",
        "outside": str(site.secret),
        "relative": "scene11.jpg",
        "relative inside": os.path.relpath(inbox / "scene11.jpg"),
        "dot-dot landing inside": f"{inbox}/sub/../scene11.jpg",
        "dot-dot out": f"{inbox}/../outside/secret.jpg",
        "symlink out": str(inbox / "escape.txt"),
        "symlinked folder out": str(inbox / "outlink" / "secret.jpg"),
        "NUL": f"{inbox}/scene11.jpg\0.txt",
    }


def test_paths_outside_the_allowed_folders_are_forbidden_and_not_read(
        site: Site, scenes: dict[str, bytes]) -> None:
    gallery_before = files_under(site.gallery)
    paths = refused_paths(site)
    assert (site.inbox / "sub" / ".." / "scene11.jpg").resolve().is_file()  # really inside
    for why, path in paths.items():
        for name, body in (("search", {"path": path}),
                           ("enroll", {"label": "intruder", "path": path})):
            answer = site.v5.ask(name, body).body
            assert answer["ok"] is False and answer["error"] == "Forbidden", (why, name, answer)
            assert answer["message"]
    # a rescan of a folder outside is refused the same way
    for folder in ("/etc", str(site.outside), str(site.inbox / "outlink")):
        answer = site.v5.ask("rescan", {"path": folder}).body
        assert answer["error"] == "Forbidden", (folder, answer)
    assert files_under(site.gallery) == gallery_before
    assert not (site.gallery / "intruder").exists()
    assert site.secret.stat().st_atime == OLD, "the daemon read the file outside"
    # ... and the access time does show a read here: a file inside, read by a search
    control = site.inbox / "control.dat"  # not an image name: only the request reads it
    control.write_bytes(scenes["scene11.jpg"])
    os.utime(control, (OLD, OLD))
    answer = site.v5.ask("search", {"path": str(control)}).body
    assert answer["ok"] is True and answer["results"][0]["path"] == str(
        site.inbox / "scene11.jpg")
    assert control.stat().st_atime != OLD


@pytest.mark.parametrize("path", [None, 5, ["/etc/passwd"], ""])
def test_a_path_that_is_not_text_is_a_bad_request(site: Site, path: object) -> None:
    answer = site.v5.ask("search", {"path": path}).body
    assert (answer["ok"], answer["error"]) == (False, "BadRequest")


def test_a_missing_file_inside_is_not_found(site: Site) -> None:
    answer = site.v5.ask("search", {"path": str(site.inbox / "nothing-here.jpg")}).body
    assert (answer["ok"], answer["error"]) == (False, "NotFound")


# ---- 4. bad requests, and the daemon keeps working ---------------------------------------------

def test_oversized_malformed_and_wrong_typed_requests_get_error_replies(
        site: Site, scenes: dict[str, bytes]) -> None:
    v5 = site.v5
    fifty_mb = b"\xff\xd8" + bytes(50 * 1024 * 1024)
    assert v5.ask("search", fifty_mb).body["error"] == "PayloadTooLarge"
    assert v5.ask("enroll", b'{"label": "x", "image": "' + b"A" * (9 << 20) + b'"}'
                  ).body["error"] == "PayloadTooLarge"
    for payload in (b'{"k": 5,', b'{"image": "abc"', b'{"k": "\xff"}'):
        body = v5.ask("search", payload).body
        assert (body["ok"], body["error"]) == (False, "InvalidJSON"), payload
        assert "id" not in body
    assert v5.ask("enroll", b"not json").body["error"] == "InvalidJSON"
    image = b64(scenes["scene11.jpg"])
    for request in ({"image": image, "k": "5"}, {"image": image, "k": True},
                    {"image": image, "k": 0}, {"image": image, "k": 101},
                    {"image": image, "k": 2.5}, {"image": "not base64!"},
                    {"vector": b64(b"\0\0\x80\x3f" * 10)},  # 10 floats, not 384
                    {"vector": 1.0}, {}, {"image": image, "path": "/etc/passwd"}):
        body = v5.ask("search", request).body
        assert (body["ok"], body["error"]) == (False, "BadRequest"), (request, body)
    for payload in (b"[1, 2]", b'"text"', b"null"):  # JSON, but not an object
        assert v5.ask("rescan", payload).body["error"] == "BadRequest", payload
    body = v5.ask("search", b"this is not a picture").body  # raw bytes: not an image
    assert (body["ok"], body["error"]) == (False, "UnidentifiedImageError"), body


def test_unknown_command_gets_an_error_on_its_reply_topic(site: Site) -> None:
    correlation = uuid.uuid4().bytes
    site.v5.send("nope", {"x": 1}, correlation=correlation)  # no response topic
    [answer] = site.v5.wait(lambda a: a.correlation == correlation)
    assert answer.topic == f"{BASE}/cmd/nope/reply"
    assert (answer.body["ok"], answer.body["error"]) == (False, "UnknownCommand")
    request_id = uuid.uuid4().hex
    site.v311.send("nope", {"id": request_id})
    [answer] = site.v311.wait(lambda a: a.body.get("id") == request_id)
    assert answer.topic == f"{BASE}/cmd/nope/reply"
    assert answer.body["error"] == "UnknownCommand"


@pytest.mark.parametrize("suffix", ["embedding", "status", "match", "cmd/search", "cmd/enroll"])
def test_a_response_topic_on_the_devices_own_topics_is_not_used(
        site: Site, scenes: dict[str, bytes], suffix: str) -> None:
    request_id = uuid.uuid4().hex
    own = f"{BASE}/{suffix}"
    answer = site.v5.ask("search", {"id": request_id, "image": b64(scenes["scene11.jpg"])},
                         response_topic=own)
    assert answer.topic == f"{BASE}/cmd/search/reply"
    assert answer.body["ok"] is True
    time.sleep(QUIET)
    posing = [m for m in site.everything.messages if m.topic == own  # (not our request)
              and request_id.encode() in m.payload and b'"ok":' in m.payload]
    assert posing == []


def test_a_response_topic_deeper_under_the_reply_topic_is_used(site: Site) -> None:
    deeper = f"{BASE}/cmd/search/reply/{site.v5.name}"
    site.v5.subscribe(deeper)
    answer = site.v5.ask("search", {"vector": b64(np.ones(384, "<f4").tobytes()), "k": 1},
                         response_topic=deeper)
    assert answer.topic == deeper and answer.body["ok"] is True


def test_a_response_topic_under_dinowatch_or_home_assistant_topics_is_not_used(
        site: Site, broker: Mosquitto) -> None:
    """A reply must not pose as another dinowatch's message or request, nor as a Home
    Assistant discovery config or birth message: it goes to the default reply topic and
    nothing at all is published on the topic asked for."""
    refused = ["homeassistant/status", "homeassistant/sensor/x/config",
               "dinowatch/other-pi/cmd/search", "dinowatch/other-pi/embedding", "dinowatch"]
    watcher = Requester(broker, paho.MQTTv5, *refused, f"{BASE}/cmd/search/reply")
    try:
        vector = b64(np.ones(384, "<f4").tobytes())
        for topic in refused:
            answer = watcher.ask("search", {"vector": vector, "k": 1}, response_topic=topic)
            assert (answer.topic, answer.body["ok"]) == (f"{BASE}/cmd/search/reply", True), \
                topic
        time.sleep(QUIET)  # a reply on a refused topic would have arrived by now
        assert [a for a in watcher.answers if a.topic in refused] == []
    finally:
        watcher.close()


def test_a_lone_surrogate_in_a_request_still_gets_exactly_one_reply(site: Site) -> None:
    """JSON may carry "\\ud800", which no UTF-8 text can hold: in an id it is echoed (as the
    same JSON escape), in a label it is a bad request and nothing reaches the gallery."""
    before = files_under(site.gallery)
    vector = b64(np.ones(384, "<f4").tobytes())
    requests = [("search", {"id": "\ud800", "vector": vector, "k": 1}, True),
                ("enroll", {"label": "\ud800", "image": b64(jpeg(50))}, False),
                ("enroll", {"id": "x\udcff", "label": "van\udcff", "image": b64(jpeg(50))},
                 False)]
    sent = []
    for name, body, ok in requests:
        correlation = uuid.uuid4().bytes
        site.v5.send(name, body, response_topic=site.v5.inbox, correlation=correlation)
        sent.append((correlation, body, ok))
    for correlation, body, ok in sent:
        [answer] = site.v5.wait(lambda a, c=correlation: a.correlation == c)
        assert answer.body["ok"] is ok, answer.body
        assert answer.body.get("id") == body.get("id")
        if not ok:
            assert answer.body["error"] == "BadRequest", answer.body
    time.sleep(QUIET)  # a second reply would arrive now
    correlations = [c for c, _, _ in sent]
    assert sorted(a.correlation for a in site.v5.answers
                  if a.correlation in correlations) == sorted(correlations)
    assert files_under(site.gallery) == before  # no folder either


def test_after_all_that_the_daemon_still_works(site: Site, scenes: dict[str, bytes]) -> None:
    assert site.daemon.process is not None and site.daemon.process.poll() is None
    embedding = site.drop("after-errors.jpg", jpeg(21))
    assert embedding["source"] == "inbox"
    body = site.v5.ask("search", {"vector": embedding["vector"], "k": 1}).body
    assert body["results"][0]["path"] == str(site.inbox / "after-errors.jpg")
    assert site.daemon.process.poll() is None
    assert "Traceback" not in site.daemon.log()


# ---- 5. enroll --------------------------------------------------------------------------------

def test_enroll_by_image_then_a_matching_image_gives_a_match_event(site: Site) -> None:
    reference = jpeg(40)
    answer = site.v5.ask("enroll", {"label": "van", "image": b64(reference)}).body
    assert answer["ok"] is True and answer["label"] == "van", answer
    enrolled = Path(answer["path"])
    assert enrolled.parent == site.gallery / "van"
    assert enrolled.read_bytes() == reference
    assert site.embedding_of(enrolled)["source"] == "gallery"  # the daemon embedded it
    site.drop("van-at-the-gate.jpg", jpeg(40, quality=60))  # the same scene, re-encoded
    site.everything.wait_for(lambda _: any(m["image"]["path"].endswith("van-at-the-gate.jpg")
                                           for m in site.matches()), TIMEOUT)
    gallery = [m for m in site.matches() if m["image"]["path"] == str(
        site.inbox / "van-at-the-gate.jpg") and m["kind"] == "gallery"]
    assert len(gallery) == 1, site.matches()
    event = gallery[0]
    assert event["label"] == "van" and event["score"] >= THRESHOLD
    assert event["reference"]["path"] == str(enrolled)
    assert event["reference"]["sha256"] == hashlib.sha256(reference).hexdigest()
    # an unrelated scene matches no label
    site.drop("unrelated.jpg", jpeg(41))
    time.sleep(QUIET)
    assert not [m for m in site.matches() if m["image"]["path"].endswith("unrelated.jpg")]
    # the same bytes enrolled again: one file
    again = site.v5.ask("enroll", {"label": "van", "image": b64(reference)}).body
    assert again["path"] == str(enrolled)
    assert [p.name for p in (site.gallery / "van").iterdir()] == [enrolled.name]


def test_enroll_by_path_inside_a_watched_folder_copies_it_into_the_gallery(
        site: Site) -> None:
    data = jpeg(14)
    source = site.inbox / "gate.jpg"
    site.drop(source.name, data)
    answer = site.v311.ask("enroll", {"label": "gate", "path": str(source)}).body
    assert answer["ok"] is True and answer["label"] == "gate", answer
    copy = Path(answer["path"])
    assert copy == site.gallery / "gate" / "gate.jpg"
    assert copy.read_bytes() == data
    assert source.read_bytes() == data  # left where it was
    assert site.embedding_of(copy)["source"] == "gallery"
    hits = site.v5.ask("search", {"path": str(source), "k": 2}).body["results"]
    assert {(hit["path"], hit["label"]) for hit in hits} == {(str(source), None),
                                                             (str(copy), "gate")}
    assert all(hit["score"] == pytest.approx(1.0, abs=1e-3) for hit in hits)


@pytest.mark.parametrize("label", ["../x", "", ".hidden", "a/b", " van", 5, None, "x" * 101])
def test_enroll_with_a_bad_label_is_a_bad_request(site: Site, label: object) -> None:
    before = files_under(site.gallery)
    answer = site.v5.ask("enroll", {"label": label, "image": b64(jpeg(50))}).body
    assert (answer["ok"], answer["error"]) == (False, "BadRequest"), answer
    assert files_under(site.gallery) == before
    assert not (site.gallery.parent / "x").exists()


def test_enroll_refuses_what_is_not_an_image(site: Site) -> None:
    before = files_under(site.gallery)
    answer = site.v5.ask("enroll", {"label": "junk", "image": b64(b"plain text")}).body
    assert (answer["ok"], answer["error"]) == (False, "UnidentifiedImageError"), answer
    assert "Traceback" not in site.daemon.log()  # the decoder's own error, not a bug
    for body in ({"label": "junk"}, {"label": "junk", "image": b64(jpeg(50)), "path": "/x"}):
        assert site.v5.ask("enroll", body).body["error"] == "BadRequest"
    assert files_under(site.gallery) == before


# ---- 6. rescan ----------------------------------------------------------------------------------

def test_rescan_lists_the_watched_folders_and_the_gallery(site: Site) -> None:
    answer = site.v5.ask("rescan", {}).body
    assert answer["ok"] is True
    assert sorted(answer["folders"]) == sorted([str(site.inbox), str(site.gallery),
                                                str(site.linked)])
    assert site.v5.ask("rescan", b"").body["folders"] == answer["folders"]  # empty: all
    one = site.v311.ask("rescan", {"path": str(site.inbox)}).body
    assert one["ok"] is True and one["folders"] == [str(site.inbox)]


def test_rescan_of_a_folder_watched_by_a_symlinks_name(site: Site) -> None:
    """The folder exactly as `rescan` listed it (as configured) can be rescanned."""
    listed = site.v5.ask("rescan", {}).body["folders"]
    assert str(site.linked) in listed
    answer = site.v5.ask("rescan", {"path": str(site.linked)}).body
    assert answer == {"ok": True, "folders": [str(site.linked)]}


def test_rescan_of_a_folder_that_is_not_watched_is_refused(site: Site) -> None:
    inside = site.v5.ask("rescan", {"path": str(site.inbox / "sub")}).body
    assert inside["ok"] is False and inside["error"] == "NotWatched", inside
    missing = site.v5.ask("rescan", {"path": str(site.inbox / "no-such-folder")}).body
    assert missing["ok"] is False and missing["error"] == "NotFound", missing
    a_file = site.v5.ask("rescan", {"path": str(site.secret)}).body
    assert a_file["ok"] is False and a_file["error"] == "Forbidden"


# ---- 7. rate limit (a daemon of its own) -------------------------------------------------------

def test_rate_limit_answers_the_burst_refuses_the_rest_and_stays_up(
        tmp_path: Path, broker: Mosquitto, tiny_model: Path) -> None:
    device = "cmd-rl"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = write_config(tmp_path / "config.yaml", device_id=device,
                          data_dir=str(tmp_path / "data"), model={"path": str(tiny_model)},
                          watch=[{"path": str(inbox), "settle_seconds": 0.5}],
                          mqtt={"host": broker.host, "port": broker.port,
                                "commands": {"burst": 3, "per_minute": 6}})
    embeddings = Subscriber(broker, (f"dinowatch/{device}/embedding",))
    requester = Requester(broker, paho.MQTTv5)
    try:
        with DaemonProcess(config, tmp_path) as daemon:
            daemon.start()
            wait_for_commands(broker, device)
            vector = b64(np.ones(384, "<f4").tobytes())
            sent = [uuid.uuid4().bytes for _ in range(10)]
            properties = []
            for correlation in sent:
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic, props.CorrelationData = requester.inbox, correlation
                properties.append(props)
            infos = [requester.client.publish(f"dinowatch/{device}/cmd/search",
                                              json.dumps({"vector": vector}), qos=1,
                                              properties=props) for props in properties]
            for info in infos:
                info.wait_for_publish(TIMEOUT)
            requester.wait(lambda a: True, count=4)  # 3 answers and a refusal
            time.sleep(2 * QUIET)  # any further replies would arrive now
            answers = requester.answers
            assert len(answers) <= 10
            assert all(a.correlation in sent for a in answers)
            assert len({a.correlation for a in answers}) == len(answers)  # one each at most
            ok = [a for a in answers if a.body["ok"] is True]
            limited = [a for a in answers if a.body.get("error") == "RateLimited"]
            assert len(ok) == 3 and len(limited) >= 1, answers
            assert len(ok) + len(limited) == len(answers)
            assert all(a.topic == requester.inbox for a in answers)
            # the daemon stays up and keeps embedding
            assert daemon.process is not None and daemon.process.poll() is None
            synthetic_photo(320, 240, seed=60).save(inbox / "later.jpg")
            embeddings.wait_for(lambda m: len(m) >= 1, TIMEOUT)
            assert daemon.process.poll() is None
            assert daemon.stop() == 0
    finally:
        requester.close()
        embeddings.close()


# ---- Commands directly: resolve, reply_topic, answer, RateLimit ---------------------------------

@dataclass
class Direct:
    commands: Commands
    watched: Path
    gallery: Path
    outside: Path
    sent: list[Reply]
    rescanned: list[Path | None]


@pytest.fixture(scope="module")
def embedder(tiny_model: Path) -> Iterator[DinoEmbedder]:
    embedder = DinoEmbedder(tiny_model)
    yield embedder
    embedder.close()


@pytest.fixture
def direct(tmp_path: Path, embedder: DinoEmbedder) -> Direct:
    watched, gallery, outside = tmp_path / "watched", tmp_path / "gallery", tmp_path / "outside"
    for folder in (watched, gallery, outside, watched / "deeper"):
        folder.mkdir()
    matcher = Matcher(MatchingSettings(), gallery, [], dim=embedder.dim)
    sent: list[Reply] = []
    rescanned: list[Path | None] = []

    def rescan(folder: Path | None) -> list[Path]:
        rescanned.append(folder)
        return [watched] if folder in (None, watched) else []

    commands = Commands(CommandSettings(max_k=20), Topics("dinowatch", "unit"),
                        embedder=embedder, matcher=matcher, gallery_dir=gallery,
                        roots=lambda: [watched], rescan=rescan, send=sent.append)
    return Direct(commands, watched, gallery, outside, sent, rescanned)


def refusal(direct: Direct, value: object, *, folder: bool = False) -> str:
    try:
        direct.commands.resolve(value, folder=folder)
    except CommandError as err:
        return err.kind
    return "accepted"


def test_resolve_accepts_files_inside_and_refuses_the_rest(direct: Direct) -> None:
    inside = direct.watched / "deeper" / "a.jpg"
    inside.write_bytes(b"x")
    odd = direct.watched / "..not-a-parent.jpg"  # a name starting with dots is no `..` part
    odd.write_bytes(b"x")
    referenced = direct.gallery / "van" / "ref.jpg"
    referenced.parent.mkdir()
    referenced.write_bytes(b"x")
    secret = direct.outside / "secret.jpg"
    secret.write_bytes(b"x")
    (direct.watched / "link.jpg").symlink_to(secret)
    (direct.watched / "inner.jpg").symlink_to(inside)  # a link that stays inside is fine
    (direct.watched / "out").symlink_to(direct.outside, target_is_directory=True)
    sibling = direct.watched.parent / "watched-not"  # shares the root's name as a prefix
    sibling.mkdir()
    (sibling / "b.jpg").write_bytes(b"x")
    assert direct.commands.resolve(str(inside)) == inside
    assert direct.commands.resolve(str(odd)) == odd
    assert direct.commands.resolve(str(referenced)) == referenced
    assert direct.commands.resolve(str(direct.watched / "inner.jpg")) == inside
    assert direct.commands.resolve(f"{direct.watched}//deeper/./a.jpg") == inside
    assert direct.commands.resolve(str(direct.watched), folder=True) == direct.watched
    cases: list[tuple[object, str]] = [
        (str(secret), "Forbidden"),
        (str(direct.watched / "link.jpg"), "Forbidden"),
        (str(direct.watched / "out" / "secret.jpg"), "Forbidden"),
        (f"{direct.watched}/deeper/../deeper/a.jpg", "Forbidden"),
        (str(sibling / "b.jpg"), "Forbidden"),
        ("deeper/a.jpg", "Forbidden"),
        ("./a.jpg", "Forbidden"),
        ("~/a.jpg", "Forbidden"),
        (f"{inside}\0", "Forbidden"),
        ("/", "Forbidden"),
        (str(direct.watched / "deeper" / "missing.jpg"), "NotFound"),
        (str(direct.watched / "deeper"), "NotFound"),  # a folder, where a file is wanted
        ("", "BadRequest"),
        (None, "BadRequest"),
        (b"/etc/passwd", "BadRequest"),
        (["/etc/passwd"], "BadRequest"),
    ]
    assert [(value, refusal(direct, value)) for value, _ in cases] == cases
    assert refusal(direct, str(inside), folder=True) == "NotFound"  # a file, not a folder
    assert refusal(direct, str(direct.outside), folder=True) == "Forbidden"


def test_reply_topic_keeps_replies_off_the_devices_own_topics(direct: Direct) -> None:
    base, default = "dinowatch/unit", "dinowatch/unit/cmd/search/reply"

    def topic(wanted: str | None) -> str:
        return direct.commands.reply_topic(Request("search", b"", response_topic=wanted))

    assert topic(None) == default
    assert topic("") == default
    for own in ("embedding", "status", "stats", "match", "last_match", "label/van",
                "cmd/search", "cmd/enroll", "cmd/nope", "cmd/", "cmd"):
        assert topic(f"{base}/{own}") == default, own
    for wildcard in ("replies/+", "replies/#", "#", "a\0b"):
        assert topic(wildcard) == default, wildcard
    # any dinowatch device's topics: a reply must not run as another device's request
    for other in ("dinowatch/unit-2/cmd/search/reply", "dinowatch/unitx",
                  "dinowatch/other/cmd/rescan", "dinowatch/other/embedding", "dinowatch"):
        assert topic(other) == default, other
    for allowed in ("replies/me", "dinowatchers/me", f"{base}/cmd/search/reply",
                    f"{base}/cmd/search/reply/me", f"{base}/cmd/rescan/reply"):
        assert topic(allowed) == allowed, allowed
    unknown = direct.commands.reply_topic(Request("nope", b""))
    assert unknown == f"{base}/cmd/nope/reply"


def answer(direct: Direct, name: str, payload: bytes | dict[str, Any],
           **request: Any) -> dict[str, Any]:
    data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    reply = direct.commands.answer(Request(name, data, **request))
    return json.loads(reply.payload)


def test_answer_search_scores_by_cosine_whatever_the_vector_scale(direct: Direct,
                                                                  embedder: DinoEmbedder
                                                                  ) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(4, embedder.dim)).astype(np.float32)
    for i, vector in enumerate(vectors):
        direct.commands.matcher.update(str(direct.watched / f"{i}.jpg"), f"{i:064x}", vector)
    query = (vectors[2] * 40).astype("<f4")
    body = answer(direct, "search", {"vector": b64(query.tobytes()), "k": 4})
    assert body["results"][0]["path"] == str(direct.watched / "2.jpg")
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(body["results"]) == 4
    for bad in (np.zeros(embedder.dim, "<f4"), np.full(embedder.dim, np.nan, "<f4"),
                np.full(embedder.dim, np.inf, "<f4")):
        refused = answer(direct, "search", {"vector": b64(bad.tobytes())})
        assert refused["error"] == "BadRequest", bad[:2]
    assert answer(direct, "search", {"vector": b64(query.tobytes()), "k": 21}
                  )["error"] == "BadRequest"  # over max_k


def test_answer_error_kinds_and_id_echo(direct: Direct) -> None:
    assert answer(direct, "search", b"", too_large=9 << 20)["error"] == "PayloadTooLarge"
    assert answer(direct, "search", b"")["error"] == "BadRequest"
    assert answer(direct, "search", b"   ")["error"] == "BadRequest"
    assert answer(direct, "enroll", b"[" * 100_000)["error"] == "InvalidJSON"  # too deep
    assert answer(direct, "enroll", b'{"label": "\xff"}')["error"] == "InvalidJSON"
    assert answer(direct, "search", {"id": 1, "k": -1}) == {
        "id": 1, "ok": False, "error": "BadRequest",
        "message": answer(direct, "search", {"k": -1})["message"]}
    assert answer(direct, "search", {"id": None, "k": -1}).keys() == {"ok", "error",
                                                                      "message"}
    assert answer(direct, "rescan", b"") == {"ok": True, "folders": [str(direct.watched)]}
    assert answer(direct, "rescan", {"id": "r", "path": str(direct.watched)}) == {
        "id": "r", "ok": True, "folders": [str(direct.watched)]}
    assert direct.rescanned == [None, direct.watched]
    unknown = direct.commands.answer(Request("nope", b"{}", correlation_data=b"c"))
    assert unknown.topic == "dinowatch/unit/cmd/nope/reply"
    assert unknown.correlation_data == b"c"
    assert json.loads(unknown.payload)["error"] == "UnknownCommand"


def test_a_path_over_the_size_limit_is_refused_unread(direct: Direct, tiny_model: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A file larger than any image within `imaging.max_pixels` can be (a small picture
    followed by 64 MiB of zeros here, which the decoder would take) is refused before it is
    read, for search and enroll alike: a request must not fill the Pi's memory."""
    # decode() makes Pillow's process-wide limits follow max_pixels: restored afterwards,
    # or later tests in this process would meet a 10,000-pixel Pillow
    for module, name in ((Image, "MAX_IMAGE_PIXELS"), (PngImagePlugin, "MAX_TEXT_CHUNK"),
                         (PngImagePlugin, "MAX_TEXT_MEMORY")):
        monkeypatch.setattr(module, name, getattr(module, name))
    imaging = ImagingOptions(max_pixels=10_000)  # max_file_bytes: 80,000 + 64 MiB
    limited = DinoEmbedder(tiny_model, imaging=imaging)
    commands = Commands(CommandSettings(), Topics("dinowatch", "unit"), embedder=limited,
                        matcher=direct.commands.matcher, gallery_dir=direct.gallery,
                        roots=lambda: [direct.watched], rescan=lambda folder: [],
                        send=direct.sent.append)
    picture = io.BytesIO()
    synthetic_photo(80, 60, seed=5).save(picture, "JPEG")
    padded = direct.watched / "padded.jpg"
    with padded.open("wb") as out:
        out.write(picture.getvalue())
        out.truncate(imaging.max_file_bytes + 1)  # a sparse tail: cheap on disk
    try:
        with padded.open("rb") as file:  # the premise: only the size refuses it
            assert limited.prepare(file, name=str(padded)).width == 80
        never = 946_684_800  # 2000-01-01: a read would move the access time (relatime)
        os.utime(padded, (never, never))
        for name, body in (("search", {"path": str(padded)}),
                           ("enroll", {"label": "van", "path": str(padded)})):
            reply = commands.answer(Request(name, json.dumps(body).encode()))
            refused = json.loads(reply.payload)
            assert (refused["ok"], refused.get("error")) == (False, "ImageTooLarge"), refused
            assert f"{imaging.max_file_bytes:,}" in refused["message"], refused
        assert files_under(direct.gallery) == set()
        assert padded.stat().st_atime == never  # refused unread
    finally:
        limited.close()


def test_rate_limit_allows_the_burst_then_the_rate() -> None:
    limit = RateLimit(per_minute=6, burst=3)
    assert [limit.take() for _ in range(5)] == [True, True, True, False, False]
    limit._at -= 10  # ten seconds later: one more token (6 a minute)
    assert [limit.take() for _ in range(2)] == [True, False]
    limit._at -= 3600  # an hour later: never more than the burst
    assert [limit.take() for _ in range(4)] == [True, True, True, False]


def test_submit_refuses_over_the_rate_with_one_reply_a_second(direct: Direct,
                                                              embedder: DinoEmbedder) -> None:
    sent: list[Reply] = []
    commands = Commands(CommandSettings(burst=3, per_minute=6), Topics("dinowatch", "unit"),
                        embedder=embedder, matcher=direct.commands.matcher,
                        gallery_dir=direct.gallery, roots=lambda: [direct.watched],
                        rescan=lambda folder: [], send=sent.append)
    commands.start()
    try:
        for n in range(10):
            commands.submit(Request("rescan", json.dumps({"id": n}).encode(),
                                    correlation_data=bytes([n])))
        wait_until(lambda: len(sent) >= 4, TIMEOUT, "3 answers and a refusal")
        time.sleep(0.5)
        bodies = [json.loads(reply.payload) for reply in sent]
        assert sorted(b["id"] for b in bodies if b["ok"]) == [0, 1, 2]
        assert [b["error"] for b in bodies if not b["ok"]] == ["RateLimited"]
        assert [r.correlation_data for r in sent if b"RateLimited" in r.payload] == [b"\x03"]
    finally:
        commands.stop()
    assert not commands.alive
