"""Test stand-in for HailoRT 4.23's `hailo_platform.pyhailort.pyhailort`: no Hailo hardware here.

It mirrors only the subset dinowatch uses (names, signatures, formats, exception classes and
where they are importable from), as read in hailo-ai/hailort@hailo8 (v4.23.0). Anything
else of HailoRT is absent on purpose.

The "device" is the folder named by $HAILO_STANDIN_DEVICE (read at each scan and VDevice
creation); tests/hailo_standin/hailo_standin.py writes it and the stand-in HEF format. Inference
runs the HEF's ONNX model with ONNX Runtime on one background "device" thread, in order.
As in HailoRT, details go to the log (logger "hailort") and exceptions carry the generic
per-status messages of pyhailort's ExceptionWrapper.
"""

from __future__ import annotations

import enum
import fcntl
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

VERSION = "4.23.0"
DEVICE_ID = "0001:01:00.0"
ENV = "HAILO_STANDIN_DEVICE"
HEF_MAGIC = b"HAILO-STANDIN-HEF\n"
ASYNC_QUEUE_SIZE = 4  # frames in flight per configured model
_POLL = 0.02
log = logging.getLogger("hailort")


class HailoRTException(Exception):
    """Base of every HailoRT error; a status with no class of its own raises this one."""


def _subclass(name: str) -> type[HailoRTException]:
    return type(name, (HailoRTException,), {})


HailoRTTimeout = _subclass("HailoRTTimeout")
HailoRTStreamAborted = _subclass("HailoRTStreamAborted")
HailoRTStreamAbortedByUser = _subclass("HailoRTStreamAbortedByUser")
HailoRTInvalidOperationException = _subclass("HailoRTInvalidOperationException")
HailoRTInvalidArgumentException = _subclass("HailoRTInvalidArgumentException")
HailoRTNotFoundException = _subclass("HailoRTNotFoundException")
HailoRTInvalidHEFException = _subclass("HailoRTInvalidHEFException")
HailoRTHEFNotCompatibleWithDevice = _subclass("HailoRTHEFNotCompatibleWithDevice")
HailoRTDriverOperationFailedException = _subclass("HailoRTDriverOperationFailedException")
HailoCommunicationClosedException = _subclass("HailoCommunicationClosedException")

_NAMES = {4: "HAILO_TIMEOUT", 6: "HAILO_INVALID_OPERATION", 8: "HAILO_INTERNAL_FAILURE",
          13: "HAILO_OPEN_FILE_FAILURE", 26: "HAILO_INVALID_HEF",
          36: "HAILO_DRIVER_OPERATION_FAILED", 61: "HAILO_NOT_FOUND", 63: "HAILO_STREAM_ABORT",
          72: "HAILO_STREAM_NOT_ACTIVATED", 73: "HAILO_DEVICE_IN_USE",
          74: "HAILO_OUT_OF_PHYSICAL_DEVICES",
          76: "HAILO_INVALID_DRIVER_VERSION", 77: "HAILO_RPC_FAILED", 82: "HAILO_QUEUE_IS_FULL",
          93: "HAILO_HEF_NOT_COMPATIBLE_WITH_DEVICE"}
_SEE_LOG = ". See hailort.log for more information"
_CLASSES: dict[int, tuple[type[HailoRTException], str]] = {
    4: (HailoRTTimeout, "Received a timeout - hailort has failed because a timeout had occurred"),
    6: (HailoRTInvalidOperationException, "Invalid operation" + _SEE_LOG),
    26: (HailoRTInvalidHEFException, "Invalid HEF" + _SEE_LOG),
    36: (HailoRTDriverOperationFailedException,
         "Failure in hailort driver ioctl. run 'dmesg | grep hailo' for more information"),
    61: (HailoRTNotFoundException, "Item not found" + _SEE_LOG),
    63: (HailoRTStreamAborted, "Stream was aborted"),
    93: (HailoRTHEFNotCompatibleWithDevice, "HEF file is not compatible with device" + _SEE_LOG),
}


def _error(status: int) -> HailoRTException:
    """The exception pyhailort's ExceptionWrapper makes of a libhailort status."""
    if status in _CLASSES:
        cls, message = _CLASSES[status]
        return cls(message)
    return HailoRTException(f"libhailort failed with error: {status} ({_NAMES[status]})")


