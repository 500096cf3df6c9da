"""Home Assistant MQTT discovery (issue 8, item 6) with the real daemon and a real Mosquitto,
and once against a real Home Assistant.

- Every retained config under `homeassistant/#` carries unique_id, availability (the
  device's status topic), device (identifiers, name) and state_topic (image: image_topic),
  and each key and value type is one that Home Assistant's documentation lists for the
  platform (DOCUMENTED below, with its sources); an unknown key fails.
- Removing a gallery label empties its config topic (retained) and keeps the other label's.
- `online` on `homeassistant/status` makes the daemon publish every config again.
- A gallery match publishes `ON` on the label's topic, the retained last match and a
  retained JPEG thumbnail no larger than `thumbnail_pixels`.
- A real Home Assistant 2025.4.4 (tests/homeassistant_server.py; its venv comes from
  scripts/homeassistant-venv.sh) shows the device's sensors with the daemon's processed
  count, the label binary sensors (`on` after a match), the thumbnail through its image
  proxy, drops a removed label's entity, marks the rest unavailable when the daemon stops,
  and logs no error or MQTT warning about our payloads.

Thresholds (the stand-in "tiny" model): references are synthetic scenes; the matching image
is its reference re-encoded at another JPEG quality (cosine >= 0.99), while different scenes
reach at most about 0.96, so matching.threshold is 0.98.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from daemon_process import DaemonProcess, wait_until, write_config
from dinowatch.testing import synthetic_photo
from homeassistant_server import HomeAssistant

DEVICE = "ha-pi"
BASE = f"dinowatch/{DEVICE}"
STATUS = f"{BASE}/status"
PREFIX = "homeassistant"
THRESHOLD = 0.98
THUMBNAIL_PIXELS = 96
LABELS = {"delivery van": 11, "cat": 12}  # label -> synthetic scene seed of its reference
VAN, CAT = "delivery van", "cat"
DINOWATCH = [sys.executable, "-m", "dinowatch.cli"]
# Sensors and the image every device has (object ids in the config topics).
DEVICE_ENTITIES = {("sensor", "processed"), ("sensor", "queue"), ("sensor", "outbox"),
                   ("sensor", "last_match_label"), ("sensor", "last_match_score"),
                   ("image", "last_match_image")}

# ---- what Home Assistant's MQTT discovery documentation lists ------------------------------
# Keys and types of the "Configuration Variables" of each platform's page, as published on
#   https://www.home-assistant.io/integrations/sensor.mqtt/
#   https://www.home-assistant.io/integrations/binary_sensor.mqtt/
#   https://www.home-assistant.io/integrations/image.mqtt/
# (read from their source, home-assistant/home-assistant.io source/_integrations/
# {sensor,binary_sensor,image}.mqtt.markdown), plus the discovery payload's `origin` option:
#   https://www.home-assistant.io/integrations/mqtt/#adding-information-about-the-origin-of-a-discovery-message
# The docs' types: string, integer, boolean, list, map, template (a string), icon (a string
# such as "mdi:camera"), device_class (a string or null); "[string, list]" means either.
# `platform` is left out: the docs allow it "only in MQTT auto discovery device messages"
# (<prefix>/device/...), not in the single-component configs dinowatch publishes.

STRING, INTEGER, BOOLEAN, LIST, TEMPLATE, ICON = ("string", "integer", "boolean", "list",
                                                   "template", "icon")
DEVICE_CLASS, STRING_OR_LIST = "device_class", "string_or_list"

AVAILABILITY_ENTRY = {"payload_available": STRING, "payload_not_available": STRING,
                      "topic": STRING, "value_template": TEMPLATE}
DEVICE_KEYS = {"configuration_url": STRING, "connections": LIST, "hw_version": STRING,
               "identifiers": STRING_OR_LIST, "manufacturer": STRING, "model": STRING,
               "model_id": STRING, "name": STRING, "serial_number": STRING,
               "suggested_area": STRING, "sw_version": STRING, "via_device": STRING}
ORIGIN_KEYS = {"name": STRING, "sw_version": STRING, "support_url": STRING}

_ENTITY = {  # on all three pages
    "availability": [AVAILABILITY_ENTRY], "availability_mode": STRING,
    "availability_template": TEMPLATE, "availability_topic": STRING, "device": DEVICE_KEYS,
    "enabled_by_default": BOOLEAN, "encoding": STRING, "entity_category": STRING,
    "entity_picture": STRING, "icon": ICON, "json_attributes_template": TEMPLATE,
    "json_attributes_topic": STRING, "name": STRING, "object_id": STRING,
    "unique_id": STRING, "origin": ORIGIN_KEYS,
}
DOCUMENTED: dict[str, dict[str, Any]] = {
    "sensor": {**_ENTITY, "device_class": DEVICE_CLASS, "expire_after": INTEGER,
               "force_update": BOOLEAN, "last_reset_value_template": TEMPLATE,
               "options": LIST, "payload_available": STRING,
               "payload_not_available": STRING, "suggested_display_precision": INTEGER,
               "qos": INTEGER, "state_class": STRING, "state_topic": STRING,
               "unit_of_measurement": STRING, "value_template": TEMPLATE},
    "binary_sensor": {**_ENTITY, "device_class": DEVICE_CLASS, "expire_after": INTEGER,
                      "force_update": BOOLEAN, "off_delay": INTEGER,
                      "payload_available": STRING, "payload_not_available": STRING,
                      "payload_off": STRING, "payload_on": STRING, "qos": INTEGER,
                      "state_topic": STRING, "value_template": TEMPLATE},
    "image": {**_ENTITY, "content_type": STRING, "image_encoding": STRING,
              "image_topic": STRING, "url_template": TEMPLATE, "url_topic": STRING},
}
# What the same pages say must be present, and the values they allow.
REQUIRED = {"sensor": ("state_topic",), "binary_sensor": ("state_topic",), "image": ()}
ALLOWED_VALUES = {
    "availability_mode": {"all", "any", "latest"},
    # "When set, the entity category must be `diagnostic` for sensors" (both sensor pages);
    # the image page links the developer docs' categories (config, diagnostic).
    "entity_category": {"diagnostic", "config"},
    # developers.home-assistant.io/docs/core/entity/sensor#available-state-classes
    "state_class": {"measurement", "total", "total_increasing"},
    "qos": {0, 1, 2},
}
# <discovery_prefix>/<component>/[<node_id>/]<object_id>/config, ids of [a-zA-Z0-9_-]
# (home-assistant.io/integrations/mqtt/#discovery-topic).
CONFIG_TOPIC = re.compile(rf"^{PREFIX}/(sensor|binary_sensor|image)/(?:[a-zA-Z0-9_-]+/)?"
                          r"([a-zA-Z0-9_-]+)/config$")


def _type_ok(kind: str, value: Any) -> bool:
    if kind in (STRING, TEMPLATE):
        return isinstance(value, str)
    if kind == ICON:
        return isinstance(value, str) and re.fullmatch(r"[a-z]+:[a-z0-9-]+", value) is not None
    if kind == DEVICE_CLASS:
        return value is None or isinstance(value, str)
    if kind == INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == BOOLEAN:
        return isinstance(value, bool)
    if kind == LIST:
        return isinstance(value, list)
    if kind == STRING_OR_LIST:
        return isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(item, str) for item in value))
    raise AssertionError(f"unknown documented type {kind}")


def _check(spec: dict[str, Any], config: Any, where: str) -> list[str]:
    if not isinstance(config, dict):
        return [f"{where}: a map expected, got {config!r}"]
    problems = []
    for key, value in config.items():
        path = f"{where}.{key}"
        if key not in spec:
            problems.append(f"{path}: not a documented key")
        elif isinstance(spec[key], dict):
            problems += _check(spec[key], value, path)
        elif isinstance(spec[key], list):  # a list of maps (availability)
            if not isinstance(value, list) or not value:
                problems.append(f"{path}: a non-empty list expected, got {value!r}")
            else:
                for i, item in enumerate(value):
                    problems += _check(spec[key][0], item, f"{path}[{i}]")
        elif not _type_ok(spec[key], value):
            problems.append(f"{path}: {spec[key]} expected, got {value!r}")
        elif key in ALLOWED_VALUES and value not in ALLOWED_VALUES[key]:
            problems.append(f"{path}: {value!r} is not one of {sorted(ALLOWED_VALUES[key])}")
    return problems


def documentation_problems(component: str, config: dict[str, Any]) -> list[str]:
    """What in `config` Home Assistant's docs for `component` do not list or allow."""
    if component not in DOCUMENTED:
        return [f"{component}: not a platform dinowatch should announce"]
    problems = _check(DOCUMENTED[component], config, component)
    problems += [f"{component}.{key}: required by the docs, missing"
                 for key in REQUIRED[component] if key not in config]
    if component == "image" and ("image_topic" in config) == ("url_topic" in config):
        problems.append("image: exactly one of image_topic and url_topic (docs: exclusive)")
    if component == "sensor" and config.get("entity_category") not in (None, "diagnostic"):
        problems.append("sensor.entity_category: must be diagnostic for sensors")
    if "availability" in config and "availability_topic" in config:
        problems.append(f"{component}: availability and availability_topic together")
    for key in ("off_delay", "expire_after"):
        if isinstance(config.get(key), int) and config[key] <= 0:
            problems.append(f"{component}.{key}: a positive number of seconds expected")
    return problems


