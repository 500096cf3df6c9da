"""The small contract every inference backend satisfies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Self, runtime_checkable

import numpy as np

from dinowatch.errors import DinowatchError


class BackendUnavailable(DinowatchError):
    """The backend cannot start (runtime or device missing, busy, a wrong model file); the
    message names the cause and what to do."""


class BackendFailed(RuntimeError):
    """The device failed under a batch (unplugged, timed out): the images are not at fault,
    and the backend must be opened again before it runs anything."""


@dataclass(frozen=True)
class InputSpec:
    """What a backend's `infer` expects as its batch.

    NCHW float32 is the seed's tensor (already ImageNet-normalized). NHWC uint8 is raw pixels,
    for accelerators such as Hailo that normalize on the device.
    """

    size: int = 224
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "uint8"] = "float32"

    @property
    def normalized_on_host(self) -> bool:
        return self.dtype == "float32"


@runtime_checkable
class Backend(Protocol):
    """One inference runtime behind one small interface."""

    type_key: str
    input_spec: InputSpec
    batch: int  # the most images the pipeline hands `infer` at once
    runs_on_cpu: bool  # False: an accelerator runs the model (bench's CPU floor leaves it out)
    producer: str  # who made the model file, as the file says ("" when it does not)
    output_dim: int | None  # the vector width the backend's file declares (None: unknown
    #                         before the first inference, which postprocess then checks)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a batch laid out as `input_spec` says; return its first output.
        Raises BackendFailed when the device, not the batch, failed; RuntimeError else."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc_info: object) -> None: ...
