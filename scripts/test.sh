#!/usr/bin/env bash
# Installs dinowatch with its test extras into the current Python and runs the whole suite.
# The end-to-end tests start their own Mosquitto: install the `mosquitto` package first.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
exec python3 -m pytest "$@"
