"""In-memory vector index and match stage (issue 8, item 1), behaviour only.

- `VectorIndex`: top-k against a brute-force numpy reference; replace, remove (the last row
  fills the hole), growth, `min_score`, `exclude`, wrong dimensions, zero vectors, and a
  concurrent add/remove/search smoke test.
- `Matcher` over a real SQLite store: `load()` after a restart equals the state built image
  by image with `update()`; gallery vs history; `label_of`; a label's score is its best
  reference; `top_k`; thresholds (global, watch, `matching.labels`, `label.yaml`, a broken
  `label.yaml`, label and watch together); duplicates; gallery images get no events;
  readers (`search`, `labels`) answer while another thread holds `Matcher.lock` (the
  pipeline holds it through a store write).
- `add_reference`: the gallery's files (atomic write, same bytes once, name clashes,
  non-images, formats the gallery's watcher would skip, bad labels, labels the gallery's
  watcher would skip or that are not UTF-8).
- Store schema 3: a version-2 database migrates keeping its rows; match rows commit in the
  image's transaction.

Speed is not asserted here: `benchmarks/index_bench.py` measures it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import UnidentifiedImageError

from dinowatch.config import DuplicateSettings, LabelSettings, MatchingSettings, WatchSettings
from dinowatch.imaging import ImageError, ImagingOptions
from dinowatch.index import INITIAL_CAPACITY, VectorIndex
from dinowatch.match import (
    DUPLICATE,
    GALLERY,
    LABEL_FILE,
    SUFFIXES,
    GalleryError,
    Matcher,
    add_reference,
    check_label,
)
from dinowatch.store import MIGRATIONS, ImageRecord, Match, Message, Store
from dinowatch.testing import synthetic_photo

# ---- VectorIndex ------------------------------------------------------------------------------


def _unit(vectors: np.ndarray) -> np.ndarray:
    """float64 rows of unit length (a zero row stays zero): the reference's own arithmetic."""
    rows = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def _brute_force(keys: list, vectors: np.ndarray, query: np.ndarray, k: int, *,
                 min_score: float = -1.0, exclude: Iterable = ()) -> list[tuple[object, float]]:
    """(key, cosine) of the k best, best first, by a full sort in float64."""
    scores = _unit(vectors) @ _unit(query)[0]
    skip = set(exclude)
    ranked = [(keys[i], float(scores[i])) for i in np.argsort(-scores, kind="stable")]
    return [(key, s) for key, s in ranked if key not in skip and s >= min_score][:max(k, 0)]


def _assert_top_k(hits: list, keys: list, vectors: np.ndarray, query: np.ndarray, k: int,
                  **filters: object) -> None:
    """`hits` are the reference's top k: the same scores rank by rank, each hit carrying its
    own key's score (float32 against float64: keys whose scores tie within 1e-5 may swap)."""
    expected = _brute_force(keys, vectors, query, k, **filters)  # type: ignore[arg-type]
    exact = dict(_brute_force(keys, vectors, query, len(keys)))
    assert len(hits) == len(expected)
    assert len({hit.key for hit in hits}) == len(hits)
    np.testing.assert_allclose([hit.score for hit in hits], [s for _, s in expected],
                               atol=1e-5)
    np.testing.assert_allclose([hit.score for hit in hits], [exact[hit.key] for hit in hits],
                               atol=1e-5)
    assert not {hit.key for hit in hits} & set(filters.get("exclude", ()))  # type: ignore


@pytest.fixture(scope="module")
def random_index() -> tuple[VectorIndex[str], list[str], np.ndarray]:
    """2,000 random 384-d vectors (past the initial capacity), half added one by one."""
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((2000, 384)).astype(np.float32)
    keys = [f"/cam/{i:04d}.jpg" for i in range(len(vectors))]
    index: VectorIndex[str] = VectorIndex(384)
    for key, vector in zip(keys[:1000], vectors[:1000], strict=True):
        index.add(key, vector)
    index.add_many(keys[1000:], vectors[1000:])
    return index, keys, vectors


@pytest.mark.parametrize("k", [0, 1, 10, 123, 2000, 5000])
def test_top_k_equals_a_brute_force_reference(random_index: tuple[VectorIndex[str], list[str],
                                                                  np.ndarray], k: int) -> None:
    index, keys, vectors = random_index
    assert len(index) == len(keys) > INITIAL_CAPACITY
    rng = np.random.default_rng(k)
    for _ in range(5):
        query = rng.standard_normal(384).astype(np.float32) * rng.uniform(0.1, 10)
        hits = index.search(query, k)
        assert len(hits) == min(k, len(keys))
        _assert_top_k(hits, keys, vectors, query, k)


def test_min_score_and_exclude_filter_without_costing_results(
        random_index: tuple[VectorIndex[str], list[str], np.ndarray]) -> None:
    index, keys, vectors = random_index
    query = vectors[7] + 0.5 * vectors[8]
    ranked = _brute_force(keys, vectors, query, len(keys))
    best_three = [key for key, _ in ranked[:3]]
    # excluding the best three still gives k results: the next ones
    _assert_top_k(index.search(query, 5, exclude=best_three), keys, vectors, query, 5,
                  exclude=best_three)
    assert [hit.key for hit in index.search(query, 5, exclude=best_three)] == \
        [key for key, _ in ranked[3:8]]
    # a threshold halfway between the 20th and 21st scores keeps exactly twenty
    cut = (ranked[19][1] + ranked[20][1]) / 2
    hits = index.search(query, 50, min_score=cut)
    assert len(hits) == 20
    _assert_top_k(hits, keys, vectors, query, 50, min_score=cut)
    # both together; unknown keys in exclude are harmless
    hits = index.search(query, 50, min_score=cut, exclude=[*best_three, "/nowhere.jpg"])
    _assert_top_k(hits, keys, vectors, query, 50, min_score=cut, exclude=best_three)
    assert index.search(query, 5, min_score=1.01) == []