# ---- helpers --------------------------------------------------------------------------------

def dinowatch(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*DINOWATCH, *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


def retained(subscriber_factory: Callable[..., Any], broker: Any,
             *filters: str) -> dict[str, bytes]:
    """What a fresh subscriber to `filters` gets as retained messages: a marker published
    after the subscription is acknowledged arrives after every retained message."""
    marker = f"dinowatch-test/barrier/{uuid.uuid4().hex}"
    subscriber = subscriber_factory(broker, *filters, marker)
    subscriber.client.publish(marker, b"x", qos=1)
    messages = subscriber.wait_for(lambda ms: any(m.topic == marker for m in ms))
    subscriber.close()
    return {m.topic: m.payload for m in messages if m.retain}


def configs_of(messages: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    return {topic: json.loads(payload) for topic, payload in messages.items()
            if CONFIG_TOPIC.match(topic) and payload}


def component_of(topic: str) -> tuple[str, str]:
    found = CONFIG_TOPIC.match(topic)
    assert found, f"{topic} is not a discovery config topic"
    return found.group(1), found.group(2)


def label_config(configs: dict[str, dict[str, Any]], label: str) -> tuple[str, dict[str, Any]]:
    """The binary sensor config for `label` (found by its entity name)."""
    found = [(topic, config) for topic, config in configs.items()
             if component_of(topic)[0] == "binary_sensor" and config["name"] == f"Match {label}"]
    assert len(found) == 1, f"one binary sensor for {label!r} expected: {sorted(configs)}"
    return found[0]


def write_reference(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"reference{seed}.jpg"
    synthetic_photo(480, 360, seed=seed).save(path, quality=90)
    return path


@dataclass
class Setup:
    config: Path
    inbox: Path
    gallery: Path
    daemon: DaemonProcess
    configs: dict[str, dict[str, Any]]  # the retained discovery configs once announced


@pytest.fixture
def setup(tmp_path: Path, mosquitto: Any, tiny_model: Path,
          subscriber_factory: Callable[..., Any]) -> Iterator[Callable[[], Setup]]:
    """`setup()` -> the daemon running with Home Assistant discovery on and the gallery's
    two labels announced (8 retained configs)."""
    inbox, data = tmp_path / "inbox", tmp_path / "data"
    inbox.mkdir()
    gallery = data / "gallery"
    for label, seed in LABELS.items():
        write_reference(gallery / label, seed)
    config = write_config(
        tmp_path / "config.yaml", device_id=DEVICE, data_dir=str(data),
        model={"path": str(tiny_model)},
        watch=[{"path": str(inbox), "source": "gate", "settle_seconds": 0.5}],
        matching={"threshold": THRESHOLD},
        mqtt={"host": mosquitto.host, "port": mosquitto.port,
              "homeassistant": {"enabled": True, "thumbnail_pixels": THUMBNAIL_PIXELS}})
    daemons: list[DaemonProcess] = []

    def make() -> Setup:
        live = subscriber_factory(mosquitto, f"{PREFIX}/#")
        daemon = DaemonProcess(config, tmp_path)
        daemons.append(daemon)
        daemon.start()
        expected = len(DEVICE_ENTITIES) + len(LABELS)
        live.wait_for(lambda ms: len({m.topic for m in ms if CONFIG_TOPIC.match(m.topic)
                                      and m.payload}) >= expected, timeout=60)
        configs = configs_of(retained(subscriber_factory, mosquitto, f"{PREFIX}/#"))
        return Setup(config, inbox, gallery, daemon, configs)

    yield make
    for daemon in daemons:
        if daemon.process and daemon.process.poll() is None:
            assert daemon.stop() == 0, daemon.log()


# ---- against the broker -----------------------------------------------------------------------

def test_the_key_check_refuses_what_the_docs_do_not_list() -> None:
    """The documented-keys check itself: it passes a documented config and names an unknown
    key, a wrong type, a missing state topic and a value the docs do not allow."""
    good = {"name": "Queue", "unique_id": "x_queue", "state_topic": "a/stats",
            "availability": [{"topic": "a/status"}], "device": {"identifiers": ["x"],
                                                                "name": "x"},
            "origin": {"name": "dinowatch"}, "value_template": "{{ value_json.queue }}",
            "icon": "mdi:tray"}
    assert documentation_problems("sensor", good) == []
    assert documentation_problems("sensor", {**good, "state_topik": "a/stats"}) == [
        "sensor.state_topik: not a documented key"]
    assert documentation_problems("sensor", {**good, "device": {"name": "x", "ids": ["x"]}}) == [
        "sensor.device.ids: not a documented key"]
    assert documentation_problems("binary_sensor", {**good, "off_delay": "30"}) == [
        "binary_sensor.off_delay: integer expected, got '30'"]
    assert documentation_problems("sensor", {**good, "entity_category": "config"}) == [
        "sensor.entity_category: must be diagnostic for sensors"]
    without_state = {key: value for key, value in good.items() if key != "state_topic"}
    assert documentation_problems("sensor", without_state) == [
        "sensor.state_topic: required by the docs, missing"]
    assert documentation_problems("image", {**without_state, "image_topic": "a/t",
                                            "value_template": None}) == [
        "image.value_template: not a documented key"]


def test_every_config_has_the_documented_keys_and_types(setup, mosquitto,
                                                        subscriber_factory) -> None:
    ready = setup()
    configs = ready.configs
    found = {component_of(topic) for topic in configs}
    labels = {entity for entity in found if entity[0] == "binary_sensor"}
    assert found - labels == DEVICE_ENTITIES
    assert len(labels) == len(LABELS)
    assert {config["name"] for topic, config in configs.items()
            if component_of(topic)[0] == "binary_sensor"} == {f"Match {label}"
                                                               for label in LABELS}
    problems = [problem for topic, config in sorted(configs.items())
                for problem in documentation_problems(component_of(topic)[0], config)]
    assert problems == [], "\n".join(problems)

    device = configs[f"{PREFIX}/sensor/{DEVICE}/processed/config"]["device"]
    assert device["identifiers"] and device["name"]
    unique_ids = [config["unique_id"] for config in configs.values()]
    assert len(set(unique_ids)) == len(unique_ids), unique_ids
    state = retained(subscriber_factory, mosquitto, f"{BASE}/#")
    assert state[STATUS] == b"online"
    for topic, config in configs.items():
        component = component_of(topic)[0]
        assert config["device"] == device, f"{topic}: one device for every entity"
        assert config["availability"] == [{"topic": STATUS}], topic
        assert config["unique_id"], topic
        if component == "image":
            assert config["image_topic"] == f"{BASE}/last_match/thumbnail"
            assert config["content_type"] == "image/jpeg"
            assert "state_topic" not in config
        elif component == "sensor":
            assert config["state_topic"] in (f"{BASE}/stats", f"{BASE}/last_match"), topic
        else:
            assert config["state_topic"].startswith(f"{BASE}/label/"), topic
            # A new label starts off (retained), not unknown.
            assert state[config["state_topic"]] == b"OFF", topic
            assert (config["payload_on"], config["payload_off"]) == ("ON", "OFF")


def test_a_removed_label_loses_its_config_and_the_other_stays(setup, mosquitto,
                                                              subscriber_factory) -> None:
    ready = setup()
    cat_topic, cat = label_config(ready.configs, CAT)
    van_topic, van = label_config(ready.configs, VAN)
    live = subscriber_factory(mosquitto, f"{PREFIX}/#", f"{BASE}/label/#")

    removed = dinowatch("gallery", "remove", CAT, "-c", ready.config)
    assert removed.returncode == 0, removed.stderr
    assert not (ready.gallery / CAT).exists()
    live.wait_for(lambda ms: any(m.topic == cat_topic and m.payload == b"" for m in ms))
    live.wait_for(lambda ms: any(m.topic == cat["state_topic"] and m.payload == b""
                                 for m in ms))

    after = retained(subscriber_factory, mosquitto, f"{PREFIX}/#", f"{BASE}/label/#")
    # An empty payload published with retain deletes the retained message: a fresh
    # subscriber gets nothing for the removed label, and the rest as before.
    assert cat_topic not in after and cat["state_topic"] not in after
    assert json.loads(after[van_topic]) == van
    assert after[van["state_topic"]] == b"OFF"
    assert set(configs_of(after)) == set(ready.configs) - {cat_topic}
    # (The daemon may announce the remaining label again: the same config, unchanged.)
    assert all(json.loads(m.payload) == van for m in live.messages if m.topic == van_topic)


def test_homeassistant_online_makes_the_daemon_publish_every_config_again(
        setup, mosquitto, subscriber_factory) -> None:
    ready = setup()
    live = subscriber_factory(mosquitto, f"{PREFIX}/+/+/+/config")
    live.wait_for(lambda ms: len({m.topic for m in ms}) >= len(ready.configs))
    assert all(m.retain for m in live.messages), "before `online` only the retained copies"

    live.client.publish(f"{PREFIX}/status", b"online", qos=1)  # Home Assistant's birth
    fresh = live.wait_for(lambda ms: {m.topic for m in ms if not m.retain} >= set(ready.configs))
    again = {m.topic: json.loads(m.payload) for m in fresh if not m.retain}
    assert again == ready.configs


def test_a_gallery_match_turns_the_label_on_and_publishes_a_thumbnail(
        setup, mosquitto, subscriber_factory) -> None:
    ready = setup()
    _, van = label_config(ready.configs, VAN)
    _, cat = label_config(ready.configs, CAT)
    live = subscriber_factory(mosquitto, f"{BASE}/#")
    dropped = ready.inbox / "van at the gate.jpg"
    synthetic_photo(480, 360, seed=LABELS[VAN]).save(dropped, quality=75)

    messages = live.wait_for(lambda ms: any(m.topic == van["state_topic"] and m.payload == b"ON"
                                            for m in ms)
                             and any(m.topic == f"{BASE}/last_match/thumbnail" for m in ms))
    matches = [json.loads(m.payload) for m in messages if m.topic == f"{BASE}/match"]
    assert [(event["kind"], event["label"]) for event in matches] == [("gallery", VAN)]
    assert matches[0]["score"] >= THRESHOLD
    assert not [m for m in messages if m.topic == cat["state_topic"] and m.payload == b"ON"]

    now = retained(subscriber_factory, mosquitto, f"{BASE}/#")
    last = json.loads(now[f"{BASE}/last_match"])
    assert last["label"] == VAN and last["score"] == matches[0]["score"]
    assert last["path"] == str(dropped) and last["source"] == "gate" and last["ts"]
    # `ON` is not retained (Home Assistant's off_delay turns the sensor off again).
    assert now[van["state_topic"]] == b"OFF"
    thumbnail = now[f"{BASE}/last_match/thumbnail"]
    with Image.open(io.BytesIO(thumbnail)) as picture:
        assert picture.format == "JPEG"
        assert max(picture.size) <= THUMBNAIL_PIXELS
        assert picture.size == (96, 72)  # 480 x 360 scaled down, aspect kept
        picture.load()


# ---- against a real Home Assistant ------------------------------------------------------------

@pytest.fixture
def home_assistant(tmp_path: Path) -> Iterator[HomeAssistant]:
    with HomeAssistant(tmp_path / "homeassistant") as server:
        yield server


def by_name(states: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Our device's entities by their entity name (friendly name less the device name)."""
    prefix = f"dinowatch {DEVICE} "
    return {state["attributes"]["friendly_name"].removeprefix(prefix): state
            for state in states
            if state["attributes"].get("friendly_name", "").startswith(prefix)}


def test_home_assistant_shows_the_device_its_labels_and_the_thumbnail(
        setup, mosquitto, subscriber_factory, home_assistant: HomeAssistant) -> None:
    ha = home_assistant
    ha.start()  # starts while the daemon does
    ready = setup()
    ha.start_with_mqtt(mosquitto.host, mosquitto.port)
    names = {"Images processed", "Queue", "Outbox", "Last match", "Last match score",
             "Last match image", f"Match {VAN}", f"Match {CAT}"}
    entities: dict[str, dict[str, Any]] = {}

    def shown(wanted: set[str], check: Callable[[dict[str, dict[str, Any]]], bool]
              = lambda found: True) -> bool:
        entities.clear()
        entities.update(by_name(ha.states()))
        return set(entities) == wanted and check(entities)

    wait_until(lambda: shown(names, lambda found: all(state["state"] != "unavailable"
                                                     for state in found.values())),
               30, f"Home Assistant to show {sorted(names)}")
    assert entities[f"Match {VAN}"]["state"] == "off"
    assert entities[f"Match {CAT}"]["state"] == "off"
    assert set(ha.mqtt_entities()) == {state["entity_id"] for state in entities.values()}

    live = subscriber_factory(mosquitto, f"{BASE}/#")
    dropped = ready.inbox / "van.jpg"
    synthetic_photo(480, 360, seed=LABELS[VAN]).save(dropped, quality=75)
    wait_until(lambda: shown(names, lambda found: found[f"Match {VAN}"]["state"] == "on"),
               30, "the van's binary sensor to turn on")
    assert entities[f"Match {CAT}"]["state"] == "off"
    image_id = entities["Last match image"]["entity_id"]
    wait_until(lambda: shown(names, lambda found: found["Last match"]["state"] == VAN
                             and found["Last match image"]["state"] not in ("unknown", "")),
               30, "the last match and its image")
    thumbnail = retained(subscriber_factory, mosquitto,
                         f"{BASE}/last_match/thumbnail")[f"{BASE}/last_match/thumbnail"]
    assert ha.image(image_id) == thumbnail
    last = json.loads(retained(subscriber_factory, mosquitto,
                               f"{BASE}/last_match")[f"{BASE}/last_match"])
    assert float(entities["Last match score"]["state"]) == last["score"]

    # Stats are published every 30 s: the first one after the match carries its count.
    stats_after_match = live.wait_for(
        lambda ms: any(m.topic == f"{BASE}/stats" and json.loads(m.payload)["matches"] >= 1
                       for m in ms), timeout=45)
    stats = next(json.loads(m.payload) for m in reversed(stats_after_match)
                 if m.topic == f"{BASE}/stats")
    assert stats["processed"] == len(LABELS) + 1  # the references and the dropped image
    wait_until(lambda: shown(names, lambda found: found["Images processed"]["state"]
                             == str(stats["processed"])),
               15, f"Home Assistant's processed count to show {stats['processed']}")
    assert entities["Queue"]["state"] == str(stats["queue"])
    assert entities["Outbox"]["state"] == str(stats["outbox"])

    cat_id = entities[f"Match {CAT}"]["entity_id"]
    removed = dinowatch("gallery", "remove", CAT, "-c", ready.config)
    assert removed.returncode == 0, removed.stderr
    wait_until(lambda: shown(names - {f"Match {CAT}"}), 30, "the cat's entity to go away")
    assert cat_id not in ha.mqtt_entities()

    # Availability: a stopping daemon says `offline` on its status topic.
    assert ready.daemon.stop() == 0, ready.daemon.log()
    wait_until(lambda: shown(names - {f"Match {CAT}"},
                             lambda found: {state["state"] for state in found.values()}
                             == {"unavailable"}),
               30, "every entity to become unavailable")

    # Every error counts (a template or sensor error about our payloads is logged by other
    # loggers than mqtt's) except the one about Debian's libturbojpeg0 missing, which
    # scripts/homeassistant-venv.sh installs where it can: the machine's, not our payloads'.
    errors = [line for line in ha.log_lines("ERROR", "CRITICAL")
              if "Error loading libturbojpeg" not in line]
    mqtt_warnings = [line for line in ha.log_lines("WARNING") if "mqtt" in line.split("]")[0]]
    assert errors + mqtt_warnings == [], "\n".join(errors + mqtt_warnings)
