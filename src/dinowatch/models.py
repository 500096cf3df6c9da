"""Model registry, verified download (resume, sha256, atomic) and the local model cache.

A registry file is used only after its size and sha256 match the pinned entry. A verified
cached file is never fetched again, and no network is touched when it is present. Entries
with a `base` are made on the device (`dinowatch model quantize`): their pin is the model
card written beside the file, which also keeps the fidelity measured when it was made.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import filelock
from tqdm import tqdm

from dinowatch.errors import DinowatchError

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20  # read, write and hash in 1 MiB pieces
FETCH_RETRIES = 5  # consecutive failed attempts without progress before giving up
BACKOFF_SECONDS = 1.0  # first retry delay; doubles per consecutive failure
BACKOFF_MAX_SECONDS = 60.0
TIMEOUT_SECONDS = 30.0  # per socket operation, not for the whole download
LOCK_TIMEOUT_SECONDS = 3600.0  # another process may be fetching 87 MB over a slow link
USER_AGENT = "dinowatch"
MODEL_DIR_ENV = "DINOWATCH_MODEL_DIR"
OFFLINE_ENV = "DINOWATCH_OFFLINE"
OFFLINE_ERRORS = (socket.gaierror,)  # a refused connection (a server restarting) is retried
OFFLINE_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN}
_TRUTHY = frozenset({"1", "true", "yes", "on"})
# Statuses worth retrying; any other HTTP error will not go away by asking again.
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class ModelError(DinowatchError):
    """A model is unknown, unpinned, failed verification or could not be stored."""


class ModelUnavailable(ModelError):
    """The model file is not present and cannot be fetched here."""

    @classmethod
    def for_entry(cls, entry: ModelEntry, cache_dir: Path, reason: str) -> ModelUnavailable:
        """Build the error with the provisioning instructions for `entry`."""
        # Built here rather than in __init__ so the exception pickles (multiprocessing).
        return cls(
            f"model {entry.name!r} is not available: {reason}.\n"
            f"To provision it, run `dinowatch model fetch {entry.name}` on a machine with "
            f"internet access and copy {entry.filename} into {cache_dir} "
            f"(or point ${MODEL_DIR_ENV} at a directory holding it), or pass --model PATH "
            "or set model.path in the config to use a local ONNX file."
        )


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable model; `size` and `sha256` pin the exact file."""

    name: str
    url: str
    size: int | None
    sha256: str | None
    dim: int
    filename: str
    base: str | None = None  # made on this device from this entry by `dinowatch model quantize`

    @property
    def pinned(self) -> bool:
        """True if there is a hash to check the file against (a made model: its card's)."""
        return self.sha256 is not None or self.base is not None


DEFAULT_MODEL = "dinov2-vits14"
INT8_MODEL = "dinov2-vits14-int8"
# The ONNX producer name of the random-weight graphs dinowatch.testing builds: a stand-in
# whose vectors mean nothing, which the daemon must never publish as the real model.
STAND_IN_PRODUCER = "dinowatch.testing"

REGISTRY: dict[str, ModelEntry] = {
    DEFAULT_MODEL: ModelEntry(
        name=DEFAULT_MODEL,
        # Pinned to a commit, so the bytes behind the URL cannot change under the hash.
        url="https://huggingface.co/sefaburak/dinov2-small-onnx/resolve/"
        "7a5e61628117b5a8bd6f5e2b2385b76da1b4582e/dinov2_vits14.onnx",
        size=86_644_121,
        sha256="4df36ef0716a8f17d984fc7546a3a5d670fda6911eb298592250cb9e26756063",
        dim=384,
        filename="dinov2_vits14.onnx",
    ),
    # The seed's source. NOT pinned: we have no published size or sha256 to check it
    # against, and the repository is laid out as a Triton model repository
    # (model_repository/...), so the file path below (the one an earlier version of the
    # reference library used) is unconfirmed. fetch() and resolve() refuse unpinned
    # entries; download and check the file yourself, then pass --model PATH.
    "dinov2-vits14-roundttble": ModelEntry(
        name="dinov2-vits14-roundttble",
        url="https://huggingface.co/RoundtTble/dinov2_vits14_onnx/resolve/main/model.onnx",
        size=None,
        sha256=None,
        dim=384,
        filename="dinov2_vits14_roundttble.onnx",
    ),
    INT8_MODEL: ModelEntry(
        name=INT8_MODEL,
        url="",  # never downloaded: quantized here, from the user's own copy of the base
        size=None,
        sha256=None,
        dim=384,
        filename="dinov2_vits14_int8.onnx",
        base=DEFAULT_MODEL,
    ),
}