def test_add_replaces_the_vector_of_an_existing_key() -> None:
    index: VectorIndex[str] = VectorIndex(3)
    index.add("a", np.array([1.0, 0.0, 0.0]))
    index.add("b", np.array([0.0, 1.0, 0.0]))
    index.add("a", np.array([0.0, 0.0, 5.0]))
    assert len(index) == 2
    assert list(index) == ["a", "b"]
    np.testing.assert_array_equal(index.vector("a"), [0.0, 0.0, 1.0])  # stored normalized
    hits = index.search(np.array([0.0, 0.0, 1.0]), 2)
    assert [(hit.key, round(hit.score, 6)) for hit in hits] == [("a", 1.0), ("b", 0.0)]
    index.add_many(["b", "c", "b"], np.array([[2.0, 0, 0], [0, 3.0, 0], [0, 0, -1.0]]))
    assert sorted(index) == ["a", "b", "c"]
    np.testing.assert_array_equal(index.vector("b"), [0.0, 0.0, -1.0])  # the last one wins


def test_remove_keeps_every_other_vector_and_unknown_keys_are_a_no_op() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((50, 16)).astype(np.float32)
    index: VectorIndex[int] = VectorIndex(16)
    index.add_many(range(50), vectors)
    removed = [49, 0, 17, 25, 48]  # the last row, the first, middles, the new last
    for key in removed:
        assert index.remove(key) is True
        assert key not in index
    assert index.remove(17) is False  # twice
    assert index.remove(999) is False  # never there
    kept = [key for key in range(50) if key not in removed]
    assert len(index) == len(kept)
    assert sorted(index) == kept
    for key in kept:
        np.testing.assert_allclose(index.vector(key), _unit(vectors[key])[0], rtol=1e-6)
    assert index.vector(17) is None
    query = rng.standard_normal(16)
    _assert_top_k(index.search(query, 50), kept, vectors[kept], query, 50)
    for key in kept:
        index.remove(key)
    assert len(index) == 0
    assert index.search(query, 5) == []


def test_growth_past_the_initial_capacity_keeps_every_vector() -> None:
    total = 2 * INITIAL_CAPACITY + 300
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((total, 8)).astype(np.float32)
    index: VectorIndex[int] = VectorIndex(8)
    for key in range(INITIAL_CAPACITY + 1):  # one at a time across the first boundary
        index.add(key, vectors[key])
    index.add_many(range(INITIAL_CAPACITY + 1, total), vectors[INITIAL_CAPACITY + 1:])
    assert len(index) == total
    assert list(index) == list(range(total))
    for key in (0, INITIAL_CAPACITY - 1, INITIAL_CAPACITY, INITIAL_CAPACITY + 1, total - 1):
        np.testing.assert_allclose(index.vector(key), _unit(vectors[key])[0], rtol=1e-6)
    query = vectors[INITIAL_CAPACITY + 7]
    assert index.search(query, 1)[0].key == INITIAL_CAPACITY + 7
    _assert_top_k(index.search(query, 30), list(range(total)), vectors, query, 30)


def test_a_wrong_dimension_raises_value_error_and_changes_nothing() -> None:
    index: VectorIndex[str] = VectorIndex(4)
    index.add("a", np.ones(4))
    with pytest.raises(ValueError, match="dimension 4"):
        index.add("b", np.ones(5))
    with pytest.raises(ValueError, match="dimension 4"):
        index.add_many(["c", "d", "e"], np.ones((2, 4)))  # one vector short
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones(3), 1)
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones((2, 4)), 1)  # two queries are not one
    assert list(index) == ["a"]
    assert [hit.key for hit in index.search(np.ones(4), 5)] == ["a"]


def test_zero_vectors_score_zero_and_never_nan() -> None:
    index: VectorIndex[str] = VectorIndex(3)
    index.add("zero", np.zeros(3))
    index.add("x", np.array([1.0, 0.0, 0.0]))
    np.testing.assert_array_equal(index.vector("zero"), [0.0, 0.0, 0.0])
    hits = index.search(np.array([1.0, 0.0, 0.0]), 5)
    assert [(hit.key, hit.score) for hit in hits] == [("x", 1.0), ("zero", 0.0)]
    hits = index.search(np.zeros(3), 5)  # a zero query is like no other vector
    assert sorted(hit.key for hit in hits) == ["x", "zero"]
    assert all(hit.score == 0.0 for hit in hits)
    assert index.search(np.zeros(3), 5, min_score=0.5) == []


def test_equal_scores_come_back_in_key_order_whatever_the_history() -> None:
    """Ties are cut by key, not by row (which adds, removals and a reload each change): the
    same question gets the same answer, also when k cuts through the tie."""
    same, other = np.array([1.0, 0.0, 0.0]), np.array([0.6, 0.8, 0.0])
    first: VectorIndex[str] = VectorIndex(3)
    for key in ["d", "b", "e", "a", "c"]:
        first.add(key, same)
    first.add("x", other)
    second: VectorIndex[str] = VectorIndex(3)
    second.add_many(["x", "c", "z", "a"], np.array([other, same, same, same]))
    second.remove("z")
    second.add_many(["e", "b", "d"], np.array([same, same, same]))
    for k in (1, 2, 3, 5, 6, 9):
        expected = ["a", "b", "c", "d", "e", "x"][:k]
        assert [hit.key for hit in first.search(same, k)] == expected
        assert [hit.key for hit in second.search(same, k)] == expected
    assert [hit.key for hit in first.search(same, 2, exclude=["a", "c"])] == ["b", "d"]


