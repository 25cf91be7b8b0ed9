#!/usr/bin/env bash
# Install Skulk as a launchd LaunchAgent (macOS).
#
#   deployment/install-launchd.sh [--print] [--skulk-bin PATH] [--env-file PATH]
#                                 [--label LABEL] [--update-on-boot [--repo DIR]]
#                                 [--with-vector [--vector-bin PATH] [--ingest-url URL]]
#
# --print           write the plist to stdout and change nothing (a dry run)
# --skulk-bin       the skulk executable (default: `command -v skulk`)
# --env-file        operator settings, KEY=VALUE lines, loaded before every start
#                   (default: <data dir>/skulk.env)
# --label           launchd label (default: io.skulk.node)
# --update-on-boot  update Skulk before starting it: `git pull --ff-only` and an
#                   editable reinstall in --repo DIR, else `pip install -U skulk`
#                   with the pip next to the skulk executable. A failed update is
#                   logged and Skulk starts anyway.
# --with-vector     also load LABEL.vector, the optional log shipper: Vector tails
#                   the node's log file, whose lines become JSON (SKULK_LOGGING_EXTERNAL=1),
#                   and ships them as its own agent, so a slow or failing sink never
#                   backpressures the node. Needs a `vector` binary (brew install
#                   vector); without one the shipper is skipped with a message.
# --vector-bin      the vector executable (default: `command -v vector`)
# --ingest-url      where the shipper sends logs: HTTP POST, newline-delimited JSON
#                   (default: SKULK_LOGGING_INGEST_URL from the environment or the env
#                   file; with none, daily JSON-lines files under <data dir>/logs/shipped/)
#
# The agent starts at login, restarts Skulk when it exits with an error
# (launchd waits ThrottleInterval seconds between starts, so a crash loop
# cannot spin) and writes its output to ~/Library/Logs/skulk/skulk.log.
set -euo pipefail

print_only=0
label=io.skulk.node
skulk_bin=""
env_file=""
update=0
repo=""
with_vector=0
vector_bin=""
ingest_url=""

while [ $# -gt 0 ]; do
  case "$1" in
    --print|--dry-run) print_only=1 ;;
    --skulk-bin) skulk_bin="$2"; shift ;;
    --env-file) env_file="$2"; shift ;;
    --label) label="$2"; shift ;;
    --update-on-boot) update=1 ;;
    --repo) repo="$2"; shift ;;
    --with-vector) with_vector=1 ;;
    --vector-bin) vector_bin="$2"; shift ;;
    --ingest-url) ingest_url="$2"; shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "install-launchd: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "$skulk_bin" ]; then
  skulk_bin="$(command -v skulk || true)"
fi
if [ -z "$skulk_bin" ]; then
  echo "install-launchd: no skulk executable found; pass --skulk-bin PATH" >&2
  exit 1