@dataclass(frozen=True)
class Fidelity:
    """Cosine similarity of a made model's vectors to its base model's, on the same images."""

    mean: float
    min: float
    images: int


@dataclass(frozen=True)
class ModelCard:
    """What `dinowatch model quantize` wrote beside a model it made (`<file stem>.json`)."""

    name: str
    sha256: str
    size: int
    base: str  # the registry entry it was made from
    base_sha256: str
    base_pinned: bool  # the base file was the registry's pinned file
    method: str  # how it was made, in ONNX Runtime's words
    fidelity: Fidelity
    onnxruntime: str  # the version that made it
    created: str  # ISO 8601 UTC

    @staticmethod
    def path_for(model: Path) -> Path:
        return Path(model).with_suffix(".json")

    @classmethod
    def read(cls, model: Path) -> ModelCard | None:
        """The card beside `model`, or None if there is none or it cannot be read."""
        try:
            fields = json.loads(cls.path_for(model).read_text(encoding="utf-8"))
            return cls(**fields | {"fidelity": Fidelity(**fields["fidelity"])})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as err:
            # maybe not a card at all: any JSON file may sit beside a user's own model
            log.debug("%s: not a model card, ignored: %s", cls.path_for(model), err)
            return None

    def write(self, model: Path) -> Path:
        """Write the card beside `model`, atomically; returns its path."""
        target = self.path_for(model)
        part = _sibling(target, f".{os.getpid()}.part")
        part.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        part.replace(target)
        return target


class _Transient(Exception):
    """A network failure worth retrying; the original error is the __cause__."""


class _Restart(_Transient):
    """The partial file cannot be continued; start again from byte 0."""


def get_entry(name: str) -> ModelEntry:
    """The registry entry called `name`, or a ModelError listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ModelError(f"unknown model {name!r}; known models: {known}") from None


def model_dir(data_dir: Path | None = None) -> Path:
    """The model cache: $DINOWATCH_MODEL_DIR, else data_dir/models, else the XDG cache."""
    override = os.environ.get(MODEL_DIR_ENV)
    if override:
        return Path(override).expanduser()
    if data_dir is not None:
        return Path(data_dir) / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says to ignore relative values.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "dinowatch" / "models"


def offline_from_env() -> bool:
    """True if $DINOWATCH_OFFLINE forbids network access."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUTHY


