"""Embed stage: the seed-compatible DinoEmbedder (preprocess -> backend -> postprocess)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Self

import numpy as np
from PIL import Image, UnidentifiedImageError

from dinowatch import models
from dinowatch.backends import (
    Backend,
    BackendConfig,
    BackendFailed,
    BackendUnavailable,
    InputSpec,
    create_backend,
    fallback_of,
)
from dinowatch.errors import DinowatchError
from dinowatch.imaging import ImagingOptions, decode, to_rgb

# What DinoEmbedder raises by contract for a bad model, image or inference (OSError covers
# FileNotFoundError); anything else is a bug.
EMBED_ERRORS = (OSError, UnidentifiedImageError, DinowatchError, RuntimeError, ValueError)

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class ModelIdentity:
    """What a vector came from, as payloads name it (DESIGN: `model` {name, sha256, pinned})."""

    name: str  # the registry entry if the file is its pinned file, else the file's own name
    sha256: str
    pinned: bool  # the registry entry's pinned file, or made here from it (model card)
    stand_in: bool  # random weights from dinowatch.testing: its vectors mean nothing
    fidelity: models.Fidelity | None = None  # a made model's cosine to its base model

    def payload(self) -> dict[str, object]:
        body: dict[str, object] = {"name": self.name, "sha256": self.sha256,
                                   "pinned": self.pinned}
        if self.fidelity is not None:
            body["fidelity"] = asdict(self.fidelity)
        return body | ({"stand_in": True} if self.stand_in else {})


@dataclass(frozen=True)
class Prepared:
    """One image ready for the backend, plus what the record stage wants to know of it."""

    tensor: np.ndarray  # one image laid out as `spec` says, no batch axis
    width: int
    height: int
    spec: InputSpec  # the input of the backend it was prepared for (a fallback's differs)


def preprocess(image: Image.Image, spec: InputSpec = InputSpec()) -> np.ndarray:
    """The seed's preprocessing: RGB, 224x224 BILINEAR, /255, ImageNet mean/std, CHW."""
    resized = to_rgb(image).resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    pixels: np.ndarray
    if not spec.normalized_on_host:
        pixels = np.asarray(resized, dtype=np.uint8)  # the device normalizes
    else:
        pixels = (np.asarray(resized, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(pixels.transpose(2, 0, 1) if spec.layout == "NCHW" else pixels)


def postprocess(output: np.ndarray, dim: int, normalize: bool = True) -> np.ndarray:
    """Model output -> (B, dim) float32: [B, D] is the CLS row, [B, N, D] takes token 0."""
    if output.ndim == 3:
        output = output[:, 0]
    if output.ndim != 2 or output.shape[1] != dim:
        raise RuntimeError(f"unexpected model output shape {tuple(output.shape)}: expected "
                           f"[batch, {dim}] or [batch, tokens, {dim}]")
    vectors = output.astype(np.float32, copy=True)
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        np.divide(vectors, norms, out=vectors, where=norms > 0)  # a zero vector stays zero
    return vectors


class DinoEmbedder:
    """DINOv2 ViT-S/14 image embeddings, with the seed library's API and errors."""

    def __init__(self, model_path: str | Path | None = None, *,
                 model_name: str = models.DEFAULT_MODEL,
                 backend: BackendConfig | None = None,
                 imaging: ImagingOptions = ImagingOptions(),
                 cache_dir: Path | None = None) -> None:
        entry = models.get_entry(model_name)
        self.model_name = model_name
        self.dim = entry.dim
        self.model_path = models.resolve(model_name, Path(model_path) if model_path else None,
                                         cache_dir=cache_dir)
        card = models.ModelCard.read(self.model_path)
        # resolve() has checked a registry file against its pin: no need to hash it again
        self._pinned_sha256 = None if model_path is not None else \
            (card.sha256 if entry.base and card else entry.sha256)
        self._card = card
        self.imaging = imaging
        self.backend_config = backend
        self.fallback: str | None = None  # why the configured backend is not the one running
        # The last device failure, whoever met it (the pipeline, an MQTT search): the backend
        # has closed itself, and the pipeline opens it again.
        self.failure: BackendFailed | None = None
        self._closed = False
        self.backend: Backend = self._open_backend()

    def _open_backend(self, failed: BaseException | None = None) -> Backend:
        """The configured backend, unless it `failed` right after opening; where it cannot
        run and a fallback is configured, the fallback, with one warning that says why.
        Raises BackendUnavailable when neither starts."""
        fallback = fallback_of(self.backend_config)
        if failed is None or fallback is None:
            try:
                backend = create_backend(self.model_path, self.backend_config, dim=self.dim)
                self.fallback = None
                return backend
            except BackendUnavailable as err:
                if fallback is None:
                    raise
                failed = err
        log.warning("%s; running on %s instead (backend.fallback)", failed, fallback.type)
        backend = create_backend(self.model_path, fallback, dim=self.dim)
        self.fallback = str(failed)
        return backend

    def reopen_backend(self, *, give_up: BaseException | None = None) -> None:
        """After a device failure (BackendFailed): open the configured backend again, or
        its fallback; `give_up`: the configured one failed again right after opening, so go
        straight to the fallback if there is one. Raises BackendUnavailable while neither
        starts."""
        self.backend.close()
        backend = self._open_backend(give_up)
        if self._closed:  # closed meanwhile (the daemon stopping): hold no device
            backend.close()
            raise BackendUnavailable("closed while the backend was being opened again")
        self.backend = backend
        self.failure = None

    @cached_property
    def model_sha256(self) -> str:
        """The model file's sha256, published with each vector so consumers tell models apart."""
        return self._pinned_sha256 or models.sha256_file(self.model_path)

    @cached_property
    def identity(self) -> ModelIdentity:
        """The model as payloads, `status` and the log name it: the registry's name only for
        the registry's own file; a stand-in says so in its name."""
        entry = models.get_entry(self.model_name)
        card = self._card if self._card and self._card.sha256 == self.model_sha256 else None
        made_here = bool(entry.base and card and card.name == entry.name)
        pinned = entry.sha256 == self.model_sha256 or bool(made_here and card and
                                                            card.base_pinned)
        stand_in = self.backend.producer == models.STAND_IN_PRODUCER
        name = self.model_name if pinned or made_here else self.model_path.name
        return ModelIdentity(f"stand-in:{name}" if stand_in else name, self.model_sha256,
                             pinned, stand_in, card.fidelity if card else None)

    def prepare(self, image: str | Path | BinaryIO, *, name: str | None = None,
                spec: InputSpec | None = None) -> Prepared:
        """Decode and preprocess one image file, given as a path or an open binary file
        (`name` then names it in errors), for `spec` (default: the backend's): the part that
        runs beside inference."""
        spec = spec or self.backend.input_spec
        decoded = decode(image, self.imaging, spec.size, name=name)
        return Prepared(preprocess(decoded.image, spec), decoded.width, decoded.height, spec)

    def infer(self, tensors: Sequence[np.ndarray], normalize: bool = True) -> np.ndarray:
        """Run prepared tensors through the backend as one batch: (N, dim) float32."""
        return self._run(self.backend, tensors, normalize)

    def _run(self, backend: Backend, tensors: Sequence[np.ndarray],
             normalize: bool) -> np.ndarray:
        try:
            output = backend.infer(np.stack(tensors))
        except BackendFailed as err:
            if backend is self.backend:  # not one the pipeline has replaced meanwhile
                self.failure = err  # the pipeline opens it again, whoever met the failure
            raise
        return postprocess(output, self.dim, normalize)

    def embed(self, image_path: str | Path | BinaryIO, normalize: bool = True, *,
              name: str | None = None) -> np.ndarray:
        """One image file (a path, or an open binary file that `name` names in errors) ->
        (dim,) float32, L2-normalized unless `normalize=False`."""
        backend = self.backend  # one backend for both steps: the pipeline may swap it
        prepared = self.prepare(image_path, name=name, spec=backend.input_spec)
        return self._run(backend, [prepared.tensor], normalize)[0]

    def embed_batch(self, image_paths: Sequence[str | Path], normalize: bool = True) -> np.ndarray:
        """Several image files -> (N, dim); the first bad file raises, naming it."""
        if not image_paths:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.infer([self.prepare(path).tensor for path in image_paths], normalize)

    def embed_image(self, image: Image.Image, normalize: bool = True) -> np.ndarray:
        """An already-open PIL image -> (dim,) float32."""
        return self.infer([preprocess(image, self.backend.input_spec)], normalize)[0]

    def warm_up(self) -> None:
        """One inference on a blank picture: the first run pays for graph preparation. A
        device that opened but cannot run it gives way to the fallback, if configured."""
        try:
            self._warm_up()
        except BackendFailed as err:
            if fallback_of(self.backend_config) is None:
                raise
            self.reopen_backend(give_up=err)
            self._warm_up()

    def _warm_up(self) -> None:
        size = self.backend.input_spec.size
        self.infer([preprocess(Image.new("RGB", (size, size)), self.backend.input_spec)])

    def close(self) -> None:
        self._closed = True  # reopen_backend opens nothing from now on
        self.backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
