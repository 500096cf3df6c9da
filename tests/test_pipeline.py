"""decode -> embed -> record: each file once, same bytes reused, failures recorded."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dinowatch import DinoEmbedder
from dinowatch import pipeline as pipeline_module
from dinowatch import store as store_module
from dinowatch.imaging import ImagingOptions
from dinowatch.pipeline import Messages, Pipeline
from dinowatch.store import ImageRecord, Message, Store
from dinowatch.testing import synthetic_photo, write_model


class TopicMessages(Messages):
    """Payloads reduced to what these tests check: which file, which outcome."""

    def embedding(self, record: ImageRecord, vector: np.ndarray) -> list[Message]:
        return [Message("embedding", record.path.encode())]

    def deleted(self, record: ImageRecord) -> list[Message]:
        return [Message("deleted", record.path.encode())]

    def error(self, path: str | None, kind: str, message: str) -> list[Message]:
        return [Message("error", f"{path}|{kind}".encode())]


class CountingEmbedder(DinoEmbedder):
    """The real embedder, counting how many images reach the backend."""

    inferred = 0

    def infer(self, tensors, normalize=True):  # type: ignore[no-untyped-def]
        self.inferred += len(tensors)
        return super().infer(tensors, normalize)


@pytest.fixture
def embedder(tiny_model: Path) -> CountingEmbedder:
    return CountingEmbedder(tiny_model, imaging=ImagingOptions(exif_transpose=True,
                                                               fast_jpeg=True))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "db" / "dinowatch.db")
    yield store
    store.close()


@pytest.fixture
def pipeline(embedder: CountingEmbedder, store: Store) -> Iterator[Pipeline]:
    pipeline = Pipeline(embedder, store, TopicMessages())
    pipeline.start()
    yield pipeline
    pipeline.stop()


def run(pipeline: Pipeline, *paths: Path, timeout: float = 60) -> None:
    for path in paths:
        pipeline.submit(path, "cam")
    deadline = time.monotonic() + timeout
    while pipeline.queued:
        assert time.monotonic() < deadline, "pipeline did not finish"
        time.sleep(0.02)


def outbox(store: Store) -> list[tuple[str, str]]:
    return [(m.topic, m.payload.decode()) for m in store.outbox_after(0, 1000)]


def photos(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(start, start + count):
        paths.append(folder / f"img{seed:03d}.jpg")
        synthetic_photo(320, 240, seed=seed).save(paths[-1], quality=90)
    return paths


def test_each_file_is_embedded_recorded_and_queued_once(pipeline: Pipeline, store: Store,
                                                        embedder: CountingEmbedder,
                                                        tmp_path: Path) -> None:
    paths = photos(tmp_path / "in", 10)
    run(pipeline, *paths)
    run(pipeline, *paths)  # submitted again, unchanged: nothing new
    assert embedder.inferred == 10
    assert sorted(outbox(store)) == sorted(("embedding", str(p)) for p in paths)
    for path in paths:
        record = store.image(str(path))
        assert record.status == "done" and (record.width, record.height) == (320, 240)
        vector, _, _ = store.known(record.sha256, embedder.model_sha256)
        np.testing.assert_allclose(vector, embedder.embed(path), atol=1e-5)


def test_same_bytes_elsewhere_reuse_the_vector(pipeline: Pipeline, store: Store,
                                               embedder: CountingEmbedder,
                                               tmp_path: Path) -> None:
    [original] = photos(tmp_path / "a", 1)
    copy = tmp_path / "b" / "copy.jpg"
    copy.parent.mkdir()
    run(pipeline, original)
    shutil.copy(original, copy)
    run(pipeline, copy)
    assert embedder.inferred == 1
    assert store.image(str(copy)).sha256 == store.image(str(original)).sha256
    assert store.image(str(copy)).width == 320
    assert outbox(store) == [("embedding", str(original)), ("embedding", str(copy))]


def test_a_changed_file_is_embedded_again(pipeline: Pipeline, store: Store,
                                          embedder: CountingEmbedder, tmp_path: Path) -> None:
    [path] = photos(tmp_path, 1)
    run(pipeline, path)
    first = store.image(str(path))
    synthetic_photo(320, 240, seed=99).save(path, quality=90)
    run(pipeline, path)
    second = store.image(str(path))
    assert embedder.inferred == 2 and first.sha256 != second.sha256
    # A consumer's mirror drops the old picture's id, then adds the new one.
    assert outbox(store) == [("embedding", str(path)), ("deleted", str(path)),
                             ("embedding", str(path))]


def test_bad_files_are_recorded_as_failed_and_good_ones_unaffected(
        pipeline: Pipeline, store: Store, tmp_path: Path) -> None:
    good = photos(tmp_path, 3)
    text = tmp_path / "notes.jpg"
    text.write_text("no picture here")
    half = tmp_path / "half.jpg"
    half.write_bytes(good[0].read_bytes()[:3000])
    run(pipeline, good[0], text, good[1], half, good[2])
    assert store.image(str(text)).status == "failed"
    assert "UnidentifiedImageError" in store.image(str(text)).error
    assert store.image(str(half)).status == "failed"
    assert ("error", f"{text}|UnidentifiedImageError") in outbox(store)
    assert str(text) in store.image(str(text)).error
    assert ("error", f"{half}|ImageError") in outbox(store)
    assert all(store.image(str(p)).status == "done" for p in good)
    assert store.counts() == {"done": 3, "failed": 2, "deleted": 0}
    assert pipeline.failed == 2 and pipeline.processed == 3


def test_stop_finishes_work_in_flight(embedder: CountingEmbedder, store: Store,
                                      tmp_path: Path) -> None:
    pipeline = Pipeline(embedder, store, TopicMessages())
    pipeline.start()
    paths = photos(tmp_path, 12)
    for path in paths:
        pipeline.submit(path, "cam")
    time.sleep(0.3)
    assert pipeline.stop(timeout=30)
    recorded = [p for p in paths if store.image(str(p)) is not None]
    assert recorded, "something was in flight"
    assert len(outbox(store)) == len(recorded) == embedder.inferred  # no half-recorded image


def test_a_path_submitted_again_while_in_flight_is_embedded_once(
        pipeline: Pipeline, store: Store, embedder: CountingEmbedder, tmp_path: Path) -> None:
    paths = photos(tmp_path, 4)
    for _ in range(5):  # a rescan and events racing the first pass
        for path in paths:
            pipeline.submit(path, "cam")
        time.sleep(0.01)
    run(pipeline)
    assert embedder.inferred == 4
    assert sorted(outbox(store)) == sorted(("embedding", str(p)) for p in paths)


class FlakyStore(Store):
    """A real store whose disk 'fills up' for one file."""

    def record(self, image, vector, messages, matches=()):  # type: ignore[no-untyped-def]
        if image.path.endswith("img001.jpg"):
            raise sqlite3.OperationalError("database or disk is full")
        super().record(image, vector, messages, matches)


def test_a_store_failure_costs_one_image_not_the_worker(embedder: CountingEmbedder,
                                                        tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "flaky.db")
    pipeline = Pipeline(embedder, store, TopicMessages())
    pipeline.start()
    paths = photos(tmp_path / "in", 4)
    run(pipeline, *paths)
    assert pipeline.alive
    assert store.image(str(paths[1])) is None  # redone at the next scan
    assert all(store.image(str(p)).status == "done" for p in paths if p != paths[1])
    assert pipeline.stop(timeout=10)
    store.close()


def test_a_file_larger_than_any_image_within_the_limit_is_refused_unread(
        tiny_model: Path, store: Store, tmp_path: Path) -> None:
    embedder = DinoEmbedder(tiny_model, imaging=ImagingOptions(max_pixels=1_000))
    pipeline = Pipeline(embedder, store, TopicMessages())
    pipeline.start()
    huge = tmp_path / "huge.jpg"
    with huge.open("wb") as file:  # sparse: 200 MB that cost no disk and are never read
        file.truncate(200 << 20)
    never = 946_684_800  # 2000-01-01: a read would move the access time (relatime)
    os.utime(huge, (never, never))
    run(pipeline, huge)
    assert huge.stat().st_atime == never  # refused unread
    assert pipeline.stop(timeout=10)
    record = store.image(str(huge))
    assert record.status == "failed" and record.error.startswith("ImageTooLarge: ")
    assert "209,715,200 bytes" in record.error and "imaging.max_pixels" in record.error
    assert outbox(store) == [("error", f"{huge}|ImageTooLarge")]


def test_a_deleted_file_ends_deleted_and_is_withdrawn_once(pipeline: Pipeline, store: Store,
                                                          tmp_path: Path) -> None:
    kept, removed = photos(tmp_path, 2)
    run(pipeline, kept, removed)
    removed.unlink()
    for path in (kept, removed):  # the watcher's word is checked: `kept` is still there
        pipeline.submit(path, "cam", gone=True)
    pipeline.submit(removed, "cam", gone=True)
    run(pipeline)
    assert store.image(str(kept)).status == "done"
    assert store.image(str(removed)).status == "deleted"
    assert outbox(store).count(("deleted", str(removed))) == 1
    never = tmp_path / "never-read.jpg"  # gone before it was read: a visible end all the same
    run(pipeline, never)
    assert store.image(str(never)).status == "deleted"
    assert store.counts() == {"done": 1, "failed": 0, "deleted": 2}


def test_another_model_embeds_and_publishes_again(tiny_model: Path, store: Store,
                                                 tmp_path: Path) -> None:
    paths = photos(tmp_path / "in", 2)
    for model in (tiny_model, write_model(tmp_path / "other.onnx", "tiny", seed=7)):
        embedder = DinoEmbedder(model)
        pipeline = Pipeline(embedder, store, TopicMessages())
        pipeline.start()
        run(pipeline, *paths)
        assert pipeline.stop(timeout=10)
        for path in paths:  # every row has a vector under the model that made it
            record = store.image(str(path))
            assert record.model == embedder.model_sha256
            assert store.known(record.sha256, embedder.model_sha256) is not None
    # Same pictures, new vectors: published again, and nothing withdrawn.
    assert sorted(outbox(store)) == sorted(2 * [("embedding", str(p)) for p in paths])


def test_the_same_bytes_later_elsewhere_keep_their_size(pipeline: Pipeline, store: Store,
                                                        tmp_path: Path) -> None:
    [first] = photos(tmp_path / "a", 1)
    run(pipeline, first)
    moved = tmp_path / "b" / "moved.jpg"
    moved.parent.mkdir()
    first.rename(moved)
    pipeline.submit(first, "cam", gone=True)
    run(pipeline, moved)
    record = store.image(str(moved))
    assert (record.status, record.width, record.height) == ("done", 320, 240)


def test_a_recorded_file_that_turns_bad_is_withdrawn(pipeline: Pipeline, store: Store,
                                                     tmp_path: Path) -> None:
    [path] = photos(tmp_path, 1)
    run(pipeline, path)
    path.write_bytes(path.read_bytes()[:500])  # overwritten by a truncated copy
    run(pipeline, path)
    assert store.image(str(path)).status == "failed"
    assert outbox(store) == [("embedding", str(path)), ("error", f"{path}|ImageError"),
                             ("deleted", str(path))]


def test_a_database_locked_elsewhere_pauses_intake_and_fails_nothing(
        embedder: CountingEmbedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_SECONDS", 0.3)
    monkeypatch.setattr(pipeline_module, "STORE_PROBE_SECONDS", 0.2)
    store = Store(tmp_path / "locked.db")
    pauses: list[str | None] = []
    pipeline = Pipeline(embedder, store, TopicMessages(),
                        on_paused=lambda error: pauses.append(error and type(error).__name__))
    pipeline.start()
    other = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # e.g. a backup tool or the sqlite3 shell
    paths = photos(tmp_path / "in", 3)
    for path in paths:
        pipeline.submit(path, "cam")
    deadline = time.monotonic() + 10
    while pipeline.paused is None:
        assert time.monotonic() < deadline, "intake did not pause"
        time.sleep(0.05)
    time.sleep(0.5)
    other.execute("COMMIT")
    other.close()
    run(pipeline)
    assert pipeline.stop(timeout=10)
    assert [store.image(str(p)).status for p in paths] == ["done"] * 3
    assert pauses == ["StoreBusy", None] and pipeline.failed == 0
    store.close()


def test_decoders_run_at_a_lower_priority_than_inference(pipeline: Pipeline) -> None:
    # Inference first: the decoders fill the gaps (issue 9). Linux keeps a nice value per
    # thread; the 19th field of /proc/self/task/<tid>/stat.
    def nice(thread: object) -> int:
        tid = thread.native_id  # type: ignore[attr-defined]
        stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[16])

    base = os.getpriority(os.PRIO_PROCESS, 0)
    deadline = time.monotonic() + 5
    while any(nice(d) != base + pipeline_module.DECODE_NICE for d in pipeline._decoders):
        assert time.monotonic() < deadline, "the decoders never lowered their priority"
        time.sleep(0.01)
    assert nice(pipeline._inference) == base and nice(pipeline._recorder) == base


def test_commits_run_on_the_record_worker_not_the_inference_thread(
        pipeline: Pipeline, store: Store, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The commit's fsync must not hold up the next inference (issue 9).
    threads: list[str] = []
    record = store.record

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return record(*args, **kwargs)

    monkeypatch.setattr(store, "record", recording)
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"photo{index}.jpg")
        synthetic_photo(64, 48, seed=index).save(paths[-1])
    run(pipeline, *paths)
    assert threads == ["record"] * 3