def producer_name(path: Path) -> str:
    """The `producer_name` an ONNX file names ("" if none, or not readable as ONNX), read from
    its first 4 KB: ModelProto field 2 (onnx/onnx.proto), which writers emit before the graph
    (protobuf writes fields in number order). onnx.load would hold the whole file in memory
    twice over (~170 MB for ViT-S/14) to read one string."""
    try:
        with open(path, "rb") as file:
            head = file.read(4096)
        pos = 0
        while pos < len(head):
            key, pos = _varint(head, pos)
            field, wire_type = key >> 3, key & 7
            if field > 2 or wire_type not in (0, 2):
                break
            value, pos = _varint(head, pos)
            if wire_type == 2:  # length-delimited: `value` bytes follow
                if field == 2:
                    return head[pos:pos + value].decode("utf-8", "replace")
                pos += value
    except (OSError, ValueError):
        pass
    return ""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A protobuf base-128 varint at `pos`: (value, the position after it)."""
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        value, shift, pos = value | (byte & 0x7F) << shift, shift + 7, pos + 1
        if not byte & 0x80:
            return value, pos
    raise ValueError("truncated varint")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in CHUNK_SIZE pieces."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def verify(entry: ModelEntry, path: Path) -> bool:
    """True if `path` has the entry's size and sha256 (size first: it is free); a made
    model's come from its card."""
    _require_pinned(entry)
    card = ModelCard.read(path) if entry.base else None
    expected_size, expected_sha = (card.size, card.sha256) if card else \
        (entry.size, _expected_sha(entry))
    try:
        size = Path(path).stat().st_size
    except FileNotFoundError:
        return False
    if entry.base and card is None:
        log.debug("%s has no model card (%s)", path, ModelCard.path_for(path).name)
        return False
    if expected_size is not None and size != expected_size:
        log.debug("%s has %s bytes, expected %s", path, size, expected_size)
        return False
    actual = sha256_file(path)
    if actual != expected_sha:
        log.debug("%s has sha256 %s, expected %s", path, actual, expected_sha)
        return False
    return True


def fetch(
    entry: ModelEntry,
    cache_dir: Path,
    *,
    retries: int = FETCH_RETRIES,
    backoff: float = BACKOFF_SECONDS,
    timeout: float = TIMEOUT_SECONDS,
    progress: bool = False,
) -> Path:
    """Download `entry` into `cache_dir`, verified, and return its path.

    Resumes from `<filename>.part`, retries network failures with exponential backoff and
    holds `<filename>.lock` so concurrent callers download once. A file that fails
    verification is deleted. Network failure after all retries raises ModelUnavailable, and
    so does a failed name resolution (no DNS: offline), at once.
    """
    _require_pinned(entry)
    if entry.base:
        raise ModelError(_made_here(entry))
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / entry.filename
    try:
        with _lock(target):
            # Checked under the lock: a concurrent caller may have just finished.
            if target.exists():
                if verify(entry, target):
                    log.debug("model %s already present and verified: %s", entry.name, target)
                    return target
                _set_aside(target)
            part = _sibling(target, ".part")
            _download(entry, part, retries=retries, backoff=backoff, timeout=timeout,
                      progress=progress)
            # Checked before the rename, so a bad file never appears under the final name.
            _check_download(entry, part)
            part.replace(target)  # atomic on POSIX
            fsync_dir(cache_dir)
    except filelock.Timeout as err:
        raise ModelError(
            f"gave up after {LOCK_TIMEOUT_SECONDS:.0f} s waiting for {err.lock_file}: "
            f"another process is still fetching {entry.filename}"
        ) from err
    log.info("model %s fetched and verified: %s", entry.name, target)
    return target


def resolve(
    name: str = DEFAULT_MODEL,
    path: Path | None = None,
    *,
    cache_dir: Path | None = None,
    offline: bool | None = None,
) -> Path:
    """The ONNX file to load: `path` as given, else the verified cached (or fetched) model.

    `offline=None` reads $DINOWATCH_OFFLINE. Raises FileNotFoundError for a missing `path`,
    ModelError for an unknown or unpinned name and ModelUnavailable when the file is
    missing and cannot be fetched.
    """
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Model file not found: {path}")
        return path
    entry = get_entry(name)
    _require_pinned(entry)
    directory = Path(cache_dir) if cache_dir is not None else model_dir()
    target = directory / entry.filename
    # The common case: present and verified, no lock and no network needed.
    if target.exists() and verify(entry, target):
        return target
    if entry.base:
        state = "does not match its model card" if target.exists() else "is missing"
        raise ModelUnavailable(f"{target} {state}. {_made_here(entry)}")
    if offline is None:
        offline = offline_from_env()
    if not offline:
        # Module constants are read here, at call time, so tests can shrink them.
        return fetch(entry, directory, retries=FETCH_RETRIES, backoff=BACKOFF_SECONDS,
                     timeout=TIMEOUT_SECONDS)
    reason = f"offline (${OFFLINE_ENV}) and no copy in {directory}"
    if target.exists():
        aside = _quarantine(entry, target)
        if aside is None:  # another process put a verified copy in place meanwhile
            return target
        reason = (f"{target} was present but failed verification (moved to {aside.name}), "
                  f"and fetching is disabled (offline, ${OFFLINE_ENV})")
    raise ModelUnavailable.for_entry(entry, directory, reason)