def test_copies_of_one_vector_tie_wherever_their_rows_sit() -> None:
    """Two copies of one picture (one vector) must score exactly alike, so that their order
    is the key order after any history, e.g. a restart that loads rows in another order."""
    rng = np.random.default_rng(21)
    for _ in range(100):
        count, dim = int(rng.integers(3, 40)), int(rng.choice([8, 384]))
        vectors = rng.standard_normal((count, dim)).astype(np.float32)
        keys = [f"k{i:02d}" for i in range(count)] + ["copy-a", "copy-b"]
        rows = np.vstack([vectors, vectors[:1], vectors[:1]])
        order = rng.permutation(len(keys))
        first: VectorIndex[str] = VectorIndex(dim)
        first.add_many(keys, rows)
        second: VectorIndex[str] = VectorIndex(dim)
        second.add_many([keys[i] for i in order], rows[order])
        query = rng.standard_normal(dim).astype(np.float32)
        one, other = first.search(query, len(keys)), second.search(query, len(keys))
        assert [hit.key for hit in one] == [hit.key for hit in other]
        scores = {hit.key: hit.score for hit in one}
        assert scores["copy-a"] == scores["copy-b"] == scores["k00"]


def test_concurrent_add_remove_search_leave_a_consistent_index() -> None:
    """Writers own disjoint key ranges (growing the matrix while searchers read); every hit
    a searcher sees must carry its own key's score, and the end state is exactly what the
    writers left."""
    dim, per_writer, writers = 24, 700, 3
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((writers * per_writer, dim)).astype(np.float32)
    units = _unit(vectors)
    index: VectorIndex[int] = VectorIndex(dim)
    owned: list[set[int]] = [set() for _ in range(writers)]
    problems: list[str] = []
    writing = threading.Barrier(writers + 2)
    done = threading.Event()

    def write(w: int) -> None:
        local = np.random.default_rng(100 + w)
        mine = range(w * per_writer, (w + 1) * per_writer)
        writing.wait()
        try:
            for _ in range(2500):
                key = int(local.choice(mine))
                if key in owned[w] and local.random() < 0.3:
                    if not index.remove(key):
                        problems.append(f"{key} was added but remove() did not find it")
                    owned[w].discard(key)
                elif local.random() < 0.05:
                    batch = [int(k) for k in local.choice(mine, size=20, replace=False)]
                    index.add_many(batch, vectors[batch])
                    owned[w].update(batch)
                else:
                    index.add(key, vectors[key])
                    owned[w].add(key)
        except Exception as err:
            problems.append(f"writer {w}: {err!r}")

    def search(s: int) -> None:
        local = np.random.default_rng(200 + s)
        writing.wait()
        try:
            while not done.is_set():
                query = local.standard_normal(dim).astype(np.float32)
                unit = _unit(query)[0]
                hits = index.search(query, 15, exclude=[0, 1])
                scores = [hit.score for hit in hits]
                if scores != sorted(scores, reverse=True):
                    problems.append(f"not best first: {scores}")
                for hit in hits:
                    if hit.key in (0, 1) or abs(hit.score - units[hit.key] @ unit) > 1e-5:
                        problems.append(f"hit {hit} does not belong to its key")
                for key in list(index)[-5:]:
                    vector = index.vector(key)  # may be removed meanwhile: None is fine
                    if vector is not None and not np.allclose(vector, units[key], atol=1e-6):
                        problems.append(f"vector of {key} is another key's")
        except Exception as err:
            problems.append(f"searcher {s}: {err!r}")

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    searchers = [threading.Thread(target=search, args=(s,)) for s in range(2)]
    for thread in threads + searchers:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    for thread in searchers:
        thread.join()
    assert problems[:5] == []
    final = sorted(set().union(*owned))
    assert len(final) > INITIAL_CAPACITY  # the matrix grew while searchers read
    assert sorted(index) == final
    assert len(index) == len(final)
    for key in final:
        np.testing.assert_allclose(index.vector(key), units[key], atol=1e-6)
    query = rng.standard_normal(dim)
    _assert_top_k(index.search(query, 40), final, vectors[final], query, 40)


# ---- Matcher over a real store --------------------------------------------------------------

DIM = 8
MODEL = "m1"


def _toward(cosine: float, side: int = 1) -> np.ndarray:
    """A unit vector whose cosine with axis 0 (the query `E0`) is exactly `cosine`; `side`
    picks the other axis, so references at the same score still differ."""
    vector = np.zeros(DIM, dtype=np.float32)
    vector[0], vector[side] = cosine, math.sqrt(max(0.0, 1 - cosine * cosine))
    return vector


E0 = _toward(1.0)


def _sha(vector: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(vector, dtype="<f4").tobytes()).hexdigest()


def _matcher(gallery: Path, *, threshold: float = 0.75, top_k: int = 3,
             duplicates: float = 0.97, duplicates_enabled: bool = True,
             labels: dict[str, float] | None = None,
             watches: Iterable[WatchSettings] = ()) -> Matcher:
    settings = MatchingSettings(
        threshold=threshold, top_k=top_k,
        duplicates=DuplicateSettings(enabled=duplicates_enabled, threshold=duplicates),
        labels={label: LabelSettings(threshold=t) for label, t in (labels or {}).items()})
    return Matcher(settings, gallery, watches, dim=DIM)


def _commit(store: Store, matcher: Matcher, path: str | Path, vector: np.ndarray | None,
            *, status: str = "done") -> list[Match]:
    """What the pipeline does with a finished image (whose file is then on disk): match,
    record row + vector + events in one transaction, bring the indexes in step. `vector`
    None: the image failed."""
    path = str(path)
    if vector is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"image")
    sha = _sha(vector) if vector is not None else None
    events = matcher.match(path, sha or "", vector) if vector is not None else []
    record = ImageRecord(path=path, source="cam", size=1, mtime_ns=1, status=status,
                         sha256=sha, model=MODEL, label=matcher.label_of(path))
    store.record(record, vector, [], events)
    matcher.update(path, sha, vector)
    return events


def _delete(store: Store, matcher: Matcher, path: str | Path) -> None:
    """The file is gone and the pipeline has recorded its deletion."""
    Path(path).unlink()
    previous = store.image(str(path))
    assert previous is not None
    store.record(replace(previous, status="deleted"), None, [])
    matcher.update(str(path), previous.sha256, None)


