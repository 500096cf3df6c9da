"""Hailo-8 / Hailo-8L backend: a compiled HEF on the Raspberry Pi AI HAT+, through HailoRT.

HailoRT's Python API (`hailo_platform`, HailoRT 4.18 or later: the InferModel API) is imported
only when this backend is configured: it is not on PyPI, and the package runs without it.
Facts, with their sources in HailoRT's code (hailo-ai/hailort, branch hailo8): docs/hailo.md.

The device takes the seed's resized picture as raw RGB uint8 224x224x3 (NHWC); the HEF
normalizes it (compiled in by the model script), and its output is read as FLOAT32.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from pathlib import Path
from typing import Any, Final, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dinowatch import models
from dinowatch.backends.base import BackendFailed, BackendUnavailable, InputSpec
from dinowatch.errors import existing_file

TYPE: Final = "hailo"
TIMEOUT_MS: Final = 10_000  # one frame on the device; HailoRT's own default vstream timeout
INPUT_SHAPE: Final = [224, 224, 3]

# HailoRT status codes (hailort.h) that have no exception class of their own in Python: they
# arrive as "libhailort failed with error: 74 (HAILO_OUT_OF_PHYSICAL_DEVICES)".
INVALID_HEF: Final = 26  # before HailoRT 4.21 also: a HEF for the other chip
DRIVER_OPERATION_FAILED: Final = 36  # with "error 13": /dev/hailo0 may not be opened
DEVICE_IN_USE: Final = 73  # the device backend.device names is held by another process
OUT_OF_PHYSICAL_DEVICES: Final = 74  # no device, or (device: auto) another process holds it
INVALID_DRIVER_VERSION: Final = 76
DRIVER_INVALID_IOCTL: Final = 86  # ⚠ another face of a driver/library mismatch
HEF_NOT_COMPATIBLE_WITH_DEVICE: Final = 93

INSTALL = ("HailoRT's Python API (hailo_platform) is not installed. On Raspberry Pi OS: "
           "`sudo apt install hailo-all` (it provides python3-hailort), and a virtual "
           "environment made with `python3 -m venv --system-site-packages` so it sees that "
           "package; see docs/hailo.md")

log = logging.getLogger(__name__)


class HailoBackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["hailo"] = Field(default=TYPE,
                                   description="Backend plug-in: hailo (Hailo-8 / 8L).")
    hef: Path = Field(description="The model compiled for this chip (docs/hailo.md).")
    device: str = Field(
        default="auto", min_length=1,
        description="auto, or the device id `hailortcli scan` prints, quoted: \"0001:01:00.0\".")
    batch: int = Field(
        default=8, ge=1, le=64,
        description="Most images per inference call; also the HEF's batch size on the device.")
    fallback: Literal["onnx"] | None = Field(
        default=None,
        description="onnx: run on the CPU (one warning) when the Hailo cannot be used; "
                    "null: the daemon stops with the reason instead.")

    @field_validator("hef")
    @classmethod
    def _hef_is_file(cls, value: Path) -> Path:
        # a typo, not a device condition: exit 78 with or without a fallback, as model.path
        return existing_file(value) or value

    @field_validator("device", mode="before")
    @classmethod
    def _device_is_text(cls, value: object) -> object:
        if isinstance(value, (int, float)):  # YAML 1.1 reads 0001:01:00.0 as 3660.0
            raise ValueError("quote the device id, e.g. device: \"0001:01:00.0\" (unquoted, "
                             "YAML reads it as a base-60 number)")
        return value


def status_code(err: BaseException) -> int | None:
    """The HailoRT status code an exception carries, if any (its message, or the status
    exception it was raised from: pyhailort's ExceptionWrapper)."""
    for candidate in (err, err.__cause__):
        if candidate is None:
            continue
        if match := re.search(r"error: (\d+) \(HAILO_", str(candidate)):
            return int(match.group(1))
        if type(candidate).__name__ == "HailoRTStatusException" and candidate.args:
            with contextlib.suppress(TypeError, ValueError):
                return int(candidate.args[0])
    return None


class HailoBackend:
    """One HEF on one Hailo device, under HailoRT's round-robin scheduler.

    Raises BackendUnavailable naming the cause: HailoRT missing, no device, a device held by
    another process, a HEF for the other chip, driver and library versions that differ, a
    HEF whose input or output does not fit this model. `infer` raises BackendFailed when the
    device fails under a batch; the backend is then closed, and must be opened again.
    """

    type_key = TYPE
    runs_on_cpu = False
    input_spec = InputSpec(size=INPUT_SHAPE[0], layout="NHWC", dtype="uint8")

    def __init__(self, model_path: Path, config: HailoBackendConfig) -> None:
        try:
            import hailo_platform
        except ImportError as err:
            raise BackendUnavailable(f"{INSTALL} ({err})") from err
        self._hp = hailo_platform
        self.hef = config.hef
        self.batch = config.batch
        # A HEF names no producer; the ONNX model it was compiled from does (a stand-in: so).
        self.producer = models.producer_name(model_path)
        self._lock = threading.Lock()  # the pipeline and MQTT commands may both infer
        self._stack = contextlib.ExitStack()
        self._configured: Any = None  # hailo_platform ConfiguredInferModel, once opened
        self.output_shape: list[int] = []
        self.output_dim: int | None = None
        if not self.hef.is_file():
            raise BackendUnavailable(f"backend.hef: {self.hef}: no such file (any more)")
        try:
            self._configured = self._open(config.device)
        except self._hp.HailoRTException as err:
            self.close()
            raise BackendUnavailable(self._explain(err, config.device)) from err
        except BaseException:
            self.close()
            raise
        log.debug("hailo backend: %s on %s, batch %d", self.hef, config.device, self.batch)

    def _open(self, device: str) -> Any:  # hailo_platform ConfiguredInferModel
        hp = self._hp
        params = hp.VDevice.create_params()
        # The Python default is NONE, under which nothing runs without activate().
        params.scheduling_algorithm = hp.HailoSchedulingAlgorithm.ROUND_ROBIN
        device_ids = None if device == "auto" else [device]
        self._vdevice = self._stack.enter_context(hp.VDevice(params, device_ids=device_ids))
        model = self._vdevice.create_infer_model(str(self.hef))
        model.set_batch_size(self.batch)
        if len(model.input_names) != 1 or len(model.output_names) != 1:
            raise BackendUnavailable(
                f"backend.hef: {self.hef} has {len(model.input_names)} inputs and "
                f"{len(model.output_names)} outputs; a DINOv2 HEF has one of each: parse it "
                f"with one end node (docs/hailo.md, section 3.3)")
        if list(model.input().shape) != INPUT_SHAPE:
            raise BackendUnavailable(
                f"backend.hef: {self.hef} takes input {list(model.input().shape)}; this model "
                f"needs {INPUT_SHAPE} (RGB 224x224, NHWC): export it at 224 px (docs/hailo.md, "
                f"section 2)")
        self.output_shape = list(model.output().shape)
        self.output_dim = self.output_shape[-1]
        model.input().set_format_type(hp.FormatType.UINT8)
        # Before configure(): afterwards the output stays in the HEF's quantized format.
        model.output().set_format_type(hp.FormatType.FLOAT32)
        return self._stack.enter_context(model.configure())

    def _explain(self, err: BaseException, device: str) -> str:
        """What a start-up failure means, and what to do about it."""
        code = status_code(err)
        if code == DEVICE_IN_USE:  # VDevice skips a busy device only for device: auto
            return _in_use(device, err)
        if code == OUT_OF_PHYSICAL_DEVICES:
            try:
                found = self._hp.Device.scan()
            except Exception:  # Device.scan() is not wrapped: _pyhailort's own exception
                found = []
            if not found or (device != "auto" and device not in found):
                wanted = "" if device == "auto" else f" {device} (found: {found or 'none'})"
                return (f"no Hailo device{wanted}: is the AI HAT+ seated and its driver loaded "
                        f"(`hailortcli scan`, /dev/hailo0)? ({err})")
            return _in_use(", ".join(found), err)
        if code in (INVALID_DRIVER_VERSION, DRIVER_INVALID_IOCTL):
            return (f"the Hailo driver and library versions differ: install the same x.y.z of "
                    f"hailort, hailo-dkms (the driver) and python3-hailort (library "
                    f"{getattr(self._hp, '__version__', '?')}), then reboot ({err})")
        if code == DRIVER_OPERATION_FAILED:  # the errno is in hailort.log, not in the exception
            return (f"cannot open /dev/hailo0 (HailoRT logs \"Failed to open device file ... with "
                    f"error N\": 13 is the file's permissions, 1 the systemd unit's device list): "
                    f"under systemd the unit needs DeviceAllow=/dev/hailo0 rw, and a restart if "
                    f"the driver loaded after it started; otherwise check the udev rule ({err})")
        # HailoRTHEFNotCompatibleWithDevice (4.21+) has no status text; older: an invalid HEF.
        if code in (HEF_NOT_COMPATIBLE_WITH_DEVICE, INVALID_HEF) or type(err).__name__ in (
                "HailoRTHEFNotCompatibleWithDevice", "HailoRTInvalidHEFException"):
            return (f"backend.hef: {self.hef} does not run on this {self._architecture()}: "
                    f"compiled for the other chip (hailo8 vs hailo8l: `hailortcli parse-hef`), "
                    f"or for another HailoRT version, or damaged; compile it with "
                    f"--hw-arch {self._architecture().lower()} ({err})")
        return f"the Hailo device cannot run {self.hef}: {err}"

    def _architecture(self) -> str:
        """HAILO8 or HAILO8L, as the device says; "Hailo device" when it cannot be asked."""
        try:
            return str(self._hp.Device().control.identify().device_architecture)
        except Exception:  # any HailoRT failure: the name only decorates a message
            return "Hailo device"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, 224, 224, 3) uint8 -> (N, tokens, dim) float32, each frame run asynchronously
        so the device holds several at once. Raises BackendFailed if the device fails."""
        outputs = np.empty((len(batch), *self.output_shape), dtype=np.float32)
        failures: list[BaseException] = []

        def done(completion_info: Any) -> None:  # on a HailoRT thread; the keyword is its API
            if completion_info.exception is not None:
                failures.append(completion_info.exception)

        with self._lock:
            if self._configured is None:
                raise BackendFailed("the Hailo device was closed after a failure")
            try:
                jobs = []
                for frame, output in zip(batch, outputs, strict=True):
                    bindings = self._configured.create_bindings()
                    bindings.input().set_buffer(np.ascontiguousarray(frame))
                    bindings.output().set_buffer(output)
                    self._configured.wait_for_async_ready(TIMEOUT_MS, frames_count=1)
                    jobs.append(self._configured.run_async([bindings], done))
                for job in jobs:
                    job.wait(TIMEOUT_MS)
            except self._hp.HailoRTException as err:
                failures.insert(0, err)
            if failures:  # wait() returns once a job is over, failed or not: see `done`
                self.close()  # a device that failed is opened again, not reused
                raise BackendFailed(f"Hailo inference failed: {failures[0]}") from failures[0]
        return outputs.reshape(len(batch), -1, outputs.shape[-1])

    def close(self) -> None:
        self._configured = None
        try:
            self._stack.close()
        except Exception as err:  # a device that is gone may fail to shut down, too
            log.debug("closing the Hailo device: %s", err)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _in_use(device: str, err: BaseException) -> str:
    return (f"the Hailo device {device} is in use by another process: `sudo fuser -v "
            f"/dev/hailo0` names it (dinowatch itself, a `bench` or `backends compare`, "
            f"Frigate, rpicam-apps); HailoRT gives a device to one process at a time ({err})")
