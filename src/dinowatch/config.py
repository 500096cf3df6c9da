"""YAML -> typed settings. Every error names its key path and line."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dinowatch.backends import BackendConfig, OnnxBackendConfig
from dinowatch.errors import DinowatchError

IMAGE_PATTERNS = ["*.jpg", "*.jpeg", "*.png", "*.webp", "*.heic", "*.heif", "*.bmp", "*.gif",
                  "*.tif", "*.tiff"]
TEMPORARY_PATTERNS = [".*", "*.tmp", "*.part", "*~"]


class ConfigError(DinowatchError):
    """The configuration is invalid; `errors` lists every problem, each naming key and line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(Section):
    name: str = Field(default="dinov2-vits14", description="Registry name of the model.")
    path: Path | None = Field(default=None, description="Local ONNX file; overrides the registry.")
    normalize: bool = Field(default=True, description="L2-normalize vectors.")


class ImagingSettings(Section):
    exif_transpose: bool = Field(default=True, description="Apply EXIF orientation.")
    fast_jpeg: bool = Field(default=True, description="JPEG draft decoding to >= 2x input size.")
    max_pixels: int = Field(default=100_000_000, gt=0, description="Larger images are refused.")


class WatchSettings(Section):
    path: Path = Field(description="Folder to watch.")
    source: str | None = Field(default=None, description="Name in payloads; default: folder name.")
    recursive: bool = Field(default=True, description="Watch sub-folders too.")
    include: list[str] = Field(default_factory=lambda: list(IMAGE_PATTERNS),
                               description="Glob patterns a file name must match.")
    exclude: list[str] = Field(default_factory=lambda: list(TEMPORARY_PATTERNS),
                               description="Glob patterns that exclude a file name.")
    polling: bool = Field(default=False, description="Poll instead of inotify (SMB/NFS).")
    settle_seconds: float = Field(default=2.0, ge=0, le=3600,
                                  description="Size and mtime unchanged this long = complete.")

    @property
    def source_name(self) -> str:
        return self.source or self.path.name


class DuplicateSettings(Section):
    enabled: bool = Field(default=True, description="Report near-duplicates of earlier images.")
    threshold: float = Field(default=0.97, ge=0, le=1, description="Cosine similarity threshold.")


class MatchingSettings(Section):
    gallery_dir: Path | None = Field(default=None,
                                     description="<label>/<image> references; default data_dir/gallery.")
    threshold: float = Field(default=0.75, ge=0, le=1, description="Gallery match threshold.")
    top_k: int = Field(default=3, ge=1, le=100, description="Matches reported per image.")
    duplicates: DuplicateSettings = Field(default_factory=DuplicateSettings)


class TlsSettings(Section):
    enabled: bool = Field(default=False, description="Connect with TLS.")
    ca_certs: Path | None = Field(default=None, description="CA bundle; null = system CAs.")
    certfile: Path | None = Field(default=None, description="Client certificate.")
    keyfile: Path | None = Field(default=None, description="Client key.")
    insecure: bool = Field(default=False, description="Skip hostname verification.")


class HomeAssistantSettings(Section):
    enabled: bool = Field(default=False, description="Publish MQTT discovery.")
    discovery_prefix: str = Field(default="homeassistant", description="HA discovery prefix.")


class MqttSettings(Section):
    host: str = Field(default="localhost", description="Broker host.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port.")
    username: str | None = Field(default=None, description="User name.")
    password_file: Path | None = Field(
        default=None, description="File holding the password; else $CREDENTIALS_DIRECTORY/mqtt_password."
    )
    tls: TlsSettings = Field(default_factory=TlsSettings)
    protocol: Literal["3.1.1", "5"] = Field(default="5", description="MQTT protocol version.")
    keepalive: int = Field(default=60, ge=5, le=3600, description="Keep-alive seconds.")
    topic_prefix: str = Field(default="dinowatch", description="First topic level.")
    qos: Literal[0, 1, 2] = Field(default=1, description="QoS of published messages.")
    vector_encoding: Literal["base64", "json", "none"] = Field(
        default="base64", description="base64 (float32 LE) | json | none."
    )
    homeassistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings)


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO",
                                                                description="Log level.")


class Settings(Section):
    device_id: str = Field(default_factory=socket.gethostname,
                           description="Used in topics and the MQTT client id.")
    data_dir: Path = Field(default=Path("/var/lib/dinowatch"), description="Database, models.")
    model: ModelSettings = Field(default_factory=ModelSettings)
    backend: BackendConfig = Field(default_factory=OnnxBackendConfig)
    imaging: ImagingSettings = Field(default_factory=ImagingSettings)
    watch: list[WatchSettings] = Field(min_length=1, description="Folders to watch.")
    matching: MatchingSettings = Field(default_factory=MatchingSettings)
    mqtt: MqttSettings | None = Field(default_factory=MqttSettings,
                                      description="null runs without a broker.")
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
