"""End to end: the seed pipeline beside the real dinowatch daemon, in one run (issue 9).

For each image set (bench_images.py) it embeds the same files with the same model twice:

* the seed (seed_pipeline.SeedEmbedder): sequential, in this process; images/s and the
  per-image wall time;
* the real daemon: `dinowatch run` as a subprocess against a private Mosquitto on
  127.0.0.1, watching an empty folder. Throughput: every image of the set is moved into the
  folder at once (os.replace from a staging folder on the same file system); images/s =
  count / (last `embedding` message received - first move). Latency: a fresh daemon, then
  one image at a time, each after the previous one's message: file moved in -> vector
  committed (the row's `updated_at` in SQLite) and -> vector on the broker (the subscriber
  receives it; on loopback that is the moment the broker sends the daemon its PUBACK).

Also per set: the daemon's CPU seconds per image per stage (its final `stats`
`cpu_seconds`, when the daemon has them), the whole process's CPU over the throughput
window (/proc/PID/stat), the CPU floor (cores / per-stage CPU seconds per image) and how
far the achieved rate is from it, the peak RSS (VmHWM) and the cosine of the daemon's
vectors (decoded from the MQTT payloads) to the seed's. `--int8` quantizes the model with
`dinowatch model quantize` and runs the daemon again on it.

    python3 benchmarks/e2e_bench.py [--sets jpeg12,mpo12,jpeg1080,png,heic] [--count 24]
        [--latency-images 15] [--model MODEL.onnx] [--work DIR] [--int8] [--keep]

Images and the stand-in model are cached in --work (default ~/.cache/dinowatch/e2e-bench);
each run's daemons, logs and databases go to a folder below it, deleted unless --keep.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import getpass
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import yaml
from bench_images import SETS, ensure_images
from paho.mqtt.enums import CallbackAPIVersion
from seed_pipeline import SeedEmbedder, cosine_summary, embed_timed

DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
    "dinowatch" / "e2e-bench"
DEFAULT_COUNT = 24  # images per set for the throughput run (heic: a quarter of it)
HEIC_SHARE = 4  # a 12 MP HEIC takes ~14-28 s to encode, so that set gets count // 4
LATENCY_IMAGES = 15  # dropped one at a time on an idle daemon
CALIBRATION_IMAGES = 16  # 1080p JPEGs of other scenes, for `dinowatch model quantize`
SETTLE_SECONDS = 0.2  # the watched folder's (moved-in files are complete at once: unused)
IDLE_SECONDS = 0.5  # pause after each latency image's message: the next finds the daemon idle
READY_SECONDS = 120.0  # daemon start: model load and warm-up
MESSAGE_SECONDS = 60.0  # per image, at most, before a run is declared stuck
STOP_SECONDS = 30.0  # SIGTERM to exit (the daemon's own budget is 9 s)
QUANTIZE_SECONDS = 1800.0
UNEVEN_CORES = 0.25  # other load differing more than this between seed and daemon: flagged
STAGES = ("read", "hash", "decode", "inference", "record")
TOPIC_PREFIX = "dinowatch"
INT8_MODEL = "dinov2-vits14-int8"
INT8_FILE = "dinov2_vits14_int8.onnx"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
# The daemon's DEBUG line for each image (pipeline._log_timings): its own wall times, ms.
TIMINGS = re.compile(r"timings (?P<path>.+?): .*read\+hash\+decode (?P<decode>\d+), .*"
                     r"inference (?P<inference>\d+) \(batch")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:.,]+\s*")  # a log line's, if it has one


# ---- child processes ------------------------------------------------------------------------

def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when this benchmark dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a child in a session of its own (Ctrl-C reaches only this script, which then
    stops its children in order), output to `log`."""
    with log.open("ab") as output:
        return subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)