# pybind11 enums: members compare equal only to themselves, not to ints
FormatType = enum.Enum("FormatType", {"AUTO": 0, "UINT8": 1, "UINT16": 2, "FLOAT32": 3})
FormatOrder = enum.Enum("FormatOrder", {"AUTO": 0, "NHWC": 1, "NC": 6, "NCHW": 11})
HailoSchedulingAlgorithm = enum.Enum("HailoSchedulingAlgorithm", {"NONE": 0, "ROUND_ROBIN": 1})
HailoStreamInterface = enum.Enum("HailoStreamInterface",
                                 {"PCIe": 0, "INTEGRATED": 1, "ETH": 2, "MIPI": 3})
_DTYPES = {FormatType.AUTO: np.uint8, FormatType.UINT8: np.uint8, FormatType.UINT16: np.uint16,
           FormatType.FLOAT32: np.float32}


class DeviceArchitectureTypes(enum.IntEnum):
    HAILO8_A0 = 0
    HAILO8 = 1
    HAILO8L = 2
    HAILO15H = 3
    HAILO15L = 4
    HAILO15M = 5
    HAILO10H = 6

    def __str__(self) -> str:
        return self.name


def _folder() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def _present(folder: Path | None) -> bool:
    return folder is not None and folder.is_dir() and not (folder / "unplugged").exists()


def _read(folder: Path, name: str, default: str) -> str:
    path = folder / name
    return path.read_text().strip() if path.exists() else default


class QuantInfo:
    def __init__(self, qp_zp: float = 0.0, qp_scale: float = 1.0) -> None:
        self.qp_zp, self.qp_scale = float(qp_zp), float(qp_scale)


def _parse_hef(data: bytes, base: Path) -> dict[str, Any]:
    try:
        if not data.startswith(HEF_MAGIC):
            raise ValueError("not a stand-in HEF")
        hef = json.loads(data[len(HEF_MAGIC):])
        missing = {"hw_arch", "network_group", "onnx", "input", "outputs", "mean", "std"} - set(hef)
        if missing:
            raise ValueError(f"missing {sorted(missing)}")
        hef["onnx"] = str(base / hef["onnx"])  # an absolute path stays as it is
        if not Path(hef["onnx"]).is_file():
            raise ValueError(f"no ONNX model at {hef['onnx']}")
    except (ValueError, TypeError) as err:
        log.error("Failed creating HEF: %s", err)
        raise _error(26) from None
    return hef


def _load_hef(path: str) -> dict[str, Any]:
    try:
        data = Path(path).read_bytes()
    except OSError:
        log.error("Failed opening file, path: %s", path)
        raise _error(13) from None
    return _parse_hef(data, Path(path).parent)


def _format(edge: dict[str, Any], type: Any = FormatType.UINT8) -> SimpleNamespace:
    order = FormatOrder.NC if len(edge["shape"]) == 1 else FormatOrder.NHWC
    return SimpleNamespace(type=type, order=order)


class _VStreamInfo:
    def __init__(self, edge: dict[str, Any], network_name: str) -> None:
        self.name, self.shape, self.network_name = edge["name"], tuple(edge["shape"]), network_name
        self.format, self.quant_info = _format(edge), QuantInfo(**edge["quant"])

    def __repr__(self) -> str:
        return f'VStreamInfo("{self.name}")'


class HEF:
    def __init__(self, hef_source: str | bytes) -> None:
        if isinstance(hef_source, str):
            self._hef, self._path = _load_hef(hef_source), hef_source
        elif isinstance(hef_source, bytes):
            self._hef, self._path = _parse_hef(hef_source, Path.cwd()), None
        else:
            raise ValueError("HEF can only be created from a file path (str) or a buffer (bytes)")

    @property
    def path(self) -> str | None:
        return self._path

    def get_network_group_names(self) -> list[str]:
        return [self._hef["network_group"]]

    def get_input_vstream_infos(self, name: str | None = None) -> list[_VStreamInfo]:
        return [_VStreamInfo(self._hef["input"], self._hef["network_group"])]

    def get_output_vstream_infos(self, name: str | None = None) -> list[_VStreamInfo]:
        return [_VStreamInfo(edge, self._hef["network_group"]) for edge in self._hef["outputs"]]


