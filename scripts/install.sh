#!/usr/bin/env bash
# dinowatch quick start.
#
#   scripts/install.sh [--prefix DIR] [--no-systemd]
#
# With systemd as PID 1 and run as root (a Raspberry Pi): installs the service
# `dinowatch` (venv /opt/dinowatch/venv, config /etc/dinowatch/config.yaml,
# data /var/lib/dinowatch, drop folder /srv/dinowatch/inbox) and starts it.
# Anywhere else, or with --no-systemd (container, CI, laptop): sets up ./.venv
# and ./.dinowatch/ in the repository and runs the daemon in the foreground.
#   --prefix DIR   where the virtualenv goes (default /opt/dinowatch/venv or ./.venv)
#   PYTHON=...     interpreter to build the venv with (default python3, needs >= 3.11)
#   DINOWATCH_MODEL=file.onnx   local run: use this model instead of the registry's
#   DINOWATCH_MQTT_PORT=N       local run: the broker's port on localhost (default 1883)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
PREFIX="" MODE=auto
while (($#)); do
  case $1 in
    --prefix) PREFIX=$(realpath -m "${2:?--prefix needs a directory}"); shift 2 ;;
    --prefix=*) PREFIX=$(realpath -m "${1#*=}"); shift ;;
    --no-systemd) MODE=local; shift ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '==> %s\n' "$*"; }
warn() { printf '\n!!! %s\n\n' "$*" >&2; }
# Is a broker accepting connections on localhost:PORT (default 1883)? (bash's /dev/tcp: no
# netcat needed)
broker_up() { (exec 3<>"/dev/tcp/127.0.0.1/${1:-1883}") 2>/dev/null; }
. "$REPO/scripts/venv.sh"  # need_venv_module, ensure_venv
# YAML single-quoted scalar (quotes doubled); "null" stays null.
yaml_str() { if [[ $1 == null ]]; then echo null; else printf "'%s'\n" "${1//\'/\'\'}"; fi; }

