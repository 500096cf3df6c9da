"""Config loading: defaults, the example file, errors with key path and line, secrets."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from dinowatch.config import (
    DEFAULT_CONFIG_PATH,
    IMAGE_PATTERNS,
    ConfigError,
    Settings,
    WatchSettings,
    config_path,
    load_settings,
    settings_warnings,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "dinowatch.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DINOWATCH_CONFIG", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value.errors


# ---- defaults and the example file ----------------------------------------------------------


def test_minimal_config_fills_defaults(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
        watch:
          - path: /srv/camera
    """)
    settings = load_settings(cfg)
    assert settings.device_id == socket.gethostname()
    assert settings.data_dir == Path("/var/lib/dinowatch")
    assert settings.gallery_dir == Path("/var/lib/dinowatch/gallery")
    assert settings.model.name == "dinov2-vits14"
    assert settings.backend.type == "onnx"
    assert settings.mqtt is not None
    assert (settings.mqtt.host, settings.mqtt.port, settings.mqtt.qos) == ("localhost", 1883, 1)
    assert settings.matching.threshold == 0.75
    assert settings.matching.duplicates.threshold == 0.97
    assert settings.logging.level == "INFO"
    watch = settings.watch[0]
    assert watch.source_name == "camera"
    assert watch.include == IMAGE_PATTERNS
    assert watch.recursive and not watch.polling


def test_gallery_dir_and_friendly_spellings(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
        device_id: null
        data_dir: /data
        matching: {gallery_dir: /refs}
        mqtt: {protocol: 3.1.1}
        logging: {level: debug}
        watch: [{path: /a}]
    """)
    settings = load_settings(cfg)
    assert settings.device_id == socket.gethostname()
    assert settings.gallery_dir == Path("/refs")
    assert settings.mqtt is not None and settings.mqtt.protocol == "3.1.1"
    assert settings.logging.level == "DEBUG"
    five = write(tmp_path, "mqtt: {protocol: 5}\nwatch: [{path: /a}]\n", "five.yaml")
    assert load_settings(five).mqtt.protocol == "5"  # type: ignore[union-attr]


def test_mqtt_null_runs_without_broker(tmp_path: Path) -> None:
    cfg = write(tmp_path, "mqtt: null\nwatch: [{path: /a}]\n")
    assert load_settings(cfg).mqtt is None


def test_example_config_loads_with_defaults() -> None:
    settings = load_settings(EXAMPLE)
    inbox = WatchSettings(path=Path("/srv/dinowatch/inbox"), source="inbox")
    assert settings == Settings(watch=[inbox])


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models(arg)]


def _missing_keys(model: type[BaseModel], data: dict[str, Any], prefix: str) -> tuple[int, list]:
    """(fields checked, dotted fields absent from `data`), recursing into every section."""
    checked, missing = 0, []
    for name, field in model.model_fields.items():
        checked += 1
        if name not in data:
            missing.append(prefix + name)
            continue
        value = data[name]
        if get_origin(field.annotation) is dict:  # keyed sections (matching.labels): each one
            value = list(value.values())
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict):
                continue
            members = [m for m in _models(field.annotation)
                       if "type" not in m.model_fields
                       or m.model_fields["type"].default == item.get("type")]
            if members:
                sub_checked, sub_missing = _missing_keys(members[0], item, f"{prefix}{name}.")
                checked += sub_checked
                missing += sub_missing
    return checked, missing


def test_example_config_covers_every_field() -> None:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    checked, missing = _missing_keys(Settings, data, "")
    assert missing == []
    assert checked > 40  # the walk really went into the sections


def test_example_config_documents_env_expansion() -> None:
    assert "${VAR:-default}" in EXAMPLE.read_text(encoding="utf-8")


# ---- errors: key path, line, "did you mean" ---------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
        watch: [{path: /a}]
        loging: {level: INFO}
    """)
    assert errors_of(cfg) == [f"{cfg}:2: loging: unknown key; did you mean 'logging'?"]


