#!/usr/bin/env bash
# Runs the test suite:  scripts/test.sh [pytest arguments, e.g. -m "not slow"]
#
# Installs dinowatch with its `test` extra into a virtual environment and runs pytest there;
# it never installs into the system Python (which Debian 12 and Raspberry Pi OS refuse
# anyway, PEP 668). Inside an activated virtual environment it uses that one; otherwise it
# makes, or reuses, ./.venv (the one `scripts/install.sh` builds for a local run).
#   PYTHON=...   interpreter to build ./.venv with (default python3, needs >= 3.11);
#                a virtual environment's python is used as it is
# The broker tests start their own Mosquitto (apt install mosquitto); the TLS ones need openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

say() { printf '==> %s\n' "$*"; }
die() { printf 'scripts/test.sh: %s\n' "$*" >&2; exit 1; }

command -v "$PY" >/dev/null || die "no $PY here: install python3 (>= 3.11) or set PYTHON=..."
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); dinowatch needs >= 3.11 (set PYTHON=...)"

. scripts/venv.sh

if "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  python=$PY   # already a virtual environment (activated, or PYTHON=venv/bin/python)
else
  ensure_venv "$PWD/.venv"
  python=$PWD/.venv/bin/python
fi
say "pip install -e '.[test]' into $("$python" -c 'import sys; print(sys.prefix)')"
"$python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
# A real Home Assistant for tests/test_homeassistant.py, in a venv of its own (it needs a
# Python 3.13; without one that test is skipped, saying so, except in CI).
if ha_venv=$(scripts/homeassistant-venv.sh); then
  export DINOWATCH_HA_VENV=$ha_venv
else
  say "no Home Assistant venv (see above): the real Home Assistant test will be skipped"
fi
exec "$python" -m pytest "$@"
