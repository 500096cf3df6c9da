"""The systemd unit and the installer: `systemd-analyze verify`, key directives, shell syntax."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "dinowatch.service"
INSTALL = ROOT / "scripts" / "install.sh"
VENV_DINOWATCH = "/opt/dinowatch/venv/bin/dinowatch"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """section -> key -> every value in order (systemd allows a key more than once)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):  # continuation: the next line belongs to this one
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def one(unit: Unit, section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be set exactly once, got {values}"
    return values[0]


# ---- systemd-analyze verify ---------------------------------------------------------------

def _analyze() -> str:
    tool = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(tool).is_file():
        pytest.skip("systemd-analyze is not installed (apt install systemd)")
    return tool


def _testable_copy(tmp_path: Path, extra: str = "") -> Path:
    """The unit with its executables swapped for ones that exist on this machine.

    verify fails on a missing ExecStart= binary, and /opt/dinowatch does not exist here.
    The file keeps its name: verify derives the unit name from it.
    """
    text = UNIT.read_text(encoding="utf-8")
    assert VENV_DINOWATCH in text
    text = text.replace(VENV_DINOWATCH, shutil.which("dinowatch") or sys.executable)
    if not Path("/bin/kill").exists():
        text = text.replace("/bin/kill", shutil.which("kill") or "/usr/bin/kill")
    text = text.replace("[Service]\n", f"[Service]\n{extra}", 1)
    copy = tmp_path / UNIT.name
    copy.write_text(text, encoding="utf-8")
    return copy


def _verify(unit_file: Path) -> tuple[int, list[str]]:
    """Exit status and the messages that concern our unit (not the host's own units)."""
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0", "LC_ALL": "C",
           "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    # --man=no: do not check that Documentation= man pages exist. verify needs no running
    # systemd: it loads the file into an in-process manager (fine in a container).
    proc = subprocess.run([_analyze(), "verify", "--man=no", str(unit_file)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    output = (proc.stdout + proc.stderr).splitlines()
    ours = [line for line in output if str(unit_file) in line or unit_file.name in line]
    return proc.returncode, ours


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    returncode, messages = _verify(_testable_copy(tmp_path))
    assert messages == [], "\n".join(messages)
    assert returncode == 0


def test_verify_would_catch_an_unknown_directive(tmp_path: Path) -> None:
    """Guards the test above: verify really reads the copy and its complaints get through."""
    _, messages = _verify(_testable_copy(tmp_path, extra="NoSuchDirective=yes\n"))
    assert any("NoSuchDirective" in line for line in messages), messages


def test_systemd_analyze_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    """systemd's own hardening score for the shipped unit (offline: no running systemd)."""
    proc = subprocess.run([_analyze(), "security", "--offline=true", "--no-pager",
                           str(_testable_copy(tmp_path))], capture_output=True, text=True,
                          env={**os.environ, "SYSTEMD_COLORS": "0", "LC_ALL": "C"},
                          timeout=120, check=False)
    overall = [line for line in proc.stdout.splitlines() if "Overall exposure level" in line]
    if proc.returncode != 0 and not overall:
        pytest.skip(f"systemd-analyze security cannot run here: {proc.stderr.strip()}")
    [line] = overall
    exposure = float(line.split(":")[1].split()[0])
    assert exposure <= 2.0, proc.stdout


# ---- the directives the design relies on ---------------------------------------------------

def test_service_type_watchdog_and_restart_policy(unit: Unit) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    watchdog = one(unit, "Service", "WatchdogSec")
    assert watchdog.isdigit() and int(watchdog) > 0
    assert one(unit, "Service", "Restart") == "on-failure"
    # 78 = EX_CONFIG from `dinowatch check-config` / `run`: a broken config is not retried.
    assert "78" in one(unit, "Service", "RestartPreventExitStatus").split()
    assert "network-online.target" in one(unit, "Unit", "Wants").split()
    assert "network-online.target" in one(unit, "Unit", "After").split()
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_commands(unit: Unit) -> None:
    config = "-c /etc/dinowatch/config.yaml"
    # "-": a failing ExecStartPre= would escape RestartPreventExitStatus= (systemd#11868)
    assert one(unit, "Service", "ExecStartPre") == f"-{VENV_DINOWATCH} check-config {config}"
    assert one(unit, "Service", "ExecStart") == f"{VENV_DINOWATCH} run {config}"
    assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_user_state_and_credentials(unit: Unit) -> None:
    assert one(unit, "Service", "User") == "dinowatch"
    assert one(unit, "Service", "Group") == "dinowatch"
    assert "DynamicUser" not in unit["Service"]
    assert one(unit, "Service", "StateDirectory") == "dinowatch"
    assert one(unit, "Service", "ConfigurationDirectory") == "dinowatch"
    credentials = unit["Service"]["LoadCredential"]
    assert [value.split(":", 1)[0] for value in credentials] == ["mqtt_password"]
    environment = unit["Service"]["Environment"]
    assert "HAILORT_LOGGER_PATH=NONE" in environment
    assert "DINOWATCH_MODEL_DIR=/var/lib/dinowatch/models" in environment


def test_hardening(unit: Unit) -> None:
    service = unit["Service"]
    expected = {
        "ProtectSystem": "strict", "ProtectHome": "read-only", "PrivateTmp": "yes",
        "NoNewPrivileges": "yes", "SystemCallArchitectures": "native",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
        "RestrictNamespaces": "yes", "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes", "UMask": "0027",
        "CapabilityBoundingSet": "", "AmbientCapabilities": "", "DevicePolicy": "closed",
    }
    assert {key: one(unit, "Service", key) for key in expected} == expected
    assert "@system-service" in service["SystemCallFilter"]
    assert set(one(unit, "Service", "RestrictAddressFamilies").split()) <= {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    # The Hailo device node must stay reachable.
    assert one(unit, "Service", "PrivateDevices") == "no"
    assert "/dev/hailo0 rw" in service["DeviceAllow"]


# ---- the installer -------------------------------------------------------------------------

def test_install_script_syntax() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)


def test_install_script_usage_and_bad_arguments() -> None:
    """Argument parsing happens before anything is touched, so these runs are harmless."""
    shown = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True,
                           timeout=30, check=False)
    assert shown.returncode == 0
    assert "--prefix DIR" in shown.stdout and "--no-systemd" in shown.stdout
    bad = subprocess.run(["bash", str(INSTALL), "--bogus"], capture_output=True, text=True,
                         timeout=30, check=False)
    assert bad.returncode == 2
    assert "--bogus" in bad.stderr


def test_install_script_rewrites_the_venv_path_that_the_unit_uses() -> None:
    """install.sh --prefix seds /opt/dinowatch/venv in the unit; both must keep that string."""
    assert "/opt/dinowatch/venv" in INSTALL.read_text(encoding="utf-8")
    assert VENV_DINOWATCH in UNIT.read_text(encoding="utf-8")
