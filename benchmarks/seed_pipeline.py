"""The seed pipeline, faithfully, beside dinowatch's library path (issue 9, first part).

The seed (`../shared/seed/dino_embedding.md`) embeds one image after another: PIL opens
and converts to RGB, resizes to 224x224 BILINEAR, scales by 1/255, normalizes with the
ImageNet mean and std, transposes to CHW, adds a batch axis, runs one ONNX Runtime session
(CPU provider, ORT_ENABLE_ALL), takes the CLS token and L2-normalizes. This script does
exactly that, then embeds the same files with `dinowatch.DinoEmbedder` (draft decoding,
EXIF orientation, batches of 4), and prints both rates and the cosine of dinowatch's
vectors to the seed's.

    python3 benchmarks/seed_pipeline.py --model MODEL.onnx --images DIR [--limit N]
    python3 benchmarks/seed_pipeline.py --make-images DIR [--count 40]   # 12 MP camera-like JPEGs

The daemon end to end (file written -> vector committed -> PUBACK), per-stage CPU seconds,
peak RSS and the other image sets are `e2e_bench.py`, which reuses `SeedEmbedder` and the
helpers below; the image sets are in `bench_images.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from bench_images import ensure_images
from PIL import Image

from dinowatch import DinoEmbedder
from dinowatch.config import ImagingSettings

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
BATCH = 4  # dinowatch's pipeline batch


class SeedEmbedder:
    """The seed's DinoEmbedder, as its documentation writes it."""

    def __init__(self, model_path: Path) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), options,
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def embed(self, path: Path) -> np.ndarray:
        image: Image.Image = Image.open(path)
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = image.resize((224, 224), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
        batch = np.expand_dims(np.transpose(pixels, (2, 0, 1)), axis=0)
        embedding = np.squeeze(self.session.run(None, {self.input: batch})[0])
        if embedding.ndim > 1:
            embedding = embedding[0]  # the CLS token
        norm = np.linalg.norm(embedding)
        return embedding / norm if norm > 0 else embedding


def embed_timed(seed: SeedEmbedder, images: list[Path]) -> tuple[np.ndarray, list[float]]:
    """The seed's vectors for `images`, one after another, and each one's wall time in s."""
    vectors, seconds = [], []
    for path in images:
        started = time.perf_counter()
        vectors.append(seed.embed(path))
        seconds.append(time.perf_counter() - started)
    return np.stack(vectors), seconds


def cosine_summary(ours: np.ndarray, seeds: np.ndarray) -> dict[str, float]:
    """Mean and min cosine of each row of `ours` to the same row of `seeds` (both unit)."""
    cosines = np.sum(ours * seeds, axis=1)
    return {"cosine_mean": round(float(statistics.fmean(cosines)), 6),
            "cosine_min": round(float(cosines.min()), 6)}


def run(model: Path, images: list[Path]) -> dict[str, object]:
    seed = SeedEmbedder(model)
    seed.embed(images[0])  # both pay their first-run graph preparation outside the timing
    seed_vectors, per_image = embed_timed(seed, images)
    seed_seconds = sum(per_image)

    # The daemon's imaging defaults (JPEG draft decoding on); the library's are the seed's.
    ours = DinoEmbedder(model, imaging=ImagingSettings().options())
    ours.warm_up()
    started = time.perf_counter()
    our_vectors = np.concatenate([ours.embed_batch(images[i:i + BATCH])
                                  for i in range(0, len(images), BATCH)])
    our_seconds = time.perf_counter() - started
    return {"benchmark": "seed_pipeline", "images": len(images), "model": model.name,
            "seed_images_per_s": round(len(images) / seed_seconds, 2),
            "dinowatch_images_per_s": round(len(images) / our_seconds, 2),
            "ratio": round(seed_seconds / our_seconds, 2),
            **cosine_summary(our_vectors, seed_vectors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="ONNX model (a stand-in: "
                                                   "python3 -m dinowatch.testing --out M.onnx)")
    parser.add_argument("--images", type=Path, help="folder of images to embed")
    parser.add_argument("--limit", type=int, default=40, help="at most this many images")
    parser.add_argument("--make-images", type=Path, metavar="DIR",
                        help="write camera-like 12 MP JPEGs into DIR (the e2e_bench 'jpeg12' "
                             "set; files already there are kept) and stop")
    parser.add_argument("--count", type=int, default=40, help="with --make-images")
    args = parser.parse_args()
    if args.make_images:
        ensure_images("jpeg12", args.make_images, args.count)
        return
    if not args.model or not args.images:
        parser.error("--model and --images are needed (or --make-images DIR)")
    images = sorted(p for p in args.images.iterdir() if p.is_file())[: args.limit]
    result = run(args.model, images)
    print(f"seed pipeline   {result['seed_images_per_s']:>7} images/s  (sequential, exact "
          "decode)")
    print(f"dinowatch       {result['dinowatch_images_per_s']:>7} images/s  (library path, "
          f"daemon's imaging defaults, batches of {BATCH}) = {result['ratio']}x")
    print(f"cosine to the seed: mean {result['cosine_mean']}, min {result['cosine_min']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
