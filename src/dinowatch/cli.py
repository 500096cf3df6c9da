"""The `dinowatch` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 config."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dinowatch import __version__, models
from dinowatch.errors import DinowatchError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78

log = logging.getLogger("dinowatch")


def _fail(message: object) -> int:
    print(f"dinowatch: {message}", file=sys.stderr)
    return EXIT_FAILURE


def cmd_embed(args: argparse.Namespace) -> int:
    from PIL import UnidentifiedImageError

    from dinowatch.embedder import DinoEmbedder

    try:
        embedder = DinoEmbedder(args.model, model_name=args.model_name)
    except (FileNotFoundError, DinowatchError, RuntimeError) as err:
        return _fail(err)
    vectors, failed = [], 0
    with embedder:
        for path in args.images:
            try:
                vector = embedder.embed(path, normalize=not args.raw)
            except (FileNotFoundError, UnidentifiedImageError, DinowatchError, RuntimeError) as err:
                failed += 1
                _fail(err)
                continue
            if args.format == "json":
                print(json.dumps({"path": str(path), "vector": vector.tolist()}), flush=True)
            vectors.append(vector)
    if args.format == "npy":
        np.save(sys.stdout.buffer, np.stack(vectors) if vectors else
                np.empty((0, embedder.dim), np.float32))
    return EXIT_FAILURE if failed else EXIT_OK


def cmd_model(args: argparse.Namespace) -> int:
    cache_dir = args.dir or models.model_dir()
    try:
        entry = models.get_entry(args.name or models.DEFAULT_MODEL)
        if args.action == "fetch":
            print(models.fetch(entry, cache_dir, progress=sys.stderr.isatty()))
            return EXIT_OK
        details = models.info(entry, cache_dir)
    except DinowatchError as err:
        return _fail(err)
    if args.action == "info":
        for key, value in details.items():
            print(f"{key}: {value}")
        return EXIT_OK
    if details["verified"]:
        print(f"{details['path']}: OK")
        return EXIT_OK
    if not details["present"]:
        return _fail(f"{details['path']} is missing")
    if details["verified"] is None:
        return _fail(f"{entry.name} is not pinned to a sha256; nothing to verify against")
    return _fail(f"{details['path']} failed verification")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinowatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dinowatch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser("embed", help="embed image files, print one JSON line each",
                                description="Embed image files with the seed's preprocessing.")
    embed.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    embed.add_argument("--model", type=Path,
                       help="ONNX file (default: the verified registry model)")
    embed.add_argument("--model-name", default=models.DEFAULT_MODEL,
                       choices=sorted(models.REGISTRY),
                       help="registry entry (sets the expected width; default %(default)s)")
    embed.add_argument("--raw", action="store_true", help="do not L2-normalize")
    embed.add_argument("--format", choices=["json", "npy"], default="json",
                       help="json: {path, vector} per line; npy: one (N, D) array on stdout")
    embed.set_defaults(handler=cmd_embed)

    model = commands.add_parser("model", help="fetch, describe or verify a model file",
                                description="Model provisioning (see README, Models).")
    model.add_argument("action", choices=["fetch", "info", "verify"])
    model.add_argument("name", nargs="?", metavar="NAME",
                       help=f"registry entry (default {models.DEFAULT_MODEL})")
    model.add_argument("--dir", type=Path, help="model cache (default $DINOWATCH_MODEL_DIR, "
                                                "else $XDG_CACHE_HOME/dinowatch/models)")
    model.set_defaults(handler=cmd_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