install_system() {
  local venv=${PREFIX:-/opt/dinowatch/venv} etc=/etc/dinowatch data=/var/lib/dinowatch
  local inbox=/srv/dinowatch/inbox unit=/etc/systemd/system/dinowatch.service
  export DEBIAN_FRONTEND=noninteractive
  need_venv_module
  # --system-site-packages: HailoRT's Python binding comes from apt (hailo-all),
  # not PyPI; this keeps it importable. numpy<2: that binding is built for numpy 1.x.
  say "virtualenv $venv, pip install $REPO"
  "$PY" -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q "$REPO" 'numpy<2'

  # A fixed system user rather than DynamicUser= (see the unit): watched folders
  # are shared with it through ordinary ownership and groups.
  getent passwd dinowatch >/dev/null || {
    say "useradd dinowatch"
    useradd --system --user-group --home-dir "$data" --no-create-home --shell /usr/sbin/nologin dinowatch
  }
  # The admin who ran sudo may then (after logging in again) drop images into
  # the inbox and read the database.
  if [[ -n ${SUDO_USER:-} && $SUDO_USER != root ]]; then usermod -aG dinowatch "$SUDO_USER"; fi

  install -d -m 0755 "$etc"
  if [[ -e $etc/config.yaml ]]; then
    say "keeping existing $etc/config.yaml"   # never overwrite the user's settings
  else
    say "installing $etc/config.yaml"
    install -m 0640 -g dinowatch "$REPO/config/dinowatch.yaml" "$etc/config.yaml"
  fi
  # Setgid drop folder: group dinowatch writes, the daemon only ever reads it.
  install -d -m 2775 -o root -g dinowatch "$inbox"
  install -d -m 0750 -o dinowatch -g dinowatch "$data"

  # Fetch (and sha256-verify) the model now, so the first start is not an
  # 87 MB download racing TimeoutStartSec.
  say "dinowatch model fetch"
  (cd / && runuser -u dinowatch -- "$venv/bin/dinowatch" model fetch --dir "$data/models") ||
    warn "model fetch failed; the service tries again when it starts (or copy the model into $data/models, see README)"
  if [[ -e /dev/hailo0 ]] && ! "$venv/bin/python" -c 'import hailo_platform' 2>/dev/null; then
    warn "a Hailo device is present but HailoRT is not: apt install hailo-all, then rerun this script"
  fi

  # A local broker, unless one is already listening. Debian's mosquitto 2.x
  # default config listens on localhost only and allows anonymous clients.
  if broker_up; then
    say "MQTT broker found on localhost:1883"
  elif command -v apt-get >/dev/null; then
    say "no MQTT broker on localhost:1883: apt-get install mosquitto mosquitto-clients"
    if apt-get update -q && apt-get install -y -q mosquitto mosquitto-clients; then
      systemctl enable --now mosquitto
    else
      warn "could not install mosquitto: set mqtt.host in $etc/config.yaml to your broker"
    fi
  else
    warn "no MQTT broker on localhost:1883 and no apt-get: set mqtt.host in $etc/config.yaml"
  fi

  say "installing $unit"
  sed "s#/opt/dinowatch/venv#$venv#g" "$REPO/systemd/dinowatch.service" >"$unit"
  systemctl daemon-reload
  # Validate as the service user first: with a bad config the unit would just
  # fail with status 78 (and, by design, not be restarted).
  if ! (cd / && runuser -u dinowatch -- "$venv/bin/dinowatch" check-config -c "$etc/config.yaml"); then
    warn "fix $etc/config.yaml, then: systemctl enable --now dinowatch"; exit 78
  fi
  # First install: enable --now. A re-run is an upgrade: restart the running daemon.
  if systemctl is-active -q dinowatch; then systemctl restart dinowatch; else systemctl enable --now dinowatch; fi ||
    { warn "dinowatch did not start: journalctl -u dinowatch -e"; exit 1; }
  cat <<EOF

dinowatch is running.
  logs:       journalctl -u dinowatch -f
  messages:   mosquitto_sub -v -t 'dinowatch/#'
  try it:     cp some.jpg $inbox/
  settings:   $etc/config.yaml, then: systemctl reload dinowatch
  MQTT login: mqtt.username in the config, the password in
              /etc/credstore/dinowatch.mqtt_password (root only, 0600)
EOF
}

