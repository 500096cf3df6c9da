"""Backend plug-ins, chosen by the config's `backend.type`.

The registry is a literal dict on purpose: a broken plug-in fails loudly at import,
and a type checker sees every backend. A plug-in imports its runtime only when opened.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import Discriminator, Tag

from dinowatch.backends.base import Backend, BackendFailed, BackendUnavailable, InputSpec
from dinowatch.backends.hailo import HailoBackend, HailoBackendConfig
from dinowatch.backends.onnx import OnnxBackend, OnnxBackendConfig


def _backend_type(value: Any) -> str:
    """`type` picks the plug-in's config; without one it is ONNX Runtime (the default)."""
    found = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return found if isinstance(found, str) else OnnxBackend.type_key


BackendConfig = Annotated[
    Annotated[OnnxBackendConfig, Tag(OnnxBackend.type_key)]
    | Annotated[HailoBackendConfig, Tag(HailoBackend.type_key)],
    Discriminator(_backend_type, custom_error_type="backend_type",
                  custom_error_message=f"type must be one of: {OnnxBackend.type_key}, "
                                       f"{HailoBackend.type_key}"),
]

BACKENDS: dict[str, Callable[[Path, Any], Backend]] = {
    OnnxBackend.type_key: OnnxBackend,
    HailoBackend.type_key: HailoBackend,
}


def create_backend(model_path: Path, config: BackendConfig | None = None, *,
                   dim: int | None = None) -> Backend:
    """Open the backend `config.type` names (default: ONNX Runtime on the CPU) for the model
    file `model_path` and its `dim`-wide vectors.

    Raises BackendUnavailable when it cannot start, naming the cause; also when its file
    declares vectors of another width than `dim`.
    """
    config = config or OnnxBackendConfig()
    backend = BACKENDS[config.type](model_path, config)
    if dim is not None and backend.output_dim not in (None, dim):
        backend.close()
        raise BackendUnavailable(
            f"{getattr(config, 'hef', model_path)} gives {backend.output_dim}-d vectors; "
            f"the model {model_path.name} gives {dim}-d ones: was it made from this model, "
            f"ending at its class token?")
    return backend


def fallback_of(config: BackendConfig | None) -> OnnxBackendConfig | None:
    """What runs when `config`'s backend cannot: `fallback: onnx` is ONNX Runtime on the CPU
    with its defaults; ONNX Runtime itself has nothing to fall back to."""
    if isinstance(config, HailoBackendConfig) and config.fallback == "onnx":
        return OnnxBackendConfig()
    return None


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendConfig",
    "BackendFailed",
    "BackendUnavailable",
    "HailoBackendConfig",
    "InputSpec",
    "OnnxBackendConfig",
    "create_backend",
    "fallback_of",
]
