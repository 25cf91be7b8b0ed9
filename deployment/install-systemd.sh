#!/usr/bin/env bash
# Install Skulk as a systemd *user* service (Linux).
#
#   deployment/install-systemd.sh [--print] [--skulk-bin PATH] [--env-file PATH]
#                                 [--name NAME] [--json-logs] [--no-start]
#                                 [--with-vector [--vector-bin PATH] [--ingest-url URL]]
#
# --print      write the unit to stdout and change nothing (a dry run)
# --skulk-bin  the skulk executable (default: `command -v skulk`)
# --env-file   operator settings, KEY=VALUE lines (default: <data dir>/skulk.env)
# --name       unit name (default: skulk)
# --json-logs  structured JSON log lines (SKULK_LOGGING_EXTERNAL=1) for log shippers
# --no-start   install and enable, but do not start now
# --with-vector  also install NAME-vector.service, the optional log shipper: Vector
#              reads the node's JSON log lines (implies --json-logs) from the user
#              journal and ships them, as its own service, so a slow or failing sink
#              never backpressures the node. Needs a `vector` binary
#              (https://vector.dev/docs/setup/installation/); without one the
#              shipper is skipped with a message and the node is installed alone.
# --vector-bin   the vector executable (default: `command -v vector`)
# --ingest-url   where the shipper sends logs: HTTP POST, newline-delimited JSON
#              (default: SKULK_LOGGING_INGEST_URL from the environment or the env
#              file; with none, daily JSON-lines files under <data dir>/logs/shipped/)
#
# The service restarts on failure with a growing delay (exponential backoff on
# systemd >= 254, a fixed 10 s before that) and stops trying after 5 failed
# starts within 10 minutes (a crash loop): `systemctl --user reset-failed skulk`
# then `systemctl --user start skulk` after fixing the cause. SIGTERM lets the
# node stop its runners in order; anything left after 60 s is killed.
set -euo pipefail

print_only=0
start_now=1
name=skulk
json_logs=0
skulk_bin=""
env_file=""
with_vector=0
vector_bin=""
ingest_url=""

while [ $# -gt 0 ]; do
  case "$1" in
    --print|--dry-run) print_only=1 ;;
    --skulk-bin) skulk_bin="$2"; shift ;;
    --env-file) env_file="$2"; shift ;;
    --name) name="$2"; shift ;;
    --json-logs) json_logs=1 ;;
    --no-start) start_now=0 ;;
    --with-vector) with_vector=1 ;;
    --vector-bin) vector_bin="$2"; shift ;;
    --ingest-url) ingest_url="$2"; shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "install-systemd: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "$skulk_bin" ]; then
  skulk_bin="$(command -v skulk || true)"
fi
if [ -z "$skulk_bin" ]; then
  echo "install-systemd: no skulk executable found; pass --skulk-bin PATH" >&2
  exit 1