class ConfigureParams:  # minimal: the vstreams API (VDevice.configure) is not simulated
    @staticmethod
    def create_from_hef(hef: HEF, interface: Any) -> dict[str, Any]:
        return {name: SimpleNamespace(batch_size=0) for name in hef.get_network_group_names()}


def _identify(folder: Path | None) -> SimpleNamespace:
    if not _present(folder):
        raise _error(36)
    arch = DeviceArchitectureTypes[_read(folder, "architecture", "HAILO8")]
    return SimpleNamespace(board_name="Hailo-8", device_architecture=arch,  # "Hailo-8" on 8L too
                           serial_number="HLLWM2B000000", part_number="HM218B1C2FAE",
                           product_name="HAILO-8 AI ACC M.2 M KEY MODULE EXT TEMP")


class Device:
    @classmethod
    def scan(cls) -> list[str]:
        return [DEVICE_ID] if _present(_folder()) else []

    def __init__(self, device_id: str | None = None) -> None:
        if device_id is None:
            ids = Device.scan()
            if not ids:
                raise HailoRTException("HailoRT device not found in the system")
            device_id = ids[0]
        elif device_id not in Device.scan():  # ⚠ the real status is not documented
            raise _error(61)
        folder = _folder()
        self.device_id = device_id
        self.control = SimpleNamespace(identify=lambda: _identify(folder))

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *args: object) -> bool:
        return False

    def release(self) -> None:
        pass


class VDeviceParams:
    def __init__(self) -> None:
        self.algorithm = HailoSchedulingAlgorithm.NONE  # the Python default, as in pyhailort
        self.device_ids: list[str] = []
        self.device_count, self.group_id, self.multi_process_service = 1, "UNIQUE", False

    @property
    def scheduling_algorithm(self) -> int:  # the real getter returns a plain int too
        return self.algorithm.value

    @scheduling_algorithm.setter
    def scheduling_algorithm(self, value: Any) -> None:
        if not isinstance(value, HailoSchedulingAlgorithm):
            raise TypeError("scheduling_algorithm takes a HailoSchedulingAlgorithm")
        self.algorithm = value


def _no_free_device() -> HailoRTException:
    log.error("Failed to create vdevice. there are not enough free devices. requested: 1, found: 0")
    return _error(74)


