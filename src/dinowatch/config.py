"""YAML -> typed settings. Every error names its key path and line."""

from __future__ import annotations

import difflib
import hashlib
import hmac
import os
import re
import socket
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dinowatch.backends import BackendConfig, OnnxBackendConfig
from dinowatch.errors import DinowatchError, existing_file, readable
from dinowatch.imaging import DEFAULT_MAX_PIXELS, ImagingOptions

DEFAULT_CONFIG_PATH = Path("/etc/dinowatch/config.yaml")
CONFIG_ENV = "DINOWATCH_CONFIG"
PASSWORD_CREDENTIAL = "mqtt_password"  # systemd LoadCredential= name

IMAGE_PATTERNS = ["*.jpg", "*.jpeg", "*.png", "*.webp", "*.heic", "*.heif", "*.bmp", "*.gif",
                  "*.tif", "*.tiff"]
TEMPORARY_PATTERNS = [".*", "*.tmp", "*.part", "*~"]


class ConfigError(DinowatchError):
    """The configuration is invalid; `errors` lists every problem, each naming key and line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class Section(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class ModelSettings(Section):
    name: str = Field(default="dinov2-vits14", description="Registry name of the model.")
    path: Path | None = Field(default=None, description="Local ONNX file; overrides the registry.")
    normalize: bool = Field(default=True, description="L2-normalize vectors.")

    @field_validator("path")
    @classmethod
    def _path_is_file(cls, value: Path | None) -> Path | None:
        return existing_file(value)


class ImagingSettings(Section):
    exif_transpose: bool = Field(default=True, description="Apply EXIF orientation.")
    fast_jpeg: bool = Field(default=True,
                            description="JPEG/MPO draft decoding to >= 2x input size.")
    heif_thumbnail: bool = Field(default=True, description="Decode a HEIF's embedded "
                                 "thumbnail when it is >= 2x input size.")

    def options(self) -> ImagingOptions:
        """These settings as the decode stage takes them."""
        return ImagingOptions(**self.model_dump())
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0,
                            description="Larger images are refused.")


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
    rescan_minutes: float = Field(default=60, ge=0, le=10080,
                                  description="Periodic reconciliation scan; 0 = off.")
    threshold: float | None = Field(default=None, ge=0, le=1,
                                    description="Gallery match threshold for images from here; "
                                                "null = matching.threshold.")
    duplicate_threshold: float | None = Field(
        default=None, ge=0, le=1,
        description="Duplicate threshold for images from here; null = matching.duplicates.")

    @property
    def source_name(self) -> str:
        """The name in payloads: valid UTF-8 even when the folder's name is not."""
        return self.source or readable(self.path.name)


class DuplicateSettings(Section):
    enabled: bool = Field(default=True, description="Report near-duplicates of earlier images.")
    threshold: float = Field(default=0.97, ge=0, le=1, description="Cosine similarity threshold.")


class LabelSettings(Section):
    """One gallery label's own settings: `matching.labels.<label>`, or the label.yaml file
    in its folder (which wins)."""

    threshold: float | None = Field(default=None, ge=0, le=1,
                                    description="Match threshold; null = the general one.")


class MatchingSettings(Section):
    gallery_dir: Path | None = Field(
        default=None, description="<label>/<image> references; default data_dir/gallery."
    )
    threshold: float = Field(default=0.75, ge=0, le=1, description="Gallery match threshold.")
    top_k: int = Field(default=3, ge=1, le=100, description="Matches reported per image.")
    duplicates: DuplicateSettings = Field(default_factory=DuplicateSettings,
                                          description="Near-duplicates of earlier images.")
    labels: dict[str, LabelSettings] = Field(default_factory=dict,
                                             description="Per-label settings, by label.")


class TlsSettings(Section):
    enabled: bool = Field(default=False, description="Connect with TLS.")
    ca_certs: Path | None = Field(default=None, description="CA bundle; null = system CAs.")
    certfile: Path | None = Field(default=None, description="Client certificate.")
    keyfile: Path | None = Field(default=None, description="Client key.")
    insecure: bool = Field(default=False, description="Skip hostname verification.")

    @field_validator("ca_certs", "certfile", "keyfile")
    @classmethod
    def _files_exist(cls, value: Path | None) -> Path | None:
        return existing_file(value)


class HomeAssistantSettings(Section):
    enabled: bool = Field(default=False, description="Publish MQTT discovery.")
    discovery_prefix: str = Field(default="homeassistant", description="HA discovery prefix.")
    match_seconds: int = Field(default=30, ge=1, le=86400,
                               description="A label's binary sensor stays on this long "
                                           "after a match.")
    thumbnail_pixels: int = Field(default=320, ge=32, le=1920,
                                  description="Longest side of the last match's thumbnail.")