run_local() {
  cd "$REPO"   # ./.venv and ./.dinowatch live next to the sources
  local venv=${PREFIX:-$REPO/.venv} state=$REPO/.dinowatch model=null
  local data=$state/data inbox=$state/inbox port=${DINOWATCH_MQTT_PORT:-1883}
  ensure_venv "$venv"   # scripts/test.sh uses the same one
  # Editable, as scripts/test.sh installs it: the two share this venv and must not keep
  # swapping the package under a running daemon; edits under src/ apply at the next start.
  say "pip install -e ."
  "$venv/bin/python" -m pip install -q -e .
  mkdir -p "$data" "$inbox"

  # The model. Same cache rule as the daemon: $DINOWATCH_MODEL_DIR, else data_dir/models.
  local models=${DINOWATCH_MODEL_DIR:-$data/models}
  if [[ -n ${DINOWATCH_MODEL:-} ]]; then
    [[ -f $DINOWATCH_MODEL ]] || { echo "DINOWATCH_MODEL=$DINOWATCH_MODEL: no such file" >&2; exit 1; }
    model=$(realpath "$DINOWATCH_MODEL")
  elif "$venv/bin/dinowatch" model verify --dir "$models" >/dev/null 2>&1; then
    say "using the verified model in $models"
  elif timeout 5 bash -c '(exec 3<>/dev/tcp/huggingface.co/443)' 2>/dev/null &&
    "$venv/bin/dinowatch" model fetch --dir "$models"; then
    say "model fetched into $models"
  else
    # Offline (the usual case on dev machines): same graph, random weights.
    model=$data/models/standin.onnx
    if [[ ! -f $model ]]; then
      "$venv/bin/python" -c 'import onnx' 2>/dev/null || "$venv/bin/pip" install -q onnx
      say "building a stand-in model (DINOv2 ViT-S/14 graph, seeded random weights)"
      "$venv/bin/python" -m dinowatch.testing --out "$model"
    fi
    warn "NO REAL MODEL: the real weights could not be fetched, so $model
!!! (random weights) is used. Vectors and matches are MEANINGLESS; fine for
!!! trying the plumbing only. Real model: DINOWATCH_MODEL=/path/to/dinov2_vits14.onnx $0"
  fi

  # Rewritten on every run (so the model and port chosen above apply), unless
  # the user edited it since the last run: then it is kept, and what this run
  # would have written is left beside it.
  local config=$state/config.yaml generated=$state/config.generated.yaml
  if [[ -f $config && -f $generated ]] && ! cmp -s "$config" "$generated"; then
    say "keeping $config: you edited it (what this run would write: $generated)"
    config=$generated.new
  fi
  cat >"$config" <<EOF
# Written by scripts/install.sh for a local foreground run; rewritten on every
# run until you edit it. Every key is explained in config/dinowatch.yaml.
data_dir: $(yaml_str "$data")
model:
  name: dinov2-vits14
  path: $(yaml_str "$model")
watch:
  - path: $(yaml_str "$inbox")
    source: inbox
mqtt:
  host: localhost
  port: $port
logging:
  level: INFO
EOF
  if [[ $config == "$state/config.yaml" ]]; then
    cp "$config" "$generated"   # what an unedited config looks like
  else
    mv "$config" "$generated"
  fi

  # Debian keeps mosquitto in /usr/sbin, which is not on a normal user's PATH.
  local mosquitto broker=$state/mosquitto
  mosquitto=$(command -v mosquitto || command -v /usr/sbin/mosquitto || true)
  if broker_up "$port"; then
    say "MQTT broker found on localhost:$port"
  elif [[ -n $mosquitto ]]; then
    # Persistence on: retained messages (status, stats) survive the broker's own restart.
    mkdir -p "$broker"
    cat >"$broker/mosquitto.conf" <<EOF
# Written by scripts/install.sh for the local run; rewritten on every run.
listener $port localhost
allow_anonymous true
persistence true
persistence_location $broker/
autosave_interval 60
pid_file $broker/mosquitto.pid
log_dest file $broker/mosquitto.log
user $(id -un)
EOF
    # -d detaches it (own session), so Ctrl-C on the daemon leaves it running.
    "$mosquitto" -d -c "$broker/mosquitto.conf"
    for _ in {1..20}; do broker_up "$port" && break; sleep 0.1; done
    say "started mosquitto on localhost:$port, state in $broker (stop it: kill \$(cat $broker/mosquitto.pid))"
  else
    warn "no MQTT broker on localhost:$port and no mosquitto binary (apt install mosquitto):
!!! dinowatch keeps its messages in the outbox until a broker appears"
  fi

  say "dinowatch run -c $state/config.yaml   (Ctrl-C stops it)"
  say "drop images into $inbox; watch with: mosquitto_sub -v -p $port -t 'dinowatch/#'"
  # The README's two lines: the venv's `dinowatch` on PATH, and this config as the default.
  say "to use the dinowatch command in another terminal, type there:"
  printf '      . %q\n      export DINOWATCH_CONFIG=%q\n      dinowatch status\n' \
    "$venv/bin/activate" "$state/config.yaml"
  exec "$venv/bin/dinowatch" run -c "$state/config.yaml"
}

if [[ $MODE == auto ]]; then
  # /run/systemd/system exists only when systemd is PID 1 (sd_booted(3)).
  if [[ -d /run/systemd/system && $EUID -eq 0 ]]; then
    MODE=system
  else
    MODE=local
    if [[ -d /run/systemd/system ]]; then say "not root: local run (sudo $0 installs the service)"; fi
  fi
fi
if [[ $MODE == system ]]; then install_system; else run_local; fi
