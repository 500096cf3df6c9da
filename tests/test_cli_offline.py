"""`dinowatch embed -c FILE` uses the configured model, and a machine without DNS gets one
clear error at once: a failed name resolution is offline, not a reason to retry for 31 s."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon_process import write_config
from dinowatch import DinoEmbedder, models
from dinowatch.imaging import ImagingOptions
from dinowatch.models import ModelEntry, ModelUnavailable
from dinowatch.testing import synthetic_photo

DINOWATCH = [sys.executable, "-m", "dinowatch.cli"]
# Nothing of the caller's: no config, model cache, offline switch or proxy settings.
AMBIENT = {"DINOWATCH_CONFIG", "DINOWATCH_MODEL_DIR", "DINOWATCH_OFFLINE", "http_proxy",
           "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "no_proxy",
           "NO_PROXY"}
ENV = {key: value for key, value in os.environ.items() if key not in AMBIENT}


def embed(*args: object, env: dict[str, str] | None = None,
          prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), *DINOWATCH, "embed", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env={**ENV, **(env or {})},
                          check=False)


def vectors(result: subprocess.CompletedProcess) -> np.ndarray:
    assert result.returncode == 0, result.stderr
    return np.array([json.loads(line)["vector"] for line in result.stdout.splitlines()],
                    dtype=np.float32)


@pytest.fixture
def rotated_jpeg(tmp_path: Path) -> Path:
    """A camera JPEG stored landscape with EXIF orientation 6 (rotate 90° to view)."""
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    synthetic_photo(320, 200, seed=5).save(path, quality=92, exif=exif)
    return path


def test_embed_with_config_uses_its_model_imaging_and_normalize(
        tmp_path: Path, tiny_model: Path, rotated_jpeg: Path) -> None:
    config = write_config(tmp_path / "config.yaml", data_dir=str(tmp_path / "data"),
                          model={"path": str(tiny_model), "normalize": False},
                          imaging={"exif_transpose": True, "fast_jpeg": False},
                          watch=[{"path": str(tmp_path)}], mqtt=None)
    configured = DinoEmbedder(tiny_model, imaging=ImagingOptions(exif_transpose=True))
    expected = configured.embed(rotated_jpeg, normalize=False)

    with_config = vectors(embed(rotated_jpeg, "-c", config))
    np.testing.assert_allclose(with_config[0], expected, rtol=1e-5, atol=1e-5)
    assert abs(np.linalg.norm(with_config[0]) - 1) > 1e-3  # normalize: false
    # $DINOWATCH_CONFIG names the same config when -c is not given
    from_env = vectors(embed(rotated_jpeg, env={"DINOWATCH_CONFIG": str(config)}))
    np.testing.assert_array_equal(from_env, with_config)
    # without a config: the library defaults (no EXIF rotation, normalized)
    plain = vectors(embed(rotated_jpeg, "--model", tiny_model))
    assert float(plain[0] @ (expected / np.linalg.norm(expected))) < 0.9999

    small = write_config(tmp_path / "small.yaml", model={"path": str(tiny_model)},
                         imaging={"max_pixels": 1000}, watch=[{"path": str(tmp_path)}])
    refused = embed(rotated_jpeg, "-c", small)
    assert refused.returncode == 1 and "rotated.jpg" in refused.stderr, refused.stderr


def test_embed_with_a_broken_config_exits_78(tmp_path: Path, photo: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("watch:\n  - path: /tmp\nmodel:\n  nmae: x\n")
    result = embed(photo, "-c", config)
    assert result.returncode == 78
    assert "bad.yaml:4: model.nmae: unknown key" in result.stderr


def no_network_namespace() -> list[str]:
    """`unshare -n`: this process alone, without any network (skips where not allowed)."""
    command = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    try:
        probe = subprocess.run([*command, "true"], capture_output=True, timeout=10, check=False)
    except FileNotFoundError:
        pytest.skip("no `unshare` here: the network-namespace variant cannot run")
    if probe.returncode != 0:
        pytest.skip(f"`{' '.join(command)}` is not allowed here ({probe.stderr.decode().strip()})"
                    ": the network-namespace variant cannot run")
    return command


@pytest.mark.parametrize("how", ["unresolvable proxy", "no network at all"])
def test_embed_without_dns_is_one_error_within_2_s(how: str, tmp_path: Path,
                                                   photo: Path) -> None:
    data = tmp_path / "data"
    config = write_config(tmp_path / "config.yaml", data_dir=str(data),
                          watch=[{"path": str(tmp_path)}], mqtt=None)
    if how == "unresolvable proxy":
        # urllib's own seam: the download goes through a proxy whose name cannot be resolved
        # (.invalid never resolves, RFC 6761), as the registry host cannot be without DNS.
        env, prefix = {"https_proxy": "http://dinowatch-test.invalid:3128"}, []
    else:
        env, prefix = {}, no_network_namespace()
    started = time.monotonic()
    result = embed(photo, "-c", config, env=env, prefix=prefix)
    elapsed = time.monotonic() - started

    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("dinowatch:")]
    assert len(errors) == 1, result.stderr
    assert "is not available: offline (cannot connect while fetching https://" in errors[0]
    message = result.stderr
    assert "dinowatch model fetch dinov2-vits14" in message and "--model" in message
    assert str(data / "models") in message  # the configured data_dir's model cache
    assert "retrying" not in message and "Traceback" not in message
    assert elapsed < 2.0, f"{elapsed:.1f} s"
    assert not (data / "models" / "dinov2_vits14.onnx").exists()


def test_fetch_does_not_retry_a_failed_name_resolution(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: object, **kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    slept: list[float] = []
    monkeypatch.setattr(models.time, "sleep", slept.append)
    entry = ModelEntry(name="dns-test", url="https://models.example/x.onnx", size=10,
                       sha256="0" * 64, dim=384, filename="x.onnx")
    with pytest.raises(ModelUnavailable, match="Temporary failure in name resolution") as caught:
        models.fetch(entry, tmp_path, retries=5, backoff=1.0, timeout=5.0)
    assert slept == []  # not one retry
    assert isinstance(caught.value.__cause__, OSError)
    assert "dinowatch model fetch dns-test" in str(caught.value)