def _summary(events: list[Match]) -> list[tuple[str, str | None, float, str]]:
    return [(e.kind, e.label, e.score, e.reference_path) for e in events]


def _labels(events: list[Match]) -> list[str | None]:
    return [e.label for e in events if e.kind == GALLERY]


@pytest.fixture
def gallery(tmp_path: Path) -> Path:
    path = tmp_path / "gallery"
    path.mkdir()
    return path


@pytest.fixture
def cam(tmp_path: Path) -> Path:
    """A watched folder's images (their files exist: duplicates are only reported for
    earlier images still on disk)."""
    path = tmp_path / "cam"
    path.mkdir()
    return path


def test_load_after_a_restart_equals_the_state_built_image_by_image(
        store: Store, gallery: Path, cam: Path) -> None:
    rng = np.random.default_rng(21)

    def vec() -> np.ndarray:
        return rng.standard_normal(DIM).astype(np.float32)

    live = _matcher(gallery, threshold=0.0, duplicates=0.0)  # everything matches
    odd_name = os.fsdecode(bytes(cam) + b"/caf\xe9.jpg")  # not UTF-8: stored as a BLOB
    for path in [gallery / "cat/a.jpg", gallery / "cat/sub/b.jpg", gallery / "dog/c.jpg",
                 gallery / "dog/d.jpg", gallery / "loose.jpg", cam / "x.jpg", cam / "y.jpg",
                 cam / "z.jpg", odd_name]:
        _commit(store, live, path, vec())
    _commit(store, live, cam / "y.jpg", vec())  # new content, same path
    _delete(store, live, cam / "z.jpg")
    _delete(store, live, gallery / "dog/d.jpg")  # a removed reference
    _commit(store, live, cam / "broken.jpg", None, status="failed")
    store.record(ImageRecord(path=str(cam / "other-model.jpg"), source="cam", size=1,
                             mtime_ns=1, status="done", sha256="ee" * 32, model="m2"),
                 vec(), [])

    references = sorted(str(gallery / p) for p in ("cat/a.jpg", "cat/sub/b.jpg", "dog/c.jpg"))
    history = sorted([str(cam / "x.jpg"), str(cam / "y.jpg"), odd_name])
    assert sorted(live.gallery) == references
    assert sorted(live.history) == history

    restarted = Store(store.path)
    try:
        loaded = _matcher(gallery, threshold=0.0, duplicates=0.0)
        assert loaded.load(restarted, MODEL) == 6
    finally:
        restarted.close()
    assert sorted(loaded.gallery) == references
    assert sorted(loaded.history) == history
    for mine, theirs in ((loaded.gallery, live.gallery), (loaded.history, live.history)):
        for key in mine:
            np.testing.assert_allclose(mine.vector(key), theirs.vector(key), rtol=1e-6)
    assert loaded.labels() == live.labels() == {"cat": 2, "dog": 1}
    kinds: set[str] = set()
    for _ in range(8):
        query, new = vec(), str(cam / "new.jpg")
        events = loaded.match(new, "q", query)
        assert events == live.match(new, "q", query)
        kinds.update(e.kind for e in events)
        assert loaded.search(query, 10) == live.search(query, 10)
    assert kinds == {GALLERY, DUPLICATE}  # the comparison saw both kinds of event
    y = str(cam / "y.jpg")
    hit = loaded.search(live.history.vector(y), 1)[0]  # type: ignore[arg-type]
    assert (hit.reference.path, hit.reference.label, hit.score) == (y, None, 1.0)
    assert hit.reference.sha256 == store.image(y).sha256  # type: ignore[union-attr]


def test_label_of_and_in_gallery(gallery: Path) -> None:
    matcher = _matcher(gallery)
    odd = os.fsdecode(bytes(gallery) + b"/caf\xe9/x.jpg")
    cases = {
        gallery / "van/a.jpg": ("van", True),
        gallery / "van/2024/june/b.jpg": ("van", True),  # nested: the top folder names it
        gallery / "loose.jpg": (None, True),  # directly in gallery_dir: no label
        gallery: (None, False),
        Path(f"{gallery}2/van/a.jpg"): (None, False),  # a sibling sharing the prefix
        Path("/cam/van/a.jpg"): (None, False),
        Path(odd): ("caf\\xe9", True),  # a label is valid UTF-8 text
    }
    for path, (label, inside) in cases.items():
        assert (matcher.label_of(path), matcher.in_gallery(path)) == (label, inside), path
        assert matcher.label_of(str(path)) == label
    nowhere = Matcher(MatchingSettings(), None, dim=DIM)
    assert nowhere.label_of(gallery / "van/a.jpg") is None
    assert not nowhere.in_gallery(gallery / "van/a.jpg")


def test_a_labels_score_is_its_best_reference_and_top_k_caps_the_labels(
        store: Store, gallery: Path, cam: Path) -> None:
    matcher = _matcher(gallery, top_k=2)
    _commit(store, matcher, gallery / "cat/far.jpg", _toward(0.80, 1))
    _commit(store, matcher, gallery / "cat/near.jpg", _toward(0.95, 2))
    _commit(store, matcher, gallery / "cat/worst.jpg", _toward(0.10, 3))
    _commit(store, matcher, gallery / "dog/d.jpg", _toward(0.90, 4))
    _commit(store, matcher, gallery / "fox/f.jpg", _toward(0.85, 5))
    _commit(store, matcher, gallery / "owl/o.jpg", _toward(0.50, 6))  # under 0.75
    events = _commit(store, matcher, cam / "1.jpg", E0)
    assert _summary(events) == [(GALLERY, "cat", 0.95, str(gallery / "cat/near.jpg")),
                                (GALLERY, "dog", 0.9, str(gallery / "dog/d.jpg"))]
    assert events[0].reference_sha256 == _sha(_toward(0.95, 2))
    assert events[0].sha256 == _sha(E0)
    assert sorted(_summary(store.matches(str(cam / "1.jpg")))) == sorted(_summary(events))
    wide = _matcher(gallery, top_k=10)
    wide.load(store, MODEL)
    assert [(e.label, e.score) for e in wide.gallery_matches(str(cam / "2.jpg"), "s", E0)] \
        == [("cat", 0.95), ("dog", 0.9), ("fox", 0.85)]  # one per label; owl is under


