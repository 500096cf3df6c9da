"""ONNX Runtime backend: the Pi 5's four Cortex-A76 cores (or any CPU)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dinowatch.backends.base import BackendUnavailable, InputSpec

TYPE: Final = "onnx"

log = logging.getLogger(__name__)


class OnnxBackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["onnx"] = Field(default=TYPE, description="Backend plug-in: onnx (CPU).")
    threads: int | None = Field(
        default=None, ge=1, le=256, description="Intra-op threads; null = all cores."
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="ONNX Runtime execution providers, in order of preference.",
    )


class OnnxBackend:
    type_key = TYPE

    def __init__(self, model_path: Path, config: OnnxBackendConfig | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise BackendUnavailable("onnxruntime is not installed: pip install dinowatch") from err
        config = config or OnnxBackendConfig()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = config.threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        # Spinning threads keep a core at 100 % between images; an idle appliance must idle.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=config.providers
            )
        except Exception as err:  # ORT raises its own untyped exceptions
            raise RuntimeError(f"cannot load ONNX model {model_path}: {err}") from err
        self.producer: str = self._session.get_modelmeta().producer_name or ""
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        height = model_input.shape[2] if len(model_input.shape) == 4 else None
        self.input_spec = InputSpec(size=height if isinstance(height, int) else 224)
        log.debug("onnx backend: %s, %d threads", model_path, options.intra_op_num_threads)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        try:
            return self._session.run(None, {self._input_name: batch})[0]
        except Exception as err:
            raise RuntimeError(f"ONNX Runtime inference failed: {err}") from err

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
