"""Backend plug-ins: the registry, and how the ONNX Runtime session is set up."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from dinowatch.backends import BACKENDS, Backend, InputSpec, OnnxBackendConfig, create_backend


def test_registry_builds_the_onnx_backend_by_type(tiny_model: Path) -> None:
    assert set(BACKENDS) == {"onnx"}
    with create_backend(tiny_model, OnnxBackendConfig()) as backend:
        assert isinstance(backend, Backend)
        assert backend.type_key == "onnx"
        assert backend.input_spec == InputSpec(size=224, layout="NCHW", dtype="float32")
        batch = np.zeros((2, 3, 224, 224), np.float32)
        assert backend.infer(batch).shape == (2, 384)


def test_onnx_session_uses_all_cores_by_default_and_never_spins(tiny_model: Path) -> None:
    backend = create_backend(tiny_model)
    options = backend._session.get_session_options()
    assert options.intra_op_num_threads == os.cpu_count()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    configured = create_backend(tiny_model, OnnxBackendConfig(threads=1))
    assert configured._session.get_session_options().intra_op_num_threads == 1
    assert configured._session.get_providers() == ["CPUExecutionProvider"]


def test_backend_config_is_strict() -> None:
    with pytest.raises(ValidationError, match="hailo"):
        OnnxBackendConfig(type="hailo")
    with pytest.raises(ValidationError, match="extra"):
        OnnxBackendConfig(thread=2)  # type: ignore[call-arg]


def test_inference_failure_is_a_runtime_error(tiny_model: Path) -> None:
    backend = create_backend(tiny_model)
    with pytest.raises(RuntimeError, match="ONNX Runtime inference failed"):
        backend.infer(np.zeros((1, 3, 100, 100), np.float32))