def terminate(process: subprocess.Popen[bytes], timeout: float = STOP_SECONDS) -> int:
    """SIGTERM, wait up to `timeout` s, then SIGKILL; returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               alive: Callable[[], bool] = lambda: True) -> None:
    """Poll `predicate` every 10 ms; RuntimeError after `timeout` s or once `alive` fails."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if not alive():
            raise RuntimeError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Broker:
    """A private Mosquitto on a free 127.0.0.1 port, without persistence."""

    host = "127.0.0.1"

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = folder / "mosquitto.log"
        self.conf = folder / "mosquitto.conf"
        # `user`: as root, mosquitto would switch to its own user, and a change of
        # credentials clears the parent-death signal that stops it if this script is killed.
        self.conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\n"
                             f"persistence false\nuser {getpass.getuser()}\n")
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Broker:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = process = spawn([binary, "-c", str(self.conf)], self.log)
        wait_until(self._listening, 10, f"mosquitto on port {self.port}",
                   alive=lambda: process.poll() is None)
        return self

    def _listening(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            terminate(self.process)


class Contention:
    """Cores kept busy by other processes (neither the daemon nor this script) over a window,
    from /proc/stat: what a shared machine took from the figures measured in that window."""

    def __init__(self) -> None:
        self._busy, self._total = self._jiffies()
        self._own = time.process_time()

    @staticmethod
    def _jiffies() -> tuple[int, int]:
        """(busy, total) clock ticks of all CPUs since boot."""
        ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # idle and iowait are not busy

    def others(self, daemon_cpu: float = 0.0) -> float:
        """Mean cores busy with other work since this meter started; `daemon_cpu`: the
        daemon's CPU seconds over the same window, s."""
        busy, total = self._jiffies()
        own = time.process_time() - self._own
        other = (busy - self._busy) / CLOCK_TICKS - own - daemon_cpu
        capacity = (total - self._total) / CLOCK_TICKS / (os.cpu_count() or 1)  # wall, s
        return round(max(0.0, other) / capacity, 2) if capacity > 0 else 0.0


# ---- the MQTT side ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Embedding:
    received: float  # time.time() when the subscriber got the message, s
    path: str  # as the daemon names it (inside the watched folder)
    vector: np.ndarray  # float32 (384,)


class Subscriber:
    """Everything under `<prefix>/<device>/`: embeddings (decoded), status, last stats."""

    def __init__(self, broker: Broker, base: str) -> None:
        self.base = base
        self.embeddings: dict[str, Embedding] = {}  # by path; the first message of each
        self.status: str | None = None
        self.stats: dict[str, Any] | None = None
        self._subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2,
                                   client_id=f"e2e-bench-{os.getpid()}-{base}")
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        wait_until(self._subscribed.is_set, 10, f"the subscription to {base}/#")

    def _on_connect(self, client: paho.Client, userdata: object, flags: object,
                    reason: object, properties: object) -> None:
        client.subscribe(f"{self.base}/#", qos=1)

    def _on_message(self, client: paho.Client, userdata: object,
                    message: paho.MQTTMessage) -> None:
        received = time.time()
        topic = message.topic.removeprefix(self.base + "/")
        if topic == "embedding":
            body = json.loads(message.payload)
            vector = np.frombuffer(base64.b64decode(body["vector"]), dtype="<f4")
            self.embeddings.setdefault(body["path"], Embedding(received, body["path"], vector))
        elif topic == "status":
            self.status = message.payload.decode()
        elif topic == "stats":
            self.stats = json.loads(message.payload)

    def wait_for(self, paths: list[str], timeout: float, alive: Callable[[], bool]) -> None:
        wait_until(lambda: all(path in self.embeddings for path in paths), timeout,
                   f"{len(paths)} embedding messages", alive)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


# ---- the daemon ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelChoice:
    """The daemon's `model` config section, its environment, and a label for the tables."""

    label: str
    section: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)


class Notifications:
    """A systemd-style notify socket (abstract address: no path, nothing to clean up), read
    on a thread for as long as the daemon runs: a socket nobody reads would fill up and block
    the daemon's sd_notify calls."""

    def __init__(self) -> None:
        name = f"dinowatch-e2e-bench-{os.getpid()}-{id(self)}"
        self.address = "@" + name  # as NOTIFY_SOCKET writes an abstract address
        self.fields: set[str] = set()  # every `KEY=value` line received
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind("\0" + name)
        self._socket.settimeout(0.1)
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                self.fields.update(self._socket.recv(4096).decode().splitlines())

    def close(self) -> None:
        self._closed.set()
        self._reader.join()
        self._socket.close()


