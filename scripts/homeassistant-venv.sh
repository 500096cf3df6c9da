#!/usr/bin/env bash
# Makes, or reuses, a virtual environment holding a real Home Assistant for the discovery
# tests (tests/test_homeassistant.py starts it against the test Mosquitto):
#   scripts/homeassistant-venv.sh            prints the venv's path when it is ready
#
# Home Assistant needs Python >= 3.13; on 3.13.0 its newest installable release is 2025.4.4.
# paho-mqtt and home-assistant-frontend are what its `mqtt` and `http` components' manifests
# ask for: installed here, so Home Assistant runs with --skip-pip and installs nothing itself.
# Everything goes into the venv (never into a system Python, PEP 668), from PyPI only.
#   DINOWATCH_HA_VENV=...  where the venv lives (default ~/.cache/dinowatch/homeassistant-venv,
#                          kept across runs and CI runs on one machine; about 70 s to build)
#   PYTHON313=...          the Python 3.13 to build it with (default: python3.13 on PATH,
#                          else pyenv's ~/.pyenv/versions/3.13.*/bin/python3.13)
set -euo pipefail

VENV=${DINOWATCH_HA_VENV:-${HOME}/.cache/dinowatch/homeassistant-venv}
REQUIREMENTS=(homeassistant==2025.4.4 paho-mqtt==2.1.0 home-assistant-frontend==20250411.0)
STAMP=$VENV/.dinowatch-requirements  # written last: a half-built venv is rebuilt

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'scripts/homeassistant-venv.sh: %s\n' "$*" >&2; exit 1; }

is_python313() {  # a working interpreter (a pyenv shim for an unselected version is not)
  [[ -n $1 ]] && "$1" -c 'import sys, ensurepip; sys.exit(sys.version_info[:2] != (3, 13))' \
    >/dev/null 2>&1
}

find_python() {
  local candidate
  for candidate in "${PYTHON313:-}" "$(command -v python3.13 || true)" \
                   "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python3.13; do
    if is_python313 "$candidate"; then
      printf '%s\n' "$candidate"
      return
    fi
  done
  die "no working Python 3.13 (Home Assistant 2025.4 needs it): install it (e.g. pyenv install 3.13.0) or set PYTHON313=/path/to/python3.13"
}

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # two test runs at once build it once

if [[ -f $STAMP && $(cat "$STAMP") == "${REQUIREMENTS[*]}" ]] &&
   "$VENV/bin/python" -c 'import homeassistant.const, paho.mqtt, hass_frontend' 2>/dev/null; then
  printf '%s\n' "$VENV"
  exit 0
fi

PY=$(find_python)
say "virtualenv $VENV ($("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])'))"
"$PY" -m venv --clear "$VENV"
say "pip install ${REQUIREMENTS[*]} (about a minute)"
# (without the warnings this machine's pip.conf gives for each of its local index folders)
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}" 2>&1 |
  { grep -v "^WARNING: Location '.*' is ignored" || true; } >&2

# Debian's libturbojpeg silences Home Assistant's error line about camera/image scaling
# (best effort: the tests do not depend on it).
if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null && command -v ldconfig >/dev/null &&
   ! ldconfig -p | grep -q 'libturbojpeg\.so\.0'; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq libturbojpeg0 >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libturbojpeg0 >/dev/null 2>&1; } ||
    say "libturbojpeg0 not installed (Home Assistant logs one harmless error line about it)"
fi

printf '%s\n' "${REQUIREMENTS[*]}" >"$STAMP"
printf '%s\n' "$VENV"
