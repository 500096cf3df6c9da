"""intake -> decode -> embed -> record: the worker threads between the watcher and the store.

Decode workers read, hash and decode files; one inference worker batches whatever is ready;
one record worker matches and commits each result. They overlap because PIL, ONNX Runtime
and SQLite release the GIL: the fsync of one commit never holds up the next inference.
Bounded queues between them are the backpressure: decoders wait while inference is behind,
and inference while the store is, so memory stays flat.

Every file handed over ends in one visible state: `done` (a vector), `failed` (a row and an
`error` message naming the file and the kind of error) or `deleted`. A file is opened once:
the bytes that are hashed are the bytes that are decoded, and a file that changes while it
is read, or before its result commits, is read again rather than recorded mixed. Deletions
go through the same queue as arrivals, so a path's row only ever changes on one thread at a
time and a file deleted while in flight ends `deleted`, not `done`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import queue
import stat
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dinowatch.backends import BackendFailed, BackendUnavailable, fallback_of
from dinowatch.config import DuplicateSettings, MatchingSettings
from dinowatch.embedder import DinoEmbedder, Prepared
from dinowatch.errors import readable
from dinowatch.health import Activity, CpuClock
from dinowatch.imaging import ImageError
from dinowatch.match import Matcher
from dinowatch.store import ImageRecord, Match, Message, Store, StoreUnavailable, utc_now
from dinowatch.watch import is_gone

log = logging.getLogger(__name__)

DECODE_WORKERS = 2
DECODE_NICE = 5  # the decode threads' nice value (0 for the rest of the daemon)
PREPARED_QUEUE = 8  # decoded tensors waiting for inference (600 KB each)
INFERRED_QUEUE = 2  # inferred batches waiting for their commits
RATE_WINDOW_SECONDS = 60.0
READ_ATTEMPTS = 5  # reads of a file that keeps changing before it goes to the back of the queue
REREAD_PAUSE = 0.1  # seconds, times the attempt number
PER_IMAGE_LOG_LIMIT = 10  # INFO lines for single images per minute; the daemon sums up the rest
REOPEN_FIRST_SECONDS = 2.0  # after a device failure: the first wait between attempts to open
REOPEN_MAX_SECONDS = 60.0  # ... doubling up to this
BACKEND_POLL_SECONDS = 1.0  # how soon a device failure met outside the pipeline is seen
STORE_PROBE_SECONDS = 5.0  # while the store takes no writes: how often to try one again
# O_NONBLOCK: opening a FIFO must not wait for a writer; it changes nothing for regular files.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY

# What happened to a job; `Pipeline.outcomes` counts them.
RECORDED, UNCHANGED, FAILED, DELETED, REQUEUED = (
    "recorded", "unchanged", "failed", "deleted", "requeued")


@dataclass(frozen=True)
class Job:
    path: Path
    source: str
    gone: bool = False  # the watcher or a scan saw the file leave: settle its row
    # time.time() when handed over; not part of the job's identity (de-duplication)
    submitted: float = field(default_factory=time.time, compare=False)


@dataclass(frozen=True)
class Decoded:
    job: Job
    stat: os.stat_result  # of the descriptor the bytes came from
    sha256: str
    prepared: Prepared
    previous: ImageRecord | None
    started: float  # time.time() when a decoder took the job
    decoded: float  # ... and when it was ready for inference


@dataclass(frozen=True)
class Inferred:
    """One batch out of the model, on its way to the record worker."""

    batch: list[Decoded]
    vectors: list[np.ndarray] | None  # None: the inference failed with `failure`
    failure: Exception | None
    started: float  # time.time() around the inference
    ended: float


class Changed(Exception):  # a signal between two methods, not an error
    """The file changed while it was read, or before its result committed."""


class Messages:
    """What the pipeline needs from the publish stage: payload builders (None: no broker)."""

    def embedding(self, record: ImageRecord, vector: np.ndarray) -> list[Message]:
        return []

    def deleted(self, record: ImageRecord) -> list[Message]:
        return []

    def error(self, path: str | None, kind: str, message: str) -> list[Message]:
        return []

    def match(self, record: ImageRecord, events: list[Match], *,
              live: bool = True) -> list[Message]:
        """`live`: the image just arrived (False: events found later, by `gallery rematch`,
        which must not look like news to Home Assistant)."""
        return []


class WorkQueue:
    """Jobs waiting for a decoder, de-duplicated; a path is never worked on twice at once."""

    def __init__(self) -> None:
        self._waiting: OrderedDict[Job, None] = OrderedDict()
        self._active: set[Path] = set()
        self._changed = threading.Condition()
        self._closed = False
        self._paused = False

    def put(self, job: Job, *, front: bool = False) -> bool:
        """Queue `job`; False if it was already waiting."""
        with self._changed:
            if job in self._waiting:
                return False
            self._waiting[job] = None
            if front:
                self._waiting.move_to_end(job, last=False)
            self._changed.notify()
            return True

    def take(self) -> Job | None:
        """The next job whose path is not being worked on; None once closed."""
        with self._changed:
            while not self._closed:
                job = None if self._paused else next(
                    (j for j in self._waiting if j.path not in self._active), None)
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

    def pause(self, paused: bool = True) -> None:
        """While paused, `take` hands out nothing (jobs keep arriving and wait)."""
        with self._changed:
            self._paused = paused
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class Pipeline:
    """Embeds every submitted file once and records it; see the module docstring.

    `on_paused(error)` is called when the store stops taking writes (a full disk, a lock held
    by another process: intake pauses) and `on_paused(None)` when it takes them again.
    """

    def __init__(self, embedder: DinoEmbedder, store: Store, messages: Messages | None = None,
                 *, matcher: Matcher | None = None,
                 normalize: bool = True, on_recorded: Callable[[], None] = lambda: None,
                 on_paused: Callable[[StoreUnavailable | None], None] = lambda error: None,
                 decode_workers: int = DECODE_WORKERS) -> None:
        self.embedder = embedder
        self.store = store
        self.messages = messages or Messages()
        # Without one: no gallery, no duplicates (the index is still kept, for search).
        self.matcher = matcher or Matcher(
            MatchingSettings(duplicates=DuplicateSettings(enabled=False)), None,
            dim=embedder.dim)
        self.normalize = normalize
        self.on_recorded = on_recorded
        self.on_paused = on_paused
        self.model_key = embedder.model_sha256
        self.work = WorkQueue()
        self._prepared: queue.Queue[Decoded | None] = queue.Queue(PREPARED_QUEUE)
        self._inferred: queue.Queue[Inferred | None] = queue.Queue(INFERRED_QUEUE)
        self._decoders = [threading.Thread(target=self._decode_loop, name=f"decode-{i}",
                                           daemon=True) for i in range(decode_workers)]
        self._inference = threading.Thread(target=self._infer_loop, name="inference",
                                           daemon=True)
        self._recorder = threading.Thread(target=self._record_loop, name="record", daemon=True)
        self._lock = threading.Lock()
        self._store_outage = threading.Lock()  # one thread waits it out, the rest queue here
        self._outages = 0  # store outages over so far
        self._stopping = threading.Event()
        self._completed: deque[float] = deque()
        self.outcomes: Counter[str] = Counter()
        self.inferred = 0  # images run through the model (a copy of known bytes is not)
        self.matched = 0  # match events recorded
        self.paused: StoreUnavailable | None = None  # why intake is paused, if it is
        self.last_recorded: str | None = None  # ISO 8601 UTC time of the last image recorded
        self.decode_activity = Activity("decoding")
        self.inference_activity = Activity("inference")
        self.record_activity = Activity("recording")
        self.cpu = CpuClock()  # read, hash, decode, inference, record
        self._submitted = 0
        self._finished = 0
        self._failed_paths: set[Path] = set()  # failed in this run and not recorded since
        self._reopening = False  # the inference thread is opening the backend right now
        # A backend whose device failed (only the inference thread writes these):
        self.backend_error: str | None = None  # why inference waits, while it does
        # their files failed meanwhile; still to do, so counted in `queued` (under _lock)
        self._waiting_for_backend: list[Job] = []
        self._next_reopen = 0.0  # time.monotonic() of the next attempt to open it again
        self._reopen_delay = REOPEN_FIRST_SECONDS
        self._proven = True  # the backend completed a batch since it was (re)opened
        self._give_up: BackendFailed | None = None  # it failed again at once: not again

    # -- control --------------------------------------------------------------------------
    @property
    def _threads(self) -> list[threading.Thread]:
        return [*self._decoders, self._inference, self._recorder]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, path: Path, source: str, *, gone: bool = False) -> None:
        """Hand a file over (from any thread); returns at once. `gone`: it left the folder."""
        self._queue(Job(path, source, gone))

    def _queue(self, job: Job, *, front: bool = False) -> None:
        if self.work.put(job, front=front):
            with self._lock:
                self._submitted += 1

    def stop(self, timeout: float = 8.0) -> bool:
        """Finish what is being decoded or inferred, leave the rest for the next start-up scan.

        Returns False if the workers did not finish within `timeout`.
        """
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self.work.close()
        for thread in self._decoders:
            thread.join(max(0.0, deadline - time.monotonic()))
        for hand_over, worker in ((self._prepared, self._inference),
                                  (self._inferred, self._recorder)):
            try:
                hand_over.put(None, timeout=max(0.01, deadline - time.monotonic()))
            except queue.Full:  # a worker is stuck; the threads are daemons and die with us
                return False
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():  # its batch may still come: the recorder must not stop
                return False
        return not any(t.is_alive() for t in self._threads)

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    @property
    def queued(self) -> int:
        """Files submitted and not yet finished (waiting, decoding or being embedded), and
        files that failed on a device and are tried again once a backend runs."""
        with self._lock:
            return self._submitted - self._finished + len(self._waiting_for_backend)

    @property
    def stalled(self) -> bool:
        """All that is left waits for a backend that is down and not being opened right now:
        a command that waits for `queued == 0` (index, bench) stops here instead of forever."""
        with self._lock:
            return self.backend_error is not None and not self._reopening and \
                self._submitted == self._finished and bool(self._waiting_for_backend)

    @property
    def still_failed(self) -> int:
        """Files whose last attempt in this run failed (`failed` counts attempts)."""
        with self._lock:
            return len(self._failed_paths)

    @property
    def processed(self) -> int:
        return self.outcomes[RECORDED]

    @property
    def failed(self) -> int:
        return self.outcomes[FAILED]

    def rate(self) -> float:
        """Images per second over the last minute."""
        with self._lock:
            self._forget_old(time.monotonic())
            return len(self._completed) / RATE_WINDOW_SECONDS

    def _complete(self, job: Job, outcome: str) -> None:
        """This attempt at `job` is over: its path may be worked on again."""
        quiet = True
        with self._lock:
            self.outcomes[outcome] += 1
            self._finished += 1
            if outcome == FAILED:
                self._failed_paths.add(job.path)
            elif outcome in (RECORDED, DELETED):
                self._failed_paths.discard(job.path)
            if outcome == RECORDED:
                now = time.monotonic()
                self._completed.append(now)
                self._forget_old(now)
                self.last_recorded = utc_now()
                quiet = len(self._completed) > PER_IMAGE_LOG_LIMIT
        if outcome == RECORDED and not quiet:
            log.info("embedded %s", readable(job.path))
        self.work.done(job)

    def _forget_old(self, now: float) -> None:
        while self._completed and self._completed[0] < now - RATE_WINDOW_SECONDS:
            self._completed.popleft()

    # -- decode ---------------------------------------------------------------------------
    def _decode_loop(self) -> None:
        # Inference first: ONNX Runtime's threads meet at every operator, so one of them
        # waiting for a core a decoder holds stalls them all. At a lower priority the
        # decoders fill the gaps instead (1.5-2 % more images/s on 2 cores; Linux applies
        # a thread's nice value to that thread alone).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)
        while (job := self.work.take()) is not None:
            outcome: str | None = None
            try:
                with self.decode_activity.working():
                    outcome = self._settle_gone(job) if job.gone else self._decode(job)
            except Exception as err:  # a bug must still leave the file in a visible state
                outcome = self._unexpected(job, err)
            finally:
                if outcome is not None:  # None: handed to inference, which completes it
                    self._complete(job, outcome)

    def _decode(self, job: Job) -> str | None:
        """Skip what the store already has; record what needs no inference; else decode."""
        started = time.time()
        previous = self.store.image(str(job.path))
        try:
            with self.cpu.timing("read"):
                read = self._read(job.path, previous)
        except Changed:
            return self._requeue(job)
        except FileNotFoundError:
            if os.path.lexists(job.path):  # the name is there: a link to nothing
                return self._record_failure(job, previous, FileNotFoundError(
                    f"{readable(job.path)}: a symbolic link to a missing file"))
            return self._record_deleted(job, previous)
        except (OSError, ImageError) as err:  # unreadable, a FIFO, a link loop, too large
            return self._record_failure(job, previous, err)
        if read is None:
            self._index_recorded(previous)
            return UNCHANGED
        st, data = read
        with self.cpu.timing("hash"):
            sha256 = hashlib.sha256(data).hexdigest()
        twin = self.store.known(sha256, self.model_key)
        if twin is not None:  # the same bytes were embedded before: reuse, no inference
            vector, width, height = twin
            return self._record_success(job, st, sha256, width, height, vector, previous)
        try:
            with self.cpu.timing("decode"):
                prepared = self.embedder.prepare(io.BytesIO(data), name=str(job.path))
        except Exception as err:  # the decoder's own errors, and anything it raises on us
            return self._record_failure(job, previous, err, st, sha256)
        self._prepared.put(Decoded(job, st, sha256, prepared, previous, started, time.time()))
        return None

    def _read(self, path: Path, previous: ImageRecord | None
              ) -> tuple[os.stat_result, bytes] | None:
        """One open: the descriptor's stat and all its bytes; None if `previous` has them.

        Raises Changed if the file keeps changing while it is read, ImageTooLarge over the
        size `imaging.max_pixels` allows, ImageError for what is not a regular file, and
        OSError as opening or reading raises it.
        """
        for attempt in range(1, READ_ATTEMPTS + 1):
            with os.fdopen(os.open(path, OPEN_FLAGS), "rb") as file:
                before = os.fstat(file.fileno())
                if not stat.S_ISREG(before.st_mode):
                    raise ImageError(f"{readable(path)}: not a regular file "
                                     f"({_file_type(before.st_mode)})")
                if previous and previous.status != "deleted" and \
                        previous.model == self.model_key and \
                        (previous.size, previous.mtime_ns) == (before.st_size, before.st_mtime_ns):
                    return None  # this version of the file is already recorded
                self.embedder.imaging.check_file_size(before.st_size, path)
                data = file.read(self.embedder.imaging.max_file_bytes + 1)
                after = os.fstat(file.fileno())
            if not _changed(before, after) and len(data) == after.st_size:
                return after, data
            time.sleep(REREAD_PAUSE * attempt)
        raise Changed(path)

    def _index_recorded(self, previous: ImageRecord | None) -> None:
        """A file recorded by another process (`dinowatch index`) joins the match index
        when the watcher reports it: the index follows the store, not only this process."""
        if previous is None or previous.status != "done" or previous.sha256 is None or \
                self.matcher.indexed(previous.path):
            return
        known = self.store.known(previous.sha256, self.model_key)
        if known is not None:
            with self.matcher.lock:
                self.matcher.update(previous.path, previous.sha256, known[0])

    def _settle_gone(self, job: Job) -> str:
        """The file left its folder: its row ends `deleted` (unless a new file took the name;
        that one's own report follows)."""
        if not is_gone(job.path):
            return UNCHANGED
        return self._record_deleted(job, self.store.image(str(job.path)))

    def _requeue(self, job: Job) -> str:
        log.debug("%s changed while being read; reading it again later", readable(job.path))
        self._queue(job)
        return REQUEUED

    # -- embed ----------------------------------------------------------------------------
    def _infer_loop(self) -> None:
        # This thread must outlive any one batch: systemd's watchdog watches it.
        while True:
            try:  # while the backend is down, wake up to open it again
                first = self._prepared.get(timeout=self._reopen_in())
            except queue.Empty:
                self._tend_backend()
                continue
            if first is None:
                return
            batch = [first]
            stop_after = False
            while len(batch) < self.embedder.backend.batch:
                try:
                    item = self._prepared.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop_after = True
                    break
                batch.append(item)
            self._tend_backend()
            batch = self._for_this_backend(batch)
            if batch:
                if self.backend_error is not None:  # still down: no device to run it on
                    now = time.time()
                    inferred = Inferred(batch, None, BackendFailed(
                        f"inference waits for its backend ({self.backend_error}); the file "
                        f"is tried again once it runs"), now, now)
                else:
                    with self.inference_activity.working():
                        inferred = self._embed(batch)
                if isinstance(inferred.failure, BackendFailed):
                    self._park(batch)  # before the record worker finishes them: `queued`
                self._inferred.put(inferred)  # waits while the record worker is behind
                if isinstance(inferred.failure, BackendFailed):
                    self._backend_failed(inferred.failure)
                elif inferred.failure is None:
                    self._proven, self._reopen_delay = True, REOPEN_FIRST_SECONDS
            if stop_after:
                return

    def _for_this_backend(self, batch: list[Decoded]) -> list[Decoded]:
        """The items prepared for the backend that runs now; the others (prepared before a
        fallback changed the input layout) go back to be decoded again."""
        spec = self.embedder.backend.input_spec
        for item in batch:
            if item.prepared.spec != spec:
                self._queue(item.job)
                self._complete(item.job, REQUEUED)
        return [item for item in batch if item.prepared.spec == spec]

    def _tend_backend(self) -> None:
        """Open a failed backend again when it is due; take up a device failure met outside
        the pipeline (an MQTT search)."""
        if self.backend_error is not None:
            self._reopen_backend()
        elif self.embedder.failure is not None:
            self._backend_failed(self.embedder.failure)

    def _reopen_in(self) -> float | None:
        """Seconds until the next attempt to open a failed backend (or to look for a failure
        met outside the pipeline)."""
        if self.backend_error is None:
            return BACKEND_POLL_SECONDS
        return max(0.05, self._next_reopen - time.monotonic())

    def _park(self, batch: list[Decoded]) -> None:
        """The device failed under `batch`: its files are recorded `failed` (the record
        worker has them) and are tried again once a backend runs."""
        with self._lock:
            self._waiting_for_backend += [item.job for item in batch]

    def _backend_failed(self, err: BackendFailed) -> None:
        if self._stopping.is_set():  # shutting down: the next start's scan retries them
            return
        if self.backend_error is None:
            self._reopening = True  # not `stalled` before the first attempt below
            self.backend_error = str(err)
            # It worked until now (a device that merely timed out): open it again at once.
            # It failed again before any batch went through: the fallback now, else back off.
            self._give_up = None if self._proven else err
            self._next_reopen = time.monotonic()
            if self._give_up is not None and fallback_of(self.embedder.backend_config) is None:
                self._next_reopen += self._reopen_delay
                self._reopen_delay = min(2 * self._reopen_delay, REOPEN_MAX_SECONDS)
            self._proven = False
            self._reopen_backend()

    def _reopen_backend(self) -> None:
        """Open the backend again, or its fallback, at most every `_reopen_delay` s (doubling
        to REOPEN_MAX_SECONDS); once one runs, the files that failed meanwhile go back in."""
        try:
            if time.monotonic() < self._next_reopen or self._stopping.is_set():
                return
            self._reopening = True  # `stalled` stays False until this attempt is over
            with self.inference_activity.working():  # a device that hangs here is a stall too
                self.embedder.reopen_backend(give_up=self._give_up)
        except Exception as err:  # BackendUnavailable, or anything else: the thread must live
            if not isinstance(err, BackendUnavailable):
                log.exception("opening the backend again failed")
            self.backend_error = str(err)
            log.error("inference waits for its backend: %s; trying again in %.0f s", err,
                      self._reopen_delay)
            self._next_reopen = time.monotonic() + self._reopen_delay
            self._reopen_delay = min(2 * self._reopen_delay, REOPEN_MAX_SECONDS)
        else:  # still `_reopening`: `stalled` must not flicker on before the files go back
            log.warning("inference runs again, on %s%s; %d failed files are tried again",
                        self.embedder.backend.type_key,
                        " (the fallback)" if self.embedder.fallback else "",
                        len(self._waiting_for_backend))
            self.backend_error = None  # the delay resets once a batch succeeds, not here
            for job in self._waiting_for_backend:  # only this thread adds to it
                self._queue(job)  # counted in _submitted before it leaves the list
            with self._lock:
                self._waiting_for_backend.clear()
        finally:
            self._reopening = False

    def _embed(self, batch: list[Decoded]) -> Inferred:
        self.inferred += len(batch)  # only this thread writes it
        started = time.time()
        try:
            with self.cpu.timing("inference", pool=True):
                vectors: list[np.ndarray] | None = list(self.embedder.infer(
                    [item.prepared.tensor for item in batch], self.normalize))
            failure: Exception | None = None
        except Exception as err:
            log.error("inference failed for a batch of %d: %s", len(batch), err)
            vectors, failure = None, err
        return Inferred(batch, vectors, failure, started, time.time())

    # -- record ---------------------------------------------------------------------------
    def _record_loop(self) -> None:
        while (inferred := self._inferred.get()) is not None:
            with self.record_activity.working(), self.cpu.timing("record"):
                self._record_batch(inferred)

    def _record_batch(self, inferred: Inferred) -> None:
        for index, item in enumerate(inferred.batch):
            outcome = FAILED
            try:
                if inferred.vectors is None:
                    outcome = self._record_failure(item.job, item.previous,
                                                   inferred.failure or RuntimeError(), None,
                                                   item.sha256)
                else:
                    outcome = self._record_success(
                        item.job, item.stat, item.sha256, item.prepared.width,
                        item.prepared.height, inferred.vectors[index], item.previous,
                        new_vector=True)
                    if log.isEnabledFor(logging.DEBUG):
                        _log_timings(item, inferred)
            except Exception as err:
                outcome = self._unexpected(item.job, err)
            finally:
                self._complete(item.job, outcome)

    def _unexpected(self, job: Job, err: Exception) -> str:
        """Last resort for an error no stage expected: record it if the store still can."""
        log.exception("unexpected error on %s", readable(job.path))
        try:
            return self._record_failure(job, None, err)
        except Exception:  # the store itself fails: the next scan tries the file again
            log.exception("cannot record the failure of %s", readable(job.path))
            return FAILED

    def _record_success(self, job: Job, st: os.stat_result, sha256: str, width: int | None,
                        height: int | None, vector: np.ndarray, previous: ImageRecord | None,
                        *, new_vector: bool = False) -> str:
        """Commit a vector, unless the file left or changed since it was read."""
        try:
            _check_unchanged(job.path, st)
        except FileNotFoundError:
            return self._record_deleted(job, previous)
        except Changed:
            return self._requeue(job)
        record = ImageRecord(path=str(job.path), source=job.source, size=st.st_size,
                             mtime_ns=st.st_mtime_ns, status="done", sha256=sha256,
                             width=width, height=height, model=self.model_key,
                             label=self.matcher.label_of(job.path))
        messages: list[Message] = []
        seen = previous is not None and previous.sha256 == sha256 and previous.status == "done"
        if seen and previous and previous.model == self.model_key:
            # touched, same bytes: consumers have it already, matches included
            return self._commit(job, record, [], RECORDED, vector=vector)
        if not seen:
            messages += self._withdrawal(previous)  # the old picture is gone
        messages += self.messages.embedding(record, vector)
        # Matched only when the picture is new here: re-embedding it under another model
        # must not fire its match events (and Home Assistant's automations) again.
        return self._commit(job, record, messages, RECORDED, store_vector=new_vector,
                            vector=vector, match=not seen)

    def _record_failure(self, job: Job, previous: ImageRecord | None, err: BaseException,
                        st: os.stat_result | None = None, sha256: str | None = None) -> str:
        """A `failed` row and one `error` message naming the file and the kind of error.

        Without a stat (the file could not be opened) the row matches no version of the
        file, so the next scan tries again; the same error is not reported twice.
        """
        kind, message = type(err).__name__, _describe(job.path, err)
        log.warning("%s", message)
        record = ImageRecord(path=str(job.path), source=job.source,
                             size=st.st_size if st else -1,
                             mtime_ns=st.st_mtime_ns if st else -1, status="failed",
                             sha256=sha256, error=f"{kind}: {message}", model=self.model_key)
        if previous == replace(record, source=previous.source if previous else ""):
            return UNCHANGED  # failed the same way before, already reported
        messages = [*self.messages.error(str(job.path), kind, message),
                    *self._withdrawal(previous)]  # the picture consumers had is gone
        return self._commit(job, record, messages, FAILED)

    def _record_deleted(self, job: Job, previous: ImageRecord | None) -> str:
        """The row ends `deleted`; consumers hear of it if they had its embedding."""
        if previous is None:  # gone before it was ever read: still a visible end
            record = ImageRecord(path=str(job.path), source=job.source, size=-1, mtime_ns=-1,
                                 status="deleted", model=self.model_key)
            return self._commit(job, record, [], DELETED)
        if previous.status == "deleted":
            return UNCHANGED
        return self._commit(job, replace(previous, status="deleted", error=None),
                            self._withdrawal(previous), DELETED)

    def _withdrawal(self, previous: ImageRecord | None) -> list[Message]:
        """The `deleted` message for a recorded version consumers got an embedding of."""
        return self.messages.deleted(previous) if previous and previous.status == "done" else []

    def _commit(self, job: Job, record: ImageRecord, messages: list[Message], outcome: str,
                *, vector: np.ndarray | None = None, store_vector: bool = False,
                match: bool = False) -> str:
        """Store the row, match events and messages in one transaction, then bring the match
        indexes in step (`vector`: the image's vector, None when the row has none;
        `store_vector`: it is new and goes into the store too; `match`: find its match
        events first). When the store cannot take a write now
        (a full disk, a lock held elsewhere), pause intake, wait until it can and put the job
        back: nothing is marked failed for it."""
        outage = self._outages
        try:
            with self.matcher.lock:  # matched, committed and indexed in one order
                events = self.matcher.match(record.path, record.sha256 or "", vector) \
                    if match and vector is not None else []
                if events:
                    messages = [*messages, *self.messages.match(record, events)]
                self.store.record(record, vector if store_vector else None, messages, events)
                self.matcher.update(record.path, record.sha256, vector)
                self.matched += len(events)
        except StoreUnavailable as err:
            self.work.pause()
            self._queue(job, front=True)
            self._wait_for_store(err, outage)
            return REQUEUED
        if messages:
            self.on_recorded()
        return outcome

    def _wait_for_store(self, err: StoreUnavailable, outage: int) -> None:
        """Report once, then probe every STORE_PROBE_SECONDS until a write commits again.

        `outage` counts the outages already over when this thread's write began: if one
        ended meanwhile, this failure belonged to it and the job is simply tried again.
        """
        with self._store_outage:
            if outage == self._outages:
                self.paused = err
                log.error("%s: intake paused until the database takes writes again", err)
                self.on_paused(err)
                while not self._stopping.wait(STORE_PROBE_SECONDS):
                    if self.store.writable():
                        self._outages += 1
                        self.paused = None
                        log.warning("%s takes writes again: intake resumed", self.store.path)
                        self.on_paused(None)
                        break
            self.work.pause(False)


def _log_timings(item: Decoded, inferred: Inferred) -> None:
    """The DEBUG line that says where an image's time went, in ms of wall-clock time."""
    written = item.stat.st_mtime_ns / 1e9
    now = time.time()
    log.debug("timings %s: written -> event %.0f ms, waited for a decoder %.0f, read+hash+decode "
              "%.0f, waited for the model %.0f, inference %.0f (batch of %d), match+commit %.0f;"
              " written -> committed %.0f ms", readable(item.job.path),
              1000 * (item.job.submitted - written), 1000 * (item.started - item.job.submitted),
              1000 * (item.decoded - item.started), 1000 * (inferred.started - item.decoded),
              1000 * (inferred.ended - inferred.started), len(inferred.batch),
              1000 * (now - inferred.ended), 1000 * (now - written))


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "an unknown kind of file"


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    """Any write or replacement moves size, mtime or ctime (ctime even past a reset mtime)."""
    return (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns,
            before.st_ctime_ns) != (after.st_dev, after.st_ino, after.st_size,
                                    after.st_mtime_ns, after.st_ctime_ns)


def _check_unchanged(path: Path, st: os.stat_result) -> None:
    """Raise FileNotFoundError if `path` is gone, Changed if it now holds other bytes."""
    try:
        now = path.stat()
    except (FileNotFoundError, NotADirectoryError) as err:
        raise FileNotFoundError(str(path)) from err
    if _changed(st, now):
        raise Changed(path)


def _describe(path: Path, err: BaseException) -> str:
    """A message naming the file: OSError's own text would show undecodable bytes as
    `\\udcNN` and sometimes no name at all."""
    if isinstance(err, OSError) and err.strerror and not isinstance(err, ImageError):
        return f"{readable(path)}: {err.strerror}"
    text = readable(str(err))
    return text if readable(path) in text else f"{readable(path)}: {text}"