def test_unknown_nested_keys(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
        watch:
          - path: /a
            recursve: false
        mqtt:
          tls:
            ca_cert: /etc/ssl/ca.pem
        backend: {type: onnx, thread: 2}
    """)
    assert errors_of(cfg) == [
        f"{cfg}:3: watch[0].recursve: unknown key; did you mean 'recursive'?",
        f"{cfg}:6: mqtt.tls.ca_cert: unknown key; did you mean 'ca_certs'?",
        f"{cfg}:7: backend.thread: unknown key; did you mean 'threads'?",
    ]


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    cfg = write(tmp_path, "watch: [{path: /a}]\nimaging: {zzz: 1}\n")
    (error,) = errors_of(cfg)
    assert error.startswith(f"{cfg}:2: imaging.zzz: unknown key; valid keys: ")
    assert "exif_transpose, fast_jpeg, heif_thumbnail, max_pixels" in error


def test_wrong_type(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
        watch:
          - path: /a
            recursive: sometimes
    """)
    (error,) = errors_of(cfg)
    assert error.startswith(f"{cfg}:3: watch[0].recursive: Input should be a valid boolean")
    assert error.endswith("(got 'sometimes')")


def test_port_out_of_range(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
        watch: [{path: /a}]
        mqtt:
          host: broker
          port: 70000
    """)
    assert errors_of(cfg) == [
        f"{cfg}:4: mqtt.port: Input should be less than or equal to 65535 (got 70000)"
    ]


def test_threshold_above_one(tmp_path: Path) -> None:
    cfg = write(tmp_path, "watch: [{path: /a}]\nmatching:\n  threshold: 1.5\n")
    assert errors_of(cfg) == [
        f"{cfg}:3: matching.threshold: Input should be less than or equal to 1 (got 1.5)"
    ]


@pytest.mark.parametrize("text", ["", "data_dir: /d\n", "watch: []\n", "watch:\n"])
def test_watch_is_required(tmp_path: Path, text: str) -> None:
    cfg = write(tmp_path, text)
    (error,) = errors_of(cfg)
    assert error.startswith(f"{cfg}:1: watch: at least one folder to watch is required")


def test_missing_key_points_at_its_parent(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
        watch:
          - path: /a
          - source: b
    """)
    assert errors_of(cfg) == [f"{cfg}:3: watch[1].path: required key is missing"]


def test_all_errors_listed_at_once_in_line_order(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
        device_id: garage/pi
        watch:
          - path: /a
            settle_seconds: -1
        matching: {top_k: 0}
        mqtt: {qos: 3}
    """)
    errors = errors_of(cfg)
    assert [error.split(": ")[0:2] for error in errors] == [
        [f"{cfg}:1", "device_id"],
        [f"{cfg}:4", "watch[0].settle_seconds"],
        [f"{cfg}:5", "matching.top_k"],
        [f"{cfg}:6", "mqtt.qos"],
    ]
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg)
    assert str(caught.value) == "\n".join(errors)


def test_duplicate_key(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
        watch: [{path: /a}]
        mqtt:
          port: 1883
          port: 1884
    """)
    assert errors_of(cfg) == [f"{cfg}:4: mqtt.port: duplicate key; it is also on line 3"]


# ---- environment variables ------------------------------------------------------------------


def test_env_expansion_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DW_HOST", "broker.lan")
    monkeypatch.setenv("DW_PORT", "8883")
    monkeypatch.setenv("DW_EMPTY", "")
    monkeypatch.delenv("DW_UNSET", raising=False)
    cfg = write(tmp_path, """
        device_id: ${DW_UNSET:-garage-pi}
        data_dir: /var/lib/${DW_UNSET:-dinowatch}/${DW_EMPTY:-x}
        watch:
          - path: ${DW_UNSET:-/srv}/camera
            source: "cam-${DW_EMPTY}"
        mqtt:
          host: ${DW_HOST}
          port: ${DW_PORT}
          topic_prefix: "${DW_EMPTY:-dinowatch}"
    """)
    settings = load_settings(cfg)
    assert settings.device_id == "garage-pi"
    assert settings.data_dir == Path("/var/lib/dinowatch/x")
    assert settings.watch[0].path == Path("/srv/camera")
    assert settings.watch[0].source == "cam-"
    assert settings.mqtt is not None
    assert (settings.mqtt.host, settings.mqtt.port) == ("broker.lan", 8883)
    assert settings.mqtt.topic_prefix == "dinowatch"


def test_expanded_plain_scalar_is_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DW_PORT", "70000")
    cfg = write(tmp_path, "watch: [{path: /a}]\nmqtt:\n  port: ${DW_PORT}\n")
    assert errors_of(cfg) == [
        f"{cfg}:3: mqtt.port: Input should be less than or equal to 65535 (got 70000)"
    ]


def test_unset_env_var_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DW_UNSET", raising=False)
    cfg = write(tmp_path, """
        watch:
          - path: /a
        mqtt:
          port: ${DW_UNSET}
    """)
    assert errors_of(cfg) == [
        f"{cfg}:4: mqtt.port: environment variable DW_UNSET is not set "
        "(write ${DW_UNSET:-default} to give a default)"
    ]


