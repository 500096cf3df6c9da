"""`dinowatch bench` and `backends compare`: speed on this device, and fidelity between models.

Throughput is measured through the daemon's own pipeline (decode workers, batched inference,
record worker, a real SQLite store in a temporary folder), so it is what the daemon reaches
on these images; latency is one image at a time, decode + inference, on an idle pipeline.

The floor is what this CPU could do at best: each image costs the CPU seconds measured for
reading, hashing and decoding it, plus its model's multiply-accumulates at the speed a
matrix-multiply probe reaches on one core of this CPU through ONNX Runtime's own kernels
(fp32 MatMul, INT8 MatMulInteger). With `cores` cores, floor images/s = cores / that sum.
For a backend that runs the model on an accelerator (Hailo) the floor is the host stages'
alone: the most images/s the CPU can hand the device.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dinowatch import models
from dinowatch.embedder import EMBED_ERRORS, DinoEmbedder, preprocess
from dinowatch.imaging import decode
from dinowatch.pipeline import DECODE_WORKERS, Pipeline
from dinowatch.store import Store

MATMUL_OPS = {"MatMul": "fp32", "Gemm": "fp32", "MatMulInteger": "int8"}
CONV_OPS = {"Conv": "fp32", "ConvInteger": "int8"}  # quantize_dynamic makes ConvInteger
PROBE_SHAPE = (257 * 4, 384, 1536)  # (M, K, N): a ViT-S/14 MLP layer on a batch of 4
PROBE_SECONDS = 1.0  # per kind of multiply
LATENCY_IMAGES = 10
DATABASE = "bench.sqlite3"
COMPARE_BATCH = 4

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Floor:
    """The multiply-accumulates of one image through the model, and the probe's speed."""

    gmacs: dict[str, float]  # {"fp32": G, "int8": G} per image (Conv counted as fp32)
    gmacs_per_core_second: dict[str, float]  # the probe, one thread

    def inference_cpu_seconds(self) -> float:
        """CPU seconds per image the model needs at the probe's speed."""
        return sum(macs / self.gmacs_per_core_second[kind] for kind, macs in self.gmacs.items())


@dataclass(frozen=True)
class BenchResult:
    model: str
    backend: str
    threads: int | None  # ONNX Runtime's intra-op threads (None: a backend without them)
    decode_workers: int
    cores: int
    images: int
    images_per_s: float
    latency_ms_p50: float  # decode + inference of one image on an idle pipeline
    latency_ms_p95: float
    cpu_ms_per_image: dict[str, float]  # by stage: read, hash, decode, inference, record
    floor_images_per_s: float
    ratio_to_floor: float  # images/s over floor images/s: 1.0 would leave nothing on the table
    floor: Floor
    backend_fallback: str | None = None  # why the configured backend is not the one measured

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def model_macs(model_path: Path) -> dict[str, float]:
    """Giga multiply-accumulates per image by kind ("fp32", "int8"), from the ONNX graph.

    Counts MatMul, Gemm and MatMulInteger (A[..., M, K] x B[K, N]: prod(A's leading dims) x
    K x N) and Conv, ConvInteger (output elements x C_in / groups x kernel area), with the
    batch set to 1.
    Raises ImportError without the onnx package.
    """
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(model_path), load_external_data=False)
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim]
              for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    shapes |= {init.name: list(init.dims) for init in model.graph.initializer}
    macs = {"fp32": 0.0, "int8": 0.0}
    for node in model.graph.node:
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1]) if len(node.input) > 1 \
            else None
        if node.op_type in MATMUL_OPS and a and b:
            macs[MATMUL_OPS[node.op_type]] += math.prod(a[:-1]) * a[-1] * b[-1]
        elif node.op_type in CONV_OPS and b and (out := shapes.get(node.output[0])):
            # b: [C_out, C_in/groups, kh, kw]
            macs[CONV_OPS[node.op_type]] += math.prod(out) * math.prod(b[1:])
    return {kind: value / 1e9 for kind, value in macs.items() if value}