class CommandSettings(Section):
    enabled: bool = Field(default=True, description="Answer requests on <prefix>/<device>/cmd/#.")
    max_payload_bytes: int = Field(default=8 * 1024 * 1024, ge=1024,
                                   description="Larger requests get an error reply.")
    per_minute: int = Field(default=60, ge=1, description="Requests answered per minute.")
    burst: int = Field(default=10, ge=1, description="Requests answered at once before "
                                                     "the per-minute rate applies.")
    max_k: int = Field(default=100, ge=1, description="Largest k a search may ask for.")


class MqttSettings(Section):
    host: str = Field(default="localhost", description="Broker host.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port.")
    username: str | None = Field(default=None, description="User name.")
    password_file: Path | None = Field(
        default=None,
        description="File holding the password; else $CREDENTIALS_DIRECTORY/mqtt_password.",
    )
    tls: TlsSettings = Field(default_factory=TlsSettings, description="Transport security.")
    protocol: Literal["3.1.1", "5"] = Field(default="5", description="MQTT protocol version.")
    keepalive: int = Field(default=60, ge=5, le=3600, description="Keep-alive seconds.")
    topic_prefix: str = Field(default="dinowatch", description="First topic level.")
    qos: Literal[0, 1, 2] = Field(default=1, description="QoS of published messages.")
    vector_encoding: Literal["base64", "json", "none"] = Field(
        default="base64", description="base64 (float32 LE) | json | none."
    )
    homeassistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings,
                                                 description="Home Assistant MQTT discovery.")
    commands: CommandSettings = Field(default_factory=CommandSettings,
                                      description="Requests over MQTT (search, enroll, rescan).")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: object) -> object:
        # YAML reads `protocol: 5` as an int.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("topic_prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        if not value or value.startswith("/") or value.endswith("/") or {"+", "#"} & set(value):
            raise ValueError("must be non-empty, without '+', '#' or a leading/trailing '/'")
        return value

    def password(self) -> str | None:
        """The broker password: `password_file`, else the systemd credential, else None."""
        if self.password_file is not None:
            return _read_secret(self.password_file, "mqtt.password_file")
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if credentials and (Path(credentials) / PASSWORD_CREDENTIAL).is_file():
            return _read_secret(Path(credentials) / PASSWORD_CREDENTIAL,
                                f"$CREDENTIALS_DIRECTORY/{PASSWORD_CREDENTIAL}")
        return None


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO",
                                                                description="Log level.")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


# Hostnames that images and distributions ship with: two stock Pis would share topics and
# the MQTT client id (and keep disconnecting each other), so these get a suffix.
DISTRIBUTION_HOSTNAMES = {"raspberrypi", "raspberry", "pi", "localhost", "debian", "ubuntu",
                          "raspbian", "dietpi", "orangepi", "rockpi", "armbian", "alarm",
                          "homeassistant", "octopi"}
MACHINE_ID = Path("/etc/machine-id")
DEVICE_ID_APP = b"dinowatch device id"  # the application key the machine id is hashed with


def topic_hostname(hostname: str | None = None) -> str:
    """This machine's short hostname as a topic level ('/', '+', '#', spaces as '-')."""
    name = (hostname or socket.gethostname()).split(".")[0] or "dinowatch"
    return re.sub(r"[/+#\s]", "-", name)


def default_device_id(hostname: str | None = None, machine_id: Path = MACHINE_ID) -> str:
    """The hostname; for a distribution default such as `raspberrypi`, plus a short suffix
    derived from /etc/machine-id (`raspberrypi-3f9a1c`), stable across reboots.

    The machine id is hashed with an application key rather than shown, as machine-id(5)
    asks of anything that exposes it on a network.
    """
    name = topic_hostname(hostname)
    if name.lower() not in DISTRIBUTION_HOSTNAMES:
        return name
    try:
        secret = machine_id.read_text().strip()
    except OSError:
        secret = ""
    if not secret:
        return name
    return f"{name}-{hmac.new(secret.encode(), DEVICE_ID_APP, hashlib.sha256).hexdigest()[:6]}"