@pytest.mark.parametrize(("cosine", "matched"), [(0.76, True), (0.75, True), (0.74, False)])
def test_the_global_threshold(store: Store, gallery: Path, cam: Path, cosine: float,
                              matched: bool) -> None:
    matcher = _matcher(gallery, threshold=0.75)
    _commit(store, matcher, gallery / "cat/a.jpg", _toward(cosine + 1e-6))
    assert _labels(_commit(store, matcher, cam / "1.jpg", E0)) == (["cat"] if matched else [])


def test_a_watch_entry_overrides_the_global_threshold(store: Store, gallery: Path,
                                                      tmp_path: Path) -> None:
    strict, lenient = tmp_path / "strict", tmp_path / "lenient"
    matcher = _matcher(gallery, threshold=0.75, watches=[
        WatchSettings(path=strict, threshold=0.9), WatchSettings(path=lenient, threshold=0.5),
        WatchSettings(path=strict / "inner", threshold=0.6)])  # the deepest entry applies
    _commit(store, matcher, gallery / "cat/a.jpg", _toward(0.8))
    _commit(store, matcher, gallery / "dog/b.jpg", _toward(0.55, 2))
    assert _labels(_commit(store, matcher, tmp_path / "elsewhere/1.jpg", E0)) == ["cat"]
    assert _labels(_commit(store, matcher, strict / "1.jpg", E0)) == []
    assert _labels(_commit(store, matcher, lenient / "1.jpg", E0)) == ["cat", "dog"]
    assert _labels(_commit(store, matcher, strict / "inner/1.jpg", E0)) == ["cat"]
    assert matcher.threshold("cat", str(strict / "x.jpg")) == 0.9
    assert matcher.threshold("cat", str(tmp_path / "strictly/x.jpg")) == 0.75


def test_a_label_threshold_from_config_and_from_label_yaml(store: Store, gallery: Path,
                                                           cam: Path) -> None:
    matcher = _matcher(gallery, threshold=0.75, labels={"cat": 0.95, "dog": 0.5})
    _commit(store, matcher, gallery / "cat/a.jpg", _toward(0.9))
    _commit(store, matcher, gallery / "dog/b.jpg", _toward(0.6, 2))
    _commit(store, matcher, gallery / "fox/c.jpg", _toward(0.8, 3))
    image = str(cam / "1.jpg")
    assert _labels(matcher.gallery_matches(image, "s", E0)) == ["fox", "dog"]

    (gallery / "cat" / LABEL_FILE).write_text("threshold: 0.85\n")  # label.yaml wins
    (gallery / "fox" / LABEL_FILE).write_text("threshold: 0.81\n")
    assert matcher.label_threshold("cat") == 0.85
    assert _labels(matcher.gallery_matches(image, "s", E0)) == ["cat", "dog"]

    label_yaml = gallery / "cat" / LABEL_FILE  # a changed file is read again
    label_yaml.write_text("threshold: 0.99\n")
    os.utime(label_yaml, ns=(1_000_000_000, 1_000_000_000))
    assert _labels(matcher.gallery_matches(image, "s", E0)) == ["dog"]
    label_yaml.unlink()  # gone: the config's 0.95 again
    assert matcher.label_threshold("cat") == 0.95
    assert matcher.label_threshold("owl") is None


@pytest.mark.parametrize("content", ["threshold: [0.5\n", "threshold: 2\n", "treshold: 0.5\n",
                                     "- 0.5\n", b"threshold: \xff\n"])
def test_a_broken_label_yaml_is_ignored_with_an_error_naming_it(
        store: Store, gallery: Path, cam: Path, caplog: pytest.LogCaptureFixture,
        content: str | bytes) -> None:
    matcher = _matcher(gallery, threshold=0.75, labels={"cat": 0.85})
    _commit(store, matcher, gallery / "cat/a.jpg", _toward(0.8))
    label_yaml = gallery / "cat" / LABEL_FILE
    label_yaml.write_bytes(content if isinstance(content, bytes) else content.encode())
    image = str(cam / "1.jpg")
    with caplog.at_level(logging.ERROR, logger="dinowatch.match"):
        assert matcher.gallery_matches(image, "s", E0) == []  # the config's 0.85 applies
        assert matcher.label_threshold("cat") == 0.85
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors  # once per version of the file, not per image
    assert str(label_yaml) in errors[0]
    label_yaml.write_text("threshold: 0.7\n")  # fixed: used from now on
    os.utime(label_yaml, ns=(2_000_000_000, 2_000_000_000))
    assert _labels(matcher.gallery_matches(image, "s", E0)) == ["cat"]


@pytest.mark.parametrize(("label", "watch", "applies"),
                         [(0.6, 0.8, 0.8), (0.85, 0.7, 0.85), (None, 0.7, 0.7), (0.7, None, 0.7)])
def test_a_label_and_a_watch_threshold_together_the_higher_applies(
        store: Store, gallery: Path, cam: Path, label: float | None, watch: float | None,
        applies: float) -> None:
    matcher = _matcher(gallery, threshold=0.75,
                       watches=[WatchSettings(path=cam, threshold=watch)])
    if label is not None:
        (gallery / "cat").mkdir()
        (gallery / "cat" / LABEL_FILE).write_text(f"threshold: {label}\n")
    assert matcher.threshold("cat", str(cam / "1.jpg")) == applies
    _commit(store, matcher, gallery / "cat/a.jpg", _toward(applies - 0.01))
    _commit(store, matcher, gallery / "cat/b.jpg", _toward(applies + 0.01, 2))
    assert _summary(_commit(store, matcher, cam / "1.jpg", E0)) == \
        [(GALLERY, "cat", round(applies + 0.01, 4), str(gallery / "cat/b.jpg"))]


