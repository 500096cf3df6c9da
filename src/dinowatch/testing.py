"""DINOv2-architecture ONNX models with seeded random weights, for tests and benchmarks.

No machine of this project can download weights, so these graphs stand in for the real
ViT-S/14: the same operators, shapes and cost, built with the `onnx` package and no torch.
The same seed gives a byte-identical file.

    python -m dinowatch.testing --out model.onnx [--variant full|tiny] [--all-tokens]
"""

from __future__ import annotations

import argparse
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dinowatch.models import STAND_IN_PRODUCER

OPSET = 17  # LayerNormalization arrived in opset 17


@dataclass(frozen=True)
class VitShape:
    image_size: int = 224
    patch: int = 14
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: int = 4
    # Sharper attention than a plain 1/sqrt(d) init, so the CLS token really depends on the
    # image (different scenes: mean cosine ~0.8 for the full model) while pixel noise barely
    # moves it (~0.99).
    qkv_gain: float = 1.5

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1


VARIANTS = {
    "full": VitShape(),  # DINOv2 ViT-S/14: 22 M parameters, ~4.6 GFLOPs per image
    "tiny": VitShape(depth=1, qkv_gain=1.8),  # same input and output, one block: fast tests
}


class _GraphBuilder:
    """Accumulates nodes and seeded initializers; names are unique by construction."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, hint: str, shape: tuple[int, ...], std: float) -> str:
        return self.const(hint, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def linear(self, x: str, d_in: int, d_out: int, hint: str, gain: float = 1.0) -> str:
        w = self.weight(f"{hint}.weight", (d_in, d_out), gain / math.sqrt(d_in))
        b = self.weight(f"{hint}.bias", (d_out,), 0.02)
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x: str, dim: int, hint: str) -> str:
        scale = 1 + 0.1 * self.rng.standard_normal(dim)
        gamma = self.const(f"{hint}.weight", scale.astype(np.float32))
        beta = self.weight(f"{hint}.bias", (dim,), 0.02)
        return self.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-6)

    def layer_scale(self, x: str, dim: int, hint: str) -> str:
        # Trained DINOv2 LayerScale values are O(0.1..1); the 1e-5 init would make every
        # image's CLS token the same, so the stand-in uses trained-like magnitudes.
        gamma = self.const(f"{hint}.gamma", np.full(dim, 1.0, dtype=np.float32))
        return self.op("Mul", [x, gamma])


def _attention(g: _GraphBuilder, x: str, s: VitShape, hint: str) -> str:
    head_dim = s.dim // s.heads
    # One qkv projection, as DINOv2 has it.
    qkv = g.linear(x, s.dim, 3 * s.dim, f"{hint}.qkv", gain=s.qkv_gain)
    qkv = g.op("Reshape", [qkv, g.const("shape", np.array([0, 0, 3, s.heads, head_dim]))])
    qkv = g.op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])  # [3, B, heads, tokens, head_dim]
    q, k, v = (g.op("Gather", [qkv, g.const("index", np.array(i))], axis=0) for i in range(3))
    scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    scores = g.op("Mul", [scores, g.const("scale", np.array(head_dim**-0.5, dtype=np.float32))])
    mixed = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    mixed = g.op("Transpose", [mixed], perm=[0, 2, 1, 3])
    mixed = g.op("Reshape", [mixed, g.const("shape", np.array([0, 0, s.dim]))])
    return g.linear(mixed, s.dim, s.dim, f"{hint}.proj")


def _mlp(g: _GraphBuilder, x: str, s: VitShape, hint: str) -> str:
    hidden = g.linear(x, s.dim, s.mlp_ratio * s.dim, f"{hint}.fc1")
    # Exact GELU written as torch exports it; ORT fuses the pattern into one Gelu kernel.
    erf = g.op("Erf", [g.op("Div", [hidden, g.const("sqrt2", np.array(math.sqrt(2), np.float32))])])
    one = g.const("one", np.array(1.0, np.float32))
    half = g.const("half", np.array(0.5, np.float32))
    gelu = g.op("Mul", [g.op("Mul", [hidden, g.op("Add", [erf, one])]), half])
    return g.linear(gelu, s.mlp_ratio * s.dim, s.dim, f"{hint}.fc2")


def build_model(variant: str = "full", *, seed: int = 0, all_tokens: bool = False,
                dim: int | None = None) -> bytes:
    """Serialize a DINOv2-architecture ONNX model: input [B, 3, 224, 224] float32.

    Output `embedding` is the CLS row [B, D], or every token [B, 257, D] with `all_tokens`
    (the other export style in the wild). `dim` overrides the width (for mismatch tests).
    """
    from onnx import TensorProto, checker, helper

    s = VARIANTS[variant]
    if dim is not None:
        s = VitShape(**{**s.__dict__, "dim": dim})
    g = _GraphBuilder(seed)
    grid = s.image_size // s.patch

    patch_std = 1.0 / math.sqrt(3 * s.patch**2)
    patch_w = g.weight("patch_embed.weight", (s.dim, 3, s.patch, s.patch), patch_std)
    patches = g.op("Conv", ["pixel_values", patch_w, g.weight("patch_embed.bias", (s.dim,), 0.02)],
                   kernel_shape=[s.patch, s.patch], strides=[s.patch, s.patch])
    patches = g.op("Reshape", [patches, g.const("shape", np.array([0, s.dim, grid * grid]))])
    patches = g.op("Transpose", [patches], perm=[0, 2, 1])  # [B, 256, D]

    input_shape = g.op("Shape", ["pixel_values"])
    batch = g.op("Gather", [input_shape, g.const("index", np.array([0]))], axis=0)
    cls_shape = g.op("Concat", [batch, g.const("shape", np.array([1, s.dim]))], axis=0)
    cls = g.op("Expand", [g.weight("cls_token", (1, 1, s.dim), 0.02), cls_shape])
    x = g.op("Concat", [cls, patches], axis=1)
    x = g.op("Add", [x, g.weight("pos_embed", (1, s.tokens, s.dim), 0.2)])

    for i in range(s.depth):
        hint = f"blocks.{i}"
        attn = _attention(g, g.layer_norm(x, s.dim, f"{hint}.norm1"), s, f"{hint}.attn")
        x = g.op("Add", [x, g.layer_scale(attn, s.dim, f"{hint}.ls1")])
        mlp = _mlp(g, g.layer_norm(x, s.dim, f"{hint}.norm2"), s, f"{hint}.mlp")
        x = g.op("Add", [x, g.layer_scale(mlp, s.dim, f"{hint}.ls2")])

    x = g.layer_norm(x, s.dim, "norm")
    if all_tokens:
        out_shape: list[str | int] = ["batch", s.tokens, s.dim]
    else:
        x = g.op("Gather", [x, g.const("index", np.array(0))], axis=1)  # CLS row
        out_shape = ["batch", s.dim]
    g.nodes[-1].output[0] = "embedding"

    graph = helper.make_graph(
        g.nodes,
        f"dinov2_vit_{variant}_seed{seed}",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                       ["batch", 3, s.image_size, s.image_size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, out_shape)],
        g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name=STAND_IN_PRODUCER, ir_version=8)
    checker.check_model(model)
    return model.SerializeToString()


def write_model(path: Path, variant: str = "full", *, seed: int = 0, all_tokens: bool = False,
                dim: int | None = None) -> Path:
    """Build and write a model file; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build_model(variant, seed=seed, all_tokens=all_tokens, dim=dim))
    return path


def synthetic_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour fields, a few hard edges and sensor noise.

    Random but structured, so JPEG and resampling behave as on real pictures and different
    seeds give clearly different embeddings.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noise = rng.normal(0, 6, (height, width, 1)).astype(np.int16)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_photos(folder: Path, count: int, *, seed: int, size: tuple[int, int] = (320, 240),
                 quality: int = 88) -> list[Path]:
    """`count` synthetic photos as JPEGs `photo<seed+i>.jpg` in `folder` (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo{seed + i}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        synthetic_photo(*size, seed=seed + i).save(path, quality=quality)
    return paths


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims `width` x `height` but holds no pixels: a decompression-bomb probe."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dinowatch.testing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the .onnx file")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all-tokens", action="store_true", help="output [B, 257, D]")
    args = parser.parse_args(argv)
    write_model(args.out, args.variant, seed=args.seed, all_tokens=args.all_tokens)
    print(args.out)


if __name__ == "__main__":
    main()
