"""models.py against a real HTTP server on 127.0.0.1: fetch, resume, verification, cache."""

from __future__ import annotations

import hashlib
import http.server
import multiprocessing
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import pytest

from dinowatch import models
from dinowatch.models import ModelEntry, ModelError, ModelUnavailable
from dinowatch.testing import write_model

PAYLOAD_SIZE = 3 * 1024 * 1024 + 12_345  # not a multiple of any chunk size
PAYLOAD = random.Random(20240601).randbytes(PAYLOAD_SIZE)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
MODEL_PATH = "/dinov2_test.onnx"
CUT_AT = 1_000_000  # deliberately not aligned with the client's 1 MiB reads
WRITE_CHUNK = 64 * 1024
FAST: dict[str, Any] = {"retries": 2, "backoff": 0.01, "timeout": 5.0}


def corrupted(data: bytes) -> bytes:
    """Same size, one byte flipped: only the sha256 can tell."""
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    return bytes(bad)


@dataclass
class Server:
    """What the test controls and observes about the HTTP server."""

    url: str = ""
    payload: bytes = PAYLOAD
    cut_after: int | None = None  # the next response is cut after this many body bytes
    corrupt: bool = False
    ignore_range: bool = False
    refuse_range_once: bool = False  # answer the next ranged request with 416
    delay: float = 0.0  # seconds per written chunk, so concurrent fetches overlap
    ranges: list[str | None] = field(default_factory=list)  # Range header of each request
    bytes_served: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: Callable[[], None] = lambda: None

    @property
    def requests(self) -> int:
        return len(self.ranges)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HttpServer

    def do_GET(self) -> None:
        state = self.server.state
        range_header = self.headers.get("Range")
        with state.lock:
            state.ranges.append(range_header)
            cut, state.cut_after = state.cut_after, None
            refuse = state.refuse_range_once and range_header is not None
            if refuse:
                state.refuse_range_once = False
        if self.path != MODEL_PATH:
            self.send_error(404)
            return
        data = corrupted(state.payload) if state.corrupt else state.payload
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and not state.ignore_range:
            start = int(match.group(1))
            if refuse or start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self._write(body if cut is None else body[:cut])
        if cut is not None:
            # Promised Content-Length, delivered less: what a dropped link looks like.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _write(self, body: bytes) -> None:
        state = self.server.state
        try:
            for i in range(0, len(body), WRITE_CHUNK):
                piece = body[i:i + WRITE_CHUNK]
                self.wfile.write(piece)
                with state.lock:
                    state.bytes_served += len(piece)
                if state.delay:
                    time.sleep(state.delay)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: Server


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = _HttpServer(("127.0.0.1", 0), _Handler)
    state = Server(url=f"http://127.0.0.1:{httpd.server_address[1]}{MODEL_PATH}")
    httpd.state = state
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()

    state.stop = stop
    yield state
    stop()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ambient env; timing knobs shrunk so failure paths stay fast."""
    for name in ("DINOWATCH_OFFLINE", "DINOWATCH_MODEL_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(models, "FETCH_RETRIES", 2)
    monkeypatch.setattr(models, "BACKOFF_SECONDS", 0.01)
    monkeypatch.setattr(models, "TIMEOUT_SECONDS", 5.0)


def make_entry(url: str, name: str = "test-model", size: int | None = PAYLOAD_SIZE,
               sha256: str | None = PAYLOAD_SHA) -> ModelEntry:
    return ModelEntry(name=name, url=url, size=size, sha256=sha256, dim=384,
                      filename="test_model.onnx")


@pytest.fixture
def entry(server: Server, monkeypatch: pytest.MonkeyPatch) -> ModelEntry:
    """An entry for the server's payload, also registered so resolve() finds it."""
    made = make_entry(server.url)
    monkeypatch.setitem(models.REGISTRY, made.name, made)
    return made


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.suffix in {".part", ".onnx"})


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# 1
def test_fetch_downloads_verified_file(server: Server, entry: ModelEntry, cache: Path) -> None:
    path = models.fetch(entry, cache, **FAST)
    assert path == cache / entry.filename
    assert path.read_bytes() == PAYLOAD
    assert leftovers(cache) == [entry.filename]  # no .part
    assert server.ranges == [None]


