"""The README's quick start as a user on Debian 12 / Raspberry Pi OS runs it, from a copy of
the repository (the real ./.venv stays untouched):

* the test command under `env -i` with Debian's own Python, which is externally managed
  (PEP 668): it must make a virtual environment and install nothing into the system;
* then the local `scripts/install.sh`, the two lines the README gives for the `dinowatch`
  command, `dinowatch status`, and the local Mosquitto keeping retained messages across its
  own restart.

Packages come from PyPI into the new virtual environment (pip's cache is shared, so only the
first run on a machine downloads them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import Subscriber
from daemon_process import wait_until

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")
# What the test command runs here: small, yet it needs both the package's dependencies
# (onnxruntime) and the test extra (onnx builds the model). Lint has its own tests.
SUBSET = "tests/test_testing.py::test_dynamic_batch_and_output_shapes"
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", ".dinowatch", "__pycache__", ".*_cache",
                                    "*.egg-info", "build")
# Read by the README's user; the test runs exactly these.
README_LINES = (". .venv/bin/activate", "export DINOWATCH_CONFIG=$PWD/.dinowatch/config.yaml")


def pip_cache() -> Path:
    """The caller's pip cache, so wheels are downloaded once per machine, not once per run."""
    if os.environ.get("PIP_CACHE_DIR"):
        return Path(os.environ["PIP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip"


def clean_env(home: Path, **extra: str) -> list[str]:
    """`env -i` and a user's minimal environment: Debian's PATH for a normal user."""
    variables = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", **extra}
    return ["env", "-i", *(f"{key}={value}" for key, value in variables.items())]


def system_python_packages(home: Path) -> list[str]:
    """Every distribution the system Python sees, user site (under `home`) included."""
    script = ("import importlib.metadata as m; "
              "print(sorted(f'{d.metadata[\"Name\"]}=={d.version}' for d in m.distributions()))")
    result = subprocess.run([*clean_env(home), str(SYSTEM_PYTHON), "-c", script],
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.splitlines()


@dataclass
class UserCopy:
    repo: Path
    home: Path
    result: subprocess.CompletedProcess
    seconds: float
    packages_before: list[str]


@pytest.fixture(scope="module")
def user_copy(tmp_path_factory: pytest.TempPathFactory) -> UserCopy:
    """A copy of the repository on which `scripts/test.sh` ran as on a fresh Debian 12."""
    if not SYSTEM_PYTHON.is_file():
        pytest.skip(f"no {SYSTEM_PYTHON}: this machine has no distribution Python to test with")
    probe = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys, ensurepip; "
                            "sys.exit(sys.version_info < (3, 11))"], capture_output=True,
                           timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip(f"{SYSTEM_PYTHON} is older than 3.11 or lacks ensurepip (python3-venv; "
                    ".ci/run installs it): the system-Python run cannot happen here")
    root = tmp_path_factory.mktemp("user")
    repo, home = root / "dinowatch", root / "home"
    shutil.copytree(ROOT, repo, ignore=NOT_COPIED, symlinks=True)
    home.mkdir()
    before = system_python_packages(home)
    started = time.monotonic()
    result = subprocess.run(
        [*clean_env(home, PYTHON=str(SYSTEM_PYTHON), PIP_CACHE_DIR=str(pip_cache())),
         "bash", "scripts/test.sh", "-q", "-p", "no:cacheprovider", SUBSET],
        cwd=repo, capture_output=True, text=True, timeout=900, check=False)
    return UserCopy(repo, home, result, time.monotonic() - started, before)


def test_readme_test_command_with_the_externally_managed_system_python(
        user_copy: UserCopy, report: Callable[[str], None]) -> None:
    result, repo = user_copy.result, user_copy.repo
    report(f"README test command under env -i with {SYSTEM_PYTHON} (new venv, pip install "
           f"-e '.[test]', {SUBSET}): {user_copy.seconds:.0f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^[1-9]\d* passed in ", result.stdout, re.MULTILINE), result.stdout
    assert f"==> virtualenv {repo}/.venv ({SYSTEM_PYTHON})" in result.stdout
    config = (repo / ".venv" / "pyvenv.cfg").read_text()
    assert f"home = {SYSTEM_PYTHON.parent}" in config
    where = subprocess.run([str(repo / ".venv" / "bin" / "python"), "-c",
                            "import dinowatch; print(dinowatch.__file__)"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert where.stdout.strip() == str(repo / "src" / "dinowatch" / "__init__.py")
    # Nothing went into the system interpreter, nor into the user's site-packages.
    assert system_python_packages(user_copy.home) == user_copy.packages_before
    imported = subprocess.run([*clean_env(user_copy.home), str(SYSTEM_PYTHON), "-c",
                               "import dinowatch"], capture_output=True, text=True, timeout=60,
                              check=False)
    assert "ModuleNotFoundError" in imported.stderr
    assert not (user_copy.home / ".local").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_gone(pid: int) -> bool:
    """Ended (a zombie counts: a detached mosquitto's parent may be an init that never reaps)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def stop_pid(pid_file: Path) -> None:
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    if not process_gone(pid):
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: process_gone(pid), 10, f"process {pid} to end")


def retained(port: int, device_topic: str) -> dict[str, bytes]:
    """The retained messages below `dinowatch/+/` right after subscribing."""
    broker = SimpleNamespace(host="127.0.0.1", port=port, log="")
    subscriber = Subscriber(broker, (device_topic,))  # type: ignore[arg-type]
    try:
        messages = subscriber.wait_for(lambda got: {m.topic.rsplit("/", 1)[1] for m in got}
                                       >= {"status", "stats"}, timeout=10)
    finally:
        subscriber.close()
    return {m.topic.rsplit("/", 1)[1]: m.payload for m in messages if m.retain}


def test_local_install_then_the_readme_lines_then_status(
        user_copy: UserCopy, tiny_model: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    assert all(line in readme for line in README_LINES), "the README no longer shows them"
    if user_copy.result.returncode != 0:
        pytest.skip("the test command failed in this copy (see the test above)")
    repo, home, port = user_copy.repo, user_copy.home, free_port()
    state = repo / ".dinowatch"
    log_path = home / "install.log"

    def readme_status(*args: str) -> subprocess.CompletedProcess:
        script = " && ".join([f"cd {repo}", *README_LINES, f"dinowatch status {' '.join(args)}"])
        return subprocess.run([*clean_env(home), "bash", "-c", script], capture_output=True,
                              text=True, timeout=60, check=False)

    with log_path.open("wb") as log:
        install = subprocess.Popen(
            [*clean_env(home, PIP_CACHE_DIR=str(pip_cache()), DINOWATCH_MODEL=str(tiny_model),
                        DINOWATCH_MQTT_PORT=str(port)),
             "bash", "scripts/install.sh", "--no-systemd"],
            cwd=repo, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "dinowatch running" in log_path.read_text()
                   or install.poll() is not None, 300, "the local install to start the daemon")
        output = log_path.read_text()
        assert install.poll() is None, output
        # The script prints the same two lines, with this checkout's paths.
        assert f"      . {repo}/.venv/bin/activate\n" in output
        assert f"      export DINOWATCH_CONFIG={state}/config.yaml\n" in output
        assert f"started mosquitto on localhost:{port}" in output

        wait_until(lambda: readme_status().stdout.startswith("daemon: running"), 30,
                   "`dinowatch status` to see the daemon")
        first = readme_status().stdout.splitlines()[0]
        assert first.endswith(f"pid {install.pid}, connected to the broker"), first
        install.send_signal(signal.SIGTERM)  # the script exec'd the daemon: same process
        assert install.wait(20) == 0
        stopped = readme_status("--json")
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(stopped.stdout)["daemon"]["running"] is False

        # The broker's own restart keeps the retained status and stats (persistence on).
        before = retained(port, "dinowatch/+/#")
        assert before["status"] == b"offline"
        stop_pid(state / "mosquitto" / "mosquitto.pid")
        assert (state / "mosquitto" / "mosquitto.db").exists()
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        subprocess.run([mosquitto, "-d", "-c", str(state / "mosquitto" / "mosquitto.conf")],
                       check=True, timeout=30)
        after = retained(port, "dinowatch/+/#")
        assert after["status"] == b"offline"
        assert after["stats"] == before["stats"]
        assert json.loads(after["stats"])["pid"] == install.pid
    finally:
        if install.poll() is None:
            install.kill()
            install.wait(10)
        stop_pid(state / "mosquitto" / "mosquitto.pid")
