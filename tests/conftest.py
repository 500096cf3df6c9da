"""Shared fixtures: seeded DINOv2-architecture models (built once per session) and images."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinowatch.testing import synthetic_photo, write_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_dir: Path) -> Path:
    """One-block ViT with the real input and output shapes: fast."""
    return write_model(model_dir / "tiny.onnx", "tiny")


@pytest.fixture(scope="session")
def full_model(model_dir: Path) -> Path:
    """The full ViT-S/14 graph (12 blocks, 22 M parameters) with seeded weights."""
    return write_model(model_dir / "full.onnx", "full")


@pytest.fixture(scope="session")
def tiny_all_tokens_model(model_dir: Path) -> Path:
    """Same weights as `tiny_model`, exported with every token: [B, 257, 384]."""
    return write_model(model_dir / "tiny_tokens.onnx", "tiny", all_tokens=True)


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    synthetic_photo(640, 480, seed=1).save(path, quality=90)
    return path