class Settings(Section):
    device_id: str = Field(default_factory=default_device_id,
                           description="Used in topics and the MQTT client id; null = hostname "
                                       "(plus a machine-id suffix for distribution defaults).")
    data_dir: Path = Field(default=Path("/var/lib/dinowatch"), description="Database, models.")
    model: ModelSettings = Field(default_factory=ModelSettings, description="Embedding model.")
    backend: BackendConfig = Field(default_factory=OnnxBackendConfig,
                                   description="Inference runtime.")
    imaging: ImagingSettings = Field(default_factory=ImagingSettings,
                                     description="Image decoding.")
    watch: list[WatchSettings] = Field(min_length=1, description="Folders to watch.")
    matching: MatchingSettings = Field(default_factory=MatchingSettings,
                                       description="Gallery and duplicate matching.")
    mqtt: MqttSettings | None = Field(default_factory=MqttSettings,
                                      description="null runs without a broker.")
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Logging.")

    @field_validator("device_id", mode="before")
    @classmethod
    def _hostname_if_null(cls, value: object) -> object:
        return default_device_id() if value is None else value

    @field_validator("device_id")
    @classmethod
    def _valid_topic_level(cls, value: str) -> str:
        if not value or {"/", "+", "#"} & set(value):
            raise ValueError("must be non-empty, without '/', '+' or '#' (it is a topic level)")
        return value

    @field_validator("watch")
    @classmethod
    def _distinct_folders(cls, watches: list[WatchSettings]) -> list[WatchSettings]:
        seen: dict[Path, int] = {}
        for index, watch in enumerate(watches):
            if watch.path in seen:
                raise ValueError(f"watch[{index}].path {watch.path} is watched twice "
                                 f"(also watch[{seen[watch.path]}])")
            seen[watch.path] = index
        return watches

    @property
    def gallery_dir(self) -> Path:
        """Labelled references: matching.gallery_dir, else data_dir/gallery."""
        return self.matching.gallery_dir or self.data_dir / "gallery"


def _read_secret(path: Path, key: str) -> str:
    """The file's text without its trailing newline; errors name the file, never the content."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"{key}: cannot read {path}: {err.strerror}"]) from err
    except UnicodeDecodeError as err:
        raise ConfigError([f"{key}: {path} is not UTF-8 text"]) from err
    secret = text.rstrip("\r\n")
    if not secret:
        raise ConfigError([f"{key}: {path} is empty"])
    return secret


# ---- loading ------------------------------------------------------------------------------

KeyPath = tuple[str | int, ...]
_ENV_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")
_STR_TAG = "tag:yaml.org,2002:str"


def config_path(explicit: Path | None = None) -> Path:
    """`explicit` (-c FILE), else $DINOWATCH_CONFIG, else /etc/dinowatch/config.yaml."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get(CONFIG_ENV)
    return Path(from_env) if from_env else DEFAULT_CONFIG_PATH


def load_settings(path: Path) -> Settings:
    """Read, expand ${VAR} and validate `path`; raise one ConfigError listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        hint = f"choose the file with -c FILE or ${CONFIG_ENV}"
        raise ConfigError([f"{path}: no such file ({hint})"]) from err
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror}"]) from err
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: not UTF-8 text"]) from err

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        document = _Document(root)
        data = yaml.constructor.SafeConstructor().construct_document(root) if root else {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f"{mark.line + 1}:" if mark else ""
        detail = f"{err.problem} ({err.context})" if err.context else err.problem
        raise ConfigError([f"{path}:{line} YAML syntax error: {detail}"]) from err
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: YAML error: {err}"]) from err
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError([f"{path}:{document.line(())}: the top level must be a mapping of "
                           f"settings (key: value), not a {kind}"])

    problems = list(document.problems)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as err:
        settings = None
        flagged = {key for _, key, _ in problems}
        for error in err.errors():
            key = _data_path(error["loc"], data)
            if key not in flagged:
                problems.append((document.line(key), key, _message(error, key, data)))
    if problems or settings is None:
        problems.sort(key=lambda problem: problem[0])
        raise ConfigError([f"{path}:{line}: {_dotted(key) or '(top level)'}: {message}"
                           for line, key, message in problems])
    return settings


class _Document:
    """Walks the composed YAML: records each key's line, flags duplicates, expands ${VAR}."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.lines: dict[KeyPath, int] = {}
        self.problems: list[tuple[int, KeyPath, str]] = []
        self._resolver = yaml.resolver.Resolver()
        self._seen: set[int] = set()
        if root is not None:
            self.lines[()] = root.start_mark.line + 1
            self._walk(root, ())

    def line(self, key: KeyPath) -> int:
        """Line of `key`, else of its nearest ancestor in the file (e.g. for a missing key)."""
        for end in range(len(key), -1, -1):
            if key[:end] in self.lines:
                return self.lines[key[:end]]
        return 1

    def _walk(self, node: yaml.Node, key: KeyPath) -> None:
        if id(node) in self._seen:  # an alias of a node walked already
            return
        self._seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                child = (*key, key_node.value)
                line = key_node.start_mark.line + 1
                if child in self.lines:
                    self.problems.append(
                        (line, child, f"duplicate key; it is also on line {self.lines[child]}"))
                self.lines[child] = line
                self._walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[(*key, index)] = item.start_mark.line + 1
                self._walk(item, (*key, index))
        elif isinstance(node, yaml.ScalarNode) and node.tag == _STR_TAG and "${" in node.value:
            self._expand(node, key)

    def _expand(self, node: yaml.ScalarNode, key: KeyPath) -> None:
        unset: list[str] = []

        def substitute(match: re.Match[str]) -> str:
            value, default = os.environ.get(match["name"]), match["default"]
            if value is None and default is None:
                unset.append(match["name"])
                return match[0]
            if value or default is None:
                return value or ""
            return default

        node.value = _ENV_REFERENCE.sub(substitute, node.value)
        for name in unset:
            self.problems.append((node.start_mark.line + 1, key,
                                  f"environment variable {name} is not set "
                                  f"(write ${{{name}:-default}} to give a default)"))
        if node.style is None and not unset:  # plain scalar: `port: ${PORT}` becomes an int
            node.tag = self._resolver.resolve(yaml.ScalarNode, node.value, (True, False))


