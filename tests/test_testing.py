"""The seeded stand-in models have DINOv2's architecture and behave like an embedder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dinowatch.testing import build_model, main


def _session(model: bytes | Path) -> ort.InferenceSession:
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def test_same_seed_gives_identical_bytes_and_another_seed_differs() -> None:
    assert build_model("tiny", seed=3) == build_model("tiny", seed=3)
    assert build_model("tiny", seed=3) != build_model("tiny", seed=4)


def test_full_model_has_vit_s14_structure(full_model: Path) -> None:
    model = onnx.load(str(full_model))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("LayerNormalization") == 2 * 12 + 1  # two per block plus the final norm
    assert ops.count("Softmax") == 12  # one attention per block
    assert ops.count("Erf") == 12  # exact GELU
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    assert list(next(a for a in conv.attribute if a.name == "strides").ints) == [14, 14]
    weights = {init.name.rsplit("_", 1)[0]: init for init in model.graph.initializer}
    assert list(weights["pos_embed"].dims) == [1, 257, 384]
    assert list(weights["blocks.0.attn.qkv.weight"].dims) == [384, 3 * 384]
    assert list(weights["blocks.11.mlp.fc1.weight"].dims) == [384, 1536]
    params = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    assert 21_500_000 < params < 22_500_000  # ViT-S/14 has 22.06 M
    epsilons = [a.f for n in model.graph.node if n.op_type == "LayerNormalization"
                for a in n.attribute if a.name == "epsilon"]
    assert epsilons == pytest.approx([1e-6] * 25)


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_and_output_shapes(tiny_model: Path, tiny_all_tokens_model: Path,
                                         batch: int) -> None:
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    cls = _session(tiny_model).run(None, {"pixel_values": x})[0]
    tokens = _session(tiny_all_tokens_model).run(None, {"pixel_values": x})[0]
    assert cls.shape == (batch, 384)
    assert tokens.shape == (batch, 257, 384)
    np.testing.assert_allclose(tokens[:, 0], cls, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("variant", "max_cosine"), [("tiny", 0.99), ("full", 0.96)])
def test_different_images_give_clearly_different_embeddings(variant: str, max_cosine: float,
                                                            full_model: Path,
                                                            tiny_model: Path,
                                                            report: Callable) -> None:
    rng = np.random.default_rng(7)
    coarse = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    images = np.kron(coarse, np.ones((28, 28), np.float32))  # six blocky 224x224 "scenes"
    session = _session(full_model if variant == "full" else tiny_model)
    clean = session.run(None, {"pixel_values": images})[0]
    noisy_input = images + 0.05 * rng.standard_normal(images.shape).astype(np.float32)
    noisy = session.run(None, {"pixel_values": noisy_input})[0]
    clean /= np.linalg.norm(clean, axis=1, keepdims=True)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    cosines = (clean @ clean.T)[~np.eye(6, dtype=bool)]
    report(f"stand-in {variant} model: cosine between different images mean {cosines.mean():.3f} "
           f"max {cosines.max():.3f}; same image + noise {np.sum(clean * noisy, 1).min():.4f}")
    assert cosines.max() < max_cosine  # not collapsed onto one direction
    assert cosines.mean() < max_cosine - 0.03
    assert np.sum(clean * noisy, axis=1).min() > 0.96  # yet stable under pixel noise


def test_module_cli_writes_a_loadable_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m.onnx"
    main(["--out", str(out), "--variant", "tiny", "--seed", "5"])
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes() == build_model("tiny", seed=5)
