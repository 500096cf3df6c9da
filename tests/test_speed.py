"""Speed work, checked for behaviour: `dinowatch model quantize` (INT8 file, model card,
fidelity), the daemon running the INT8 model, `dinowatch bench`, the per-stage CPU clock in
`stats` and the DEBUG timings. Real `dinowatch` processes, real files, a real Mosquitto; the
tiny stand-in model throughout (nothing here depends on the model's size). No timing is
asserted: how fast is for benchmarks/."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from daemon_process import DaemonProcess, wait_until, write_config
from dinowatch import DinoEmbedder
from dinowatch.config import ImagingSettings
from dinowatch.models import INT8_MODEL, REGISTRY, STAND_IN_PRODUCER
from dinowatch.testing import VARIANTS, write_photos

DINOWATCH = [sys.executable, "-m", "dinowatch.cli"]
INT8_FILE = REGISTRY[INT8_MODEL].filename  # dinov2_vits14_int8.onnx
STAGES = {"read", "hash", "decode", "inference", "record"}
# Neither the caller's config nor its model cache: each test says which it uses.
AMBIENT = {key: value for key, value in os.environ.items()
           if key not in ("DINOWATCH_CONFIG", "DINOWATCH_MODEL_DIR")}


def dinowatch(*args: object, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*DINOWATCH, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**AMBIENT, **(env or {})}, check=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def card_of(model: Path) -> dict:
    return json.loads(model.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> SimpleNamespace:
    """`dinowatch model quantize --model TINY --images DIR --dir CACHE`, run once: DIR holds
    four pictures and one file named like a JPEG that is not one."""
    root = tmp_path_factory.mktemp("quantize")
    images = root / "images"
    good = write_photos(images, 4, seed=10)
    (images / "notes.jpg").write_text("not a picture")
    cache = root / "cache"
    result = dinowatch("model", "quantize", "--model", tiny_model, "--images", images,
                       "--dir", cache)
    return SimpleNamespace(result=result, cache=cache, model=cache / INT8_FILE,
                           images=images, good=good)


def test_quantize_writes_an_int8_model_and_a_card_that_pins_it(quantized, tiny_model: Path,
                                                                report) -> None:
    result = quantized.result
    assert result.returncode == 0, result.stderr
    model = quantized.model
    assert model.is_file() and model.with_suffix(".json").is_file()
    card = card_of(model)
    assert card["name"] == INT8_MODEL and card["base"] == "dinov2-vits14"
    assert card["sha256"] == sha256(model) and card["size"] == model.stat().st_size
    assert card["base_sha256"] == sha256(tiny_model)
    assert card["base_pinned"] is False  # the stand-in is not the registry's file
    fidelity = card["fidelity"]
    # The undecodable notes.jpg is skipped: the fidelity is over the four real pictures.
    assert fidelity["images"] == len(quantized.good) == 4
    assert "notes.jpg" in result.stderr  # ... and the skip is said
    report(f"INT8 fidelity, tiny stand-in, 4 images: mean {fidelity['mean']}, "
           f"min {fidelity['min']}")
    # Measured on the tiny stand-in: mean 0.99951, min 0.99936. Per-channel INT8 weights on
    # one block cost about a thousandth of cosine; below 0.99 the quantization is broken.
    assert 0.99 <= fidelity["min"] <= fidelity["mean"] <= 1.0
    # The output names the fidelity, with the card's numbers.
    assert (f"fidelity to dinov2-vits14 on 4 images: mean cosine {fidelity['mean']:.5f}, "
            f"min {fidelity['min']:.5f}") in result.stdout
    assert str(model) in result.stdout

    graph = onnx.load(str(model))
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("MatMulInteger") == 4  # qkv, proj, fc1, fc2 of the one block
    assert model.stat().st_size < tiny_model.stat().st_size / 2
    # Still signed as the stand-in it was made from, so nobody takes it for DINOv2.
    assert graph.producer_name == STAND_IN_PRODUCER
    with DinoEmbedder(model_name=INT8_MODEL, cache_dir=quantized.cache) as embedder:
        identity = embedder.identity
    assert identity.name == f"stand-in:{INT8_MODEL}" and identity.stand_in
    assert identity.sha256 == card["sha256"] and identity.pinned is False
    assert identity.fidelity is not None and identity.fidelity.images == 4


def test_quantize_without_images_or_config_says_to_give_images(tmp_path: Path,
                                                               tiny_model: Path) -> None:
    result = dinowatch("model", "quantize", "--model", tiny_model, "--dir", tmp_path / "cache")
    assert result.returncode == 1
    assert "--images" in result.stderr and "-c CONFIG" in result.stderr
    assert not (tmp_path / "cache" / INT8_FILE).exists()


def test_quantize_without_images_says_so_before_looking_for_the_model(tmp_path: Path) -> None:
    # No --model, no config, no --images: the usage error needs no model. Offline, with an
    # empty model cache, the model lookup fails instead (online it fetches 87 MB first).
    result = dinowatch("model", "quantize",
                       env={"DINOWATCH_OFFLINE": "1", "DINOWATCH_MODEL_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert "--images" in result.stderr


def test_quantize_with_a_config_uses_its_model_data_dir_and_watched_folders(
        tmp_path: Path, tiny_model: Path) -> None:
    front, back = tmp_path / "front", tmp_path / "back"
    write_photos(front, 2, seed=20)
    write_photos(back / "sub", 1, seed=30)  # watch folders are recursive by default
    (back / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (back / "readme.txt").write_text("not an image name: never even listed")
    data = tmp_path / "data"
    config = write_config(tmp_path / "config.yaml", data_dir=str(data),
                          model={"path": str(tiny_model)},
                          watch=[{"path": str(front)}, {"path": str(back)}], mqtt=None)
    result = dinowatch("model", "quantize", "-c", config)
    assert result.returncode == 0, result.stderr
    model = data / "models" / INT8_FILE
    card = card_of(model)
    assert card["sha256"] == sha256(model)
    assert card["base_sha256"] == sha256(tiny_model)  # model.path was the source
    assert card["fidelity"]["images"] == 3  # the watched folders' three pictures
    assert "on 3 images" in result.stdout
    assert "broken.png" in result.stderr


@pytest.fixture
def int8_daemon(tmp_path: Path, quantized, broker) -> SimpleNamespace:
    """A config that runs the INT8 model by name from data_dir/models (no model.path)."""
    assert quantized.result.returncode == 0, quantized.result.stderr
    data, inbox = tmp_path / "data", tmp_path / "inbox"
    inbox.mkdir()
    (data / "models").mkdir(parents=True)
    for suffix in (".onnx", ".json"):
        shutil.copy2(quantized.model.with_suffix(suffix), data / "models")
    config = write_config(tmp_path / "config.yaml", device_id="int8-pi", data_dir=str(data),
                          model={"name": INT8_MODEL},
                          watch=[{"path": str(inbox), "settle_seconds": 0.5}],
                          mqtt={"host": broker.host, "port": broker.port})
    return SimpleNamespace(config=config, data=data, inbox=inbox,
                           model=data / "models" / INT8_FILE)


def test_the_daemon_runs_the_int8_model_and_says_so(int8_daemon, broker, subscriber_factory,
                                                    tmp_path: Path, tiny_model: Path,
                                                    report) -> None:
    topic = "dinowatch/int8-pi"
    subscriber = subscriber_factory(broker, f"{topic}/embedding")
    card = card_of(int8_daemon.model)
    # ~1.7 MB camera-quality JPEGs: reading and hashing them shows on the CPU clock.
    staged = write_photos(tmp_path / "staging", 4, seed=40, size=(2400, 1800), quality=95)
    with DaemonProcess(int8_daemon.config, tmp_path) as daemon:
        daemon.start()
        for path in staged:
            shutil.copy2(path, int8_daemon.inbox / f".{path.name}.part")
            (int8_daemon.inbox / f".{path.name}.part").rename(int8_daemon.inbox / path.name)
        messages = subscriber.wait_for(lambda m: len(m) >= len(staged), timeout=90)
        assert daemon.stop() == 0, daemon.log()
    # after the stop: the daemon's stats (what `status` shows of its model) are then written
    status = dinowatch("status", "-c", int8_daemon.config, timeout=60)
    payloads = {Path(p["path"]).name: p for p in (json.loads(m.payload) for m in messages)}
    assert set(payloads) == {path.name for path in staged}
    expected_model = {"name": f"stand-in:{INT8_MODEL}", "sha256": card["sha256"],
                      "pinned": False, "stand_in": True, "fidelity": card["fidelity"]}
    with DinoEmbedder(tiny_model, imaging=ImagingSettings().options()) as fp32:
        cosines = []
        for path in staged:
            payload = payloads[path.name]
            assert payload["model"] == expected_model
            vector = np.frombuffer(base64.b64decode(payload["vector"]), dtype="<f4")
            cosines.append(float(vector @ fp32.embed(path)))
    report(f"daemon INT8 vs fp32 tiny stand-in, 4 images: cosine min {min(cosines):.5f}")
    assert min(cosines) >= 0.99

    assert status.returncode == 0, status.stderr
    fidelity = card["fidelity"]
    assert (f"model fidelity: cosine to its fp32 base on {fidelity['images']} images: mean "
            f"{fidelity['mean']}, min {fidelity['min']}") in status.stdout.splitlines()
    assert f"model: stand-in:{INT8_MODEL} (sha256 {card['sha256'][:12]}" in status.stdout

    final = dinowatch("status", "-c", int8_daemon.config, "--json", timeout=60)
    assert final.returncode == 0, final.stderr
    stats = json.loads(final.stdout)["daemon"]  # the last figures, written at the stop
    assert stats["processed"] == len(staged) and stats["inferred"] == len(staged)
    assert stats["model"] == expected_model
    cpu = stats["cpu_seconds"]
    report(f"daemon CPU seconds by stage, 4 images of 2400x1800, INT8 tiny stand-in: {cpu}")
    assert set(cpu) == STAGES
    assert all(cpu[stage] > 0 for stage in STAGES), cpu


def test_the_daemon_refuses_an_int8_model_that_is_missing(tmp_path: Path) -> None:
    inbox, cache = tmp_path / "inbox", tmp_path / "models"
    inbox.mkdir()
    cache.mkdir()
    config = write_config(tmp_path / "config.yaml", data_dir=str(tmp_path / "data"),
                          model={"name": INT8_MODEL}, watch=[{"path": str(inbox)}], mqtt=None)
    result = dinowatch("run", "-c", config, env={"DINOWATCH_MODEL_DIR": str(cache)},
                       timeout=120)
    # The daemon's exit code for a model it cannot open: 1 (a runtime failure, not 78).
    assert result.returncode == 1, result.stderr
    assert f"{cache / INT8_FILE} is missing" in result.stderr
    assert "run `dinowatch model quantize dinov2-vits14`" in result.stderr


def test_the_daemon_refuses_an_int8_model_changed_after_its_card(int8_daemon) -> None:
    model = int8_daemon.model
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    model.write_bytes(bytes(data))
    result = dinowatch("run", "-c", int8_daemon.config, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"{model} does not match its model card" in result.stderr
    assert "run `dinowatch model quantize dinov2-vits14`" in result.stderr


def expected_gmacs(variant: str) -> float:
    """Multiply-accumulates of one image through a dinowatch.testing ViT, from its shape:
    the patch Conv, then per block the qkv, attention (scores and mix), proj, fc1 and fc2
    matrix products on every token."""
    s = VARIANTS[variant]
    grid, tokens, dim = s.image_size // s.patch, s.tokens, s.dim
    patch_embed = grid * grid * dim * 3 * s.patch * s.patch
    block = (tokens * dim * 3 * dim  # qkv
             + 2 * tokens * tokens * dim  # q k^T and softmax v, over all heads
             + tokens * dim * dim  # proj
             + 2 * tokens * dim * s.mlp_ratio * dim)  # fc1, fc2
    return (patch_embed + s.depth * block) / 1e9


def bench(*args: object) -> dict:
    result = dinowatch("bench", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # exactly one JSON object, nothing else on stdout


def check_bench(measured: dict, images: int) -> None:
    assert measured["images"] == images
    assert measured["images_per_s"] > 0
    assert 0 < measured["latency_ms_p50"] <= measured["latency_ms_p95"]
    assert set(measured["cpu_ms_per_image"]) == STAGES
    assert measured["cpu_ms_per_image"]["inference"] > 0
    assert measured["floor_images_per_s"] > 0 and measured["ratio_to_floor"] > 0
    assert measured["cores"] == os.cpu_count()
    assert all(rate > 0 for rate in measured["floor"]["gmacs_per_core_second"].values())
    assert set(measured["floor"]["gmacs_per_core_second"]) == set(measured["floor"]["gmacs"])


def test_bench_measures_the_tiny_model_on_given_images(tmp_path: Path, tiny_model: Path) -> None:
    write_photos(tmp_path / "images", 4, seed=50)
    measured = bench("--model", tiny_model, "--images", tmp_path / "images", "--count", 3)
    check_bench(measured, images=3)  # --count 3 of the folder's 4
    assert measured["model"] == "stand-in:tiny.onnx"
    gmacs = measured["floor"]["gmacs"]
    assert set(gmacs) == {"fp32"}
    assert math.isclose(gmacs["fp32"], expected_gmacs("tiny"), rel_tol=0.01), gmacs


def test_bench_counts_the_int8_models_integer_multiplies(quantized, tmp_path: Path) -> None:
    assert quantized.result.returncode == 0, quantized.result.stderr
    write_photos(tmp_path / "images", 2, seed=60)
    measured = bench("--model", quantized.model, "--images", tmp_path / "images", "--count", 2)
    check_bench(measured, images=2)
    gmacs = measured["floor"]["gmacs"]
    assert gmacs["int8"] > gmacs["fp32"] > 0, gmacs


def test_bench_int8_model_does_the_same_multiplies_as_its_base(quantized) -> None:
    from dinowatch.bench import model_macs

    gmacs = model_macs(quantized.model)
    # Quantizing changes the number type of each multiply, not how many there are.
    assert math.isclose(sum(gmacs.values()), expected_gmacs("tiny"), rel_tol=0.01), gmacs


def test_bench_without_images_makes_its_own(tiny_model: Path) -> None:
    # No config, no --images: two generated 12 MP camera JPEGs.
    measured = bench("--model", tiny_model, "--count", 2)
    check_bench(measured, images=2)
    assert math.isclose(measured["floor"]["gmacs"]["fp32"], expected_gmacs("tiny"),
                        rel_tol=0.01)


def test_debug_logging_shows_each_images_timings_and_the_puback(
        tmp_path: Path, tiny_model: Path, broker, subscriber_factory) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = write_config(tmp_path / "config.yaml", device_id="timings-pi",
                          data_dir=str(tmp_path / "data"), model={"path": str(tiny_model)},
                          watch=[{"path": str(inbox), "settle_seconds": 0.5}],
                          mqtt={"host": broker.host, "port": broker.port},
                          logging={"level": "DEBUG"})
    subscriber = subscriber_factory(broker, "dinowatch/timings-pi/embedding")
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.start()
        [dropped] = write_photos(inbox, 1, seed=70)
        subscriber.wait_for(lambda m: len(m) >= 1, timeout=60)
        line = re.compile(rf"timings {re.escape(str(dropped))}: written -> event -?\d+ ms, "
                          r"waited for a decoder -?\d+, read\+hash\+decode -?\d+, waited for "
                          r"the model -?\d+, inference -?\d+ \(batch of 1\), match\+commit "
                          r"-?\d+; written -> committed -?\d+ ms")
        wait_until(lambda: line.search(daemon.log()), 30, "the timings line in the log")
        wait_until(lambda: re.search(r"PUBACK for outbox message \d+, [\d.]+ ms after it was "
                                     "sent", daemon.log()), 30, "the PUBACK line in the log")
        assert daemon.stop() == 0


def test_quantize_refuses_a_model_that_is_quantized_already(quantized, tmp_path: Path) -> None:
    # Quantizing the INT8 file again would measure it against itself (cosine 1.0) and store
    # that as its fidelity.
    again = dinowatch("model", "quantize", "--model", quantized.model, "--images",
                      quantized.images, "--dir", tmp_path / "cache")
    assert again.returncode == 1
    assert str(quantized.model) in again.stderr and "fp32" in again.stderr
    assert not (tmp_path / "cache" / INT8_FILE).exists()
    bare = tmp_path / "bare.onnx"  # the same graph without its card beside it
    shutil.copy(quantized.model, bare)
    result = dinowatch("model", "quantize", "--model", bare, "--images", quantized.images,
                       "--dir", tmp_path / "cache")
    assert result.returncode == 1 and "quantized already (" in result.stderr


def test_bench_names_a_missing_image_folder(tmp_path: Path, tiny_model: Path) -> None:
    result = dinowatch("bench", "--model", tiny_model, "--images", tmp_path / "nowhere")
    assert result.returncode == 1
    assert f"cannot list {tmp_path / 'nowhere'}" in result.stderr
    assert "Traceback" not in result.stderr


def test_backends_compare_prints_both_models_fidelity_and_speed(quantized,
                                                                tiny_model: Path) -> None:
    # The check a user runs after making a model (a HEF, an INT8 file): on the same pictures
    # quantize measured, the fidelity is the card's.
    card = card_of(quantized.model)
    result = dinowatch("backends", "compare", "--images", quantized.images, "--model",
                       quantized.model, "--reference-model", tiny_model, "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["images"] == 4  # notes.jpg does not decode: skipped, and said
    assert "notes.jpg" in result.stderr
    assert figures["cosine_mean"] == pytest.approx(card["fidelity"]["mean"], abs=1e-4)
    assert figures["cosine_min"] == pytest.approx(card["fidelity"]["min"], abs=1e-4)
    assert figures["reference"]["model"] == "stand-in:tiny.onnx"
    assert figures["compared"]["model"] == f"stand-in:{INT8_FILE}"
    for side in ("reference", "compared"):
        assert figures[side]["backend"] == "onnx"
        assert figures[side]["inference_ms_per_image"] > 0
    table = dinowatch("backends", "compare", "--images", quantized.images, "--model",
                      quantized.model, "--reference-model", tiny_model)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].split()[:3] == ["reference", "stand-in:tiny.onnx", "onnx"]
    assert lines[2].split()[:3] == ["compared", f"stand-in:{INT8_FILE}", "onnx"]
    assert (f"cosine of the compared vectors to the reference's, 4 images: mean "
            f"{figures['cosine_mean']:.6f}") in table.stdout


def test_backends_compare_of_an_empty_folder_says_so(tmp_path: Path, tiny_model: Path) -> None:
    result = dinowatch("backends", "compare", "--images", tmp_path, "--model", tiny_model,
                       "--reference-model", tiny_model)
    assert result.returncode == 1 and f"no images in {tmp_path}" in result.stderr