def info(entry: ModelEntry, cache_dir: Path) -> dict[str, Any]:
    """What `dinowatch model info` shows; `verified` is None for an unpinned entry."""
    path = Path(cache_dir) / entry.filename
    present = path.is_file()
    verified: bool | None = None
    if entry.pinned:
        verified = present and verify(entry, path)
    card = ModelCard.read(path) if entry.base else None
    return {
        "name": entry.name,
        "url": entry.url or f"(made here from {entry.base} by `dinowatch model quantize`)",
        "size": card.size if card else entry.size,
        "sha256": card.sha256 if card else entry.sha256,
        "dim": entry.dim,
        "path": str(path),
        "present": present,
        "verified": verified,
    } | ({"fidelity": asdict(card.fidelity), "made_from": card.base_sha256,
          "method": card.method} if card else {})


def _made_here(entry: ModelEntry) -> str:
    return (f"{entry.name!r} is made on this device from {entry.base!r}, not downloaded: "
            f"run `dinowatch model quantize {entry.base}` (with -c CONFIG, so it lands in "
            "the daemon's model cache).")


def _require_pinned(entry: ModelEntry) -> None:
    if not entry.pinned:
        raise ModelError(
            f"model {entry.name!r} has no pinned sha256, so dinowatch will neither download "
            f"nor trust it. Download {entry.url} yourself, check it, and pass --model PATH "
            "or set model.path in the config."
        )


def _expected_sha(entry: ModelEntry) -> str:
    return (entry.sha256 or "").lower()


def _sibling(target: Path, suffix: str) -> Path:
    return target.with_name(target.name + suffix)


def _lock(target: Path) -> filelock.BaseFileLock:
    return filelock.FileLock(_sibling(target, ".lock"), timeout=LOCK_TIMEOUT_SECONDS)


def _set_aside(target: Path) -> Path:
    """Move a cached file that failed verification out of the way, keeping it to inspect."""
    # Renamed rather than deleted: it may be a file the user copied in by hand.
    aside = _sibling(target, ".corrupt")
    target.replace(aside)
    log.warning("%s failed verification; moved to %s and not used", target, aside)
    return aside


def _quarantine(entry: ModelEntry, target: Path) -> Path | None:
    """Set `target` aside under the lock unless it verifies by now; the new path or None."""
    with _lock(target):
        if not target.exists():
            return _sibling(target, ".corrupt")
        if verify(entry, target):
            return None
        return _set_aside(target)


def _part_size(part: Path) -> int:
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return 0


def _download(
    entry: ModelEntry, part: Path, *, retries: int, backoff: float, timeout: float,
    progress: bool,
) -> None:
    """Bring `part` to the full download, resuming and retrying as needed."""
    bar = tqdm(total=entry.size, unit="B", unit_scale=True, unit_divisor=1024,
               desc=entry.filename, file=sys.stderr, disable=not progress)
    failures = 0
    try:
        while True:
            before = _part_size(part)
            try:
                _attempt(entry, part, timeout, bar)
                return
            except _Transient as err:
                if isinstance(err, _Restart):
                    part.unlink(missing_ok=True)
                # Only failures in a row count: a flaky link that keeps making progress
                # on a large file should still get there.
                failures = 0 if _part_size(part) > before else failures + 1
                cause = err.__cause__ or err
                if failures > retries:
                    raise ModelUnavailable.for_entry(
                        entry, part.parent,
                        f"download from {entry.url} failed {failures} times in a row "
                        f"(last error: {cause})",
                    ) from cause
                delay = min(backoff * 2 ** max(failures - 1, 0), BACKOFF_MAX_SECONDS)
                log.warning("fetching %s: %s; retrying in %.1f s", entry.name, cause, delay)
                time.sleep(delay)
    finally:
        bar.close()


