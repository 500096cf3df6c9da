"""DinoEmbedder: the seed's preprocessing and API, output handling and the bad-input table."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from dinowatch import DinoEmbedder
from dinowatch.backends import InputSpec
from dinowatch.embedder import postprocess, preprocess
from dinowatch.imaging import ImageError, ImageTooLarge
from dinowatch.testing import synthetic_photo, write_model, write_png_header


def seed_formula(image: Image.Image) -> np.ndarray:
    """The seed library's preprocessing, written out independently of dinowatch."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = image.resize((224, 224), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    pixels = (pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return np.expand_dims(np.transpose(pixels, (2, 0, 1)), 0)


@pytest.fixture(scope="module")
def embedder(tiny_model: Path) -> DinoEmbedder:
    return DinoEmbedder(tiny_model)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_preprocessing_is_the_seed_formula(mode: str) -> None:
    image = synthetic_photo(333, 251, seed=8).convert(mode)
    tensor = preprocess(image)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[None], seed_formula(image), atol=1e-5)


def test_raw_nhwc_uint8_input_for_device_side_normalization() -> None:
    image = synthetic_photo(300, 200, seed=9)
    tensor = preprocess(image, InputSpec(layout="NHWC", dtype="uint8"))
    assert tensor.shape == (224, 224, 3) and tensor.dtype == np.uint8
    expected = np.asarray(image.resize((224, 224), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(tensor, expected)


def test_embed_is_a_unit_float32_vector_matching_the_model_on_the_seed_tensor(
        embedder: DinoEmbedder, photo: Path) -> None:
    vector = embedder.embed(photo)
    assert vector.shape == (384,) and vector.dtype == np.float32
    assert abs(np.linalg.norm(vector) - 1) < 1e-5
    with Image.open(photo) as image:
        direct = embedder.backend.infer(seed_formula(image).astype(np.float32))[0]
    np.testing.assert_allclose(vector, direct / np.linalg.norm(direct), atol=1e-5)


def test_raw_output_is_the_unnormalized_vector(embedder: DinoEmbedder, photo: Path) -> None:
    raw = embedder.embed(photo, normalize=False)
    assert abs(np.linalg.norm(raw) - 1) > 0.01
    np.testing.assert_allclose(raw / np.linalg.norm(raw), embedder.embed(photo), atol=1e-6)


def test_batch_and_pil_entry_points_agree_with_embed(embedder: DinoEmbedder,
                                                      tmp_path: Path) -> None:
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"{seed}.png")
        synthetic_photo(200, 150, seed=seed).save(paths[-1])
    batch = embedder.embed_batch(paths)
    assert batch.shape == (3, 384)
    for row, path in zip(batch, paths, strict=True):
        np.testing.assert_allclose(row, embedder.embed(path), atol=1e-5)
        with Image.open(path) as image:
            np.testing.assert_allclose(embedder.embed_image(image), row, atol=1e-5)
    assert embedder.embed_batch([]).shape == (0, 384)


def test_all_tokens_export_takes_the_cls_token(embedder: DinoEmbedder, tiny_all_tokens_model: Path,
                                               photo: Path) -> None:
    tokens_embedder = DinoEmbedder(tiny_all_tokens_model)
    np.testing.assert_allclose(tokens_embedder.embed(photo), embedder.embed(photo), atol=1e-5)


def test_width_other_than_the_registry_says_is_an_error_naming_the_shape(
        tmp_path: Path, photo: Path) -> None:
    narrow = DinoEmbedder(write_model(tmp_path / "narrow.onnx", "tiny", dim=192))
    with pytest.raises(RuntimeError, match=r"shape \(1, 192\)"):
        narrow.embed(photo)


@pytest.mark.parametrize("shape", [(2,), (2, 4, 8, 384), (2, 100)])
def test_other_output_shapes_are_errors_naming_the_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(RuntimeError, match=rf"shape {re.escape(str(shape))}"):
        postprocess(np.ones(shape, np.float32), 384)


def test_zero_vector_stays_zero() -> None:
    vectors = postprocess(np.zeros((2, 384), np.float32), 384)
    assert not np.isnan(vectors).any() and not vectors.any()


def test_missing_or_broken_model_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.onnx"):
        DinoEmbedder(tmp_path / "nowhere.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    with pytest.raises(RuntimeError, match=r"broken\.onnx"):
        DinoEmbedder(broken)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user can reach (pytest's tmp_path is private to root under CI)."""
    path = Path(tempfile.mkdtemp(prefix="dinowatch-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Run the block as `nobody` when tests run as root (CI does): root ignores mode 000."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def _missing(d: Path) -> Path:
    return d / "missing.jpg"


def _zero_bytes(d: Path) -> Path:
    (d / "empty.jpg").touch()
    return d / "empty.jpg"


def _text_as_jpeg(d: Path) -> Path:
    (d / "readme.jpg").write_text("hello, I am text\n")
    return d / "readme.jpg"


def _half_jpeg(d: Path) -> Path:
    whole = d / "whole.jpg"
    synthetic_photo(640, 480, seed=2).save(whole, quality=90)
    (d / "half.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return d / "half.jpg"


def _huge_png_header(d: Path) -> Path:
    return write_png_header(d / "huge.png", 20000, 20000)


def _unreadable(d: Path) -> Path:
    path = d / "secret.jpg"
    synthetic_photo(64, 64).save(path)
    path.chmod(0)
    return path


def _directory(d: Path) -> Path:
    (d / "folder.jpg").mkdir()
    return d / "folder.jpg"


BAD_INPUTS: list[tuple[Callable[[Path], Path], type[Exception]]] = [
    (_missing, FileNotFoundError),
    (_zero_bytes, UnidentifiedImageError),
    (_text_as_jpeg, UnidentifiedImageError),
    (_half_jpeg, ImageError),
    (_huge_png_header, ImageTooLarge),
    (_unreadable, ImageError),
    (_directory, ImageError),
]


@pytest.mark.parametrize(("make", "error"), BAD_INPUTS, ids=[m.__name__[1:] for m, _ in BAD_INPUTS])
def test_bad_input_raises_a_clear_error_and_the_next_image_still_embeds(
        embedder: DinoEmbedder, photo: Path, open_dir: Path,
        make: Callable[[Path], Path], error: type[Exception]) -> None:
    before = embedder.embed(photo)
    bad = make(open_dir)
    as_user = unprivileged() if make is _unreadable else contextlib.nullcontext()
    with pytest.raises(error) as caught, as_user:
        embedder.embed(bad)
    assert bad.name in str(caught.value)
    np.testing.assert_array_equal(embedder.embed(photo), before)


def test_path_with_spaces_and_non_ascii_characters(embedder: DinoEmbedder, photo: Path,
                                                   tmp_path: Path) -> None:
    odd = tmp_path / "Ferien 2024 Zürich" / "été à 東京 #1.jpg"
    odd.parent.mkdir()
    shutil.copy(photo, odd)
    np.testing.assert_array_equal(embedder.embed(odd), embedder.embed(photo))


def test_model_identity_names_only_the_registry_file_as_the_registry_model(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    from dinowatch import models

    with DinoEmbedder(tiny_model) as stand_in:
        assert stand_in.identity.payload() == {
            "name": "stand-in:tiny.onnx", "sha256": stand_in.model_sha256, "pinned": False,
            "stand_in": True}
    exported = onnx.load(str(tiny_model))  # the same graph, exported by someone else
    exported.producer_name = "pytorch"
    other = tmp_path / "my-dinov2.onnx"
    onnx.save(exported, str(other))
    with DinoEmbedder(other) as embedder:
        assert embedder.identity.payload() == {
            "name": "my-dinov2.onnx", "sha256": embedder.model_sha256, "pinned": False}
        # The same bytes as the registry pins: then, and only then, the registry's name.
        entry = models.get_entry(models.DEFAULT_MODEL)
        monkeypatch.setitem(models.REGISTRY, models.DEFAULT_MODEL,
                            dataclasses.replace(entry, sha256=embedder.model_sha256))
        del embedder.__dict__["identity"]
        assert embedder.identity.payload() == {
            "name": models.DEFAULT_MODEL, "sha256": embedder.model_sha256, "pinned": True}