def _data_path(loc: tuple[str | int, ...], data: Any) -> KeyPath:
    """Pydantic's error location as a path in the file: drops union tags such as 'onnx'."""
    key: list[str | int] = []
    for position, part in enumerate(loc):
        in_file = (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data))
        if in_file:
            data = data[part]
        elif position < len(loc) - 1 or not isinstance(data, dict):
            continue  # a union member's name, not a key of the file
        key.append(part)
    return tuple(key)


def _message(error: Any, key: KeyPath, data: Any) -> str:
    """One pydantic error as a user-facing sentence (never echoing an unknown key's value)."""
    if error["type"] == "extra_forbidden":
        return _unknown_key(key, data)
    if key == ("watch",) and (error["type"] in ("missing", "too_short") or error["input"] is None):
        return "at least one folder to watch is required (a list of '- path: /folder' entries)"
    if error["type"] == "missing":
        return "required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{message} (got {_shorten(repr(error['input']))})"


def _unknown_key(key: KeyPath, data: Any) -> str:
    name = str(key[-1])
    if key[-2:] == ("mqtt", "password"):
        return ("unknown key; keep the password out of this file: write it to a file "
                "and set 'password_file' to that file's path")
    fields = _field_names(key[:-1], data)
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
    return f"unknown key; {hint}"


def _field_names(key: KeyPath, data: Any) -> list[str]:
    """Field names of the section at `key` (for a union, the member the data's `type` picks)."""
    models: list[type[BaseModel]] = [Settings]
    for part in key:
        data = data[part]
        if isinstance(part, str):
            fields = [m.model_fields[part] for m in models if part in m.model_fields]
            models = _models_in(fields[0].annotation) if fields else []
    if len(models) > 1 and isinstance(data, dict):
        chosen = [m for m in models if "type" in m.model_fields
                  and m.model_fields["type"].default == data.get("type")]
        models = chosen or models
    return sorted({name for model in models for name in model.model_fields})


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (unwrapping Optional, list, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def _dotted(key: KeyPath) -> str:
    """("watch", 0, "path") -> "watch[0].path"."""
    text = ""
    for part in key:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def settings_warnings(settings: Settings) -> list[str]:
    """Things that are valid but probably not what the user wants (check-config prints them)."""
    warnings: list[str] = []
    sources: dict[str, int] = {}
    for index, watch in enumerate(settings.watch):
        where = f"watch[{index}]"
        if not watch.path.exists():
            warnings.append(f"{where}.path: {watch.path} does not exist yet; "
                            "it will be watched when it appears")
        elif not watch.path.is_dir():
            warnings.append(f"{where}.path: {watch.path} is not a folder")
        if watch.source_name in sources:
            warnings.append(f"{where}.source: '{watch.source_name}' is also the source of "
                            f"watch[{sources[watch.source_name]}]; payloads cannot tell them apart")
        sources.setdefault(watch.source_name, index)
    if settings.mqtt is not None and settings.mqtt.username is None and \
            settings.mqtt.password() is not None:
            warnings.append("mqtt.username: not set, so the MQTT password found is not used")
    return warnings