class Daemon:
    """One `dinowatch run` with its own data_dir, watched folder, device_id and log.

    Entering starts it and returns once it sent READY=1 (its watchers run) and the broker
    holds its retained `online` (which it publishes on connect, before its watchers start);
    leaving stops it with SIGTERM and keeps its final stats and its log's complaints.
    """

    def __init__(self, folder: Path, model: ModelChoice, broker: Broker, device_id: str,
                 *, debug: bool = False) -> None:
        self.folder = folder
        self.watch = folder / "watch"
        self.staging = folder / "staging"
        self.database = folder / "data" / "dinowatch.db"
        self.log = folder / "daemon.log"
        for path in (self.watch, self.staging):
            path.mkdir(parents=True)
        self.config = folder / "config.yaml"
        self.config.write_text(yaml.safe_dump({
            "device_id": device_id,
            "data_dir": str(folder / "data"),
            "model": model.section,
            "watch": [{"path": str(self.watch), "settle_seconds": SETTLE_SECONDS}],
            "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": TOPIC_PREFIX,
                     "vector_encoding": "base64"},
            # DEBUG: the per-image `timings` lines (costs nothing that counts when idle)
            "logging": {"level": "DEBUG" if debug else "INFO"},
        }, sort_keys=False))
        self.env = {**os.environ, **model.env, "PYTHONUNBUFFERED": "1"}
        self.broker = broker
        self.base = f"{TOPIC_PREFIX}/{device_id}"
        self.process: subprocess.Popen[bytes] | None = None
        self.subscriber: Subscriber | None = None
        self.notifications: Notifications | None = None
        self.final_stats: dict[str, Any] | None = None
        self.exit_code: int | None = None

    def __enter__(self) -> Daemon:
        self.subscriber = Subscriber(self.broker, self.base)
        try:
            self.notifications = notifications = Notifications()
            self.process = spawn([sys.executable, "-m", "dinowatch.cli", "run", "-c",
                                  str(self.config)], self.log,
                                 {**self.env, "NOTIFY_SOCKET": notifications.address})
            wait_until(lambda: "READY=1" in notifications.fields, READY_SECONDS,
                       "READY=1 from the daemon", self.alive)
            subscriber = self.subscriber
            wait_until(lambda: subscriber.status == "online", 30, "the daemon's `online`",
                       self.alive)
        except BaseException as err:
            self.__exit__()
            if isinstance(err, RuntimeError):
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{err}; the end of {self.log}:\n{tail}") from err
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.exit_code = terminate(self.process)
        if self.notifications is not None:
            self.notifications.close()
        if self.subscriber is not None:
            self.subscriber.close()
        if self.database.exists():
            with contextlib.closing(sqlite3.connect(self.database)) as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'stats'").fetchone()
            self.final_stats = json.loads(row[0]) if row else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_seconds(self) -> float:
        """The whole process's user + system CPU time so far, s (/proc/PID/stat)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime

    def peak_rss_mb(self) -> float:
        """VmHWM: the process's peak resident set size so far, MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc")

    def stage(self, images: list[Path]) -> list[Path]:
        """Copy `images` into the staging folder (same file system as the watched one)."""
        staged = []
        for image in images:
            shutil.copyfile(image, self.staging / image.name)
            staged.append(self.staging / image.name)
        return staged

    def committed_at(self, paths: list[str]) -> dict[str, float]:
        """Each path's `updated_at` (the commit of its vector) as a Unix time, s. Read after
        the daemon stopped."""
        with contextlib.closing(sqlite3.connect(self.database)) as db:
            rows = db.execute(f"SELECT path, updated_at FROM images WHERE path IN "
                              f"({','.join('?' * len(paths))})", paths).fetchall()
        return {path: datetime.fromisoformat(stamp).timestamp() for path, stamp in rows}

    def work_seconds(self) -> dict[str, float]:
        """Each image's read+hash+decode plus inference wall time, s, from the daemon's own
        DEBUG `timings` lines (a daemon started with `debug`)."""
        found = (TIMINGS.search(line) for line in
                 self.log.read_text(errors="replace").splitlines())
        return {m["path"]: (int(m["decode"]) + int(m["inference"])) / 1000
                for m in found if m}

    def complaints(self) -> list[str]:
        """Distinct WARNING/ERROR/Traceback lines of the log, but the expected stand-in one."""
        seen: dict[str, None] = {}
        for line in self.log.read_text(errors="replace").splitlines():
            if any(word in line for word in ("WARNING", "ERROR", "CRITICAL", "Traceback")) \
                    and "STAND-IN" not in line:
                seen.setdefault(TIMESTAMP.sub("", line)[:200], None)
        return list(seen)


