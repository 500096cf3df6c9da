"""The real `dinowatch` command: embed and model, output formats and exit codes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from dinowatch import DinoEmbedder
from dinowatch.imaging import ImagingOptions
from dinowatch.models import DEFAULT_MODEL, REGISTRY
from dinowatch.testing import synthetic_photo

DINOWATCH = [sys.executable, "-m", "dinowatch.cli"]


def dinowatch(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # Without the caller's $DINOWATCH_CONFIG, which `embed` would follow (README's two lines).
    ambient = {key: value for key, value in os.environ.items() if key != "DINOWATCH_CONFIG"}
    return subprocess.run([*DINOWATCH, *map(str, args)], capture_output=True, timeout=300,
                          env={**ambient, **(env or {})}, check=False)


@pytest.fixture(scope="module")
def camera_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12 MP JPEG the size a Raspberry Pi HQ camera writes (4056 x 3040)."""
    path = tmp_path_factory.mktemp("camera") / "hq camera.jpg"
    synthetic_photo(4056, 3040, seed=11).save(path, quality=92)
    return path


def seed_reference(model: Path, image_path: Path) -> np.ndarray:
    """The seed library's algorithm end to end, written out here independently of dinowatch."""
    with Image.open(image_path) as image:
        image = image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    pixels = (np.asarray(image, np.float32) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    batch = np.expand_dims(np.transpose(pixels, (2, 0, 1)), 0).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    embedding = np.squeeze(session.run(None, {session.get_inputs()[0].name: batch})[0])
    return embedding / np.linalg.norm(embedding)


@pytest.mark.slow
def test_embed_camera_jpeg_with_full_model_matches_the_seed(full_model: Path, camera_jpeg: Path,
                                                            report: Callable) -> None:
    result = dinowatch("embed", camera_jpeg, "--model", full_model)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    vector = np.array(record["vector"], dtype=np.float32)
    assert record["path"] == str(camera_jpeg)
    assert vector.shape == (384,)
    assert abs(np.linalg.norm(vector) - 1) <= 1e-5
    cosine = float(vector @ seed_reference(full_model, camera_jpeg))
    report(f"seed parity, 4056x3040 JPEG, full model, fast_jpeg off: cosine {cosine:.7f}")
    assert cosine >= 0.99999


@pytest.mark.slow
def test_fast_jpeg_fidelity_is_reported(full_model: Path, camera_jpeg: Path,
                                        report: Callable) -> None:
    exact = DinoEmbedder(full_model).embed(camera_jpeg)
    fast = DinoEmbedder(full_model, imaging=ImagingOptions(fast_jpeg=True)).embed(camera_jpeg)
    cosine = float(exact @ fast)
    report(f"fast_jpeg fidelity, 4056x3040 JPEG, full model: cosine {cosine:.6f} to the "
           "exact decode")
    assert cosine > 0.99


def test_npy_raw_and_a_bad_image_among_good_ones(tiny_model: Path, tmp_path: Path) -> None:
    good = [tmp_path / "a.png", tmp_path / "b.png"]
    for seed, path in enumerate(good):
        synthetic_photo(160, 120, seed=seed).save(path)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    result = dinowatch("embed", good[0], bad, good[1], "--model", tiny_model, "--format", "npy",
                       "--raw")
    assert result.returncode == 1
    assert "bad.jpg" in result.stderr.decode()
    array = np.load(io.BytesIO(result.stdout))
    assert array.shape == (2, 384) and array.dtype == np.float32
    expected = DinoEmbedder(tiny_model).embed_batch(good, normalize=False)
    np.testing.assert_allclose(array, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("command", [[], ["run"], ["check-config"], ["embed"], ["index"],
                                     ["status"], ["model"]])
def test_help_everywhere(command: list[str]) -> None:
    result = dinowatch(*command, "--help")
    assert result.returncode == 0
    assert b"usage: dinowatch" in result.stdout


@pytest.mark.parametrize("args", [["frobnicate"], ["embed"], ["embed", "x.jpg", "--format", "csv"],
                                  ["model", "destroy"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert dinowatch(*args).returncode == 2


def test_missing_model_offline_says_how_to_provision(tmp_path: Path, photo: Path) -> None:
    env = {"DINOWATCH_MODEL_DIR": str(tmp_path), "DINOWATCH_OFFLINE": "1"}
    result = dinowatch("embed", photo, env=env)
    assert result.returncode == 1
    message = result.stderr.decode()
    assert "dinowatch model fetch" in message and "--model" in message and str(tmp_path) in message


def test_model_info_and_verify(tmp_path: Path) -> None:
    env = {"DINOWATCH_MODEL_DIR": str(tmp_path)}
    entry = REGISTRY[DEFAULT_MODEL]
    info = dinowatch("model", "info", env=env)
    assert info.returncode == 0
    text = info.stdout.decode()
    assert entry.sha256 in text and entry.url in text and "present: False" in text
    missing = dinowatch("model", "verify", env=env)
    assert missing.returncode == 1 and b"is missing" in missing.stderr
    (tmp_path / entry.filename).write_bytes(b"\0" * 1000)
    corrupt = dinowatch("model", "verify", DEFAULT_MODEL, env=env)
    assert corrupt.returncode == 1 and b"failed verification" in corrupt.stderr