# ---- files and YAML -------------------------------------------------------------------------


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
        watch:
          - path: /a
        mqtt:
          host: localhost
         port: 1883
    """)
    (error,) = errors_of(cfg)
    assert error.startswith(f"{cfg}:5: YAML syntax error: ")


def test_missing_file_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "nope.yaml"
    (error,) = errors_of(cfg)
    assert error.startswith(f"{cfg}: no such file")


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path)  # a directory
    assert error.startswith(f"{tmp_path}: cannot read")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    cfg = write(tmp_path, "- path: /a\n")
    assert errors_of(cfg) == [
        f"{cfg}:1: the top level must be a mapping of settings (key: value), not a list"
    ]


def test_config_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_path(None) == DEFAULT_CONFIG_PATH == Path("/etc/dinowatch/config.yaml")
    monkeypatch.setenv("DINOWATCH_CONFIG", str(tmp_path / "env.yaml"))
    assert config_path(None) == tmp_path / "env.yaml"
    assert config_path(tmp_path / "cli.yaml") == tmp_path / "cli.yaml"


# ---- secrets ---------------------------------------------------------------------------------

SECRET = "s3cret-Pa55word"


def test_password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "mqtt_password"
    secret.write_text(SECRET + "\n", encoding="utf-8")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt_password").write_text("other\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    cfg = write(tmp_path, f"""
        watch: [{{path: /a}}]
        mqtt: {{username: dino, password_file: {secret}}}
    """)
    settings = load_settings(cfg)
    assert settings.mqtt is not None
    assert settings.mqtt.password() == SECRET  # password_file wins over the credential
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.mqtt)):
        assert SECRET not in text
    assert all(SECRET not in warning for warning in settings_warnings(settings))


def test_password_from_systemd_credential(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, "watch: [{path: /a}]\nmqtt: {username: dino}\n")
    settings = load_settings(cfg)
    assert settings.mqtt is not None
    assert settings.mqtt.password() is None
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert settings.mqtt.password() is None  # no mqtt_password credential there
    (tmp_path / "mqtt_password").write_text(SECRET + "\r\n", encoding="utf-8")
    assert settings.mqtt.password() == SECRET


def test_unreadable_password_file_is_named(tmp_path: Path) -> None:
    cfg = write(tmp_path, f"watch: [{{path: /a}}]\nmqtt: {{password_file: {tmp_path}}}\n")
    settings = load_settings(cfg)
    assert settings.mqtt is not None
    with pytest.raises(ConfigError) as caught:
        settings.mqtt.password()
    assert caught.value.errors == [f"mqtt.password_file: cannot read {tmp_path}: Is a directory"]


def test_password_never_echoed_in_errors(tmp_path: Path) -> None:
    cfg = write(tmp_path, f"""
        watch: [{{path: /a}}]
        mqtt:
          password: {SECRET}
          port: 70000
    """)
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg)
    assert SECRET not in str(caught.value)
    assert caught.value.errors[0].startswith(f"{cfg}:3: mqtt.password: unknown key; ")
    assert "password_file" in caught.value.errors[0]


# ---- warnings ---------------------------------------------------------------------------------


def test_warnings(tmp_path: Path) -> None:
    existing = tmp_path / "inbox"
    existing.mkdir()
    missing = tmp_path / "later"
    cfg = write(tmp_path, f"""
        watch:
          - path: {existing}
          - path: {missing}
            source: inbox
    """)
    assert settings_warnings(load_settings(cfg)) == [
        f"watch[1].path: {missing} does not exist yet; it will be watched when it appears",
        "watch[1].source: 'inbox' is also the source of watch[0]; "
        "payloads cannot tell them apart",
    ]


def test_missing_files_and_a_folder_watched_twice_are_errors(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
        watch:
          - path: /srv/a
          - path: /srv/a
        model:
          path: /nowhere/model.onnx
        mqtt:
          tls:
            enabled: true
            ca_certs: /nowhere/ca.pem
    """)
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg)
    text = "\n".join(caught.value.errors)
    assert "config.yaml:1: watch: watch[1].path /srv/a is watched twice" in text
    assert "config.yaml:5: model.path: /nowhere/model.onnx is not a file" in text
    assert "config.yaml:9: mqtt.tls.ca_certs: /nowhere/ca.pem is not a file" in text