# ---- measurements ----------------------------------------------------------------------------

@dataclass
class DaemonRun:
    """What one set's two daemons measured (times in s, unless the name says otherwise)."""

    images_per_s: float
    process_cpu_per_image: float  # whole process, over the throughput window
    others: float  # cores busy with other processes over the throughput window
    stage_cpu_per_image: dict[str, float] | None  # None: the daemon has no `cpu_seconds` yet
    peak_rss_mb: float
    commit_latency: list[float]
    broker_latency: list[float]
    # broker latency minus the daemon's own decode + inference time, image by image
    overhead: list[float]
    work: list[float]  # that decode + inference time
    vectors: dict[str, np.ndarray]  # by file name
    complaints: list[str]


def throughput(daemon: Daemon, images: list[Path]) -> tuple[float, float, float]:
    """Move every image in at once; returns (images/s, process CPU s per image, cores busy
    with other processes meanwhile)."""
    assert daemon.subscriber is not None
    staged = daemon.stage(images)
    targets = [daemon.watch / path.name for path in staged]
    contention = Contention()
    cpu_before, started = daemon.cpu_seconds(), time.time()
    for path, target in zip(staged, targets, strict=True):
        path.replace(target)
    daemon.subscriber.wait_for([str(t) for t in targets], MESSAGE_SECONDS * len(images),
                               daemon.alive)
    cpu = daemon.cpu_seconds() - cpu_before
    last = max(daemon.subscriber.embeddings[str(t)].received for t in targets)
    return len(images) / (last - started), cpu / len(images), contention.others(cpu)


def latency(daemon: Daemon, images: list[Path]) -> dict[str, float]:
    """One image at a time on an idle daemon, each after the previous one's message;
    returns when each was moved in (Unix time, s) by the daemon's path for it."""
    assert daemon.subscriber is not None
    moved: dict[str, float] = {}
    for path in daemon.stage(images):
        target = str(daemon.watch / path.name)
        moved[target] = time.time()
        path.replace(target)
        daemon.subscriber.wait_for([target], MESSAGE_SECONDS, daemon.alive)
        time.sleep(IDLE_SECONDS)
    return moved


def run_daemon(name: str, model: ModelChoice, broker: Broker, folder: Path,
               throughput_images: list[Path], latency_images: list[Path]) -> DaemonRun:
    """Throughput on one fresh daemon, then latency on another (so the images can be the
    same files without the store recognizing them)."""
    device = f"bench-{name}-{model.label}"
    with Daemon(folder / f"{name}-{model.label}-throughput", model, broker,
                f"{device}-throughput") as busy:
        images_per_s, process_cpu, others = throughput(busy, throughput_images)
        peak_rss = busy.peak_rss_mb()
    with Daemon(folder / f"{name}-{model.label}-latency", model, broker,
                f"{device}-latency", debug=True) as idle:
        moved = latency(idle, latency_images)
    assert busy.subscriber is not None and idle.subscriber is not None
    received = idle.subscriber.embeddings
    commits = idle.committed_at(list(moved))
    commit_latency = [commits[path] - at for path, at in moved.items()]
    broker_latency = [received[path].received - at for path, at in moved.items()]
    work = idle.work_seconds()
    overhead = [received[path].received - at - work[path] for path, at in moved.items()
                if path in work]
    vectors = {Path(path).name: embedding.vector for path, embedding in
               [*busy.subscriber.embeddings.items(), *received.items()]}
    return DaemonRun(images_per_s, process_cpu, others, stage_cpu(busy.final_stats),
                     peak_rss, commit_latency, broker_latency, overhead,
                     [work[path] for path in moved if path in work], vectors,
                     busy.complaints() + idle.complaints())


