"""The Hailo backend against the in-repo stand-in of HailoRT's Python API (tests/hailo_standin).

No Hailo device runs here: the stand-in has HailoRT's names, signatures, formats and errors,
and computes its outputs with ONNX Runtime on the CPU (uint8 NHWC in, float out), so the real
`dinowatch` process runs end to end on it. Each start-up failure is checked with and without
`fallback: onnx`, in-process (the message) and through the real daemon (the exit code).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from daemon_process import DaemonProcess, wait_until, write_config
from dinowatch import DinoEmbedder
from dinowatch.backends import BackendFailed, BackendUnavailable, HailoBackendConfig
from dinowatch.backends import hailo as hailo_backend
from dinowatch.config import ImagingSettings
from dinowatch.pipeline import Pipeline
from dinowatch.store import Store
from dinowatch.testing import write_photos

STANDIN = Path(__file__).resolve().parent / "hailo_standin"
sys.path.insert(0, str(STANDIN))  # hailo_standin (the helpers); hailo_platform comes with it

import hailo_standin  # noqa: E402

DINOWATCH = [sys.executable, "-m", "dinowatch.cli"]


@dataclass
class Hailo:
    """A stand-in device folder and a HEF compiled (so to speak) from the tiny model."""

    device: Path
    hef: Path
    model: Path

    def env(self) -> dict[str, str]:
        """What a `dinowatch` process needs to find the stand-in and its device."""
        return {"PYTHONPATH": os.pathsep.join(filter(None, [str(STANDIN),
                                                            os.environ.get("PYTHONPATH")])),
                "HAILO_STANDIN_DEVICE": str(self.device)}


@pytest.fixture
def hailo(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hailo]:
    device = hailo_standin.make_device(tmp_path / "hailo0", architecture="HAILO8")
    hef = tmp_path / "dinov2_vits14.hef"
    hailo_standin.write_hef(hef, tiny_model, hw_arch="hailo8")
    made = Hailo(device, hef, tiny_model)
    for key, value in made.env().items():
        monkeypatch.setenv(key, value)  # this process and the daemons it starts
    yield made


def hailo_config(hailo: Hailo, **options: object) -> HailoBackendConfig:
    return HailoBackendConfig.model_validate({"type": "hailo", "hef": hailo.hef, **options})


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- the backend ----------------------------------------------------------------------------

def test_hailo_vectors_match_the_cpu_backend(hailo: Hailo, tmp_path: Path) -> None:
    images = write_photos(tmp_path / "images", 6, seed=10)
    with DinoEmbedder(hailo.model, backend=hailo_config(hailo, batch=4)) as on_hailo, \
            DinoEmbedder(hailo.model) as on_cpu:
        assert on_hailo.backend.type_key == "hailo"
        assert on_hailo.fallback is None
        spec = on_hailo.backend.input_spec
        assert (spec.size, spec.layout, spec.dtype) == (224, "NHWC", "uint8")
        prepared = on_hailo.prepare(images[0])
        assert prepared.tensor.shape == (224, 224, 3) and prepared.tensor.dtype == np.uint8
        vectors = on_hailo.embed_batch(images)  # 6 images: two device runs at batch 4
        expected = on_cpu.embed_batch(images)
    assert vectors.shape == (6, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert cosines(vectors, expected).min() >= 0.999
    # Different pictures stay different: the device really ran each frame.
    assert cosines(vectors[:1], vectors[1:2])[0] < 0.999


def test_hailo_backend_frees_the_device_on_close(hailo: Hailo) -> None:
    # HailoRT gives a device to one process (one VDevice) at a time: a daemon that restarts
    # its backend, or a `backends compare` after the daemon stopped, must find it free.
    first = DinoEmbedder(hailo.model, backend=hailo_config(hailo))
    first.close()
    with DinoEmbedder(hailo.model, backend=hailo_config(hailo)) as second:
        assert second.backend.type_key == "hailo"


@dataclass(frozen=True)
class StartFailure:
    name: str
    message: str  # a regular expression the error must match
    options: tuple[tuple[str, object], ...] = ()  # backend settings it needs


START_FAILURES = [
    StartFailure("not installed", r"hailo_platform\) is not installed.*hailo-all.*"
                                  r"--system-site-packages"),
    StartFailure("no device", r"no Hailo device: is the AI HAT\+ seated"),
    StartFailure("device busy", r"Hailo device 0001:01:00\.0 is in use by another process"),
    StartFailure("device busy, by id", r"Hailo device 0001:01:00\.0 is in use by another "
                                       r"process.*HAILO_DEVICE_IN_USE",
                 (("device", "0001:01:00.0"),)),
    StartFailure("wrong chip", r"does not run on this HAILO8L: compiled for the other chip.*"
                               r"--hw-arch hailo8l"),
    StartFailure("driver mismatch", r"Hailo driver and library versions differ.*"
                                    r"library 4\.23\.0"),
    StartFailure("input shape", r"takes input \[256, 256, 3\]; this model needs "
                                r"\[224, 224, 3\]"),
    StartFailure("output dim", r"gives 192-d vectors; the model tiny\.onnx gives 384-d ones"),
]


@pytest.fixture
def start_failure(request: pytest.FixtureRequest, hailo: Hailo, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[StartFailure, Hailo]]:
    """Arrange one way for the Hailo backend not to start (for this process and its
    children); yields the failure and the Hailo to configure."""
    failure: StartFailure = request.param
    holder = None
    if failure.name == "not installed":
        monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", "").replace(
            str(STANDIN), ""))
        monkeypatch.setitem(sys.modules, "hailo_platform", None)  # import raises ImportError
    elif failure.name == "no device":
        monkeypatch.setenv("HAILO_STANDIN_DEVICE", str(tmp_path / "nothing-here"))
    elif failure.name.startswith("device busy"):
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, hailo_platform as hp\n"
             "with hp.VDevice(hp.VDevice.create_params()):\n"
             "    print('held', flush=True); sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout and holder.stdout.readline().strip() == "held"
    elif failure.name == "wrong chip":
        hailo_standin.make_device(hailo.device, architecture="HAILO8L")
    elif failure.name == "driver mismatch":
        hailo_standin.make_device(hailo.device, architecture="HAILO8",
                                  driver_version="4.20.0")
    elif failure.name == "input shape":
        hailo_standin.write_hef(hailo.hef, hailo.model, input_shape=(256, 256, 3))
    elif failure.name == "output dim":
        hailo_standin.write_hef(hailo.hef, hailo.model, output_shape=(192,))
    yield failure, hailo
    if holder is not None:
        holder.communicate("", timeout=10)


@pytest.mark.parametrize("start_failure", START_FAILURES, ids=lambda f: f.name,
                         indirect=True)
def test_start_failure_without_fallback_names_the_cause(
        start_failure: tuple[StartFailure, Hailo]) -> None:
    failure, hailo = start_failure
    with pytest.raises(BackendUnavailable, match=failure.message):
        DinoEmbedder(hailo.model, backend=hailo_config(hailo, **dict(failure.options)))


@pytest.mark.parametrize("start_failure", START_FAILURES, ids=lambda f: f.name,
                         indirect=True)
def test_start_failure_with_fallback_runs_on_the_cpu_with_one_warning(
        start_failure: tuple[StartFailure, Hailo], caplog: pytest.LogCaptureFixture,
        photo: Path) -> None:
    failure, hailo = start_failure
    with caplog.at_level(logging.WARNING), \
            DinoEmbedder(hailo.model, backend=hailo_config(
                hailo, fallback="onnx", **dict(failure.options))) as embedder, \
            DinoEmbedder(hailo.model) as on_cpu:
        assert embedder.backend.type_key == "onnx"
        assert embedder.fallback is not None
        assert embedder.fallback and re.search(failure.message, embedder.fallback)
        np.testing.assert_allclose(embedder.embed(photo), on_cpu.embed(photo), atol=1e-6)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "running on onnx instead (backend.fallback)" in warnings[0].getMessage()


def test_a_device_that_times_out_fails_the_batch_and_is_closed(
        hailo: Hailo, photo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hailo_backend, "TIMEOUT_MS", 300)
    with DinoEmbedder(hailo.model, backend=hailo_config(hailo)) as embedder:
        hailo_standin.hang(hailo.device, on=True)
        with pytest.raises(BackendFailed, match=r"Hailo inference failed: .*timeout"):
            embedder.embed(photo)
        hailo_standin.hang(hailo.device, on=False)
        with pytest.raises(BackendFailed, match="closed after a failure"):
            embedder.embed(photo)  # a failed device is opened again, never reused
        embedder.reopen_backend()
        assert embedder.backend.type_key == "hailo"
        assert embedder.embed(photo).shape == (384,)


def test_a_device_lost_under_a_running_batch_fails_it_rather_than_return_garbage(
        hailo: Hailo, photo: Path) -> None:
    # HailoRT's job.wait() returns once a job is over, failed or not: the failure comes only
    # through the callback's completion_info, and the output buffer holds whatever it held.
    with DinoEmbedder(hailo.model, backend=hailo_config(hailo)) as embedder, \
            ThreadPoolExecutor(1) as pool:
        hailo_standin.hang(hailo.device, on=True)
        running = pool.submit(embedder.embed, photo)
        time.sleep(0.5)  # the frame is on the device
        hailo_standin.unplug(hailo.device)
        hailo_standin.hang(hailo.device, on=False)
        with pytest.raises(BackendFailed, match="Hailo inference failed"):
            running.result(timeout=30)


# -- recovery in the pipeline (in-process, a real store and real files) --------------------

@pytest.fixture
def pipeline_on(tmp_path: Path) -> Iterator[Callable[[DinoEmbedder], Pipeline]]:
    started: list[tuple[Pipeline, Store]] = []

    def start(embedder: DinoEmbedder) -> Pipeline:
        store = Store(tmp_path / f"store{len(started)}.db")
        pipeline = Pipeline(embedder, store)
        pipeline.start()
        started.append((pipeline, store))
        return pipeline

    yield start
    for pipeline, store in started:
        pipeline.stop()
        store.close()
        pipeline.embedder.close()


def statuses(pipeline: Pipeline, paths: list[Path]) -> list[str | None]:
    return [(row.status if (row := pipeline.store.image(str(p))) else None) for p in paths]


def test_a_device_that_opens_but_keeps_failing_gives_way_to_the_fallback(
        hailo: Hailo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        pipeline_on: Callable[[DinoEmbedder], Pipeline]) -> None:
    # It opens again each time, then times out again: reopening it forever would embed
    # nothing and never use the fallback.
    monkeypatch.setattr(hailo_backend, "TIMEOUT_MS", 300)
    embedder = DinoEmbedder(hailo.model, backend=hailo_config(hailo, fallback="onnx"))
    pipeline = pipeline_on(embedder)
    hailo_standin.hang(hailo.device, on=True)
    images = write_photos(tmp_path / "images", 2, seed=90)
    for path in images:
        pipeline.submit(path, "test")
    wait_until(lambda: statuses(pipeline, images) == ["done", "done"], 60,
               "both files embedded on the fallback")
    assert embedder.backend.type_key == "onnx"
    assert embedder.fallback and "Hailo inference failed" in embedder.fallback
    assert pipeline.backend_error is None


def test_a_device_that_opens_but_keeps_failing_is_retried_with_a_growing_pause(
        hailo: Hailo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
        pipeline_on: Callable[[DinoEmbedder], Pipeline]) -> None:
    monkeypatch.setattr(hailo_backend, "TIMEOUT_MS", 200)
    pipeline = pipeline_on(DinoEmbedder(hailo.model, backend=hailo_config(hailo)))
    hailo_standin.hang(hailo.device, on=True)
    [image] = write_photos(tmp_path / "images", 1, seed=95)
    with caplog.at_level(logging.WARNING):
        pipeline.submit(image, "test")
        time.sleep(5)
    reopened = [r for r in caplog.records if "inference runs again" in r.getMessage()]
    # at once after the first failure, then 2 s, then 4 s: not a reopen per timeout
    assert 1 <= len(reopened) <= 3, [r.getMessage() for r in reopened]
    assert statuses(pipeline, [image]) == ["failed"]
    hailo_standin.hang(hailo.device, on=False)
    wait_until(lambda: statuses(pipeline, [image]) == ["done"], 60,
               "the file embedded once the device answers")


@pytest.mark.parametrize("files_before_the_poll", [0, 2])
def test_a_device_failure_met_by_a_search_is_repaired(
        hailo: Hailo, tmp_path: Path, photo: Path, monkeypatch: pytest.MonkeyPatch,
        pipeline_on: Callable[[DinoEmbedder], Pipeline], files_before_the_poll: int) -> None:
    # An MQTT search calls embed() beside the pipeline: a device that fails under it must
    # not stay closed until the next camera picture, nor fail the pictures that arrive before
    # the inference thread's next look.
    monkeypatch.setattr(hailo_backend, "TIMEOUT_MS", 300)
    embedder = DinoEmbedder(hailo.model, backend=hailo_config(hailo))
    pipeline = pipeline_on(embedder)
    hailo_standin.hang(hailo.device, on=True)
    with pytest.raises(BackendFailed):
        embedder.embed(photo)
    hailo_standin.hang(hailo.device, on=False)
    images = write_photos(tmp_path / "images", files_before_the_poll, seed=150)
    for path in images:
        pipeline.submit(path, "test")
    wait_until(lambda: statuses(pipeline, images) == ["done"] * len(images), 30,
               "the files embedded")
    assert pipeline.failed == 0
    wait_until(lambda: embedder.failure is None and pipeline.backend_error is None, 10,
               "the pipeline opening the device again")
    assert embedder.embed(photo).shape == (384,)


def test_a_fallback_that_cannot_load_leaves_the_inference_thread_alive(
        hailo: Hailo, tmp_path: Path, pipeline_on: Callable[[DinoEmbedder], Pipeline]) -> None:
    # The Hailo path never loads the ONNX file with ONNX Runtime; the fallback does, and a
    # damaged file must leave the daemon waiting, not dead.
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(hailo.model.read_bytes()[:4096])
    hailo_standin.write_hef(hailo.hef, hailo.model)
    embedder = DinoEmbedder(damaged, backend=hailo_config(hailo, fallback="onnx"))
    pipeline = pipeline_on(embedder)
    hailo_standin.unplug(hailo.device)
    [image] = write_photos(tmp_path / "images", 1, seed=97)
    pipeline.submit(image, "test")
    wait_until(lambda: statuses(pipeline, [image]) == ["failed"], 30, "the file failed")
    wait_until(lambda: pipeline.backend_error is not None
               and "cannot load ONNX model" in pipeline.backend_error, 30,
               "the fallback's load error reported")
    assert pipeline.alive


def test_warm_up_on_a_device_that_cannot_run_gives_way_to_the_fallback(
        hailo: Hailo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hailo_backend, "TIMEOUT_MS", 300)
    hailo_standin.hang(hailo.device, on=True)
    with DinoEmbedder(hailo.model, backend=hailo_config(hailo, fallback="onnx")) as embedder:
        assert embedder.backend.type_key == "hailo"  # it opened
        embedder.warm_up()
        assert embedder.backend.type_key == "onnx"
        assert embedder.fallback and "timeout" in embedder.fallback.lower()
    with DinoEmbedder(hailo.model, backend=hailo_config(hailo)) as embedder, \
            pytest.raises(BackendFailed):
        embedder.warm_up()


def test_a_missing_hef_is_a_config_error_and_one_gone_since_is_a_start_failure(
        tmp_path: Path, hailo: Hailo) -> None:
    # A typo is not a device condition: exit 78 (systemd does not restart), fallback or not.
    for fallback in (None, "onnx"):
        config, _ = daemon_config(tmp_path, Hailo(hailo.device, tmp_path / "typo.hef",
                                                  hailo.model), None, "hef-pi",
                                  fallback=fallback)
        for command in ("check-config", "run"):
            result = subprocess.run([*DINOWATCH, command, "-c", str(config)],
                                    capture_output=True, text=True, timeout=60, check=False)
            assert result.returncode == 78, result.stderr
            assert f"backend.hef: {tmp_path / 'typo.hef'} is not a file" in \
                result.stdout + result.stderr
    # Deleted after the config was read: the backend cannot start, and says why.
    configured, with_fallback = hailo_config(hailo), hailo_config(hailo, fallback="onnx")
    hailo.hef.unlink()
    with pytest.raises(BackendUnavailable, match=r"backend\.hef: .* no such file \(any more\)"):
        DinoEmbedder(hailo.model, backend=configured)
    with DinoEmbedder(hailo.model, backend=with_fallback) as embedder:
        assert embedder.backend.type_key == "onnx"
        assert embedder.fallback and "no such file (any more)" in embedder.fallback


def test_an_unquoted_device_id_is_a_config_error_that_says_to_quote_it(
        tmp_path: Path, hailo: Hailo) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{path: {hailo.model}}}\nwatch: [{{path: {tmp_path}}}]\n"
                      f"backend: {{type: hailo, hef: {hailo.hef}, device: 0001:01:00.0}}\n")
    result = subprocess.run([*DINOWATCH, "check-config", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 78
    assert 'backend.device: quote the device id, e.g. device: "0001:01:00.0"' in \
        result.stdout + result.stderr


# -- the real daemon ------------------------------------------------------------------------

def daemon_config(tmp_path: Path, hailo: Hailo, broker: object | None, device_id: str,
                  **backend: object) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    mqtt = {"host": broker.host, "port": broker.port} if broker else None  # type: ignore[attr-defined]
    config = write_config(
        tmp_path / "config.yaml", device_id=device_id, data_dir=str(tmp_path / "data"),
        model={"path": str(hailo.model)},
        backend={"type": "hailo", "hef": str(hailo.hef), "batch": 4, **backend},
        watch=[{"path": str(inbox), "settle_seconds": 0.3}], mqtt=mqtt)
    return config, inbox


def drop(staged: list[Path], inbox: Path) -> None:
    for path in staged:
        part = inbox / f".{path.name}.part"
        part.write_bytes(path.read_bytes())
        part.rename(inbox / path.name)


def daemon_stats(config: Path, env: dict[str, str] | None = None) -> dict[str, object]:
    result = subprocess.run([*DINOWATCH, "status", "-c", str(config), "--json"],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["daemon"]


def test_daemon_on_hailo_publishes_vectors_that_match_the_cpu_backend(
        hailo: Hailo, tmp_path: Path, broker: object,
        subscriber_factory: Callable[..., object]) -> None:
    config, inbox = daemon_config(tmp_path, hailo, broker, "hailo-pi")
    subscriber = subscriber_factory(broker, "dinowatch/hailo-pi/embedding")
    staged = write_photos(tmp_path / "staging", 6, seed=20)
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.start()
        drop(staged, inbox)
        messages = subscriber.wait_for(lambda m: len(m) >= len(staged), timeout=90)  # type: ignore[attr-defined]
        wait_until(lambda: daemon_stats(config).get("processed") == len(staged), 60,
                   "the daemon's stats")
        stats = daemon_stats(config)
        assert daemon.stop() == 0, daemon.log()
    assert stats["backend"] == "hailo" and "backend_fallback" not in stats
    payloads = {Path(p["path"]).name: p for p in (json.loads(m.payload) for m in messages)}
    assert set(payloads) == {path.name for path in staged}
    vectors = np.stack([np.frombuffer(base64.b64decode(payloads[p.name]["vector"]), "<f4")
                        for p in staged])
    with DinoEmbedder(hailo.model, imaging=ImagingSettings().options()) as on_cpu:
        expected = on_cpu.embed_batch(staged)
        assert {p["model"]["sha256"] for p in payloads.values()} == {on_cpu.model_sha256}
    assert cosines(vectors, expected).min() >= 0.999


@pytest.mark.parametrize("start_failure", START_FAILURES, ids=lambda f: f.name,
                         indirect=True)
def test_daemon_start_failure_exits_1_without_fallback_and_runs_on_cpu_with_it(
        start_failure: tuple[StartFailure, Hailo], tmp_path: Path) -> None:
    failure, hailo = start_failure
    config, inbox = daemon_config(tmp_path, hailo, None, "hailo-fail", **dict(failure.options))
    run = subprocess.run([*DINOWATCH, "run", "-c", str(config)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 1, run.stderr
    assert re.search(failure.message, run.stderr), run.stderr

    config, inbox = daemon_config(tmp_path, hailo, None, "hailo-fail", fallback="onnx",
                                  **dict(failure.options))
    [image] = write_photos(tmp_path / "staging", 1, seed=30)
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.start()
        drop([image], inbox)
        store = Store(tmp_path / "data" / "dinowatch.db")
        try:
            wait_until(lambda: (row := store.image(str(inbox / image.name))) is not None
                       and row.status == "done", 60, "the image embedded on the CPU")
        finally:
            store.close()
        assert daemon.stop() == 0, daemon.log()
        log = daemon.log()
    assert log.count("running on onnx instead (backend.fallback)") == 1, log
    status = subprocess.run([*DINOWATCH, "status", "-c", str(config)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert status.returncode == 0, status.stderr
    assert "backend: onnx (FALLBACK: " in status.stdout, status.stdout
    stats = daemon_stats(config)
    assert stats["backend"] == "onnx"
    assert re.search(failure.message, str(stats["backend_fallback"]))


def test_device_lost_at_run_time_fails_the_files_then_retries_them_when_it_returns(
        hailo: Hailo, tmp_path: Path, broker: object,
        subscriber_factory: Callable[..., object]) -> None:
    config, inbox = daemon_config(tmp_path, hailo, broker, "lost-pi")
    subscriber = subscriber_factory(broker, "dinowatch/lost-pi/embedding",
                                    "dinowatch/lost-pi/error")
    first, second = write_photos(tmp_path / "staging", 2, seed=40)
    store = Store(tmp_path / "data" / "dinowatch.db")
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.start()
        hailo_standin.unplug(hailo.device)
        drop([first], inbox)
        wait_until(lambda: (row := store.image(str(inbox / first.name))) is not None
                   and row.status == "failed", 60, "the file failed while the device is gone")
        row = store.image(str(inbox / first.name))
        assert row is not None and row.error and "Hailo inference failed" in row.error
        wait_until(lambda: "backend_error" in daemon_stats(config), 30,
                   "stats saying inference waits for its backend")
        status = subprocess.run([*DINOWATCH, "status", "-c", str(config)], capture_output=True,
                                text=True, timeout=60, check=False)
        assert "backend: hailo (WAITING: no Hailo device" in status.stdout, status.stdout
        drop([second], inbox)  # arrives while the device is still gone
        wait_until(lambda: (row := store.image(str(inbox / second.name))) is not None
                   and row.status == "failed", 60, "the second file failed too")
        hailo_standin.replug(hailo.device)
        wait_until(lambda: all((row := store.image(str(inbox / p.name))) is not None
                               and row.status == "done" for p in (first, second)), 90,
                   "both files retried once the device is back")
        messages = subscriber.wait_for(  # type: ignore[attr-defined]
            lambda m: sum(x.topic.endswith("/embedding") for x in m) >= 2, timeout=30)
        wait_until(lambda: "backend_error" not in daemon_stats(config), 30,
                   "stats saying the device runs again")
        assert daemon.stop() == 0, daemon.log()
    store.close()
    assert daemon_stats(config)["backend"] == "hailo"
    errors = [json.loads(m.payload) for m in messages if m.topic.endswith("/error")]
    assert {Path(e["path"]).name for e in errors} == {first.name, second.name}
    assert "inference runs again, on hailo" in daemon.log()


def test_device_lost_at_run_time_with_fallback_moves_to_the_cpu(
        hailo: Hailo, tmp_path: Path) -> None:
    config, inbox = daemon_config(tmp_path, hailo, None, "fallback-pi", fallback="onnx")
    staged = write_photos(tmp_path / "staging", 5, seed=50)
    store = Store(tmp_path / "data" / "dinowatch.db")
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.start()
        hailo_standin.unplug(hailo.device)
        drop(staged, inbox)
        wait_until(lambda: all((row := store.image(str(inbox / p.name))) is not None
                               and row.status == "done" for p in staged), 90,
                   "every file embedded on the CPU after the device left")
        wait_until(lambda: daemon_stats(config).get("backend") == "onnx", 60,
                   "stats naming the fallback")
        stats = daemon_stats(config)
        assert daemon.stop() == 0, daemon.log()
        log = daemon.log()
    with DinoEmbedder(hailo.model, imaging=ImagingSettings().options()) as on_cpu:
        for path in staged:
            stored = store.known(store.image(str(inbox / path.name)).sha256 or "",  # type: ignore[union-attr]
                                 on_cpu.model_sha256)
            assert stored is not None
            assert float(stored[0] @ on_cpu.embed(path)) >= 0.999
    store.close()
    assert "backend_fallback" in stats
    assert "inference runs again, on onnx (the fallback)" in log


def test_backends_compare_prints_hailo_and_the_cpu_reference(hailo: Hailo,
                                                             tmp_path: Path) -> None:
    config, _ = daemon_config(tmp_path, hailo, None, "compare-pi")
    images = write_photos(tmp_path / "images", 5, seed=60)
    result = subprocess.run([*DINOWATCH, "backends", "compare", "--images",
                             str(images[0].parent), "-c", str(config)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split()}
    assert rows["compared"][2] == "hailo", result.stdout
    assert rows["reference"][2] == "onnx", result.stdout
    as_json = subprocess.run([*DINOWATCH, "backends", "compare", "--images",
                              str(images[0].parent), "-c", str(config), "--json"],
                             capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(as_json.stdout)
    assert report["images"] == 5
    assert report["compared"]["backend"] == "hailo"
    assert report["reference"]["backend"] == "onnx"
    assert report["cosine_min"] >= 0.999


def test_compare_refuses_the_fallback_and_bench_names_it(
        hailo: Hailo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon holds the device, say: with `fallback: onnx` the configured side would be
    # ONNX Runtime too, and a cosine of 1.0 would look like a perfect HEF.
    monkeypatch.setenv("HAILO_STANDIN_DEVICE", str(tmp_path / "nothing-here"))
    config, _ = daemon_config(tmp_path, hailo, None, "compare-pi", fallback="onnx")
    images = write_photos(tmp_path / "images", 2, seed=70)
    result = subprocess.run([*DINOWATCH, "backends", "compare", "--images",
                             str(images[0].parent), "-c", str(config)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1
    assert "the configured backend did not start, so there is nothing to compare with the " \
        "CPU: no Hailo device" in result.stderr
    assert result.stdout == ""
    bench = subprocess.run([*DINOWATCH, "bench", "--images", str(images[0].parent), "--count",
                            "2", "-c", str(config)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert bench.returncode == 0, bench.stderr  # it measures what would run: say so
    assert "on onnx (FALLBACK: no Hailo device" in bench.stdout, bench.stdout


def test_bench_on_hailo_leaves_the_model_out_of_the_cpu_floor(hailo: Hailo,
                                                              tmp_path: Path) -> None:
    config, _ = daemon_config(tmp_path, hailo, None, "bench-pi")
    # big enough that the stages' CPU ms, rounded to 0.1 in the report, sum up accurately
    images = write_photos(tmp_path / "images", 4, seed=80, size=(1600, 1200))
    result = subprocess.run([*DINOWATCH, "bench", "--images", str(images[0].parent),
                             "--count", "4", "-c", str(config), "--json"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backend"] == "hailo" and report["images"] == 4
    assert report["floor"]["gmacs"] == {}
    host = sum(ms for stage, ms in report["cpu_ms_per_image"].items() if stage != "inference")
    assert report["floor_images_per_s"] == pytest.approx(report["cores"] / (host / 1000),
                                                         rel=0.1)


# -- review: accounting for commands that wait for `queued == 0`, shutdown, searches ---------

def test_files_retried_after_a_device_failure_are_not_counted_failed_nor_left_behind(
        hailo: Hailo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        pipeline_on: Callable[[DinoEmbedder], Pipeline]) -> None:
    # `dinowatch index` waits for queued == 0 and prints what failed: a file that failed on
    # the device and is embedded on the retry must neither end the wait early (opening the
    # device takes time) nor count as failed.
    monkeypatch.setattr(hailo_backend, "TIMEOUT_MS", 300)
    opened = hailo_backend.HailoBackend._open

    def slow_open(self: hailo_backend.HailoBackend, device: str) -> object:
        time.sleep(1.0)  # loading a HEF onto a device is not instant
        return opened(self, device)

    embedder = DinoEmbedder(hailo.model, backend=hailo_config(hailo, batch=4))
    monkeypatch.setattr(hailo_backend.HailoBackend, "_open", slow_open)
    pipeline = pipeline_on(embedder)
    images = write_photos(tmp_path / "images", 2, seed=120)
    hailo_standin.hang(hailo.device, on=True)
    for path in images:
        pipeline.submit(path, "test")
    time.sleep(0.5)
    hailo_standin.hang(hailo.device, on=False)
    deadline = time.monotonic() + 30
    while (pipeline.queued and not pipeline.stalled) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert statuses(pipeline, images) == ["done", "done"]
    assert pipeline.still_failed == 0 and pipeline.failed >= 1


def test_a_device_that_never_returns_stalls_rather_than_hangs_index(
        hailo: Hailo, tmp_path: Path, pipeline_on: Callable[[DinoEmbedder], Pipeline]) -> None:
    pipeline = pipeline_on(DinoEmbedder(hailo.model, backend=hailo_config(hailo)))
    hailo_standin.unplug(hailo.device)
    images = write_photos(tmp_path / "images", 5, seed=130)
    for path in images:
        pipeline.submit(path, "test")
    wait_until(lambda: pipeline.stalled, 30, "the pipeline stalled on the missing device")
    assert pipeline.queued == 5 and pipeline.still_failed == 5
    assert "no Hailo device" in (pipeline.backend_error or "")


def test_stopping_during_a_hung_batch_does_not_open_the_device_again(
        hailo: Hailo, tmp_path: Path) -> None:
    embedder = DinoEmbedder(hailo.model, backend=hailo_config(hailo))
    store = Store(tmp_path / "stop.db")
    pipeline = Pipeline(embedder, store)
    pipeline.start()
    hailo_standin.hang(hailo.device, on=True)
    [image] = write_photos(tmp_path / "images", 1, seed=140)
    pipeline.submit(image, "test")
    time.sleep(3)  # on the device, which does not answer within TIMEOUT_MS (10 s)
    assert not pipeline.stop(1.0)  # as the daemon's shutdown: then it closes the embedder
    store.close(timeout=1)
    embedder.close()
    time.sleep(2)
    assert getattr(embedder.backend, "_configured", None) is None  # nothing opened again
    with DinoEmbedder(hailo.model, backend=hailo_config(hailo)) as next_start:  # device free
        assert next_start.backend.type_key == "hailo"
