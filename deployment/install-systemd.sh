#!/usr/bin/env bash
# Install Skulk as a systemd *user* service (Linux).
#
#   deployment/install-systemd.sh [--print] [--skulk-bin PATH] [--env-file PATH]
#                                 [--name NAME] [--json-logs] [--no-start]
#
# --print      write the unit to stdout and change nothing (a dry run)
# --skulk-bin  the skulk executable (default: `command -v skulk`)
# --env-file   operator settings, KEY=VALUE lines (default: <data dir>/skulk.env)
# --name       unit name (default: skulk)
# --json-logs  structured JSON log lines (SKULK_LOGGING_EXTERNAL=1) for log shippers
# --no-start   install and enable, but do not start now
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

while [ $# -gt 0 ]; do
  case "$1" in
    --print|--dry-run) print_only=1 ;;
    --skulk-bin) skulk_bin="$2"; shift ;;
    --env-file) env_file="$2"; shift ;;
    --name) name="$2"; shift ;;
    --json-logs) json_logs=1 ;;
    --no-start) start_now=0 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
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

if [ "$print_only" = 1 ]; then
  printf '%s' "$unit"
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
systemctl --user daemon-reload
if [ "$start_now" = 1 ]; then
  systemctl --user enable --now "$name.service"
else
  systemctl --user enable "$name.service"
fi
echo "install-systemd: enabled $name.service (logs: journalctl --user -u $name -f)"
echo "install-systemd: to run without a login session: loginctl enable-linger $USER"
