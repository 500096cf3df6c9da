# Sourced by scripts/install.sh and scripts/test.sh: making a virtual environment with $PY on
# Debian / Raspberry Pi OS, whose system Python takes no pip installs (PEP 668). Needs `say`.

# `python -m venv` needs ensurepip, which Debian ships separately in python3-venv.
need_venv_module() {
  "$PY" -c 'import ensurepip' 2>/dev/null && return
  local version package=python3-venv
  version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  # Debian's default python3 comes with python3-venv; another version has its own package.
  [[ $(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) == "$version" ]] ||
    package=python$version-venv
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    say "apt-get install $package (python -m venv needs ensurepip)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$package" || { apt-get update -q && apt-get install -y -q "$package"; } ||
      true
  fi
  "$PY" -c 'import ensurepip' 2>/dev/null || {
    printf '%s cannot make a virtual environment (no ensurepip). On Debian / Raspberry Pi OS: sudo apt install %s\n' \
      "$PY" "$package" >&2
    exit 1
  }
}

# The venv at $1, reused when it works; a half-made one (e.g. `venv` failed for want of
# ensurepip) is made again.
ensure_venv() {
  "$1/bin/python" -m pip --version >/dev/null 2>&1 && return
  need_venv_module
  say "virtualenv $1 ($PY)"
  "$PY" -m venv --clear "$1"
}
