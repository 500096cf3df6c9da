"""Match stage: each new image against the labelled gallery and against earlier images.

Two in-memory indexes (`index.VectorIndex`), kept in step with the store by the pipeline:
the gallery (references under `<gallery_dir>/<label>/`) and the history (every other
recorded image). A label's score is the best cosine over its references; an earlier image
is a duplicate when its cosine reaches the duplicate threshold.

Thresholds, most specific first: a label's own (`<gallery_dir>/<label>/label.yaml` or
`matching.labels.<label>`), a watch entry's (`watch[].threshold`), `matching.threshold`.
When a label and a watch entry both set one, the stricter (higher) applies: a noisy camera
made strict stays strict for every label.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from pydantic import ValidationError

from dinowatch.config import LabelSettings, MatchingSettings, WatchSettings
from dinowatch.errors import DinowatchError, readable
from dinowatch.imaging import ImageError, ImagingOptions, decode
from dinowatch.index import Hit, VectorIndex
from dinowatch.store import Match, Store
from dinowatch.watch import is_gone, name_matches

log = logging.getLogger(__name__)

LABEL_FILE = "label.yaml"
GALLERY, DUPLICATE = "gallery", "duplicate"


@dataclass(frozen=True)
class Reference:
    """An indexed image: a gallery reference (with its label) or an earlier image."""

    path: str
    sha256: str
    label: str | None = None


@dataclass(frozen=True)
class SearchHit:
    reference: Reference
    score: float


class Matcher:
    """The match stage. `lock` is held by the pipeline around match -> commit -> update, so
    two images recorded at once see each other in the order they were committed (it may be
    held through a slow store write). Readers (`search`, `labels`) only take the short lock
    that keeps the indexes and their references consistent, so they never wait for a write."""

    def __init__(self, settings: MatchingSettings, gallery_dir: Path | None,
                 watches: Iterable[WatchSettings] = (), *, dim: int) -> None:
        self.settings = settings
        self.gallery_dir = gallery_dir
        self.watches = list(watches)
        self.lock = threading.RLock()
        self._state = threading.RLock()  # the indexes and _refs, together
        self._gallery_prefix = str(gallery_dir).rstrip(os.sep) + os.sep if gallery_dir else None
        self.gallery: VectorIndex[str] = VectorIndex(dim)
        self.history: VectorIndex[str] = VectorIndex(dim)
        self._refs: dict[str, Reference] = {}
        self._label_files: dict[str, tuple[float, float | None]] = {}  # label -> (mtime, t)

    # -- keeping in step with the store -----------------------------------------------------
    def load(self, store: Store, model: str) -> int:
        """Fill both indexes with the store's recorded images of `model` (replacing what they
        held); returns the count."""
        paths, sha256s, vectors = store.recorded_vectors(model)
        refs = [Reference(path, sha256, self.label_of(path))
                for path, sha256 in zip(paths, sha256s, strict=True)]
        gallery = [row for row, ref in enumerate(refs) if ref.label]
        history = [row for row, ref in enumerate(refs) if not self.in_gallery(ref.path)]
        with self._state:
            self._refs.clear()
            for rows, index in ((gallery, self.gallery), (history, self.history)):
                self._refs.update((refs[row].path, refs[row]) for row in rows)
                # the history is usually every row: then the array itself is handed over
                chosen = vectors if len(rows) == len(refs) else vectors[rows]
                index.load([refs[row].path for row in rows], chosen)
        return len(gallery) + len(history)

    def update(self, path: str, sha256: str | None, vector: np.ndarray | None) -> None:
        """After a commit: `path` now has this vector (None: failed or deleted)."""
        with self._state:
            self.gallery.remove(path)
            self.history.remove(path)
            self._refs.pop(path, None)
            label = self.label_of(path)
            if vector is None or sha256 is None or (label is None and self.in_gallery(path)):
                return  # nothing to index, or a file directly in the gallery (no label)
            self._refs[path] = Reference(path, sha256, label)
            (self.gallery if label else self.history).add(path, vector)

    def indexed(self, path: str) -> bool:
        with self._state:
            return path in self._refs

    # -- the gallery ------------------------------------------------------------------------
    def in_gallery(self, path: str | Path) -> bool:
        return self._gallery_prefix is not None and str(path).startswith(self._gallery_prefix)

    def label_of(self, path: str | Path) -> str | None:
        """The label of a reference `<gallery_dir>/<label>/…/<image>`; None elsewhere."""
        if self._gallery_prefix is None or not self.in_gallery(path):
            return None
        label, slash, _ = str(path)[len(self._gallery_prefix):].partition(os.sep)
        return readable(label) if slash and label else None

    def labels(self) -> dict[str, int]:
        """Label -> number of indexed references."""
        counts: dict[str, int] = {}
        with self._state:
            for key in self.gallery:
                label = self._refs[key].label or ""
                counts[label] = counts.get(label, 0) + 1
        return counts

    def label_threshold(self, label: str) -> float | None:
        """The label's own threshold: its label.yaml, else `matching.labels`, else None."""
        own = self._label_file(label)
        if own is not None:
            return own
        configured = self.settings.labels.get(label)
        return configured.threshold if configured else None

    def _label_file(self, label: str) -> float | None:
        """`threshold` from `<gallery_dir>/<label>/label.yaml` (re-read when it changes);
        a broken file is logged, naming it, and ignored."""
        if self.gallery_dir is None:
            return None
        file = self.gallery_dir / label / LABEL_FILE
        try:
            mtime = file.stat().st_mtime
        except OSError:
            return None
        cached = self._label_files.get(label)
        if cached and cached[0] == mtime:
            return cached[1]
        threshold = None
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            threshold = LabelSettings.model_validate(data).threshold
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValidationError) as err:
            log.error("%s is ignored: %s", readable(file), _one_line(err))
        self._label_files[label] = (mtime, threshold)
        return threshold

    # -- matching ---------------------------------------------------------------------------
    def _watch_of(self, path: str) -> WatchSettings | None:
        owners = [w for w in self.watches if Path(path).is_relative_to(w.path)]
        return max(owners, key=lambda w: len(w.path.parts), default=None)

    def threshold(self, label: str, path: str) -> float:
        """The gallery threshold for `label` on an image at `path` (see module docstring)."""
        return self._threshold(label, self._watch_of(path))

    def _threshold(self, label: str, watch: WatchSettings | None) -> float:
        overrides = [t for t in (self.label_threshold(label),
                                 watch.threshold if watch else None) if t is not None]
        return max(overrides) if overrides else self.settings.threshold

    def duplicate_threshold(self, path: str) -> float:
        watch = self._watch_of(path)
        if watch is not None and watch.duplicate_threshold is not None:
            return watch.duplicate_threshold
        return self.settings.duplicates.threshold

    def match(self, path: str, sha256: str, vector: np.ndarray) -> list[Match]:
        """Events for a newly recorded image: gallery labels at or over their threshold (at
        most `top_k`, best first), then earlier images at or over the duplicate threshold.
        Gallery images themselves get none."""
        if self.in_gallery(path):
            return []
        with self._state:
            events = self.gallery_matches(path, sha256, vector)
            if self.settings.duplicates.enabled:
                events += [self._event(path, sha256, DUPLICATE, hit.score, self._refs[hit.key])
                           for hit in self._duplicates(path, vector)]
        return events

    def _duplicates(self, path: str, vector: np.ndarray) -> list[Hit[str]]:
        """Earlier images at or over the duplicate threshold, best first, at most `top_k`.
        One whose file is gone was renamed to this path (its deletion is on its way through
        the pipeline): not a duplicate, and it must not take a real one's place."""
        top_k = k = self.settings.top_k
        threshold = self.duplicate_threshold(path)
        while True:
            hits = self.history.search(vector, k, exclude=[path], min_score=threshold)
            present = [hit for hit in hits if not is_gone(hit.key)]
            if len(present) >= top_k or len(hits) < k:
                return present[:top_k]
            k *= 2

    def gallery_matches(self, path: str, sha256: str, vector: np.ndarray) -> list[Match]:
        """The labels `vector` matches, best first, at most `top_k`."""
        best: dict[str, Match] = {}
        seen: set[str] = set()
        watch = self._watch_of(path)  # once per image, not once per label
        with self._state:
            for hit in self.gallery.search(vector, len(self.gallery)):
                reference = self._refs[hit.key]
                label = reference.label or ""
                if label in seen:  # hits come best first: its best reference was seen
                    continue
                seen.add(label)
                if hit.score >= self._threshold(label, watch):  # once per label, not per ref
                    best[label] = self._event(path, sha256, GALLERY, hit.score, reference)
        return sorted(best.values(), key=lambda e: -e.score)[: self.settings.top_k]

    @staticmethod
    def _event(path: str, sha256: str, kind: str, score: float, reference: Reference) -> Match:
        return Match(path=path, sha256=sha256, kind=kind, label=reference.label,
                     score=_score(score), reference_path=reference.path,
                     reference_sha256=reference.sha256)

    def search(self, vector: np.ndarray, k: int) -> list[SearchHit]:
        """The `k` nearest indexed images, gallery and history together, best first."""
        with self._state:
            hits = [*self.gallery.search(vector, k), *self.history.search(vector, k)]
            hits.sort(key=lambda hit: (-_score(hit.score), hit.key))  # as published, then path
            return [SearchHit(self._refs[hit.key], _score(hit.score)) for hit in hits[:k]]


