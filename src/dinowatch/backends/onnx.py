"""ONNX Runtime backend: the Pi 5's four Cortex-A76 cores (or any CPU)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Final, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dinowatch import models
from dinowatch.backends.base import BackendUnavailable, InputSpec

TYPE: Final = "onnx"
CACHE_DIR: Final = ".ort-cache"  # beside the model: its copy with mapped weights
PARTIAL: Final = ".partial-"  # a copy being written
PARTIAL_SECONDS: Final = 600.0  # a partial copy this old was left by a killed start

log = logging.getLogger(__name__)


class OnnxBackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["onnx"] = Field(default=TYPE, description="Backend plug-in: onnx (CPU).")
    threads: int | None = Field(
        default=None, ge=1, le=256, description="Intra-op threads; null = all cores."
    )
    batch: int = Field(
        default=4, ge=1, le=64,
        description="Most images per inference call: 4 is ~5 % faster than 1 on a CPU; 1 "
                    "needs ~35 MB less memory and gives an INT8 model batch-independent vectors.",
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="ONNX Runtime execution providers, in order of preference.",
    )


def _mapped_copy(model_path: Path, ort_version: str) -> Path:
    """Where this model's copy with its weights in a side file is kept (beside the model):
    ORT maps such weights instead of copying them onto its heap, and frees the mapping of
    each weight a kernel pre-packs, so those are not held twice (about 55 MB for ViT-S/14).
    Keyed by the file's identity (device, inode, size, mtime and ctime: a file written or
    renamed into place gets a new ctime, which user code cannot set back) and ORT's version;
    the graph is not optimized, so the copy is not tied to this CPU."""
    st = model_path.stat()
    identity = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:" \
               f"{ort_version}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return model_path.parent / CACHE_DIR / f"{model_path.stem}-{key}.onnx"


def _is_file(path: Path) -> bool:
    """Path.is_file(), but False where the folder cannot even be looked into."""
    try:
        return path.is_file()
    except OSError:
        return False


class OnnxBackend:
    type_key = TYPE
    runs_on_cpu = True
    output_dim: int | None

    def __init__(self, model_path: Path, config: OnnxBackendConfig | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise BackendUnavailable("onnxruntime is not installed: pip install dinowatch") from err
        config = config or OnnxBackendConfig()
        self._ort = ort
        self._providers = config.providers
        self.threads: int = config.threads or os.cpu_count() or 1  # intra-op
        self.batch = config.batch
        mapped = _mapped_copy(model_path, ort.__version__)
        if not _is_file(mapped):  # renamed into place last: a copy that exists is whole
            self._write_mapped_copy(model_path, mapped)
        source = mapped if _is_file(mapped) else model_path
        try:
            self._session = self._open(source)
        except Exception as err:  # ORT raises its own untyped exceptions
            if source == model_path:
                raise RuntimeError(f"cannot load ONNX model {model_path}: {err}") from err
            log.warning("ignoring %s: %s", mapped, err)  # damaged: a new copy next time
            with contextlib.suppress(OSError):
                mapped.unlink()
            try:
                self._session = self._open(model_path)
            except Exception as final:
                raise RuntimeError(f"cannot load ONNX model {model_path}: {final}") from final
        self.producer = models.producer_name(model_path)
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        height = model_input.shape[2] if len(model_input.shape) == 4 else None
        self.input_spec = InputSpec(size=height if isinstance(height, int) else 224)
        self.output_dim = None  # postprocess checks the output: a file may export any width
        log.debug("onnx backend: %s, %d threads", model_path, self.threads)

    def _options(self) -> Any:  # ort.SessionOptions
        ort = self._ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Spinning threads keep a core at 100 % between images; an idle appliance must idle.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        # A memory pattern is one block per input shape (batch 1, 4, ...), each kept in
        # ORT's arena: without them the peak is ~43 MB lower at the same speed (issue 9).
        options.enable_mem_pattern = False
        return options

    def _open(self, path: Path) -> Any:  # ort.InferenceSession
        return self._ort.InferenceSession(str(path), sess_options=self._options(),
                                          providers=self._providers)

    def _write_mapped_copy(self, model_path: Path, mapped: Path) -> None:
        """Save the model as it is (no optimization) with its weights in `<mapped>.data`.
        Both files are written in a private folder and renamed into place, the graph last:
        a crash leaves no half copy, and a file another process has mapped is replaced,
        never rewritten under it. Any failure leaves the weights on the heap, nothing worse."""
        folder = mapped.parent
        try:
            folder.mkdir(exist_ok=True)
            self._forget_old_copies(model_path, mapped)
            with tempfile.TemporaryDirectory(dir=folder, prefix=PARTIAL) as partial:
                graph, data = Path(partial) / mapped.name, Path(partial) / f"{mapped.stem}.data"
                options = self._options()
                options.graph_optimization_level = \
                    self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                options.optimized_model_filepath = str(graph)
                options.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name", data.name)
                options.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
                self._ort.InferenceSession(str(model_path), sess_options=options,
                                           providers=["CPUExecutionProvider"])
                data.replace(mapped.with_name(data.name))
                graph.replace(mapped)
        except Exception as err:  # a read-only or full disk, a folder of another user, ...
            log.info("no mapped copy of the model in %s (%s): its weights are loaded onto "
                     "the heap", folder, err)

    @staticmethod
    def _forget_old_copies(model_path: Path, mapped: Path) -> None:
        """Copies of earlier versions of this model, and what a killed start left half
        written (after PARTIAL_SECONDS: a concurrent start may still be writing)."""
        stale = re.compile(rf"{re.escape(model_path.stem)}-[0-9a-f]{{16}}\.(onnx|data)")
        for old in mapped.parent.iterdir():
            with contextlib.suppress(OSError):
                if stale.fullmatch(old.name) and old.stem != mapped.stem:
                    old.unlink()
                elif old.name.startswith(PARTIAL) and \
                        time.time() - old.stat().st_mtime > PARTIAL_SECONDS:
                    shutil.rmtree(old, ignore_errors=True)

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