def stage_cpu(stats: dict[str, Any] | None) -> dict[str, float] | None:
    """CPU seconds per recorded image per stage, from the final stats' `cpu_seconds`."""
    if not stats or not isinstance(stats.get("cpu_seconds"), dict) or not stats.get("processed"):
        return None
    return {stage: float(seconds) / stats["processed"]
            for stage, seconds in stats["cpu_seconds"].items()}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def summarize(run: DaemonRun, seed_vectors: dict[str, np.ndarray], seed_images_per_s: float,
              cores: int) -> dict[str, Any]:
    """The machine-readable figures of one daemon run beside the seed's."""
    names = sorted(run.vectors)
    floor = None
    if run.stage_cpu_per_image:
        floor = cores / sum(run.stage_cpu_per_image.values())
    return {
        "images_per_s": round(run.images_per_s, 2),
        "ratio_to_seed": round(run.images_per_s / seed_images_per_s, 2),
        "floor_images_per_s": None if floor is None else round(floor, 2),
        "floor_over_achieved": None if floor is None else round(floor / run.images_per_s, 3),
        "process_cpu_ms_per_image": ms(run.process_cpu_per_image),
        "process_floor_over_achieved": round(
            cores / run.process_cpu_per_image / run.images_per_s, 3),
        "stage_cpu_ms_per_image": None if run.stage_cpu_per_image is None else
        {stage: ms(seconds) for stage, seconds in run.stage_cpu_per_image.items()},
        "commit_ms_p50": ms(percentile(run.commit_latency, 50)),
        "commit_ms_p95": ms(percentile(run.commit_latency, 95)),
        "broker_ms_p50": ms(percentile(run.broker_latency, 50)),
        "broker_ms_p95": ms(percentile(run.broker_latency, 95)),
        "decode_inference_ms_p50": ms(percentile(run.work, 50)) if run.work else None,
        "overhead_ms_p50": ms(percentile(run.overhead, 50)) if run.overhead else None,
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "other_cores_busy": run.others,
        **cosine_summary(np.stack([run.vectors[n] for n in names]),
                         np.stack([seed_vectors[n] for n in names])),
        "log_complaints": run.complaints,
    }


# ---- INT8 ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Quantized:
    """What `dinowatch model quantize` made: the model to run (None: skipped) and what it
    said (its output, and the model card it wrote beside the model: the fidelity)."""

    model: ModelChoice | None
    output: str
    card: dict[str, Any] | None = None


def quantize(model: Path, calibration: Path, model_dir: Path) -> Quantized:
    """Make the INT8 model with the product's own command, into `model_dir`."""
    shutil.rmtree(model_dir, ignore_errors=True)
    argv = [sys.executable, "-m", "dinowatch.cli", "model", "quantize", "dinov2-vits14",
            "--model", str(model), "--images", str(calibration), "--dir", str(model_dir)]
    print("quantizing: dinowatch", " ".join(argv[3:]), flush=True)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=QUANTIZE_SECONDS,
                          preexec_fn=_die_with_parent)
    if done.returncode != 0:
        if "invalid choice: 'quantize'" in done.stderr:
            return Quantized(None, "skipped: this dinowatch has no `dinowatch model quantize`")
        return Quantized(None, f"skipped: quantize exited {done.returncode}: "
                               f"{done.stderr.strip()[-800:]}")
    cards = sorted(model_dir.glob("*.json"))
    card = json.loads(cards[0].read_text()) if cards else None
    if not (model_dir / INT8_FILE).is_file():
        return Quantized(None, f"skipped: quantize wrote no {INT8_FILE}: {done.stdout}", card)
    return Quantized(ModelChoice("int8", {"name": INT8_MODEL},
                                 {"DINOWATCH_MODEL_DIR": str(model_dir)}),
                     done.stdout.strip(), card)


# ---- the run ---------------------------------------------------------------------------------

@dataclass
class SeedRun:
    images_per_s: float
    ms_p50: float
    ms_p95: float
    others: float  # cores busy with other processes meanwhile
    vectors: dict[str, np.ndarray]  # by file name


def run_seed(seed: SeedEmbedder, images: list[Path], timed: int) -> SeedRun:
    """Embed `images` sequentially; the rate and per-image times come from the first
    `timed` (the throughput images), the rest only give vectors to compare."""
    contention = Contention()
    vectors, seconds = embed_timed(seed, images)
    return SeedRun(timed / sum(seconds[:timed]), ms(percentile(seconds[:timed], 50)) or 0,
                   ms(percentile(seconds[:timed], 95)) or 0, contention.others(),
                   {path.name: vector for path, vector in zip(images, vectors, strict=True)})