def test_duplicates_name_earlier_images_but_never_the_image_itself_or_the_gallery(
        store: Store, gallery: Path, cam: Path, tmp_path: Path) -> None:
    matcher = _matcher(gallery, duplicates=0.97, watches=[
        WatchSettings(path=cam / "strict", duplicate_threshold=0.99)])
    _commit(store, matcher, gallery / "cat/ref.jpg", E0)  # identical, but a reference
    a, b, c = cam / "a.jpg", cam / "b.jpg", cam / "c.jpg"
    _commit(store, matcher, a, E0)
    _commit(store, matcher, b, _toward(0.98, 2))
    _commit(store, matcher, c, _toward(0.96, 3))  # under 0.97
    new = tmp_path / "other/n.jpg"
    events = _commit(store, matcher, new, E0)
    assert _summary(events) == [(GALLERY, "cat", 1.0, str(gallery / "cat/ref.jpg")),
                                (DUPLICATE, None, 1.0, str(a)),
                                (DUPLICATE, None, 0.98, str(b))]
    assert (events[1].sha256, events[1].reference_sha256) == (_sha(E0), _sha(E0))
    assert sorted(_summary(store.matches(str(new)))) == sorted(_summary(events))

    again = _commit(store, matcher, a, E0)  # the same path recorded again: not itself
    assert [e.reference_path for e in again if e.kind == DUPLICATE] == [str(new), str(b)]
    strict = _commit(store, matcher, cam / "strict/s.jpg", _toward(0.98, 2))
    assert [(e.reference_path, e.score) for e in strict if e.kind == DUPLICATE] == \
        [(str(b), 1.0)]  # 0.98 to a.jpg and n.jpg is under this folder's 0.99

    _delete(store, matcher, b)  # a deleted image no longer matches
    late = matcher.match(str(tmp_path / "other/m.jpg"), "s", _toward(0.98, 2))
    duplicates = [e.reference_path for e in late if e.kind == DUPLICATE]
    assert duplicates[0] == str(cam / "strict/s.jpg")  # then a.jpg and n.jpg, tied at 0.98
    assert sorted(duplicates[1:]) == sorted([str(a), str(new)])

    capped = _matcher(gallery, top_k=1)
    capped.load(store, MODEL)
    assert [e.kind for e in capped.match(str(tmp_path / "k.jpg"), "s", E0)] == \
        [GALLERY, DUPLICATE]
    off = _matcher(gallery, duplicates_enabled=False)
    off.load(store, MODEL)
    assert [e.kind for e in off.match(str(tmp_path / "k.jpg"), "s", E0)] == [GALLERY]


def test_an_earlier_image_whose_file_is_gone_is_no_duplicate(
        store: Store, gallery: Path, cam: Path) -> None:
    """A file renamed to a new path: its old row is still indexed until the deletion comes
    through the pipeline, and must not be reported as the new file's duplicate."""
    matcher = _matcher(gallery, top_k=3)
    _commit(store, matcher, cam / "old-name.jpg", E0)
    (cam / "old-name.jpg").rename(cam / "new-name.jpg")
    assert _commit(store, matcher, cam / "new-name.jpg", E0) == []


def test_a_gone_file_does_not_cost_a_real_duplicate_its_place(
        store: Store, gallery: Path, cam: Path) -> None:
    """With top_k 1, the best hit is a renamed file's old row and the next is a real copy
    still on disk: the copy is the duplicate to report."""
    matcher = _matcher(gallery, top_k=1)
    _commit(store, matcher, cam / "copy.jpg", _toward(0.99, 2))
    _commit(store, matcher, cam / "old-name.jpg", E0)
    (cam / "old-name.jpg").rename(cam / "new-name.jpg")
    events = _commit(store, matcher, cam / "new-name.jpg", E0)
    assert [(e.kind, e.reference_path) for e in events] == [(DUPLICATE, str(cam / "copy.jpg"))]


def test_gallery_images_get_no_events_and_loose_gallery_files_are_not_indexed(
        store: Store, gallery: Path, cam: Path) -> None:
    matcher = _matcher(gallery, threshold=0.0, duplicates=0.0)
    _commit(store, matcher, gallery / "cat/a.jpg", E0)
    _commit(store, matcher, cam / "1.jpg", E0)
    assert _commit(store, matcher, gallery / "cat/b.jpg", E0) == []
    assert _commit(store, matcher, gallery / "dog/c.jpg", E0) == []
    assert _commit(store, matcher, gallery / "loose.jpg", E0) == []
    assert {m.path for m in store.matches()} == {str(cam / "1.jpg")}  # matched cat/a.jpg
    assert matcher.labels() == {"cat": 2, "dog": 1}
    assert str(gallery / "loose.jpg") not in [hit.reference.path
                                              for hit in matcher.search(E0, 10)]
    assert sorted(matcher.history) == [str(cam / "1.jpg")]


def test_readers_do_not_wait_for_a_slow_commit(store: Store, gallery: Path, cam: Path) -> None:
    """The pipeline holds `Matcher.lock` from match through the store write to the index
    update; a slow write (a busy SD card) must not stall MQTT searches or `labels()`. Another
    thread holds the lock here while a reader runs: a deadlock check, not a timing one."""
    matcher = _matcher(gallery)
    _commit(store, matcher, gallery / "cat/a.jpg", _toward(0.9))
    _commit(store, matcher, cam / "1.jpg", E0)
    held, release = threading.Event(), threading.Event()

    def commit_in_progress() -> None:
        with matcher.lock:
            held.set()
            release.wait(60)

    answers: dict[str, object] = {}

    def read() -> None:
        answers["search"] = [(hit.reference.path, hit.score) for hit in matcher.search(E0, 5)]
        answers["labels"] = matcher.labels()

    writer = threading.Thread(target=commit_in_progress, daemon=True)
    reader = threading.Thread(target=read, daemon=True)
    writer.start()
    try:
        assert held.wait(10)
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), "search()/labels() waited for Matcher.lock"
    finally:
        release.set()
        writer.join(10)
        reader.join(10)
    assert answers == {"search": [(str(cam / "1.jpg"), 1.0), (str(gallery / "cat/a.jpg"), 0.9)],
                       "labels": {"cat": 1}}