def probe(kinds: Sequence[str]) -> dict[str, float]:
    """Giga multiply-accumulates per second on one core, through ONNX Runtime, by kind."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m, k, n = PROBE_SHAPE
    rng = np.random.default_rng(0)
    rates = {}
    feeds: dict[str, np.ndarray]
    for kind in kinds:
        if kind == "int8":
            node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
            types = (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32)
            feeds = {"a": rng.integers(0, 255, (m, k), dtype=np.uint8),
                     "b": rng.integers(-127, 127, (k, n), dtype=np.int8)}
        else:
            node = helper.make_node("MatMul", ["a", "b"], ["y"])
            types = (TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT)
            feeds = {"a": rng.standard_normal((m, k), dtype=np.float32),
                     "b": rng.standard_normal((k, n), dtype=np.float32)}
        graph = helper.make_graph(
            [node], "probe", [helper.make_tensor_value_info("a", types[0], [m, k]),
                              helper.make_tensor_value_info("b", types[1], [k, n])],
            [helper.make_tensor_value_info("y", types[2], [m, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        times: list[float] = []
        deadline = time.perf_counter() + PROBE_SECONDS
        while time.perf_counter() < deadline or len(times) < 5:
            start = time.thread_time()
            session.run(None, feeds)
            times.append(time.thread_time() - start)
        rates[kind] = m * k * n / statistics.median(times) / 1e9
    return rates


def run(embedder: DinoEmbedder, images: Sequence[Path], *,
        decode_workers: int = DECODE_WORKERS) -> BenchResult:
    """Measure `embedder` on `images` (see the module docstring). Raises ValueError with no
    images, and what DinoEmbedder raises for the first image that fails to decode."""
    if not images:
        raise ValueError("no images to measure with")
    embedder.warm_up()
    latencies = []
    for path in list(images)[:LATENCY_IMAGES]:
        start = time.perf_counter()
        embedder.embed(path)
        latencies.append(1000 * (time.perf_counter() - start))
    with tempfile.TemporaryDirectory(prefix="dinowatch-bench-") as folder:
        store = Store(Path(folder) / DATABASE)
        pipeline = Pipeline(embedder, store, decode_workers=decode_workers)
        pipeline.start()
        start = time.perf_counter()
        for path in images:
            pipeline.submit(Path(path), "bench")
        while pipeline.queued and not pipeline.stalled:
            time.sleep(0.01)
        seconds = time.perf_counter() - start
        pipeline.stop()
        store.close()
    if pipeline.failed:  # a device failure, even one recovered from, spoils the timing
        raise ValueError(f"{pipeline.failed} of {len(images)} images failed to embed"
                         + (f": {pipeline.backend_error}" if pipeline.backend_error else ""))
    done = pipeline.processed
    stage_seconds = {stage: value / done for stage, value in pipeline.cpu.seconds().items()}
    gmacs = model_macs(embedder.model_path) if embedder.backend.runs_on_cpu else {}
    floor = Floor(gmacs, probe(list(gmacs)))
    host = sum(value for stage, value in stage_seconds.items() if stage != "inference")
    cores = os.cpu_count() or 1
    floor_rate = cores / (host + floor.inference_cpu_seconds())
    rate = done / seconds
    return BenchResult(
        model=embedder.identity.name, backend=embedder.backend.type_key,
        threads=getattr(embedder.backend, "threads", None),
        decode_workers=decode_workers, cores=cores, images=done,
        images_per_s=round(rate, 2),
        latency_ms_p50=round(statistics.median(latencies), 1),
        latency_ms_p95=round(float(np.percentile(latencies, 95)), 1),
        cpu_ms_per_image={stage: round(1000 * value, 1)
                          for stage, value in stage_seconds.items()},
        floor_images_per_s=round(floor_rate, 2),
        ratio_to_floor=round(rate / floor_rate, 3), floor=floor,
        backend_fallback=embedder.fallback)


def sample(images: Iterable[Path], count: int) -> list[Path]:
    """Up to `count` of `images`, spread evenly over their sorted order (the same every run)."""
    ordered = sorted(images)
    if len(ordered) <= count:
        return ordered
    step = len(ordered) / count
    return [ordered[int(i * step)] for i in range(count)]


@dataclass(frozen=True)
class Comparison:
    """Two embedders on the same images: how alike their vectors are, and their speed."""

    fidelity: models.Fidelity  # cosine of `other`'s vectors to `reference`'s
    inference_ms: tuple[float, float]  # per image, wall time: reference, other


def compare(reference: DinoEmbedder, other: DinoEmbedder,
            images: Sequence[Path]) -> Comparison:
    """Embed `images` with both, each decoded once (with `reference`'s imaging options) and
    laid out for each backend's own input, in batches of COMPARE_BATCH. Images that fail to
    decode are skipped (a WARNING names them); ValueError if none decodes."""
    cosines: list[np.ndarray] = []
    spent = [0.0, 0.0]
    for start in range(0, len(images), COMPARE_BATCH):
        pictures = []
        for path in images[start:start + COMPARE_BATCH]:
            try:
                pictures.append(decode(path, reference.imaging,
                                       reference.backend.input_spec.size).image)
            except EMBED_ERRORS as err:
                log.warning("skipped: %s", err)
        if not pictures:
            continue
        vectors = []
        for index, embedder in enumerate((reference, other)):
            tensors = [preprocess(picture, embedder.backend.input_spec) for picture in pictures]
            started = time.perf_counter()
            vectors.append(embedder.infer(tensors))
            spent[index] += time.perf_counter() - started
        # both L2-normalized: the row-wise dot product is the cosine
        cosines.append(np.sum(vectors[0] * vectors[1], axis=1))
    if not cosines:
        raise ValueError(f"no image to compare on: none of the {len(images)} given decodes")
    values = np.concatenate(cosines).astype(np.float64)
    count = len(values)
    return Comparison(
        models.Fidelity(mean=round(float(values.mean()), 6), min=round(float(values.min()), 6),
                        images=count),
        (round(1000 * spent[0] / count, 1), round(1000 * spent[1] / count, 1)))
