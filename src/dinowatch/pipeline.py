"""intake -> decode -> embed -> record: the worker threads between the watcher and the store.

Decode workers read, hash and decode files; one inference worker batches whatever is ready.
The two overlap because PIL and ONNX Runtime release the GIL. A bounded queue between them
is the backpressure: decoders wait while inference is behind, so memory stays flat.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinowatch.embedder import EMBED_ERRORS, DinoEmbedder, Prepared
from dinowatch.store import ImageRecord, Message, Store

log = logging.getLogger(__name__)

DECODE_WORKERS = 2
BATCH_SIZE = 4  # images per inference call; larger batches gain little on 4 cores
PREPARED_QUEUE = 8  # decoded tensors waiting for inference (600 KB each)
RATE_WINDOW_SECONDS = 60.0



@dataclass(frozen=True)
class Job:
    path: Path
    source: str


@dataclass(frozen=True)
class Decoded:
    job: Job
    stat: os.stat_result
    sha256: str
    prepared: Prepared


class Messages:
    """What the pipeline needs from the publish stage: payload builders (None: no broker)."""

    def embedding(self, record: ImageRecord, vector: np.ndarray) -> list[Message]:
        return []

    def error(self, path: str | None, error: BaseException) -> list[Message]:
        return []


class WorkQueue:
    """Paths waiting for a decoder, de-duplicated; a path is never worked on twice at once."""

    def __init__(self) -> None:
        self._waiting: OrderedDict[Job, None] = OrderedDict()
        self._active: set[Path] = set()
        self._changed = threading.Condition()
        self._closed = False

    def put(self, job: Job) -> bool:
        """Queue `job`; False if it was already waiting."""
        with self._changed:
            if job in self._waiting:
                return False
            self._waiting[job] = None
            self._changed.notify()
            return True

    def take(self) -> Job | None:
        """The next job whose path is not being worked on; None once closed."""
        with self._changed:
            while not self._closed:
                job = next((j for j in self._waiting if j.path not in self._active), None)
                if job is not None:
                    del self._waiting[job]
                    self._active.add(job.path)
                    return job
                self._changed.wait()
            return None

    def done(self, job: Job) -> None:
        with self._changed:
            self._active.discard(job.path)
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class Pipeline:
    """Embeds every submitted file once and records it; see the module docstring."""

    def __init__(self, embedder: DinoEmbedder, store: Store, messages: Messages | None = None,
                 *, normalize: bool = True, on_recorded: Callable[[], None] = lambda: None,
                 decode_workers: int = DECODE_WORKERS) -> None:
        self.embedder = embedder
        self.store = store
        self.messages = messages or Messages()
        self.normalize = normalize
        self.on_recorded = on_recorded
        self.model_key = embedder.model_sha256
        self.work = WorkQueue()
        self._prepared: queue.Queue[Decoded | None] = queue.Queue(PREPARED_QUEUE)
        self._decoders = [threading.Thread(target=self._decode_loop, name=f"decode-{i}",
                                           daemon=True) for i in range(decode_workers)]
        self._inference = threading.Thread(target=self._infer_loop, name="inference",
                                           daemon=True)
        self._lock = threading.Lock()
        self._completed: deque[float] = deque()
        self.processed = 0
        self.failed = 0
        self._submitted = 0
        self._finished = 0

    # -- control --------------------------------------------------------------------------
    def start(self) -> None:
        for thread in [*self._decoders, self._inference]:
            thread.start()

    def submit(self, path: Path, source: str) -> None:
        """Hand a file over (from any thread); returns at once."""
        if self.work.put(Job(path, source)):
            with self._lock:
                self._submitted += 1

    def stop(self, timeout: float = 8.0) -> bool:
        """Finish what is being decoded or inferred, leave the rest for the next start-up scan.

        Returns False if the workers did not finish within `timeout`.
        """
        deadline = time.monotonic() + timeout
        self.work.close()
        for thread in self._decoders:
            thread.join(max(0.0, deadline - time.monotonic()))
        try:
            self._prepared.put(None, timeout=max(0.01, deadline - time.monotonic()))
        except queue.Full:  # inference is stuck; the threads are daemons and die with us
            return False
        self._inference.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in [*self._decoders, self._inference])

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in [*self._decoders, self._inference])

    @property
    def queued(self) -> int:
        """Files submitted and not yet finished (waiting, decoding or being embedded)."""
        with self._lock:
            return self._submitted - self._finished

    def _complete(self, job: Job) -> None:
        """`job` is recorded (or skipped): its path may be worked on again."""
        self.work.done(job)
        with self._lock:
            self._finished += 1

    def rate(self) -> float:
        """Images per second over the last minute."""
        with self._lock:
            self._forget_old(time.monotonic())
            return len(self._completed) / RATE_WINDOW_SECONDS

    # -- decode ---------------------------------------------------------------------------
    def _decode_loop(self) -> None:
        while (job := self.work.take()) is not None:
            decoded = None
            try:
                decoded = self._decode(job)
                if decoded is not None:
                    self._prepared.put(decoded)  # inference completes the job
            except Exception:
                log.exception("unexpected error on %s", job.path)
            finally:
                if decoded is None:  # skipped, recorded without inference, or failed
                    self._complete(job)

    def _decode(self, job: Job) -> Decoded | None:
        """Skip what the store already has; record what needs no inference; else decode."""
        path = str(job.path)
        try:
            stat = job.path.stat()
        except FileNotFoundError:
            log.debug("%s vanished before it was read", path)
            return None
        except OSError as err:
            self._record_failure(job, None, err)  # no stat: retried at the next scan
            return None
        known = self.store.image(path)
        if known and known.status != "deleted" and known.model == self.model_key and \
                (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            return None  # this version of the file is already recorded (done or failed)
        try:
            with job.path.open("rb") as file:  # streamed: a huge file never sits in memory
                sha256 = hashlib.file_digest(file, "sha256").hexdigest()
        except FileNotFoundError:
            return None
        except OSError as err:  # e.g. permissions: may be fixed without touching the file
            self._record_failure(job, None, err)
            return None
        twin = self.store.known(sha256, self.model_key)
        if twin is not None:  # the same bytes were embedded before: reuse, no inference
            vector, width, height = twin
            resend = not (known and known.sha256 == sha256 and known.status == "done")
            self._record_success(job, stat, sha256, width, height, vector, publish=resend)
            return None
        try:
            prepared = self.embedder.prepare(job.path)
        except EMBED_ERRORS as err:
            self._record_failure(job, stat, err, sha256)
            return None
        return Decoded(job, stat, sha256, prepared)

    # -- embed ----------------------------------------------------------------------------
    def _infer_loop(self) -> None:
        # This thread must outlive any one batch: systemd's watchdog watches it.
        while (first := self._prepared.get()) is not None:
            batch = [first]
            stop_after = False
            while len(batch) < BATCH_SIZE:
                try:
                    item = self._prepared.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop_after = True
                    break
                batch.append(item)
            try:
                self._embed(batch)
            except Exception:
                log.exception("unexpected error embedding a batch of %d", len(batch))
            if stop_after:
                return

    def _embed(self, batch: list[Decoded]) -> None:
        try:
            vectors: list[np.ndarray | None] = list(self.embedder.infer(
                [item.prepared.tensor for item in batch], self.normalize))
            failure: Exception | None = None
        except RuntimeError as err:
            log.error("inference failed for a batch of %d: %s", len(batch), err)
            vectors, failure = [None] * len(batch), err
        for item, vector in zip(batch, vectors, strict=True):
            try:
                if vector is None:  # no stat: the next scan retries it
                    self._record_failure(item.job, None, failure or RuntimeError(), item.sha256)
                else:
                    self._record_success(item.job, item.stat, item.sha256, item.prepared.width,
                                         item.prepared.height, vector, new_vector=True)
            except Exception:  # e.g. disk full: the file is redone at the next scan
                log.exception("cannot record %s", item.job.path)
            finally:
                self._complete(item.job)

    # -- record ---------------------------------------------------------------------------
    def _record_success(self, job: Job, stat: os.stat_result, sha256: str, width: int | None,
                        height: int | None, vector: np.ndarray, *, new_vector: bool = False,
                        publish: bool = True) -> None:
        record = ImageRecord(path=str(job.path), source=job.source, size=stat.st_size,
                             mtime_ns=stat.st_mtime_ns, status="done", sha256=sha256,
                             width=width, height=height, model=self.model_key)
        messages = self.messages.embedding(record, vector) if publish else []
        self._commit(record, vector if new_vector else None, messages, failed=False)

    def _record_failure(self, job: Job, stat: os.stat_result | None, err: BaseException,
                        sha256: str | None = None) -> None:
        log.warning("%s", err)
        record = ImageRecord(path=str(job.path), source=job.source,
                             size=stat.st_size if stat else -1,
                             mtime_ns=stat.st_mtime_ns if stat else -1, status="failed",
                             sha256=sha256, error=f"{type(err).__name__}: {err}",
                             model=self.model_key)
        self._commit(record, None, self.messages.error(str(job.path), err), failed=True)

    def _commit(self, record: ImageRecord, vector: np.ndarray | None, messages: list[Message],
                *, failed: bool) -> None:
        self.store.record(record, vector, messages)
        now = time.monotonic()
        with self._lock:
            if failed:
                self.failed += 1
            else:
                self.processed += 1
                self._completed.append(now)
                self._forget_old(now)
        if messages:
            self.on_recorded()

    def _forget_old(self, now: float) -> None:
        while self._completed and self._completed[0] < now - RATE_WINDOW_SECONDS:
            self._completed.popleft()