# ---- add_reference: the gallery's files ----------------------------------------------------

def _image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    synthetic_photo(*size, seed=seed).save(buffer, format=fmt)
    return buffer.getvalue()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_add_reference_writes_atomically_and_names_files(gallery: Path) -> None:
    options = ImagingOptions()
    one, two = _image_bytes(1), _image_bytes(2)
    path = add_reference(gallery, "van", one, "front.jpg", options)
    assert path == gallery / "van" / "front.jpg"
    assert path.read_bytes() == one
    assert _files(gallery) == ["front.jpg", "van"]  # no .part left behind

    assert add_reference(gallery, "van", one, "front.jpg", options) == path  # same bytes
    assert add_reference(gallery, "van", one, "front.jpeg", options) == path  # same stem
    assert _files(gallery / "van") == ["front.jpg"]

    other = add_reference(gallery, "van", two, "front.jpg", options)  # a name clash
    assert other == gallery / "van" / f"front-{hashlib.sha256(two).hexdigest()[:8]}.jpg"
    assert path.read_bytes() == one and other.read_bytes() == two

    unnamed = add_reference(gallery, "van", one, None, options)  # named by its content
    assert unnamed.name == hashlib.sha256(one).hexdigest()[:16] + ".jpg"
    assert add_reference(gallery, "van", one, None, options) == unnamed
    png = add_reference(gallery, "van", _image_bytes(3, "PNG"), "../../side.jpg", options)
    assert png == gallery / "van" / "side.png"  # the content's suffix, never outside
    hidden = add_reference(gallery, "van", _image_bytes(4), ".secret.jpg", options)
    assert hidden == gallery / "van" / "secret.jpg"  # never a hidden (excluded) file
    assert [p for p in _files(gallery) if p.startswith(".") or p.endswith(".part")] == []
    assert len(_files(gallery / "van")) == 5


def test_add_reference_refuses_what_is_not_an_image_and_writes_nothing(
        gallery: Path) -> None:
    with pytest.raises(UnidentifiedImageError, match=r"notes\.txt"):
        add_reference(gallery, "van", b"just some text", "notes.txt", ImagingOptions())
    whole = _image_bytes(1, size=(320, 240))
    with pytest.raises(ImageError, match=r"cut\.jpg"):  # a JPEG cut short
        add_reference(gallery, "van", whole[: len(whole) // 2], "cut.jpg", ImagingOptions())
    assert _files(gallery) == []


@pytest.mark.parametrize("label", ["", ".x", "a/b", " x", "x ", "..", "a\0b", "é" * 51, 7])
def test_add_reference_refuses_bad_labels(gallery: Path, label: object) -> None:
    with pytest.raises(GalleryError):
        add_reference(gallery, label, _image_bytes(1), "a.jpg",  # type: ignore[arg-type]
                      ImagingOptions())
    assert _files(gallery.parent) == ["gallery"]


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "ICO"])
def test_add_reference_refuses_a_format_the_gallery_watcher_skips(gallery: Path,
                                                                  fmt: str) -> None:
    """Pillow decodes these, but no gallery file name could carry them past the watcher's
    include patterns: the reference would never be embedded."""
    data = _image_bytes(1, fmt)
    assert fmt not in SUFFIXES
    with pytest.raises(ImageError) as refused:
        add_reference(gallery, "van", data, f"side.{fmt.lower()}", ImagingOptions())
    message = str(refused.value)
    assert fmt in message and f"side.{fmt.lower()}" in message
    assert all(supported in message for supported in ("JPEG", "PNG", "WEBP")), message
    assert _files(gallery) == []


@pytest.mark.parametrize("label", ["engine.part", "x.tmp", "van~", "van\udcff", "\ud800"],
                         ids=["part", "tmp", "tilde", "undecodable-byte", "lone-surrogate"])
def test_labels_the_gallery_watcher_skips_or_not_utf8_are_refused(gallery: Path,
                                                                  label: str) -> None:
    """A folder named like a temporary file is excluded by the gallery's watch (its
    references would never be embedded); a label must be text that UTF-8 can write."""
    with pytest.raises(GalleryError) as refused:
        check_label(label)
    if label.isascii():
        assert repr(label) in str(refused.value)  # names the label
    with pytest.raises(GalleryError):
        add_reference(gallery, label, _image_bytes(1), "a.jpg", ImagingOptions())
    assert _files(gallery.parent) == ["gallery"]
    assert check_label("part.engine") == "part.engine"  # the patterns, not a substring