def set_counts(name: str, count: int) -> int:
    return max(2, count // HEIC_SHARE) if name == "heic" else count


Row = tuple[str, str, SeedRun | None, dict[str, Any]]  # set, model, seed (1st model only), figures



def figure(key: str) -> Callable[[Row], object]:
    """A column that shows one of the daemon run's figures."""
    return lambda row: row[3][key]


THROUGHPUT_COLUMNS: list[tuple[str, Callable[[Row], object]]] = [
    ("seed/s", lambda row: row[2] and round(row[2].images_per_s, 2)),
    ("seed ms", lambda row: row[2] and row[2].ms_p50),
    ("dw/s", figure("images_per_s")),
    ("ratio", figure("ratio_to_seed")),
    ("floor/s", figure("floor_images_per_s")),
    ("floor/dw", figure("floor_over_achieved")),
    ("proc ms", figure("process_cpu_ms_per_image")),
    ("proc/dw", figure("process_floor_over_achieved")),
    ("RSS MB", figure("peak_rss_mb")),
    ("cos mean", figure("cosine_mean")),
    ("cos min", figure("cosine_min")),
    ("oth seed", lambda row: row[2] and row[2].others),
    ("oth dw", figure("other_cores_busy")),
]
LATENCY_COLUMNS: list[tuple[str, Callable[[Row], object]]] = [
    ("commit p50", figure("commit_ms_p50")),
    ("p95", figure("commit_ms_p95")),
    ("broker p50", figure("broker_ms_p50")),
    ("p95", figure("broker_ms_p95")),
    ("dec+inf p50", figure("decode_inference_ms_p50")),
    ("over p50", figure("overhead_ms_p50")),
    *[(stage, lambda row, stage=stage: (row[3]["stage_cpu_ms_per_image"] or {}).get(stage))
      for stage in STAGES],
]
LEGEND = """\
seed ms: the seed's time per image (p50). ratio: dinowatch's images/s over the seed's (the fp32
seed's for every model). floor/s: cores / the stages' CPU s per image (the daemon's own
cpu_seconds); floor/dw <= 1.05 is "within 1.05x of the floor". proc ms: the daemon process's
CPU (every thread, ONNX Runtime's pool included) per image over the throughput window;
proc/dw: cores / that CPU, over the achieved rate. oth seed, oth dw: cores busy with other
processes during the seed's run and the daemon's window (/proc/stat; a shared machine's share).
broker: the subscriber receives the message; on loopback, when the broker sends the PUBACK.
dec+inf: the daemon's own read+hash+decode and inference wall time for the image (its DEBUG
`timings` line); over: broker minus that, image by image (aim: <= 20 ms)."""


def print_table(title: str, rows: list[Row], columns: list[tuple[str, Callable[[Row], object]]]
                ) -> None:
    """One table: set and model, then `columns` (None shows as n/a)."""
    widths = [max(len(header), 6) + 2 for header, _ in columns]
    print(f"\n{title}\n{'set':<9}{'model':<6}"
          + "".join(f"{header:>{width}}" for (header, _), width in zip(columns, widths,
                                                                        strict=True)))
    for row in rows:
        cells = [value(row) for _, value in columns]
        print(f"{row[0]:<9}{row[1]:<6}" + "".join(
            f"{'n/a' if cell is None else cell:>{width}}"
            for cell, width in zip(cells, widths, strict=True)))


def print_tables(rows: list[Row], settle: float) -> None:
    print_table("throughput: the set moved in at once (seed: sequential, same files and model)",
                rows, THROUGHPUT_COLUMNS)
    print_table(f"latency on an idle daemon, ms: file moved in -> vector committed, -> on the "
                f"broker (a file moved in is complete at once: settle_seconds {settle} does "
                f"not apply); CPU ms per image per stage", rows, LATENCY_COLUMNS)
    print("\n" + LEGEND)
    seeds = {name: seed for name, _, seed, _ in rows if seed}
    for name, label, _, figures in rows:
        seed_others, daemon_others = seeds[name].others, figures["other_cores_busy"]
        if abs(seed_others - daemon_others) > UNEVEN_CORES:
            print(f"UNEVEN ({name}, {label}): other processes kept {seed_others} cores busy "
                  f"during the seed's run, {daemon_others} during the daemon's: this ratio is "
                  "not side by side; run again")
        for line in figures["log_complaints"]:
            print(f"daemon log ({name}, {label}): {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(SETS),
                        help=f"comma-separated, of {', '.join(SETS)} (default: all)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT,
                        help=f"images per set for throughput (heic: count // {HEIC_SHARE})")
    parser.add_argument("--latency-images", type=int, default=LATENCY_IMAGES,
                        help="images dropped one at a time per set")
    parser.add_argument("--model", type=Path,
                        help="ONNX model (default: the full-size stand-in, built into --work)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="cache of images and model, and the runs' folders")
    parser.add_argument("--int8", action="store_true",
                        help="also quantize the model (dinowatch model quantize) and run the "
                             "daemon on it")
    parser.add_argument("--keep", action="store_true",
                        help="keep this run's folder (configs, logs, databases)")
    args = parser.parse_args()
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if unknown := [s for s in sets if s not in SETS]:
        parser.error(f"unknown set(s) {', '.join(unknown)}; known: {', '.join(SETS)}")
    signal.signal(signal.SIGTERM, _interrupt)  # cleanup runs through the `with` blocks

    began = time.monotonic()
    cores = len(os.sched_getaffinity(0))
    model = args.model or args.work / "full.onnx"
    if args.model is None and not model.exists():
        subprocess.run([sys.executable, "-m", "dinowatch.testing", "--out", str(model),
                        "--variant", "full"], check=True, stdout=subprocess.DEVNULL)
    images = {name: ensure_images(name, args.work / "images" / name,
                                  max(set_counts(name, args.count), args.latency_images))
              for name in sets}
    generated = time.monotonic()
    run_dir = args.work / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    models = [ModelChoice("fp32", {"path": str(model)})]
    quantized: Quantized | None = None
    rows: list[Row] = []
    try:
        if args.int8:
            calibration = args.work / "images" / "calibration"
            ensure_images("jpeg1080", calibration, CALIBRATION_IMAGES, seed_offset=1000)
            quantized = quantize(model, calibration, run_dir / "int8-model")
            print(quantized.output, flush=True)
            models += [quantized.model] if quantized.model else []
        seed = SeedEmbedder(model)
        seed.embed(images[sets[0]][0])  # graph preparation outside the timing
        with Broker(run_dir / "mosquitto") as broker:
            for name in sets:
                count = set_counts(name, args.count)
                print(f"{name}: seed, then the daemon ({count} images at once, "
                      f"{args.latency_images} one by one) ...", flush=True)
                seed_run = run_seed(seed, images[name], count)
                for choice in models:
                    daemon_run = run_daemon(name, choice, broker, run_dir, images[name][:count],
                                            images[name][:args.latency_images])
                    rows.append((name, choice.label, seed_run if choice is models[0] else None,
                                 summarize(daemon_run, seed_run.vectors, seed_run.images_per_s,
                                           cores)))
    finally:
        if args.keep:
            print(f"kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)

    print_tables(rows, SETTLE_SECONDS)
    if quantized is not None:
        print(f"\nINT8, as `dinowatch model quantize` reported it:\n{quantized.output}")
    print(f"\n{cores} cores; model {model}; images generated in {generated - began:.0f} s; "
          f"whole run {time.monotonic() - began:.0f} s")
    print(json.dumps({
        "benchmark": "e2e", "cores": cores, "model": str(model), "settle_seconds": SETTLE_SECONDS,
        "latency_images": args.latency_images,
        "int8_quantize": quantized and {"output": quantized.output, "card": quantized.card},
        "results": [{"set": name, "model": label, "images": set_counts(name, args.count),
                     **({"seed_images_per_s": round(seed.images_per_s, 2),
                         "seed_ms_p50": seed.ms_p50, "seed_ms_p95": seed.ms_p95,
                         "seed_other_cores_busy": seed.others}
                        if seed else {}), **figures}
                    for name, label, seed, figures in rows],
        "seconds": round(time.monotonic() - began, 1)}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the `with` blocks have stopped every child by now
        print("interrupted: the broker and daemons this run started are stopped",
              file=sys.stderr)
        sys.exit(130)