def test_fetch_progress_bar_goes_to_stderr(
    server: Server, entry: ModelEntry, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models.fetch(entry, cache, progress=True, **FAST)
    captured = capsys.readouterr()
    assert entry.filename in captured.err
    assert captured.out == ""


# 2
def test_fetch_resumes_after_cut_connection(
    server: Server, entry: ModelEntry, cache: Path
) -> None:
    server.cut_after = CUT_AT
    path = models.fetch(entry, cache, **FAST)
    assert server.ranges == [None, f"bytes={CUT_AT}-"]
    assert path.read_bytes() == PAYLOAD
    assert models.verify(entry, path)
    assert server.bytes_served == PAYLOAD_SIZE < 2 * PAYLOAD_SIZE
    assert leftovers(cache) == [entry.filename]


def test_fetch_restarts_when_server_ignores_range(
    server: Server, entry: ModelEntry, cache: Path
) -> None:
    server.cut_after = CUT_AT
    server.ignore_range = True
    path = models.fetch(entry, cache, **FAST)
    assert server.ranges == [None, f"bytes={CUT_AT}-"]
    assert path.read_bytes() == PAYLOAD  # the 200 body replaced the partial, not appended


def test_fetch_restarts_after_416(server: Server, entry: ModelEntry, cache: Path) -> None:
    cache.mkdir()
    (cache / f"{entry.filename}.part").write_bytes(PAYLOAD[:1000])
    server.refuse_range_once = True
    path = models.fetch(entry, cache, **FAST)
    assert server.ranges == ["bytes=1000-", None]
    assert path.read_bytes() == PAYLOAD


def test_fetch_resumes_from_leftover_part_file(
    server: Server, entry: ModelEntry, cache: Path
) -> None:
    cache.mkdir()
    (cache / f"{entry.filename}.part").write_bytes(PAYLOAD[:CUT_AT])
    path = models.fetch(entry, cache, **FAST)
    assert server.ranges == [f"bytes={CUT_AT}-"]
    assert server.bytes_served == PAYLOAD_SIZE - CUT_AT
    assert path.read_bytes() == PAYLOAD


# 3
def test_corrupted_download_is_deleted_and_named(
    server: Server, entry: ModelEntry, cache: Path
) -> None:
    server.corrupt = True
    with pytest.raises(ModelError) as caught:
        models.fetch(entry, cache, **FAST)
    assert not isinstance(caught.value, ModelUnavailable)
    message = str(caught.value)
    assert entry.filename in message
    assert PAYLOAD_SHA in message
    assert hashlib.sha256(corrupted(PAYLOAD)).hexdigest() in message
    assert leftovers(cache) == []  # neither the final file nor the .part
    assert server.requests == 1  # a bad file is not downloaded again and again


def test_wrong_size_on_server_fails_before_download(
    server: Server, cache: Path
) -> None:
    entry = make_entry(server.url, size=PAYLOAD_SIZE + 1)
    with pytest.raises(ModelError, match="not the pinned file"):
        models.fetch(entry, cache, **FAST)
    assert server.requests == 1
    assert leftovers(cache) == []  # not a byte of the wrong file kept


def test_http_404_is_not_retried(server: Server, cache: Path) -> None:
    entry = make_entry(server.url.replace(MODEL_PATH, "/nope.onnx"))
    with pytest.raises(ModelUnavailable, match="404"):
        models.fetch(entry, cache, **FAST)
    assert server.requests == 1


# 4
def test_verified_file_present_needs_no_network(
    server: Server, entry: ModelEntry, cache: Path
) -> None:
    cache.mkdir()
    (cache / entry.filename).write_bytes(PAYLOAD)
    assert models.resolve(entry.name, cache_dir=cache, offline=False) == cache / entry.filename
    assert models.fetch(entry, cache, **FAST) == cache / entry.filename
    assert server.requests == 0
    server.stop()
    assert models.resolve(entry.name, cache_dir=cache) == cache / entry.filename


# 5
@pytest.mark.parametrize("how", ["env-1", "env-true", "argument"])
def test_offline_and_missing_says_how_to_provision(
    how: str, server: Server, entry: ModelEntry, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs: dict[str, Any] = {}
    if how == "argument":
        kwargs["offline"] = True
    else:
        monkeypatch.setenv("DINOWATCH_OFFLINE", how.removeprefix("env-"))
    with pytest.raises(ModelUnavailable) as caught:
        models.resolve(entry.name, cache_dir=cache, **kwargs)
    message = str(caught.value)
    assert f"dinowatch model fetch {entry.name}" in message
    assert "--model" in message
    assert entry.filename in message
    assert str(cache) in message
    assert server.requests == 0


# 6
def test_unreachable_server_is_unavailable_after_retries(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = make_entry(f"http://127.0.0.1:{closed_port()}{MODEL_PATH}")
    monkeypatch.setitem(models.REGISTRY, entry.name, entry)
    delays: list[float] = []
    monkeypatch.setattr(models.time, "sleep", delays.append)

    with pytest.raises(ModelUnavailable) as caught:
        models.fetch(entry, cache, retries=3, backoff=0.01, timeout=2.0)
    assert delays == pytest.approx([0.01, 0.02, 0.04])  # exponential, then give up
    assert isinstance(caught.value.__cause__, OSError)
    assert "dinowatch model fetch" in str(caught.value)

    with pytest.raises(ModelUnavailable, match="--model"):
        models.resolve(entry.name, cache_dir=cache)
    assert not (cache / entry.filename).exists()


# 7
def test_cached_file_failing_verification_is_refetched(
    server: Server, entry: ModelEntry, cache: Path
) -> None:
    cache.mkdir()
    target = cache / entry.filename
    target.write_bytes(corrupted(PAYLOAD))
    assert models.resolve(entry.name, cache_dir=cache) == target
    assert target.read_bytes() == PAYLOAD
    assert server.requests == 1
    # Kept aside, not deleted: it may be a file someone copied in by hand.
    assert (cache / f"{entry.filename}.corrupt").read_bytes() == corrupted(PAYLOAD)


def test_cached_file_failing_verification_offline_is_refused(
    server: Server, entry: ModelEntry, cache: Path
) -> None:
    cache.mkdir()
    target = cache / entry.filename
    target.write_bytes(b"not a model")
    with pytest.raises(ModelUnavailable, match="failed verification") as caught:
        models.resolve(entry.name, cache_dir=cache, offline=True)
    assert "dinowatch model fetch" in str(caught.value)
    assert not target.exists()
    assert server.requests == 0


# 8
def _fetch_in_child(entry: ModelEntry, cache: Path, barrier: Any, results: Any) -> None:
    barrier.wait(timeout=30)
    started = time.monotonic()
    try:
        path = str(models.fetch(entry, cache, **FAST))
    except ModelError as err:  # reported, so the parent fails fast with the reason
        path = f"failed: {err}"
    results.put((path, started, time.monotonic()))


def test_concurrent_processes_download_once(
    server: Server, entry: ModelEntry, cache: Path
) -> None:
    server.delay = 0.01  # about 0.5 s of download, so the two fetches overlap
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with server threads
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    children = [ctx.Process(target=_fetch_in_child, args=(entry, cache, barrier, results))
                for _ in range(2)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0

    assert {path for path, _, _ in outcomes} == {str(cache / entry.filename)}
    assert max(s for _, s, _ in outcomes) < min(e for _, _, e in outcomes)  # they overlapped
    assert models.verify(entry, cache / entry.filename)
    assert server.requests == 1  # the lock holder downloaded; the other found the file
    assert server.bytes_served == PAYLOAD_SIZE
    assert leftovers(cache) == [entry.filename]


# 9
def test_model_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert models.model_dir() == tmp_path / "home" / ".cache" / "dinowatch" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert models.model_dir() == tmp_path / "home" / ".cache" / "dinowatch" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.model_dir() == tmp_path / "xdg" / "dinowatch" / "models"
    assert models.model_dir(tmp_path / "data") == tmp_path / "data" / "models"
    monkeypatch.setenv("DINOWATCH_MODEL_DIR", str(tmp_path / "env"))
    assert models.model_dir(tmp_path / "data") == tmp_path / "env"
    assert models.model_dir() == tmp_path / "env"


# 10
def test_default_registry_entry_matches_design() -> None:
    entry = models.REGISTRY[models.DEFAULT_MODEL]
    assert models.DEFAULT_MODEL == "dinov2-vits14" == entry.name
    assert entry.url.startswith("https://huggingface.co/sefaburak/dinov2-small-onnx/resolve/")
    assert "/7a5e61628117b5a8bd6f5e2b2385b76da1b4582e/" in entry.url
    assert entry.size == 86_644_121
    assert entry.sha256 == "4df36ef0716a8f17d984fc7546a3a5d670fda6911eb298592250cb9e26756063"
    assert entry.dim == 384
    assert entry.pinned
    filenames = [e.filename for e in models.REGISTRY.values()]
    assert len(set(filenames)) == len(filenames)  # entries never overwrite each other
    assert all(key == e.name for key, e in models.REGISTRY.items())


def test_unpinned_entry_is_refused(server: Server, cache: Path) -> None:
    seed = models.REGISTRY["dinov2-vits14-roundttble"]
    assert "RoundtTble/dinov2_vits14_onnx" in seed.url
    assert not seed.pinned
    with pytest.raises(ModelError, match="--model PATH"):
        models.resolve(seed.name, cache_dir=cache)
    with pytest.raises(ModelError, match="no pinned sha256"):
        models.fetch(make_entry(server.url, sha256=None), cache, **FAST)
    assert server.requests == 0
    assert models.info(seed, cache)["verified"] is None


def test_explicit_path_wins(tmp_path: Path) -> None:
    local = tmp_path / "mine.onnx"
    with pytest.raises(FileNotFoundError, match=r"mine\.onnx"):
        models.resolve(path=local)
    local.write_bytes(b"any bytes: an explicit path is the user's choice")
    assert models.resolve("no-such-model", path=local, offline=True) == local


def test_unknown_name_lists_known_models(cache: Path) -> None:
    with pytest.raises(ModelError, match="dinov2-vits14") as caught:
        models.resolve("dinov3", cache_dir=cache)
    assert "dinov3" in str(caught.value)


def test_info_and_verify(server: Server, entry: ModelEntry, cache: Path) -> None:
    before = models.info(entry, cache)
    assert before["present"] is False
    assert before["verified"] is False
    assert before["path"] == str(cache / entry.filename)
    models.fetch(entry, cache, **FAST)
    after = models.info(entry, cache)
    assert after["present"] is True
    assert after["verified"] is True
    assert after["sha256"] == PAYLOAD_SHA
    assert after["dim"] == 384
    assert models.sha256_file(cache / entry.filename) == PAYLOAD_SHA
    (cache / "other.onnx").write_bytes(PAYLOAD[:-1])
    assert not models.verify(entry, cache / "other.onnx")


def test_producer_name_reads_the_onnx_header_as_onnx_does(tmp_path: Path) -> None:
    stand_in = write_model(tmp_path / "tiny.onnx", "tiny")
    other = onnx.load(str(stand_in))
    other.producer_name, other.ir_version = "pytorch", 8
    onnx.save(other, str(tmp_path / "other.onnx"))
    assert models.producer_name(stand_in) == onnx.load(str(stand_in)).producer_name == \
        "dinowatch.testing"
    assert models.producer_name(tmp_path / "other.onnx") == "pytorch"
    (tmp_path / "x.hef").write_bytes(b"\x01\x02not protobuf at all" * 10)
    assert models.producer_name(tmp_path / "x.hef") == ""
    assert models.producer_name(tmp_path / "missing.onnx") == ""
