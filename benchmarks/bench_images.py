"""Generated image sets for the benchmarks, built once into a cache folder and reused.

Every image is a smooth random scene plus sensor-like noise: the noise is what makes real
photos cost their decode time (a flat synthetic image decodes and compresses far too fast).
Image k of a set is the same scene at every size and in every format, so figures of two
sets differ by the format and the size alone.

| set | what |
| --- | --- |
| jpeg12 | camera-like 12 MP (4032x3024) JPEG, quality 90, about 3 MB |
| mpo12 | the same, carrying an MPF preview (1920x1440): Pillow opens it as MPO |
| jpeg1080 | 1920x1080 JPEG, quality 90 |
| png | 1920x1080 PNG (noisy, so about 5 MB) |
| heic | 12 MP HEIC, quality 85, with an embedded 640-px thumbnail (~14 s each to encode) |
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import dinowatch.imaging  # noqa: F401  (registers pillow_heif's HEIF opener and saver)

CAMERA_12MP = (4032, 3024)
FULL_HD = (1920, 1080)
MPO_PREVIEW = (1920, 1440)
HEIC_THUMBNAIL = 640  # pixels, longest side
NOISE_SIGMA = 6.0  # sensor-like noise, in 8-bit levels


def camera_scene(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth random scene of `size` (width, height) plus Gaussian noise, RGB."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    scene = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.normal(0, NOISE_SIGMA, scene.shape).astype(np.int16)
    return Image.fromarray(np.clip(scene + noise, 0, 255).astype(np.uint8))


def _save_jpeg(image: Image.Image, path: Path) -> None:
    image.save(path, format="JPEG", quality=90)


def _save_mpo(image: Image.Image, path: Path) -> None:
    image.save(path, format="MPO", save_all=True,
               append_images=[image.resize(MPO_PREVIEW)], quality=90)


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG")


def _save_heic(image: Image.Image, path: Path) -> None:
    image.save(path, format="HEIF", quality=85, thumbnails=[HEIC_THUMBNAIL])


@dataclass(frozen=True)
class ImageSet:
    """One kind of image: its size, file suffix and how a scene is written."""

    name: str
    size: tuple[int, int]
    suffix: str
    save: Callable[[Image.Image, Path], None]
    description: str

    def path(self, folder: Path, index: int) -> Path:
        return folder / f"{self.name}-{index:03d}{self.suffix}"


SETS: dict[str, ImageSet] = {s.name: s for s in [
    ImageSet("jpeg12", CAMERA_12MP, ".jpg", _save_jpeg, "12 MP camera JPEG"),
    ImageSet("mpo12", CAMERA_12MP, ".jpg", _save_mpo, "12 MP JPEG with an MPF preview (MPO)"),
    ImageSet("jpeg1080", FULL_HD, ".jpg", _save_jpeg, "1920x1080 JPEG"),
    ImageSet("png", FULL_HD, ".png", _save_png, "1920x1080 PNG"),
    ImageSet("heic", CAMERA_12MP, ".heic", _save_heic, "12 MP HEIC, 640-px thumbnail"),
]}


def _write_one(set_name: str, path: Path, seed: int) -> None:
    """Write one image atomically: a half-written file is never mistaken for a cached one."""
    image_set = SETS[set_name]
    partial = path.with_name(f".{path.name}.part")
    image_set.save(camera_scene(image_set.size, seed), partial)
    partial.replace(path)


def ensure_images(set_name: str, folder: Path, count: int, *, seed_offset: int = 0,
                  workers: int | None = None) -> list[Path]:
    """The first `count` images of the set in `folder`, writing the missing ones in a process
    pool of `workers` (default: one per core). Returns their paths in order."""
    image_set = SETS[set_name]
    folder.mkdir(parents=True, exist_ok=True)
    paths = [image_set.path(folder, index) for index in range(count)]
    missing = [(index, path) for index, path in enumerate(paths) if not path.exists()]
    if missing:
        print(f"generating {len(missing)} {image_set.description} images in {folder} ...",
              flush=True)
        with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
            for done in [pool.submit(_write_one, set_name, path, seed_offset + index)
                         for index, path in missing]:
                done.result()
    return paths
