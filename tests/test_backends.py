"""Backend plug-ins: the registry, and how the ONNX Runtime session is set up."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from dinowatch.backends import BACKENDS, Backend, InputSpec, OnnxBackendConfig, create_backend
from dinowatch.testing import write_model


def test_registry_builds_the_onnx_backend_by_type(tiny_model: Path) -> None:
    assert set(BACKENDS) == {"onnx", "hailo"}
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


def test_a_model_replaced_in_place_is_not_run_from_its_old_mapped_copy(tmp_path: Path) -> None:
    # The copy in .ort-cache is keyed by the file's identity: another model written over it
    # with the same size and mtime (cp -p, rsync -t) must not run the old weights.
    path = write_model(tmp_path / "model.onnx", "tiny", seed=1)
    other = write_model(tmp_path / "other.onnx", "tiny", seed=2)
    batch = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with create_backend(path) as backend:
        first = backend.infer(batch)
    assert list((tmp_path / ".ort-cache").glob("model-*.onnx"))  # the copy was made
    stamp = path.stat()
    shutil.copyfile(other, path)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size == stamp.st_size and path.stat().st_mtime_ns == stamp.st_mtime_ns
    with create_backend(path) as backend, create_backend(other) as expected:
        replaced = backend.infer(batch)
        np.testing.assert_allclose(replaced, expected.infer(batch), rtol=1e-5, atol=1e-6)
    assert not np.allclose(first, replaced)
    # ... and the old model's copy is gone
    assert len(list((tmp_path / ".ort-cache").glob("model-*.onnx"))) == 1