def _attempt(entry: ModelEntry, part: Path, timeout: float, bar: tqdm) -> None:
    """One HTTP request appending to `part`; raises _Transient if it must be repeated."""
    offset = _part_size(part)
    if entry.size is not None and offset > entry.size:
        raise _Restart(f"partial file has {offset} bytes, more than {entry.size}")
    if entry.size is not None and offset == entry.size:
        return  # complete before a crash or a lost rename; verification decides
    request = urllib.request.Request(
        entry.url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    )
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    response = _open(entry, request, timeout, part.parent)
    with response:
        total: int | None = response.length
        if offset and response.status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                raise _Restart(f"server resumed at byte {start}, not {offset}")
        elif offset:
            log.info("server ignored the range request for %s; restarting from byte 0",
                     entry.name)
            offset = 0
        if total is not None and entry.size is not None and total != entry.size:
            part.unlink(missing_ok=True)
            raise ModelError(f"{entry.url} serves {total} bytes, expected {entry.size}; "
                             "it is not the pinned file")
        remaining = response.length  # body bytes promised by Content-Length, if sent
        received = 0
        bar.reset(total=entry.size)
        bar.update(offset)
        with part.open("ab" if offset else "wb") as out:
            try:
                while chunk := _read(response):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            finally:
                # Durable partial data is what makes a resume after a crash worthwhile.
                out.flush()
                os.fsync(out.fileno())
    if remaining is not None and received < remaining:
        raise _Transient(f"connection closed after {received} of {remaining} bytes")
    if entry.size is not None and offset + received < entry.size:
        raise _Transient(f"download ended at byte {offset + received} of {entry.size}")


def _open(
    entry: ModelEntry, request: urllib.request.Request, timeout: float, cache_dir: Path
) -> Any:
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416:
            raise _Restart("server refused the range (HTTP 416)") from err
        if err.code in _RETRYABLE_STATUS:
            raise _Transient(f"HTTP {err.code}") from err
        raise ModelUnavailable.for_entry(
            entry, cache_dir, f"{entry.url} answered HTTP {err.code} {err.reason}"
        ) from err
    except (OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)  # URLError wraps the socket's error
        if isinstance(reason, OFFLINE_ERRORS) or getattr(reason, "errno", None) in OFFLINE_ERRNOS:
            # No name resolution, no route to the network: offline, like
            # $DINOWATCH_OFFLINE. One error now; retrying (1 + 2 + 4 + 8 + 16 s) would only
            # delay it. A connection lost mid-download is retried (and resumed) instead.
            raise ModelUnavailable.for_entry(
                entry, cache_dir, f"offline (cannot connect while fetching {entry.url}: "
                f"{reason})"
            ) from err
        raise _Transient(str(err)) from err


def _read(response: Any) -> bytes:
    try:
        return response.read(CHUNK_SIZE)
    except (OSError, http.client.HTTPException) as err:
        raise _Transient(f"connection lost: {err}") from err


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    """(first byte, total size or None) from a Content-Range header."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        raise _Restart(f"unusable Content-Range {value!r}")
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _check_download(entry: ModelEntry, part: Path) -> None:
    """Delete `part` and raise ModelError unless it matches the pinned size and sha256."""
    size = part.stat().st_size
    if entry.size is not None and size != entry.size:
        part.unlink()
        raise ModelError(f"downloaded {entry.filename} has {size} bytes, expected "
                         f"{entry.size}; the file was deleted")
    actual = sha256_file(part)
    if actual != _expected_sha(entry):
        part.unlink()
        raise ModelError(
            f"downloaded {entry.filename} failed verification: expected sha256 "
            f"{entry.sha256}, got {actual}; the file was deleted"
        )


def fsync_dir(directory: Path) -> None:
    """Make the rename durable; not possible on every platform, so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
