"""`dinowatch model quantize`: an INT8 copy of a model, and its fidelity on the user's images.

Dynamic quantization, as ONNX Runtime recommends for transformer models on CPUs: weights are
stored as signed INT8 with one scale per output channel, activations are quantized on the fly
for each batch, so no calibration set is needed. Its graph is prepared first with ONNX
Runtime's `quant_pre_process` (shape inference and graph optimization), as its quantization
guide advises. Sources: onnxruntime.ai/docs/performance/model-optimizations/quantization.html
and onnxruntime/python/tools/quantization (quantize_dynamic, shape_inference).

Fidelity is measured, not assumed: the same images go through the base model and the new
one (bench.compare: decoded once with the daemon's imaging options), and the cosine of each
pair of vectors is kept (mean and min) in the model card beside the new file.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dinowatch import models
from dinowatch.backends import BackendConfig
from dinowatch.bench import compare
from dinowatch.embedder import DinoEmbedder
from dinowatch.imaging import ImagingOptions
from dinowatch.models import ModelCard
from dinowatch.store import utc_now

log = logging.getLogger(__name__)

METHOD = "quantize_dynamic: INT8 weights (QInt8, per channel), activations UINT8 per batch; " \
         "graph prepared by quant_pre_process"
QUANTIZED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul",
                 "QLinearConv", "DequantizeLinear"}


class QuantizeError(models.ModelError):
    """The model could not be quantized, or its fidelity could not be measured."""


def quantize(source: Path, entry: models.ModelEntry, cache_dir: Path, images: Sequence[Path],
             imaging: ImagingOptions, backend: BackendConfig | None = None) -> ModelCard:
    """Write `cache_dir/<entry.filename>` (INT8) and its model card; return the card.

    `source` is the fp32 model `entry.base` names (the registry file, or the user's own copy).
    Images that fail to decode are skipped. Raises QuantizeError if ONNX Runtime cannot
    quantize the model or no image decodes; nothing is replaced then.
    """
    from onnxruntime import __version__ as ort_version

    target = Path(cache_dir) / entry.filename
    _check_source(Path(source), target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with DinoEmbedder(source, model_name=entry.base or entry.name, imaging=imaging,
                      backend=backend) as base, \
            tempfile.TemporaryDirectory(dir=target.parent, prefix=".quantize-") as work:
        made = Path(work) / entry.filename
        _quantize_file(source, made, base.backend.producer)
        with DinoEmbedder(made, model_name=entry.name, imaging=imaging,
                          backend=backend) as int8:
            try:
                fidelity = compare(base, int8, images).fidelity
            except ValueError as err:
                raise QuantizeError(str(err)) from err
        base_id = base.identity
        card = ModelCard(
            name=entry.name, sha256=models.sha256_file(made), size=made.stat().st_size,
            base=entry.base or entry.name, base_sha256=base_id.sha256,
            base_pinned=base_id.pinned, method=METHOD, fidelity=fidelity,
            onnxruntime=ort_version, created=utc_now())
        # Both are complete before either replaces what was there; between the two renames
        # the new model meets the old card and is refused, never trusted half-made.
        card_file = card.write(made)
        made.replace(target)
        card_file.replace(ModelCard.path_for(target))
        models.fsync_dir(target.parent)
    log.info("%s: %s, fidelity to %s on %d images: mean %.5f, min %.5f", target, entry.name,
             card.base, fidelity.images, fidelity.mean, fidelity.min)
    return card


def _check_source(source: Path, target: Path) -> None:
    """QuantizeError unless `source` is an fp32 model: quantizing a quantized model again
    would measure its fidelity against itself (cosine 1.0) and store that."""
    import onnx

    if ModelCard.read(source) is not None or source.resolve() == target.resolve():
        raise QuantizeError(f"{source} was made by `dinowatch model quantize`: give the fp32 "
                            "model it came from (--model, or model.path)")
    model = onnx.load(str(source), load_external_data=False)
    quantized = {node.op_type for node in model.graph.node} & QUANTIZED_OPS
    if quantized:
        raise QuantizeError(f"{source} is quantized already ({', '.join(sorted(quantized))} "
                            "nodes): give the fp32 model (--model, or model.path)")


def _quantize_file(source: Path, target: Path, producer: str) -> None:
    """ONNX Runtime's graph preparation, then dynamic INT8 quantization, into `target`."""
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as err:
        raise QuantizeError(f"model quantize needs the onnx package ({err}): "
                            "pip install dinowatch") from err
    prepared = target.with_name("prepared.onnx")
    try:
        quant_pre_process(str(source), str(prepared))
        quantize_dynamic(prepared, target, per_channel=True, weight_type=QuantType.QInt8)
    except Exception as err:  # the tools raise whatever onnx or ORT raise
        raise QuantizeError(f"cannot quantize {source}: {type(err).__name__}: {err}") from err
    finally:
        prepared.unlink(missing_ok=True)
    if producer:
        # The quantizer signs the file as its own; keep the base's producer, so a stand-in
        # (dinowatch.testing) is still reported as one.
        model = onnx.load(str(target))
        model.producer_name = producer
        onnx.save(model, str(target))
