"""The HailoRT stand-in (tests/hailo_standin) itself: HailoRT's layout, errors and numbers.

Each test would fail if the stand-in let through something the real HailoRT 4.23 rejects
(hailo-ai/hailort@hailo8, v4.23.0), or computed other vectors than the ONNX model.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dinowatch.testing import synthetic_photo

STANDIN = Path(__file__).resolve().parent / "hailo_standin"
sys.path.insert(0, str(STANDIN))

import hailo_platform as hp  # noqa: E402
from hailo_platform.pyhailort import pyhailort  # noqa: E402

import hailo_standin  # noqa: E402

MEAN, STD = np.float32(hailo_standin.IMAGENET_MEAN), np.float32(hailo_standin.IMAGENET_STD)


@pytest.fixture
def device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = hailo_standin.make_device(tmp_path / "hailo0")
    monkeypatch.setenv(hailo_standin.ENV, str(folder))
    return folder


@pytest.fixture
def hef(tmp_path: Path, tiny_model: Path) -> Path:
    return hailo_standin.write_hef(tmp_path / "tiny.hef", tiny_model)


def round_robin() -> Any:
    params = hp.VDevice.create_params()
    params.scheduling_algorithm = hp.HailoSchedulingAlgorithm.ROUND_ROBIN
    return params


@pytest.fixture
def vdevice(device: Path) -> Iterator[Any]:
    with hp.VDevice(round_robin()) as vdevice:
        yield vdevice


def frame(seed: int) -> np.ndarray:
    return np.asarray(synthetic_photo(224, 224, seed=seed), dtype=np.uint8)


def cpu_cls(model: Path, frames: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = ((frames.astype(np.float32) - MEAN) / STD).transpose(0, 3, 1, 2)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def bind(cim: Any, image: np.ndarray, dtype: Any = np.uint8, size: int = 384) -> Any:
    return cim.create_bindings(input_buffers={"dinov2_vits14/input_layer1": image},
                               output_buffers={"dinov2_vits14/output_layer1":
                                               np.zeros(size, dtype)})


def status(err: pytest.ExceptionInfo[Exception]) -> str:
    return str(err.value).removeprefix("libhailort failed with error: ")


def test_module_layout_is_hailorts() -> None:
    for name in ("VDevice", "HEF", "FormatType", "HailoSchedulingAlgorithm",
                 "HailoStreamInterface", "ConfigureParams", "Device", "AsyncInferJob",
                 "HailoRTException", "HailoRTStreamAbortedByUser",
                 "HailoCommunicationClosedException"):
        assert hasattr(hp, name), name
    assert hp.__version__ == "4.23.0"
    for name in ("HailoRTTimeout", "HailoRTInvalidOperationException",
                 "HailoRTInvalidArgumentException", "HailoRTNotFoundException",
                 "HailoRTInvalidHEFException", "HailoRTHEFNotCompatibleWithDevice",
                 "HailoRTDriverOperationFailedException"):
        assert not hasattr(hp, name), f"{name} is only in hailo_platform.pyhailort.pyhailort"
        assert issubclass(getattr(pyhailort, name), hp.HailoRTException)
    assert not hasattr(hp, "DeviceArchitectureTypes")
    assert [a.name for a in hp.HailoSchedulingAlgorithm] == ["NONE", "ROUND_ROBIN"]
    assert hp.VDevice.create_params().scheduling_algorithm == 0  # NONE, as a plain int


def test_without_a_device_there_is_nothing_to_open(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hailo_standin.ENV, raising=False)
    assert hp.Device.scan() == []
    monkeypatch.setenv(hailo_standin.ENV, str(tmp_path / "nothing-here"))
    with pytest.raises(hp.HailoRTException) as err:
        hp.VDevice(round_robin())
    assert type(err.value) is hp.HailoRTException
    assert str(err.value) == "libhailort failed with error: 74 (HAILO_OUT_OF_PHYSICAL_DEVICES)"


def test_identify_names_the_chip(device: Path) -> None:
    assert hp.Device.scan() == ["0001:01:00.0"]
    assert str(hp.Device().control.identify().device_architecture) == "HAILO8"
    hailo_standin.make_device(device, architecture="HAILO8L")
    arch = hp.Device(hp.Device.scan()[0]).control.identify().device_architecture
    assert arch == pyhailort.DeviceArchitectureTypes.HAILO8L and str(arch) == "HAILO8L"


def test_inference_needs_the_scheduler_or_activate(device: Path, hef: Path) -> None:
    with hp.VDevice() as vdevice:  # the Python default: no scheduler
        model = vdevice.create_infer_model(str(hef))
        with model.configure() as cim:
            with pytest.raises(hp.HailoRTException) as err:
                cim.run([bind(cim, frame(0))], 5000)
            assert status(err) == "72 (HAILO_STREAM_NOT_ACTIVATED)"
        with model.configure() as cim:
            cim.activate()
            cim.run([bind(cim, frame(0))], 5000)
        del model, cim
    with hp.VDevice(round_robin()) as vdevice, \
            vdevice.create_infer_model(str(hef)).configure() as cim:
        with pytest.raises(pyhailort.HailoRTInvalidOperationException):
            cim.activate()  # not allowed under the scheduler
        cim.run([bind(cim, frame(0))], 5000)


def test_float32_output_is_the_models_class_token(vdevice: Any, hef: Path,
                                                  tiny_model: Path) -> None:
    model = vdevice.create_infer_model(str(hef))
    assert model.input().shape == [224, 224, 3] and model.output().shape == [384]
    assert model.input().format.order == pyhailort.FormatOrder.NHWC
    assert model.output().format.order == pyhailort.FormatOrder.NC
    model.output().set_format_type(hp.FormatType.FLOAT32)
    model.set_batch_size(2)
    frames = np.stack([frame(1), frame(2)])
    with model.configure() as cim:
        bindings = [bind(cim, image, np.float32) for image in frames]
        cim.run(bindings, 5000)
        got = [b.output().get_buffer() for b in bindings]
    expected = cpu_cls(tiny_model, frames)
    assert expected.shape == (2, 384)
    for vector, reference in zip(got, expected, strict=True):
        assert vector.dtype == np.float32 and cosine(vector, reference) > 0.9999
    assert cosine(got[0], got[1]) < 0.999  # each frame really ran


def test_uint8_output_by_default_dequantizes_with_its_quant_info(vdevice: Any, hef: Path,
                                                                 tiny_model: Path) -> None:
    model = vdevice.create_infer_model(str(hef))
    assert model.output().format.type == hp.FormatType.UINT8
    quant = model.output().quant_infos[0]
    with model.configure() as cim:
        model.output().set_format_type(hp.FormatType.FLOAT32)  # too late: formats are fixed
        binding = bind(cim, frame(3))
        cim.run([binding], 5000)
        raw = binding.output().get_buffer()
        with pytest.raises(pyhailort.HailoRTInvalidOperationException):
            cim.run([bind(cim, frame(3), np.float32)], 5000)
    assert raw.dtype == np.uint8 and raw.min() > 0 and raw.max() < 255
    vector = (raw.astype(np.float32) - quant.qp_zp) * quant.qp_scale
    assert cosine(vector, cpu_cls(tiny_model, frame(3)[None])[0]) > 0.999


def test_buffers_are_checked_and_a_failed_run_shuts_the_model_down(vdevice: Any,
                                                                   hef: Path) -> None:
    with vdevice.create_infer_model(str(hef)).configure() as cim:
        with pytest.raises(hp.HailoRTException, match="Buffer must be C_CONTIGUOUS"):
            cim.create_bindings().input().set_buffer(np.zeros((224, 224, 6), np.uint8)[..., ::2])
        with pytest.raises(pyhailort.HailoRTInvalidOperationException):
            cim.run([bind(cim, frame(0), size=383)], 5000)
        with pytest.raises(pyhailort.HailoRTStreamAborted):
            cim.run([bind(cim, frame(0))], 5000)
        with pytest.raises(TypeError):  # a list of bindings, not one
            cim.run(bind(cim, frame(0)), 5000)


def test_hef_sources_and_names(vdevice: Any, hef: Path, tmp_path: Path,
                               tiny_model: Path) -> None:
    info = hp.HEF(str(hef))
    assert info.get_network_group_names() == ["dinov2_vits14"]
    assert info.get_input_vstream_infos()[0].shape == (224, 224, 3)
    assert info.get_output_vstream_infos()[0].shape == (384,)
    with pytest.raises(ValueError):
        hp.HEF(hef)  # a Path is neither str nor bytes
    with pytest.raises(TypeError):
        vdevice.create_infer_model(hef)
    assert vdevice.create_infer_model(hef.read_bytes()).output_names == [
        "dinov2_vits14/output_layer1"]
    with pytest.raises(hp.HailoRTException) as err:
        vdevice.create_infer_model(str(tmp_path / "missing.hef"))
    assert status(err) == "13 (HAILO_OPEN_FILE_FAILURE)"
    (tmp_path / "junk.hef").write_bytes(b"\x00" * 64)
    with pytest.raises(pyhailort.HailoRTInvalidHEFException):
        vdevice.create_infer_model(str(tmp_path / "junk.hef"))
    two = hailo_standin.write_hef(tmp_path / "two.hef", tiny_model, extra_outputs=1)
    model = vdevice.create_infer_model(str(two))
    with pytest.raises(pyhailort.HailoRTNotFoundException):
        model.output()  # "" names the output only when there is one
    assert model.output("dinov2_vits14/output_layer2").shape == [384]


def test_architecture_is_checked_at_configure(device: Path, tmp_path: Path, tiny_model: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    for_8l = hailo_standin.write_hef(tmp_path / "8l.hef", tiny_model, hw_arch="hailo8l")
    for_8 = hailo_standin.write_hef(tmp_path / "8.hef", tiny_model, hw_arch="hailo8")
    with hp.VDevice(round_robin()) as vdevice, caplog.at_level(logging.WARNING):
        vdevice.create_infer_model(str(for_8l)).configure().shutdown()
    assert "compiled for Hailo8L device" in caplog.text
    hailo_standin.make_device(device, architecture="HAILO8L")
    with hp.VDevice(round_robin()) as vdevice:
        model = vdevice.create_infer_model(str(for_8))  # parsing is fine ...
        with pytest.raises(pyhailort.HailoRTHEFNotCompatibleWithDevice):
            model.configure()  # ... configuring fails (status 93)
        vdevice.create_infer_model(str(for_8l)).configure().shutdown()


def test_a_device_held_by_another_process_is_status_74(device: Path, hef: Path) -> None:
    script = "import hailo_platform as hp\ntry:\n    hp.VDevice()\nexcept Exception as e:\n" \
             "    print(type(e).__name__, e)\nelse:\n    print('opened')\n"
    env = hailo_standin.environ(device)

    def other_process() -> str:
        return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=60, check=True).stdout.strip()

    vdevice = hp.VDevice(round_robin())
    model = vdevice.create_infer_model(str(hef))
    assert other_process() == ("HailoRTException libhailort failed with error: 74 "
                               "(HAILO_OUT_OF_PHYSICAL_DEVICES)")
    with pytest.raises(hp.HailoRTException, match=r"74 \(HAILO_OUT_OF_PHYSICAL_DEVICES\)"):
        hp.VDevice(round_robin())  # one holder in this process too
    vdevice.release()
    assert other_process().startswith("HailoRTException")  # the InferModel holds it still
    del model
    assert other_process() == "opened"


def test_a_driver_of_another_version_is_status_76(device: Path) -> None:
    hailo_standin.make_device(device, driver_version="4.20.0")
    with pytest.raises(hp.HailoRTException) as err:
        hp.VDevice(round_robin())
    assert status(err) == "76 (HAILO_INVALID_DRIVER_VERSION)"


def test_an_unplugged_device_fails_inference_and_disappears(device: Path, hef: Path) -> None:
    vdevice = hp.VDevice(round_robin())
    with vdevice.create_infer_model(str(hef)).configure() as cim:
        cim.run([bind(cim, frame(0))], 5000)
        hailo_standin.unplug(device)
        with pytest.raises(pyhailort.HailoRTDriverOperationFailedException):
            cim.run([bind(cim, frame(0))], 5000)
    vdevice.release()
    assert hp.Device.scan() == []
    with pytest.raises(hp.HailoRTException, match="74"):
        hp.VDevice(round_robin())
    hailo_standin.replug(device)
    with hp.VDevice(round_robin()) as again, \
            again.create_infer_model(str(hef)).configure() as cim:
        cim.run([bind(cim, frame(0))], 5000)


def test_a_hung_device_times_out_and_a_failure_in_flight_goes_to_the_callback(
        vdevice: Any, hef: Path, device: Path) -> None:
    with vdevice.create_infer_model(str(hef)).configure() as cim:
        assert cim.get_async_queue_size() == 4
        hailo_standin.hang(device)
        with pytest.raises(pyhailort.HailoRTTimeout):
            cim.run([bind(cim, frame(0))], 100)
        infos: list[Any] = []
        job = cim.run_async([bind(cim, frame(0)) for _ in range(3)],
                            lambda completion_info: infos.append(completion_info))
        with pytest.raises(pyhailort.HailoRTTimeout):
            job.wait(100)
        with pytest.raises(pyhailort.HailoRTTimeout):
            cim.wait_for_async_ready(100)  # 4 frames in flight: the queue is full
        hailo_standin.hang(device, on=False)
        job.wait(5000)
        assert [info.exception for info in infos] == [None]
        hailo_standin.hang(device)
        job = cim.run_async([bind(cim, frame(0))],
                            lambda completion_info: infos.append(completion_info))
        hailo_standin.unplug(device)
        job.wait(5000)  # as in HailoRT, the job's failure is not raised here ...
        assert isinstance(infos[-1].exception, pyhailort.HailoRTDriverOperationFailedException)
        with pytest.raises(pyhailort.HailoRTDriverOperationFailedException):
            cim.run_async([bind(cim, frame(0))])  # ... and the model stays broken
