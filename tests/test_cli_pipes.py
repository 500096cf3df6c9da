"""Every command survives a reader that goes away (`dinowatch status | head -1`): no
BrokenPipeError traceback, and exit 141, what a tool killed by SIGPIPE reports in the shell."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_process import write_config
from dinowatch.testing import synthetic_photo

DINOWATCH = [sys.executable, "-m", "dinowatch.cli"]
ENV = {key: value for key, value in os.environ.items() if key != "DINOWATCH_CONFIG"}
NOISE = ("Traceback", "BrokenPipeError", "Exception ignored", "Errno 32")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, str]:
    """A config with a database holding a few images, and 20 pictures to embed."""
    root = tmp_path_factory.mktemp("pipes")
    photos = root / "photos"
    photos.mkdir()
    for seed in range(20):
        synthetic_photo(96, 64, seed=seed).save(photos / f"p{seed:02}.png")
    config = write_config(root / "config.yaml", data_dir=str(root / "data"),
                          model={"path": str(tiny_model)}, watch=[{"path": str(photos)}],
                          mqtt=None)
    index = subprocess.run([*DINOWATCH, "index", str(photos), "-c", str(config)],
                           capture_output=True, text=True, timeout=120, env=ENV, check=False)
    assert index.returncode == 0, index.stderr
    return {"config": str(config), "photos": str(photos), "model": str(tiny_model)}


COMMANDS = {
    "help": ["--help"],
    "status": ["status", "-c", "{config}"],
    "status --json": ["status", "--json", "-c", "{config}"],
    "check-config": ["check-config", "-c", "{config}"],
    "index": ["index", "{photos}", "-c", "{config}"],
    "embed": ["embed", "{photos}/p00.png", "{photos}/p01.png", "--model", "{model}"],
    "embed npy": ["embed", "{photos}/p00.png", "--model", "{model}", "--format", "npy"],
    "model info": ["model", "info"],
    "outbox list": ["outbox", "list", "-c", "{config}"],
}


@pytest.mark.parametrize("name", COMMANDS)
def test_a_closed_pipe_ends_the_command_quietly(name: str, setup: dict[str, str],
                                                tmp_path: Path) -> None:
    args = [arg.format(**setup) for arg in COMMANDS[name]]
    process = subprocess.Popen([*DINOWATCH, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**ENV, "DINOWATCH_MODEL_DIR":
                                                            str(tmp_path)})
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before the command has written anything
    stderr = process.stderr.read().decode()
    # argparse swallows the error of its own --help output (and exits 0)
    assert process.wait(120) == (0 if name == "help" else 141), stderr
    assert not any(word in stderr for word in NOISE), stderr


def test_embed_into_head_prints_one_line_and_no_traceback(setup: dict[str, str]) -> None:
    images = sorted(Path(setup["photos"]).glob("*.png"))
    command = shlex.join([*DINOWATCH, "embed", *map(str, images), "--model", setup["model"]])
    script = f'{command} | head -1; echo "exit ${{PIPESTATUS[0]}}" >&2'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                            env=ENV, check=False)
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["path"] == str(images[0])
    assert not any(word in result.stderr for word in NOISE), result.stderr
    # head leaves after the first line; 19 more images take far longer than that
    assert result.stderr.strip().endswith("exit 141"), result.stderr


def test_status_into_head(setup: dict[str, str]) -> None:
    command = shlex.join([*DINOWATCH, "status", "-c", setup["config"]])
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {command} | head -1"],
                            capture_output=True, text=True, timeout=120, env=ENV, check=False)
    assert result.returncode in (0, 141), result.stderr  # 0 when all fitted in the pipe at once
    assert result.stdout.startswith("daemon: not running"), result.stdout
    assert not any(word in result.stderr for word in NOISE), result.stderr