def test_a_failed_reference_write_leaves_no_part_file(gallery: Path) -> None:
    """A real write failure: the child process may write files of at most 16 KiB
    (RLIMIT_FSIZE, SIGXFSZ ignored so write() fails with EFBIG) and adds a larger image."""
    data = _image_bytes(5, "PNG", (200, 150))
    assert len(data) > 16 * 1024
    child = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        from dinowatch.imaging import ImagingOptions
        from dinowatch.match import add_reference
        data = Path(sys.argv[1]).read_bytes()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({16 * 1024}, {16 * 1024}))
        try:
            add_reference(Path(sys.argv[2]), "van", data, "big.png", ImagingOptions())
        except OSError as err:
            print("OSError", err.errno)
    """)
    source = gallery.parent / "big.png"
    source.write_bytes(data)
    result = subprocess.run([sys.executable, "-c", child, str(source), str(gallery)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.split()[:1] == ["OSError"], result.stdout + result.stderr
    assert _files(gallery / "van") == []


# ---- the store: schema 3 ----------------------------------------------------------------------

def _version_2_database(path: Path) -> None:
    """A database as dinowatch 0.2 left it: migrations 1 and 2, with rows in each table."""
    db = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
    db.execute("PRAGMA journal_mode=WAL")
    db.executemany(
        "INSERT INTO images (path, source, sha256, size, mtime_ns, width, height, status, "
        "error, model, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        [("/cam/a.jpg", "cam", "aa" * 32, 10, 1, 4, 3, "done", None, MODEL, "t"),
         (b"/cam/\xff.jpg", "cam", "bb" * 32, 11, 2, 5, 6, "done", None, MODEL, "t"),
         ("/cam/bad.jpg", "cam", None, 12, 3, None, None, "failed", "ImageError: x", MODEL,
          "t")])
    db.executemany("INSERT INTO vectors VALUES (?,?,?)",
                   [("aa" * 32, MODEL, np.full(DIM, 1, "<f4").tobytes()),
                    ("bb" * 32, MODEL, np.full(DIM, 2, "<f4").tobytes())])
    db.execute("INSERT INTO outbox (topic, payload, qos, retain, created_at) "
               "VALUES ('t/e', x'01', 1, 0, 't')")
    db.execute("INSERT INTO dead_letters VALUES (9, 't/d', x'02', 1, 0, 't', 5, 'refused', "
               "'t', NULL)")
    db.close()


def test_a_version_2_database_migrates_to_3_and_keeps_its_rows(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "old.db"
    _version_2_database(path)
    with caplog.at_level(logging.INFO, logger="dinowatch.store"):
        store = Store(path)
    try:
        assert "migrated to schema version 3" in caplog.text
        assert "schema version 2" not in caplog.text  # only what was missing ran
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == 3 == len(MIGRATIONS)
        odd = os.fsdecode(b"/cam/\xff.jpg")
        assert store.image("/cam/a.jpg") == ImageRecord(
            path="/cam/a.jpg", source="cam", size=10, mtime_ns=1, status="done",
            sha256="aa" * 32, width=4, height=3, model=MODEL, label=None)
        assert store.image(odd).size == 11  # type: ignore[union-attr]
        assert store.counts() == {"done": 2, "failed": 1, "deleted": 0}
        paths, shas, vectors = store.recorded_vectors(MODEL)
        assert sorted(zip(paths, shas, vectors[:, 0].tolist(), strict=True)) == \
            [("/cam/a.jpg", "aa" * 32, 1.0), (odd, "bb" * 32, 2.0)]
        assert vectors.shape == (2, DIM) and vectors.dtype == np.float32
        assert [m.payload for m in store.outbox_after(0, 10)] == [b"\x01"]
        assert [d.seq for d in store.dead_letters()] == [9]
        assert store.matches() == []
    finally:
        store.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinowatch.store"):
        Store(path).close()
    assert "migrated" not in caplog.text  # opened again: nothing more to do


def _match(path: str, kind: str = GALLERY, label: str | None = "van",
           score: float = 0.9) -> Match:
    return Match(path=path, sha256="cc" * 32, kind=kind, label=label, score=score,
                 reference_path="/gallery/van/ref.jpg", reference_sha256="dd" * 32)


def test_record_writes_matches_in_the_images_transaction(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _version_2_database(path)
    store = Store(path)
    try:
        odd = os.fsdecode(b"/cam/n\xff.jpg")
        record = ImageRecord(path=odd, source="cam", size=1, mtime_ns=1, status="done",
                             sha256="cc" * 32, model=MODEL)
        events = [_match(odd), _match(odd, DUPLICATE, None, 0.98)]
        store.record(record, np.ones(DIM, np.float32), [Message("t/m", b"m")], events)
        stored = store.matches(odd)
        assert [(m.kind, m.label, m.score, m.reference_path) for m in stored] == \
            [(DUPLICATE, None, 0.98, "/gallery/van/ref.jpg"),  # newest first
             (GALLERY, "van", 0.9, "/gallery/van/ref.jpg")]
        assert all(m.path == odd and m.sha256 == "cc" * 32 and m.ts.endswith("Z")
                   for m in stored)
        assert store.matches(odd, limit=1) == stored[:1]
        assert store.matches("/cam/a.jpg") == []

        labelled = ImageRecord(path="/gallery/van/ref.jpg", source="gallery", size=1,
                               mtime_ns=1, status="done", sha256="dd" * 32, model=MODEL,
                               label="van")
        store.record(labelled, np.ones(DIM, np.float32), [])
        assert store.image("/gallery/van/ref.jpg") == labelled
        assert {r.path: r.label for r in store.images()} == {
            "/cam/a.jpg": None, os.fsdecode(b"/cam/\xff.jpg"): None, odd: None,
            "/gallery/van/ref.jpg": "van"}

        failing = ImageRecord(path="/cam/f.jpg", source="cam", size=1, mtime_ns=1,
                              status="done", sha256="ff" * 32, model=MODEL)
        with pytest.raises(sqlite3.IntegrityError):  # kind is CHECKed: the second row fails
            store.record(failing, np.ones(DIM, np.float32), [Message("t/f", b"f")],
                         [_match("/cam/f.jpg"), _match("/cam/f.jpg", kind="nearby")])
        assert store.image("/cam/f.jpg") is None
        assert store.matches("/cam/f.jpg") == []
        assert store.known("ff" * 32, MODEL) is None
        assert [m.payload for m in store.outbox_after(0, 10)] == [b"\x01", b"m"]

        store.add_matches([_match("/cam/a.jpg", score=0.8)], [Message("t/r", b"r")])
        assert [m.score for m in store.matches("/cam/a.jpg")] == [0.8]
        assert len(store.matches()) == 3
    finally:
        store.close()
