"""Home Assistant MQTT discovery: one device per dinowatch instance, and its entities.

Config topics are `<discovery_prefix>/<component>/<node_id>/<object_id>/config`, retained;
an empty retained payload removes an entity (home-assistant.io/integrations/mqtt, "MQTT
Discovery"). Every entity's `device` carries the same identifiers and the device's name,
which Home Assistant wants in each entity's device block. Entities are unavailable while
the `status` topic says `offline` (the broker's Will).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from dinowatch import __version__
from dinowatch.config import HomeAssistantSettings
from dinowatch.mqtt import Topics, json_payload
from dinowatch.store import Message

ORIGIN = {"name": "dinowatch", "sw_version": __version__}


def slug(text: str) -> str:
    """`text` as a discovery topic level / object id ([a-zA-Z0-9_-], as Home Assistant's
    discovery topic pattern requires): lower-cased, other characters as `_`, plus a short
    hash when anything was replaced, so two labels never share a slug."""
    clean = re.sub(r"[^a-z0-9_-]", "_", text.lower())
    if clean == text:
        return clean
    return f"{clean[:40]}_{hashlib.sha256(text.encode(errors='surrogateescape')).hexdigest()[:6]}"


@dataclass(frozen=True)
class Discovery:
    """Discovery config messages for one device."""

    settings: HomeAssistantSettings
    topics: Topics
    device_id: str
    qos: int = 1

    @property
    def node_id(self) -> str:
        return slug(self.device_id)

    @property
    def status_topic(self) -> str:
        """Home Assistant's birth and last-will topic."""
        return f"{self.settings.discovery_prefix}/status"

    def thumbnail_topic(self) -> str:
        return f"{self.topics.last_match}/thumbnail"

    def _device(self) -> dict[str, Any]:
        return {"identifiers": [f"dinowatch_{self.node_id}"],
                "name": f"dinowatch {self.device_id}", "manufacturer": "dinowatch",
                "model": "DINOv2 image embeddings", "sw_version": __version__}

    def _config_topic(self, component: str, object_id: str) -> str:
        return f"{self.settings.discovery_prefix}/{component}/{self.node_id}/{object_id}/config"

    def _entity(self, component: str, object_id: str, name: str,
                **fields: Any) -> tuple[str, dict[str, Any]]:
        config = {"name": name, "unique_id": f"dinowatch_{self.node_id}_{object_id}",
                  "availability": [{"topic": self.topics.status}],
                  "device": self._device(), "origin": ORIGIN, **fields}
        return self._config_topic(component, object_id), config

    def _device_entities(self) -> list[tuple[str, dict[str, Any]]]:
        stats, last = self.topics.stats, self.topics.last_match
        return [
            self._entity("sensor", "processed", "Images processed", state_topic=stats,
                         value_template="{{ value_json.processed }}",
                         state_class="total_increasing", unit_of_measurement="images",
                         icon="mdi:image-multiple"),
            self._entity("sensor", "queue", "Queue", state_topic=stats,
                         value_template="{{ value_json.queue }}", state_class="measurement",
                         unit_of_measurement="images", entity_category="diagnostic"),
            self._entity("sensor", "outbox", "Outbox", state_topic=stats,
                         value_template="{{ value_json.outbox }}", state_class="measurement",
                         unit_of_measurement="messages", entity_category="diagnostic"),
            self._entity("sensor", "last_match_label", "Last match", state_topic=last,
                         value_template="{{ value_json.label }}",
                         json_attributes_topic=last, icon="mdi:image-search"),
            self._entity("sensor", "last_match_score", "Last match score", state_topic=last,
                         value_template="{{ value_json.score }}", state_class="measurement"),
            self._entity("image", "last_match_image", "Last match image",
                         image_topic=self.thumbnail_topic(), content_type="image/jpeg"),
        ]

    def _label_entities(self, labels: list[str]) -> list[tuple[str, dict[str, Any]]]:
        return [self._entity("binary_sensor", f"label_{slug(label)}", f"Match {label}",
                             state_topic=self.label_topic(label), payload_on="ON",
                             payload_off="OFF", off_delay=self.settings.match_seconds,
                             icon="mdi:image-check")
                for label in sorted(labels)]

    def configs(self, labels: list[str]) -> list[Message]:
        """Every entity's retained config, the labels' binary sensors included."""
        return self._messages([*self._device_entities(), *self._label_entities(labels)])

    def label_configs(self, labels: list[str]) -> list[Message]:
        """The labels' binary sensors' retained configs alone."""
        return self._messages(self._label_entities(labels))

    def _messages(self, entities: list[tuple[str, dict[str, Any]]]) -> list[Message]:
        return [Message(topic, json_payload(config), self.qos, retain=True)
                for topic, config in entities]

    def label_topic(self, label: str) -> str:
        return self.topics.label(slug(label))

    def label_on(self, label: str) -> Message:
        """A match of `label` (not retained: Home Assistant's off_delay turns it off)."""
        return Message(self.label_topic(label), b"ON", self.qos)

    def label_off(self, label: str) -> Message:
        """A new label's binary sensor starts `off`, not `unknown` (retained; a match sends
        a plain `ON`, and Home Assistant's off_delay turns it off again)."""
        return Message(self.label_topic(label), b"OFF", self.qos, retain=True)

    def removals(self, label: str) -> list[Message]:
        """Empty retained payloads: the label's entity and its retained state disappear."""
        return [Message(self._config_topic("binary_sensor", f"label_{slug(label)}"), b"",
                        self.qos, retain=True),
                Message(self.label_topic(label), b"", self.qos, retain=True)]