class _Hold:
    """The physical device, held while a VDevice or anything made from it lives: an exclusive
    flock on <folder>/lock, so a second holder in any process gets status 74."""

    fd: int | None = None

    def __init__(self, params: VDeviceParams, device_ids: list[str] | None) -> None:
        folder = _folder()
        ids = list(device_ids or params.device_ids or [])
        if folder is None or not _present(folder) or any(i != DEVICE_ID for i in ids):
            raise _no_free_device()
        driver = _read(folder, "driver_version", VERSION)
        if driver != VERSION:
            log.error("Driver version (%s) is different from library version (%s)", driver, VERSION)
            raise _error(76)
        if params.multi_process_service:  # no hailort service runs here
            raise _error(77)
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            if ids:  # vdevice.cpp skips a busy device only when the caller named none
                log.error("CHECK_SUCCESS failed with status=HAILO_DEVICE_IN_USE(73)")
                raise _error(73) from None
            raise _no_free_device() from None
        self.fd, self.folder = fd, folder
        self.scheduled = params.algorithm is not HailoSchedulingAlgorithm.NONE

    def __del__(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class VDevice:
    def __init__(self, params: VDeviceParams | None = None, *,
                 device_ids: list[str] | None = None) -> None:
        self._vdevice: Any = None
        self._params = params or VDevice.create_params()
        self._creation_pid = os.getpid()
        self._vdevice = _Hold(self._params, device_ids)

    @staticmethod
    def create_params() -> VDeviceParams:
        return VDeviceParams()

    def __enter__(self) -> VDevice:
        return self

    def __exit__(self, *args: object) -> bool:
        self.release()
        return False

    def __del__(self) -> None:
        self.release()

    def release(self) -> None:
        self._vdevice = None  # the device stays held while an InferModel made from it lives

    def get_physical_devices(self) -> list[Device]:
        self._vdevice.fd  # noqa: B018 - AttributeError once released, as in pyhailort
        return [Device(DEVICE_ID)]

    def create_infer_model(self, hef_source: str | bytes, name: str = "") -> InferModel:
        if os.getpid() != self._creation_pid:
            raise HailoRTException("InferModel can be created only from the process VDevice was "
                                   "created in.")
        hold = self._vdevice
        hold.fd  # noqa: B018 - AttributeError once released, as in pyhailort
        if type(hef_source) is bytes:
            hef = _parse_hef(hef_source, Path.cwd())
        elif isinstance(hef_source, str):
            hef = _load_hef(hef_source)
        else:  # pybind11 converts no os.PathLike to std::string
            raise TypeError("create_infer_model_from_file(): incompatible function arguments")
        if name not in ("", hef["network_group"]):
            raise _error(61)
        return InferModel(hef, hold)


def _pick(streams: dict[str, Any], name: str) -> Any:
    if name == "" and len(streams) == 1:
        return next(iter(streams.values()))
    if name not in streams:
        log.error("Failed to find edge '%s'", name)
        raise _error(61)
    return streams[name]


class InferModel:
    class InferStream:
        def __init__(self, edge: dict[str, Any]) -> None:
            self._edge = edge  # shared with the InferModel until configure() copies it
            self.name, self.shape = edge["name"], list(edge["shape"])

        @property
        def format(self) -> SimpleNamespace:
            return _format(self._edge, self._edge["type"])

        @property
        def quant_infos(self) -> list[QuantInfo]:
            return [QuantInfo(**self._edge["quant"])]

        def set_format_type(self, type: Any) -> None:  # the real parameter name
            if not isinstance(type, FormatType):
                raise TypeError("set_format_type takes a FormatType")
            self._edge["type"] = type

    def __init__(self, hef: dict[str, Any], hold: _Hold) -> None:
        self._hef, self._hold, self._batch_size = hef, hold, 0
        self._inputs = {e["name"]: dict(e, type=FormatType.UINT8) for e in [hef["input"]]}
        self._outputs = {e["name"]: dict(e, type=FormatType.UINT8) for e in hef["outputs"]}

    def set_batch_size(self, batch_size: int) -> None:
        self._batch_size = int(batch_size)

    def configure(self) -> ConfiguredInferModel:
        folder = self._hold.folder
        if not _present(folder):
            raise _error(36)
        device, arch = _read(folder, "architecture", "HAILO8"), self._hef["hw_arch"].upper()
        if device == "HAILO8" and arch == "HAILO8L":
            log.warning("HEF was compiled for Hailo8L device, while the device itself is Hailo8. "
                        "This will result in lower performance.")
        elif device != arch:
            log.error("HEF format is not compatible with device. Device arch: %s, HEF arch: %s",
                      device, arch)
            raise _error(93)
        edges = {n: dict(e) for n, e in (*self._inputs.items(), *self._outputs.items())}
        return ConfiguredInferModel(_Engine(self._hef, edges, self._hold), self)

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def inputs(self) -> list[InferStream]:
        return [self.InferStream(e) for e in self._inputs.values()]

    @property
    def outputs(self) -> list[InferStream]:
        return [self.InferStream(e) for e in self._outputs.values()]

    def input(self, name: str = "") -> InferStream:
        return self.InferStream(_pick(self._inputs, name))

    def output(self, name: str = "") -> InferStream:
        return self.InferStream(_pick(self._outputs, name))


class AsyncInferCompletionInfo:
    def __init__(self, exception: HailoRTException | None) -> None:
        self.exception = exception  # None on success


class _Job:
    def __init__(self, frames: list[tuple[dict, dict]], callback: Any) -> None:
        self.frames, self.callback, self.done = frames, callback, threading.Event()

    def finish(self, status: int) -> None:
        if self.callback is not None:
            try:
                info = AsyncInferCompletionInfo(_error(status) if status else None)
                self.callback(completion_info=info)
            except Exception:
                log.exception("the inference callback raised")
        self.done.set()


class AsyncInferJob:
    def __init__(self, job: _Job) -> None:
        self._job = job

    def wait(self, timeout_ms: int) -> None:
        """Waits for the job and its callback. As in HailoRT, a job that failed on the device
        does not raise here: its exception goes to the callback's completion_info only."""
        if not self._job.done.wait(timeout_ms / 1000):
            log.error("Waiting for async job to finish has failed with timeout (%dms)", timeout_ms)
            raise _error(4)


def run_model(session: Any, pixels: np.ndarray, hef: dict[str, Any]) -> np.ndarray:
    """What the compiled HEF computes: uint8 NHWC frames in, its first output per frame."""
    x = (pixels.astype(np.float32) - np.float32(hef["mean"])) / np.float32(hef["std"])
    out = session.run(None, {session.get_inputs()[0].name: x.transpose(0, 3, 1, 2)})[0]
    shape = hef["outputs"][0]["shape"]
    if out.ndim == 3 and len(shape) == 1:
        out = out[:, 0]  # the class token
    return out.reshape(len(x), *shape).astype(np.float16).astype(np.float32)  # device precision


class _Engine:
    """A configured model on the device: a queue of jobs and one device thread."""

    def __init__(self, hef: dict[str, Any], edges: dict[str, dict], hold: _Hold) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(hef["onnx"], sess_options=options,
                                             providers=["CPUExecutionProvider"])
        self._hef, self._hold, self._edges = hef, hold, edges
        self._cv = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._pending, self._status, self._stopped, self.activated = 0, 0, False, False
        self._thread = threading.Thread(target=self._loop, name="hailort-standin-device",
                                        daemon=True)
        self._thread.start()

    def _check(self) -> None:
        if self._status:
            raise _error(self._status)
        if not self._hold.scheduled and not self.activated:
            raise _error(72)  # no scheduler and no activate(): the streams are not active

    def activate(self) -> None:
        if self._hold.scheduled:
            log.error("Manually activate a core-op is not allowed when the core-op scheduler is "
                      "active!")
            raise _error(6)
        self.activated = True

    def _frame(self, bindings: ConfiguredInferModel.Bindings) -> tuple[dict, dict]:
        frame: tuple[dict, dict] = ({}, {})
        for side, kind in enumerate(("input", "output")):
            for name, stream in (bindings._outputs if side else bindings._inputs).items():
                buffer, edge = stream._buffer, self._edges[name]
                size = int(np.prod(edge["shape"])) * np.dtype(_DTYPES[edge["type"]]).itemsize
                if buffer is None:
                    log.error("Couldnt find %s buffer for '%s'", kind, name)
                    raise _error(61)
                if buffer.nbytes != size:
                    log.error("%s buffer size %d is different than expected %d for %s '%s'",
                              kind.capitalize(), buffer.nbytes, size, kind, name)
                    raise _error(6)
                frame[side][name] = buffer
        return frame

    def submit(self, bindings: list[ConfiguredInferModel.Bindings], callback: Any) -> _Job:
        with self._cv:
            try:
                self._check()
                frames = [self._frame(b) for b in bindings]
                if self._pending + len(frames) > ASYNC_QUEUE_SIZE:
                    log.error("Can't handle infer request since a queue in the pipeline is full.")
                    raise _error(82)
                if not _present(self._hold.folder):
                    raise _error(36)
            except HailoRTException:
                self._stop()  # as in HailoRT: a failed run_async shuts the model down
                raise
            job = _Job(frames, callback)
            self._jobs.append(job)
            self._pending += len(frames)
            self._cv.notify_all()
            return job

    def wait_ready(self, timeout_ms: int, frames_count: int) -> None:
        with self._cv:
            ready = self._cv.wait_for(lambda: bool(self._status) or (
                self._pending + frames_count <= ASYNC_QUEUE_SIZE), timeout_ms / 1000)
            self._check()
            if not ready:
                log.error("Got timeout in `wait_for_async_ready` (%dms)", timeout_ms)
                raise _error(4)

    def _stop(self) -> None:
        self._stopped, self._status = True, self._status or 63
        self._cv.notify_all()

    def shutdown(self) -> None:
        with self._cv:
            self._stop()
        if threading.current_thread() is not self._thread and not sys.is_finalizing():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._jobs) or self._stopped)
                if not self._jobs:
                    return
                job = self._jobs[0]
            status = self._execute(job)
            with self._cv:
                self._jobs.popleft()
                self._pending -= len(job.frames)
                if status == 36:
                    self._status = self._status or 36  # the pipeline is broken for good
                self._cv.notify_all()
            job.finish(status)

    def _execute(self, job: _Job) -> int:
        folder = self._hold.folder
        while (folder / "hang").exists() and _present(folder) and not self._stopped:
            time.sleep(_POLL)
        if self._stopped:
            return 63
        if not _present(folder):
            return 36
        try:
            self._infer(job.frames)
        except Exception:
            log.exception("stand-in inference failed")
            return 8
        return 0

    def _infer(self, frames: list[tuple[dict, dict]]) -> None:
        name = self._hef["input"]["name"]
        edge, pixels = self._edges[name], []
        for inputs, _ in frames:  # the device takes uint8: other formats are quantized to it
            raw = np.frombuffer(inputs[name].tobytes(), _DTYPES[edge["type"]])
            quant = edge["quant"]
            pixels.append(np.clip(np.rint(raw / quant["qp_scale"] + quant["qp_zp"]), 0, 255)
                          .reshape(edge["shape"]))
        values = run_model(self._session, np.stack(pixels).astype(np.uint8), self._hef)
        for (_, outputs), value in zip(frames, values, strict=True):
            for index, (name, buffer) in enumerate(outputs.items()):
                out = self._edges[name]
                data = value if index == 0 else np.zeros(out["shape"], np.float32)
                if out["type"] is not FormatType.FLOAT32:
                    quant = out["quant"]
                    data = np.clip(np.rint(data / quant["qp_scale"] + quant["qp_zp"]), 0, 255)
                raw = np.frombuffer(data.astype(_DTYPES[out["type"]]).tobytes(), np.uint8)
                np.copyto(buffer.reshape(-1).view(np.uint8), raw)  # in place, like the DMA