fi
case "$skulk_bin" in /*) ;; *) skulk_bin="$(cd "$(dirname "$skulk_bin")" && pwd)/$(basename "$skulk_bin")" ;; esac

# The data directory, resolved as Skulk does (SKULK_HOME, EXO_HOME, ~/.skulk, ~/.exo, XDG).
data_dir="${SKULK_HOME:-${EXO_HOME:-}}"
if [ -z "$data_dir" ]; then
  if [ -d "$HOME/.skulk" ]; then data_dir="$HOME/.skulk"
  elif [ -d "$HOME/.exo" ]; then data_dir="$HOME/.exo"
  else data_dir="${XDG_DATA_HOME:-$HOME/.local/share}/skulk"
  fi
fi
env_file="${env_file:-$data_dir/skulk.env}"

# The optional log shipper: skipped, with the reason, when there is no vector.
if [ "$with_vector" = 1 ]; then
  vector_bin="${vector_bin:-$(command -v vector || true)}"
  if [ -z "$vector_bin" ] || [ ! -x "$vector_bin" ]; then
    echo "install-systemd: --with-vector: no 'vector' executable found (install Vector:" \
         "https://vector.dev/docs/setup/installation/, or pass --vector-bin PATH);" \
         "skipping the log shipper and installing the node alone" >&2
    with_vector=0
  else
    json_logs=1
    if [ -z "$ingest_url" ]; then
      ingest_url="${SKULK_LOGGING_INGEST_URL:-}"
      if [ -z "$ingest_url" ] && [ -f "$env_file" ]; then
        ingest_url="$(sed -n 's/^SKULK_LOGGING_INGEST_URL=//p' "$env_file" | tail -n 1)"
      fi
    fi
  fi
fi

systemd_version="$(systemctl --version 2>/dev/null | awk 'NR==1 {print $2}' || true)"
case "$systemd_version" in ''|*[!0-9]*) systemd_version=0 ;; esac
if [ "$systemd_version" -ge 254 ]; then
  restart_lines="RestartSec=2
RestartSteps=6
RestartMaxDelaySec=120"
else
  restart_lines="RestartSec=10"
fi

unit="[Unit]
Description=Skulk inference cluster node
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=600
StartLimitBurst=5

[Service]
Type=simple
ExecStart=\"$skulk_bin\" run
EnvironmentFile=-$env_file
Environment=\"SKULK_HOME=$data_dir\"
Environment=PYTHONUNBUFFERED=1"
if [ "$json_logs" = 1 ]; then
  unit="$unit
Environment=SKULK_LOGGING_EXTERNAL=1"
fi
unit="$unit
Restart=on-failure
$restart_lines
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=60
LimitNOFILE=65536

[Install]
WantedBy=default.target
"

vector_unit=""
vector_config=""
if [ "$with_vector" = 1 ]; then
  if [ -n "$ingest_url" ]; then
    sink="    type: http
    inputs: [skulk_json]
    uri: \"$ingest_url\"
    encoding:
      codec: json
    framing:
      method: newline_delimited
    request:
      timeout_secs: 5
    buffer:
      type: disk
      max_size: 268435488
      when_full: drop_newest"
  else
    sink="    type: file
    inputs: [skulk_json]
    path: \"$data_dir/logs/shipped/skulk-%Y-%m-%d.jsonl\"
    encoding:
      codec: json"
  fi
  vector_config="# Written by deployment/install-systemd.sh --with-vector; rerun it to change.
# Vector ships the JSON log lines of $name.service (SKULK_LOGGING_EXTERNAL=1)
# from the user journal. Lines that are not JSON (a traceback printed before
# logging starts) are dropped rather than shipped malformed.
data_dir: \"$data_dir/vector\"
sources:
  skulk_journal:
    type: journald
    current_boot_only: false
    extra_args: [\"--user\"]
    include_matches:
      _SYSTEMD_USER_UNIT: [\"$name.service\"]
transforms:
  skulk_json:
    type: remap
    inputs: [skulk_journal]
    drop_on_error: true
    drop_on_abort: true
    source: |
      parsed, err = parse_json(.message)
      if err != null { abort }
      . = parsed
sinks:
  skulk_out:
$sink
"
  vector_unit="[Unit]
Description=Skulk log shipper (Vector) for $name.service
After=$name.service

[Service]
Type=simple
ExecStart=\"$vector_bin\" --config \"$data_dir/vector.yaml\"
Restart=on-failure
RestartSec=10

[Install]
WantedBy=default.target
"
fi

if [ "$print_only" = 1 ]; then
  printf '%s' "$unit"
  if [ "$with_vector" = 1 ]; then
    printf '### %s\n%s' "$name-vector.service" "$vector_unit"
    printf '### %s\n%s' "$data_dir/vector.yaml" "$vector_config"
  fi
  exit 0
fi

unit_dir="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
mkdir -p "$unit_dir" "$data_dir"
if [ ! -f "$env_file" ]; then
  cat > "$env_file" <<'EOF'
# Skulk settings (KEY=VALUE); see docs/operations.md. Examples:
# SKULK_API_PORT=52415
# SKULK_BOOTSTRAP_PEERS=tcp/192.168.1.10:52416
# SKULK_CLUSTER_KEY=<the same key on every node>
EOF
fi
printf '%s' "$unit" > "$unit_dir/$name.service"
echo "install-systemd: wrote $unit_dir/$name.service"
if [ "$with_vector" = 1 ]; then
  mkdir -p "$data_dir/vector" "$data_dir/logs/shipped"
  printf '%s' "$vector_config" > "$data_dir/vector.yaml"
  printf '%s' "$vector_unit" > "$unit_dir/$name-vector.service"
  "$vector_bin" validate --no-environment "$data_dir/vector.yaml" \
    || echo "install-systemd: warning: vector could not validate $data_dir/vector.yaml" >&2
  echo "install-systemd: wrote $unit_dir/$name-vector.service and $data_dir/vector.yaml" \
       "(shipping to ${ingest_url:-$data_dir/logs/shipped/})"
fi
systemctl --user daemon-reload
units="$name.service"
if [ "$with_vector" = 1 ]; then units="$units $name-vector.service"; fi
if [ "$start_now" = 1 ]; then
  systemctl --user enable --now $units
else
  systemctl --user enable $units
fi
echo "install-systemd: enabled $units (logs: journalctl --user -u $name -f)"
echo "install-systemd: to run without a login session: loginctl enable-linger $USER"
