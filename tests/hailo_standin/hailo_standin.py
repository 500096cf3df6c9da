"""Helpers for tests that run dinowatch's Hailo backend on the HailoRT stand-in in this folder.

Not part of the HailoRT surface. Put this folder (STANDIN_DIR) on sys.path or PYTHONPATH, make a
device folder with make_device() and point $HAILO_STANDIN_DEVICE (ENV) at it; environ() gives
both for a subprocess.

The device folder:
    architecture    "HAILO8" or "HAILO8L" (missing: HAILO8)
    driver_version  optional, default the library's "4.23.0"; another: VDevice() -> status 76
    unplugged       exists: the device is gone; scan() == [], VDevice() -> 74, inference -> 36
    hang            exists: inference never completes (waits time out) until it is removed
    lock            flock'ed by the VDevice that holds the device; a second holder -> 74

A stand-in HEF is b"HAILO-STANDIN-HEF\\n" followed by one JSON object:
    hw_arch         "hailo8" or "hailo8l"
    network_group   e.g. "dinov2_vits14"
    onnx            the model: absolute, or relative to the HEF's folder (to the current
                    directory for a HEF given as bytes)
    input           {"name", "shape": [224, 224, 3], "quant": {"qp_zp", "qp_scale"}}: uint8 NHWC
    outputs         [{"name", "shape", "quant"}, ...]: the first is the model's output, [D] (the
                    class token of a [B, T, D] model) or [T, D]; any further ones read zeros
    mean, std       the compiled normalization, per channel in 0..255 units
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hailo_platform.pyhailort.pyhailort import DEVICE_ID, ENV, HEF_MAGIC

__all__ = ["DEVICE_ID", "ENV", "IMAGENET_MEAN", "IMAGENET_STD", "STANDIN_DIR", "environ", "hang",
           "make_device", "replug", "unplug", "write_hef"]

STANDIN_DIR = Path(__file__).resolve().parent
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # DINOv2's, in 0..255 units
IMAGENET_STD = (58.395, 57.12, 57.375)
OUTPUT_ZERO_POINT = 128


def make_device(folder: Path, architecture: str = "HAILO8",
                driver_version: str | None = None) -> Path:
    """A plugged-in, idle device folder; returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "architecture").write_text(architecture + "\n")
    if driver_version is not None:
        (folder / "driver_version").write_text(driver_version + "\n")
    return folder


def unplug(folder: Path) -> None:
    (folder / "unplugged").touch()


def replug(folder: Path) -> None:
    (folder / "unplugged").unlink(missing_ok=True)


def hang(folder: Path, on: bool = True) -> None:
    if on:
        (folder / "hang").touch()
    else:
        (folder / "hang").unlink(missing_ok=True)


def environ(folder: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with the stand-in first on PYTHONPATH and ENV = `folder`."""
    env = dict(os.environ if base is None else base)
    paths = [str(STANDIN_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env[ENV] = str(folder)
    return env


def _calibration_scale(session: Any, output_shape: Sequence[int], mean: Sequence[float],
                       std: Sequence[float]) -> float:
    """Largest |output| over a few synthetic photos at the model's own input size (so a HEF
    that does not match its model can still be written), mapped to 100 of the 127 steps."""
    from dinowatch.testing import synthetic_photo

    model_input = session.get_inputs()[0]
    height, width = (dim if isinstance(dim, int) else 224 for dim in model_input.shape[2:])
    frames = np.stack([np.asarray(synthetic_photo(width, height, seed=seed), dtype=np.float32)
                       for seed in range(4)])
    x = ((frames - np.float32(mean)) / np.float32(std)).transpose(0, 3, 1, 2)
    out = session.run(None, {model_input.name: x})[0]
    if out.ndim == 3 and len(output_shape) == 1:
        out = out[:, 0]
    return float(np.abs(out).max()) / 100 or 1.0


def write_hef(path: Path, onnx_model: Path, *, hw_arch: str = "hailo8",
              input_shape: Sequence[int] = (224, 224, 3),
              output_shape: Sequence[int] | None = None, extra_outputs: int = 0,
              network_group: str = "dinov2_vits14", output_qp_scale: float | None = None,
              mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Path:
    """Write a stand-in HEF for `onnx_model` (stored as an absolute path); returns `path`.

    output_shape defaults to [the model's last output dim]. The output's quantization is
    zero point 128 and, unless `output_qp_scale` is given, a scale calibrated like the Dataflow
    Compiler would: the largest |value| over a few synthetic photos maps to 100 of the 127 steps.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    if output_shape is None:
        output_shape = [session.get_outputs()[0].shape[-1]]
    if output_qp_scale is None:
        output_qp_scale = _calibration_scale(session, output_shape, mean, std)
    outputs = [{"name": f"{network_group}/output_layer{index + 1}", "shape": list(output_shape),
                "quant": {"qp_zp": OUTPUT_ZERO_POINT, "qp_scale": output_qp_scale}}
               for index in range(1 + extra_outputs)]
    hef = {"hw_arch": hw_arch, "network_group": network_group,
           "onnx": str(Path(onnx_model).resolve()),
           "input": {"name": f"{network_group}/input_layer1", "shape": list(input_shape),
                     "quant": {"qp_zp": 0.0, "qp_scale": 1.0}},
           "outputs": outputs, "mean": list(mean), "std": list(std)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(HEF_MAGIC + json.dumps(hef).encode() + b"\n")
    return path
