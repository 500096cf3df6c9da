"""Backend plug-ins, chosen by the config's `backend.type`.

The registry is a literal dict on purpose: a broken plug-in fails loudly at import,
and a type checker sees every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dinowatch.backends.base import Backend, BackendUnavailable, InputSpec
from dinowatch.backends.onnx import OnnxBackend, OnnxBackendConfig

# One member today; the Hailo issue turns this into Annotated[A | B, Field(discriminator="type")].
BackendConfig = OnnxBackendConfig

BACKENDS: dict[str, Callable[[Path, BackendConfig], Backend]] = {
    OnnxBackend.type_key: OnnxBackend,
}


def create_backend(model_path: Path, config: BackendConfig | None = None) -> Backend:
    """Build the backend that `config.type` names (default: ONNX Runtime on the CPU)."""
    config = config or OnnxBackendConfig()
    return BACKENDS[config.type](model_path, config)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendConfig",
    "BackendUnavailable",
    "InputSpec",
    "OnnxBackendConfig",
    "create_backend",
]