def _score(value: float) -> float:
    return round(float(value), 4)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


# ---- the gallery's files --------------------------------------------------------------------

class GalleryError(DinowatchError):
    """A label or reference image the gallery cannot take."""


SUFFIXES = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "HEIF": ".heic",
            "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}
MAX_LABEL_BYTES = 100


def check_label(label: object) -> str:
    """`label` if it can name a gallery folder; GalleryError saying why not."""
    if not isinstance(label, str) or not label or label.strip() != label:
        raise GalleryError("a label must be non-empty text without leading or trailing spaces")
    if "/" in label or "\0" in label:  # a leading '.' is the watcher's (below)
        raise GalleryError(f"label {label!r}: cannot contain '/'")
    try:
        size = len(label.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise GalleryError("a label must be valid UTF-8 text") from err
    if size > MAX_LABEL_BYTES:
        raise GalleryError(f"label {label[:20]!r}…: at most {MAX_LABEL_BYTES} bytes")
    if name_matches(label, gallery_watch(Path()).exclude):  # the watcher's own rule
        raise GalleryError(f"label {label!r}: the gallery's watcher skips folders named like "
                           f"{', '.join(gallery_watch(Path()).exclude)}")
    return label


def gallery_watch(gallery_dir: Path) -> WatchSettings:
    """The gallery is watched like any folder (its files are references, by their folder)."""
    return WatchSettings(path=gallery_dir, source="gallery", recursive=True)


def add_reference(gallery_dir: Path, label: str, data: bytes, name: str | None,
                  options: ImagingOptions) -> Path:
    """Write one reference image to `<gallery_dir>/<label>/`; returns its path.

    The file appears at once under its final name (written beside it as a hidden file,
    then renamed), so the daemon's watcher never sees half of it. `name` keeps the user's
    file name (a different file already there gets a `-<sha256>` suffix); None names it by
    its content. The same bytes twice give one file. Raises GalleryError for a bad label,
    ImageError for what is not a decodable image, OSError for what the filesystem refuses.
    """
    check_label(label)
    decode(io.BytesIO(data), options, name=name or "the image")  # refuse what is not one
    digest = hashlib.sha256(data).hexdigest()
    with Image.open(io.BytesIO(data)) as image:
        suffix = SUFFIXES.get(image.format or "")
    if suffix is None:  # a name the gallery's watcher would skip
        raise ImageError(f"{name or 'the image'}: {image.format} images are not taken; the "
                         f"gallery takes {', '.join(sorted(SUFFIXES))}")
    folder = gallery_dir / label
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(name).stem.lstrip(".") if name else ""
    target = folder / f"{stem or digest[:16]}{suffix}"
    if target.exists():
        if target.read_bytes() == data:
            return target
        target = folder / f"{stem or digest[:16]}-{digest[:8]}{suffix}"
    part = folder / f".{target.name}.part"  # hidden: the default exclude patterns skip it
    try:
        with open(part, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        part.replace(target)
    except BaseException:
        part.unlink(missing_ok=True)  # a failed write leaves nothing behind
        raise
    return target