class ConfiguredInferModel:
    class Bindings:
        class InferStream:
            def __init__(self) -> None:
                self._buffer: np.ndarray | None = None

            def set_buffer(self, buffer: np.ndarray) -> None:
                if not buffer.flags.c_contiguous:
                    raise HailoRTException("Buffer must be C_CONTIGUOUS")
                self._buffer = buffer

            def get_buffer(self, tf_format: bool = False) -> np.ndarray | None:
                return self._buffer

        def __init__(self, input_names: list[str], output_names: list[str]) -> None:
            self._inputs = {name: self.InferStream() for name in input_names}
            self._outputs = {name: self.InferStream() for name in output_names}

        def input(self, name: str = "") -> InferStream:
            return _pick(self._inputs, name)

        def output(self, name: str = "") -> InferStream:
            return _pick(self._outputs, name)

    def __init__(self, engine: _Engine, infer_model: InferModel) -> None:
        self._configured_infer_model: Any = engine
        self._input_names, self._output_names = infer_model.input_names, infer_model.output_names

    def __enter__(self) -> ConfiguredInferModel:
        return self

    def __exit__(self, *args: object) -> None:
        self.__del__()
        self._configured_infer_model = None  # as in pyhailort: AttributeError after the block

    def __del__(self) -> None:  # the C++ object's destructor shuts the model down
        engine = getattr(self, "_configured_infer_model", None)
        if engine is not None:
            engine.shutdown()

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._configured_infer_model, method)(*args)
        except HailoRTException as err:  # raised from C++ in HailoRT: no frames that keep the
            raise err.with_traceback(None) from None  # device held while the error lives

    def activate(self) -> None:
        self._call("activate")

    def create_bindings(self, input_buffers: dict[str, np.ndarray] | None = None,
                        output_buffers: dict[str, np.ndarray] | None = None) -> Bindings:
        bindings = self.Bindings(self._input_names, self._output_names)
        for name, buffer in (input_buffers or {}).items():
            bindings.input(name).set_buffer(buffer)
        for name, buffer in (output_buffers or {}).items():
            bindings.output(name).set_buffer(buffer)
        return bindings

    def wait_for_async_ready(self, timeout_ms: int = 1000, frames_count: int = 1) -> None:
        self._call("wait_ready", timeout_ms, frames_count)

    def run(self, bindings: list[Bindings], timeout: int) -> None:
        self.run_async(bindings).wait(timeout)

    def run_async(self, bindings: list[Bindings], callback: Any = None) -> AsyncInferJob:
        bindings = list(bindings)  # pyhailort iterates them first: one Bindings is a TypeError
        return AsyncInferJob(self._call("submit", bindings, callback))

    def get_async_queue_size(self) -> int:
        return ASYNC_QUEUE_SIZE

    def shutdown(self) -> None:
        self._configured_infer_model.shutdown()