fi
case "$skulk_bin" in /*) ;; *) skulk_bin="$(cd "$(dirname "$skulk_bin")" && pwd)/$(basename "$skulk_bin")" ;; esac
bin_dir="$(dirname "$skulk_bin")"

data_dir="${SKULK_HOME:-${EXO_HOME:-}}"
if [ -z "$data_dir" ]; then
  if [ -d "$HOME/.skulk" ]; then data_dir="$HOME/.skulk"
  elif [ -d "$HOME/.exo" ]; then data_dir="$HOME/.exo"
  else data_dir="$HOME/.skulk"
  fi
fi
env_file="${env_file:-$data_dir/skulk.env}"
log_dir="$HOME/Library/Logs/skulk"
vector_label="$label.vector"

# The optional log shipper: skipped, with the reason, when there is no vector.
if [ "$with_vector" = 1 ]; then
  vector_bin="${vector_bin:-$(command -v vector || true)}"
  if [ -z "$vector_bin" ] || [ ! -x "$vector_bin" ]; then
    echo "install-launchd: --with-vector: no 'vector' executable found (brew install vector," \
         "see https://vector.dev/docs/setup/installation/, or pass --vector-bin PATH);" \
         "skipping the log shipper and installing the node alone" >&2
    with_vector=0
  elif [ -z "$ingest_url" ]; then
    ingest_url="${SKULK_LOGGING_INGEST_URL:-}"
    if [ -z "$ingest_url" ] && [ -f "$env_file" ]; then
      ingest_url="$(sed -n 's/^SKULK_LOGGING_INGEST_URL=//p' "$env_file" | tail -n 1)"
    fi
  fi
fi
json_env=""
if [ "$with_vector" = 1 ]; then
  json_env="
    <key>SKULK_LOGGING_EXTERNAL</key>
    <string>1</string>"
fi

sq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }   # shell single-quote
xml() { printf '%s' "$1" | sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e 's/"/\&quot;/g'; }

update_cmd=":"
if [ "$update" = 1 ]; then
  if [ -n "$repo" ]; then
    update_cmd="(cd $(sq "$repo") && git pull --ff-only && $(sq "$bin_dir/pip") install -q -e .) || echo 'skulk: update failed; starting the installed version' >&2"
  else
    update_cmd="$(sq "$bin_dir/pip") install -q -U skulk || echo 'skulk: update failed; starting the installed version' >&2"
  fi
fi
script="set -a; if [ -f $(sq "$env_file") ]; then . $(sq "$env_file"); fi; set +a; $update_cmd; exec $(sq "$skulk_bin") run"

plist="<?xml version=\"1.0\" encoding=\"UTF-8\"?>
<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">
<plist version=\"1.0\">
<dict>
  <key>Label</key>
  <string>$(xml "$label")</string>
  <key>ProgramArguments</key>
  <array>
    <string>/bin/sh</string>
    <string>-c</string>
    <string>$(xml "$script")</string>
  </array>
  <key>EnvironmentVariables</key>
  <dict>
    <key>SKULK_HOME</key>
    <string>$(xml "$data_dir")</string>
    <key>PATH</key>
    <string>$(xml "$bin_dir"):/usr/local/bin:/opt/homebrew/bin:/usr/bin:/bin:/usr/sbin:/sbin</string>
    <key>PYTHONUNBUFFERED</key>
    <string>1</string>$json_env
  </dict>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <dict>
    <key>SuccessfulExit</key>
    <false/>
  </dict>
  <key>ThrottleInterval</key>
  <integer>30</integer>
  <key>ExitTimeOut</key>
  <integer>60</integer>
  <key>ProcessType</key>
  <string>Interactive</string>
  <key>StandardOutPath</key>
  <string>$(xml "$log_dir/skulk.log")</string>
  <key>StandardErrorPath</key>
  <string>$(xml "$log_dir/skulk.log")</string>
</dict>
</plist>
"

vector_plist=""
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
  vector_config="# Written by deployment/install-launchd.sh --with-vector; rerun it to change.
# Vector tails the node's log file (JSON lines, SKULK_LOGGING_EXTERNAL=1) and
# ships each line; lines that are not JSON (a traceback printed before logging
# starts) are dropped rather than shipped malformed.
data_dir: \"$data_dir/vector\"
sources:
  skulk_log:
    type: file
    include: [\"$log_dir/skulk.log\"]
    read_from: beginning
transforms:
  skulk_json:
    type: remap
    inputs: [skulk_log]
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
  vector_plist="<?xml version=\"1.0\" encoding=\"UTF-8\"?>
<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">
<plist version=\"1.0\">
<dict>
  <key>Label</key>
  <string>$(xml "$vector_label")</string>
  <key>ProgramArguments</key>
  <array>
    <string>$(xml "$vector_bin")</string>
    <string>--config</string>
    <string>$(xml "$data_dir/vector.yaml")</string>
  </array>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <dict>
    <key>SuccessfulExit</key>
    <false/>
  </dict>
  <key>ThrottleInterval</key>
  <integer>10</integer>
  <key>StandardOutPath</key>
  <string>$(xml "$log_dir/vector.log")</string>
  <key>StandardErrorPath</key>
  <string>$(xml "$log_dir/vector.log")</string>
</dict>
</plist>
"
fi

if [ "$print_only" = 1 ]; then
  printf '%s' "$plist"
  if [ "$with_vector" = 1 ]; then
    printf '### %s\n%s' "$vector_label.plist" "$vector_plist"
    printf '### %s\n%s' "$data_dir/vector.yaml" "$vector_config"
  fi
  exit 0
fi

agents="$HOME/Library/LaunchAgents"
target="$agents/$label.plist"
mkdir -p "$agents" "$log_dir" "$data_dir"
if [ ! -f "$env_file" ]; then
  cat > "$env_file" <<'EOF'
# Skulk settings (KEY=VALUE); see docs/operations.md. Examples:
# SKULK_API_PORT=52415
# SKULK_BOOTSTRAP_PEERS=tcp/192.168.1.10:52416
# SKULK_CLUSTER_KEY=<the same key on every node>
EOF
fi
printf '%s' "$plist" > "$target"
plutil -lint "$target"
launchctl bootout "gui/$(id -u)/$label" 2>/dev/null || true
launchctl bootstrap "gui/$(id -u)" "$target"
echo "install-launchd: loaded $target (logs: $log_dir/skulk.log)"
if [ "$with_vector" = 1 ]; then
  mkdir -p "$data_dir/vector" "$data_dir/logs/shipped"
  printf '%s' "$vector_config" > "$data_dir/vector.yaml"
  "$vector_bin" validate --no-environment "$data_dir/vector.yaml" \
    || echo "install-launchd: warning: vector could not validate $data_dir/vector.yaml" >&2
  vtarget="$agents/$vector_label.plist"
  printf '%s' "$vector_plist" > "$vtarget"
  plutil -lint "$vtarget"
  launchctl bootout "gui/$(id -u)/$vector_label" 2>/dev/null || true
  launchctl bootstrap "gui/$(id -u)" "$vtarget"
  echo "install-launchd: loaded $vtarget (shipping to ${ingest_url:-$data_dir/logs/shipped/}; its own log: $log_dir/vector.log)"
fi
