"""Runtime configuration: environment, ``skulk.env``, ``skulk.yaml``, defaults.

Theory of operation
-------------------
Every setting is declared once in ``SETTINGS`` (name, type, default, meaning);
``docs/operations.md`` lists the same table and a test keeps the two in step.
A setting named ``X`` is read from the first of these that has it:

1. an explicit override (command-line flags);
2. the process environment: ``SKULK_X``, then the legacy ``EXO_X``;
3. ``<data_dir>/skulk.env`` (operator-editable ``KEY=VALUE`` lines):
   ``SKULK_X``, then ``EXO_X``;
4. ``skulk.yaml`` (``SKULK_CONFIG``, else ``<data_dir>/skulk.yaml``): key ``x``
   in lower case; its optional ``core:`` mapping overrides any ``CoreConfig``
   field by name;
5. the default.

The data directory itself comes from ``skulk.paths`` (``SKULK_HOME``/
``EXO_HOME``, ``~/.skulk``, an existing ``~/.exo``, the XDG data dir). The
node id and the cluster secret are stored there on first start, so a
restarted node is the same node in the same cluster.

Invalid values fail loudly with the setting's name and where the value came
from; nothing silently falls back to a default.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml

from skulk.core.admission import DEFAULT_MAX_OUTPUT_TOKENS
from skulk.core.config import CoreConfig
from skulk.core.runner_policy import WEDGE_EXIT_CODE
from skulk.runtime import auth

__all__ = [
    "ConfigError",
    "Setting",
    "SETTINGS",
    "RuntimeConfig",
    "load_config",
    "read_env_file",
    "load_node_id",
    "NODE_ID_FILENAME",
    "ENV_FILENAME",
    "YAML_FILENAME",
    "DEFAULT_API_PORT",
    "DEFAULT_ZENOH_PORT",
    "valid_node_id",
]

DEFAULT_API_PORT = 52415
DEFAULT_ZENOH_PORT = 52416
NODE_ID_FILENAME = "node_id"
ENV_FILENAME = "skulk.env"
YAML_FILENAME = "skulk.yaml"
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the setting and its source."""


def valid_node_id(value: str) -> bool:
    """Node ids are key-expression safe: letters, digits, ``_.-``, at most 64 chars."""
    return bool(_NODE_ID_RE.match(value))


# --- parsers -------------------------------------------------------------------------


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {text!r}")


def _list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in re.split(r"[,\s]+", text) if p.strip())


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65_536:
        raise ValueError(f"expected a TCP port (1-65535), got {port}")
    return port


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"expected a positive number, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"expected a non-negative number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"expected a non-negative integer, got {text!r}")
    return value


def _auto_or_bytes(text: str) -> str:
    value = text.strip().lower()
    if value != "auto" and not (value.isdigit() and int(value) >= 0):
        raise ValueError(f"expected 'auto' or a byte count, got {text!r}")
    return value


def _optional_model(text: str) -> str | None:
    text = text.strip()
    return None if text.lower() in ("", "0", "none", "off", "false") else text


def _str(text: str) -> str:
    return text.strip()


@dataclass(frozen=True)
class Setting:
    """One operator setting: ``SKULK_<name>`` (legacy ``EXO_<name>``)."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    doc: str
    core_field: str | None = None  # the CoreConfig field it sets, if any
    aliases: tuple[str, ...] = ()  # further legacy variable names (full names)

    @property
    def env(self) -> str:
        return "SKULK_" + self.name

    @property
    def legacy(self) -> tuple[str, ...]:
        return ("EXO_" + self.name, *self.aliases)

    @property
    def yaml_key(self) -> str:
        return self.name.lower()


_LOCAL_DEFAULT = object()  # computed at load time (hostname, data dir)

SETTINGS: tuple[Setting, ...] = (
    # Identity and cluster.
    Setting("NODE_ID", _str, _LOCAL_DEFAULT, "This node's id; by default generated once and kept in <data_dir>/node_id."),
    Setting("FRIENDLY_NAME", _str, _LOCAL_DEFAULT, "Name shown in /state and the dashboard (default: the host name)."),
    Setting("NAMESPACE", _str, "skulk", "Cluster namespace: nodes only talk to nodes of the same namespace.",
            aliases=("EXO_LIBP2P_NAMESPACE",)),
    Setting("CLUSTER_KEY", _str, None,
            "Cluster secret (hex or text, >= 16 chars). Default: generated on first start in <data_dir>/cluster.key."),
    Setting("FORCE_MASTER", _bool, False, "Give this node overwhelming seniority in elections.", core_field="force_master"),
    # Transport.
    Setting("BOOTSTRAP_PEERS", _list, (), "Comma-separated peers to connect to (tcp/host:port or host:port)."),
    Setting("LISTEN", _list, (f"tcp/0.0.0.0:{DEFAULT_ZENOH_PORT}",), "Comma-separated zenoh listen endpoints."),
    Setting("MULTICAST", _bool, True, "Find peers on the LAN by multicast scouting."),
    Setting("LEASE_MS", _positive_int, 3000,
            "zenoh link lease (ms): a silently vanished peer is dropped after at most this long."),
    Setting("REPLAY_WINDOW_S", _nonnegative_float, 300.0,
            "Replay guard: drop messages sent longer ago than this by the sender's clock, and younger ones seen "
            "before. Node clocks must agree within it (NTP); 0 turns the guard off."),
    Setting("ADVERTISE", _list, (),
            "Override the advertised addresses: comma-separated ip or ip=kind (kind: thunderbolt, ethernet, wifi, "
            "unknown, vpn). Default: every interface this host has."),
    # HTTP API.
    Setting("API_HOST", _str, "0.0.0.0", "Address the HTTP API binds to."),
    Setting("API_PORT", _port, DEFAULT_API_PORT, "HTTP API port (OpenAI-compatible endpoint and dashboard)."),
    Setting("API_MAX_BODY_BYTES", _positive_int, 8 * 1024 * 1024, "Largest request body the API accepts (413 above)."),
    Setting("API_KEYS", _list, (),
            "Comma-separated API keys; when any key is set, every endpoint but /healthz (and the dashboard's "
            "page) needs one (docs/operations.md, API keys)."),
    Setting("API_ADMIN_KEYS", _list, (),
            "Comma-separated admin keys; when set, placement, deletion and the model store need one."),
    Setting("API_KEYS_FILE", _str, "",
            "File of API keys, one per line ('admin:' before an admin key, '#' comments); read at start."),
    # Models and runners.
    Setting("AUTO_PLACE", _optional_model, "skulk/tiny-qwen2",
            "Model the master places when it has no instance of it ('none' disables)."),
    Setting("MAX_CONCURRENT_REQUESTS", _positive_int, 8, "Concurrent requests per runner.",
            core_field="max_concurrent_requests"),
    Setting("MAX_OUTPUT_TOKENS", _positive_int, DEFAULT_MAX_OUTPUT_TOKENS, "Default cap on generated tokens per request."),
    Setting("KV_QUEUE_WAIT_SECONDS", _nonnegative_float, 30.0,
            "Longest a request waits for room in its runner's KV budget before a 503 kv_budget_exhausted."),
    Setting("PREFIX_CACHE_BYTES", _auto_or_bytes, "auto",
            "Bound on each runner's prefix cache ('auto': whatever the KV budget leaves free; 0: no prefix cache)."),
    Setting("KV_BUDGET_BYTES", _nonnegative_int, 0,
            "Override the KV bytes placement reserved for a runner (0: placement's figure). Above it risks out-of-memory."),
    Setting("GROUP_CONNECT_DEADLINE_SECONDS", _positive_float, 120.0, "Deadline for a multi-node group to connect.",
            core_field="group_connect_deadline_s"),
    Setting("WARMUP_DEADLINE_SECONDS", _positive_float, 300.0, "Deadline for a runner to load and warm up.",
            core_field="warmup_deadline_s"),
    Setting("FIRST_REPORT_DEADLINE_SECONDS", _positive_float, 120.0, "Deadline for a new runner's first status.",
            core_field="first_report_deadline_s"),
    Setting("PIPELINE_EVAL_TIMEOUT_SECONDS", _positive_float, 60.0,
            f"A runner step without progress for this long is a wedge (exit {WEDGE_EXIT_CODE}, never retried)."),
    Setting("RUNNER_HEARTBEAT_SECONDS", _positive_float, 1.0, "Runner heartbeat interval."),
    Setting("RUNNER_STOP_GRACE_SECONDS", _positive_float, 10.0,
            "After a graceful Shutdown, wait this long before SIGTERM (and as long again before SIGKILL)."),
    Setting("RING_BASE_PORT", _port, 52500, "First port of the MLX ring port range.", core_field="base_port"),
    Setting("EVENTLOG_MIN_FREE_BYTES", _nonnegative_int, 2 * 1024**3,
            "The master's disk log stops writing (degraded mode, one critical line) under this much free space."),
    # Model files (docs/models.md).
    Setting("STORE", _optional_model, None,
            "The store node (node id or friendly name): it downloads whole models once from the hub and the other "
            "nodes copy from it. Unset: every node fetches what it needs (from a peer that has it, else the hub).",
            core_field="store_node"),
    Setting("MODELS_DISK_BUDGET", _nonnegative_int, 0,
            "Bytes this node's model copies may take; over it, the least recently used copies no instance uses are "
            "evicted. 0: no budget."),
    Setting("TRANSFER_STALL_SECONDS", _positive_float, 60.0,
            "A model transfer with no new byte for this long is given up and fetched from another source.",
            core_field="transfer_stall_s"),
    Setting("HF_ENDPOINT", _optional_model, None,
            "Hugging Face-compatible hub to download from (default: huggingface.co).", aliases=("HF_ENDPOINT",)),
    Setting("HF_TOKEN", _optional_model, None, "Hub token, for private and gated models.",
            aliases=("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")),
    Setting("HF_HUB_OFFLINE", _bool, False,
            "1: never download from the hub; use the files present (and copies from peers).",
            aliases=("HF_HUB_OFFLINE",)),
    # Election and liveness.
    Setting("CAMPAIGN_TIMEOUT_SECONDS", _positive_float, 3.0, "Longest an election campaign waits for votes.",
            core_field="campaign_timeout_s"),
    Setting("NODE_TIMEOUT_SECONDS", _positive_float, 30.0, "A node silent for this long is considered gone.",
            core_field="node_timeout_s"),
    Setting("TELEMETRY_INTERVAL_SECONDS", _positive_float, 5.0, "How often a node measures and re-reports itself.",
            core_field="telemetry_interval_s"),
    Setting("PROBE_INTERVAL_SECONDS", _positive_float, 10.0, "How often every advertised peer address is probed."),
    Setting("PROBE_TIMEOUT_SECONDS", _positive_float, 5.0, "Timeout of one link probe."),
    # Logging.
    Setting("LOGGING_EXTERNAL", _bool, False, "1: structured JSON log lines on stdout (for log shippers)."),
    Setting("LOG_LEVEL", _str, "INFO", "Log level: DEBUG, INFO, WARNING, ERROR."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


# --- the result ----------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything a node process needs, resolved. ``sources`` says where each value came from."""

    data_dir: Path
    models_dir: Path
    node_id: str
    friendly_name: str
    namespace: str
    cluster_secret: bytes
    cluster_key_source: str
    force_master: bool
    bootstrap_peers: tuple[str, ...]
    listen: tuple[str, ...]
    multicast: bool
    lease_ms: int
    replay_window_s: float
    advertise: tuple[tuple[str, str | None], ...]
    api_host: str
    api_port: int
    api_max_body_bytes: int
    api_keys: tuple[str, ...]
    api_admin_keys: tuple[str, ...]
    api_keys_file: str
    auto_place: str | None
    max_output_tokens: int
    kv_queue_wait_s: float
    prefix_cache_bytes: str
    kv_budget_bytes: int
    pipeline_eval_timeout_s: float
    runner_heartbeat_s: float
    runner_stop_grace_s: float
    probe_interval_s: float
    probe_timeout_s: float
    eventlog_min_free_bytes: int
    models_disk_budget_bytes: int
    hf_endpoint: str | None
    hf_token: str | None
    hf_offline: bool
    logging_external: bool
    log_level: str
    core: CoreConfig
    sources: Mapping[str, str] = field(default_factory=dict)

    def runner_env(self) -> dict[str, str]:
        """Settings a runner subprocess reads, under their ``SKULK_`` names."""
        return {
            "SKULK_PIPELINE_EVAL_TIMEOUT_SECONDS": repr(self.pipeline_eval_timeout_s),
            "SKULK_RUNNER_HEARTBEAT_SECONDS": repr(self.runner_heartbeat_s),
            "SKULK_MAX_OUTPUT_TOKENS": str(self.max_output_tokens),
            "SKULK_KV_QUEUE_WAIT_SECONDS": repr(self.kv_queue_wait_s),
            "SKULK_PREFIX_CACHE_BYTES": self.prefix_cache_bytes,
            "SKULK_KV_BUDGET_BYTES": str(self.kv_budget_bytes),
            "SKULK_MODELS_DIR": str(self.models_dir),
            "SKULK_HOME": str(self.data_dir),
        }


# --- files ---------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, optional ``export``, optional quotes)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    known = {s.yaml_key for s in SETTINGS} | {"core"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    return data


def load_node_id(data_dir: Path, wanted: str | None) -> str:
    """This node's id: ``wanted`` if given (and then kept), else the stored one, else a new one.

    The id is stored in ``<data_dir>/node_id`` so a restart is the same node.
    """
    path = data_dir / NODE_ID_FILENAME
    stored = path.read_text().strip() if path.is_file() else None
    node_id = wanted or stored or f"node-{secrets.token_hex(6)}"
    if not valid_node_id(node_id):
        raise ConfigError(f"invalid node id {node_id!r}: letters, digits and _.- only, at most 64 characters")
    if node_id != stored:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{NODE_ID_FILENAME}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(node_id + "\n")
        os.replace(tmp, path)
    return node_id


# --- loading -------------------------------------------------------------------------


def _yaml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if value is None:
        return ""
    return str(value)


def _parse_advertise(items: tuple[str, ...]) -> tuple[tuple[str, str | None], ...]:
    import ipaddress

    kinds = {"thunderbolt", "ethernet", "wifi", "unknown", "vpn"}
    out: list[tuple[str, str | None]] = []
    for item in items:
        ip, _, kind = item.partition("=")
        ipaddress.ip_address(ip)  # raises ValueError on junk
        if kind and kind not in kinds:
            raise ValueError(f"unknown link kind {kind!r} in {item!r}; kinds: {sorted(kinds)}")
        out.append((ip, kind or None))
    return tuple(out)


def load_config(
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    create: bool = True,
) -> RuntimeConfig:
    """Resolve every setting (see the module docstring for the order).

    ``overrides`` maps setting names (``"API_PORT"``) to already-typed values.
    With ``create`` False nothing is written (no node id or key file), which
    is what read-only commands such as ``skulk status`` want.
    """
    env = dict(os.environ if environ is None else environ)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(_BY_NAME) - {"HOME", "MODELS_DIR", "CONFIG"})
    assert not unknown, f"unknown override(s) {unknown}"
    data_dir = _data_dir(env, overrides)
    file_env = read_env_file(data_dir / ENV_FILENAME)
    yaml_path_text = overrides.get("CONFIG") or env.get("SKULK_CONFIG") or env.get("EXO_CONFIG") \
        or file_env.get("SKULK_CONFIG")
    yaml_path = Path(yaml_path_text).expanduser() if yaml_path_text else data_dir / YAML_FILENAME
    ydata = _read_yaml(yaml_path)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        value, source = _resolve(setting, overrides, env, file_env, ydata, data_dir, yaml_path)
        values[setting.name] = value
        sources[setting.name] = source

    models_text = overrides.get("MODELS_DIR") or env.get("SKULK_MODELS_DIR") or env.get("EXO_MODELS_DIR") \
        or file_env.get("SKULK_MODELS_DIR") or file_env.get("EXO_MODELS_DIR")
    models_dir = Path(models_text).expanduser() if models_text else data_dir / "models"

    namespace = values["NAMESPACE"]
    if not _NAMESPACE_RE.match(namespace):
        raise ConfigError(f"SKULK_NAMESPACE ({sources['NAMESPACE']}): invalid namespace {namespace!r}")

    if create:
        node_id = load_node_id(data_dir, values["NODE_ID"] if sources["NODE_ID"] != "default" else None)
    else:
        stored = data_dir / NODE_ID_FILENAME
        node_id = values["NODE_ID"] if sources["NODE_ID"] != "default" else (
            stored.read_text().strip() if stored.is_file() else "unknown")
    friendly = values["FRIENDLY_NAME"] if sources["FRIENDLY_NAME"] != "default" else socket.gethostname()

    if values["CLUSTER_KEY"]:
        try:
            secret = auth.parse_secret(values["CLUSTER_KEY"])
        except ValueError as exc:
            raise ConfigError(f"SKULK_CLUSTER_KEY ({sources['CLUSTER_KEY']}): {exc}") from None
        key_source = sources["CLUSTER_KEY"]
    elif create:
        secret, _, created = auth.load_or_create_secret(data_dir)
        key_source = f"{data_dir / auth.KEY_FILENAME}" + (" (created)" if created else "")
    else:
        path = data_dir / auth.KEY_FILENAME
        secret = auth.parse_secret(path.read_text()) if path.is_file() else b""
        key_source = str(path)

    core_kwargs: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.core_field and sources[setting.name] != "default":
            core_kwargs[setting.core_field] = values[setting.name]
    if values["AUTO_PLACE"] is not None:
        core_kwargs["auto_place"] = (values["AUTO_PLACE"],)
    core_kwargs.update(_core_from_yaml(ydata.get("core"), yaml_path))
    encode_names = {f.name: f.encode_name for f in msgspec.structs.fields(CoreConfig)}
    try:
        core = msgspec.convert({encode_names[k]: v for k, v in core_kwargs.items()}, CoreConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"core settings ({yaml_path} core:, or SKULK_* variables): {exc}") from None

    bootstrap = tuple(_normalise_endpoint(p) for p in values["BOOTSTRAP_PEERS"])
    listen = tuple(_normalise_endpoint(p) for p in values["LISTEN"])
    try:
        advertise = _parse_advertise(values["ADVERTISE"])
    except ValueError as exc:
        raise ConfigError(f"SKULK_ADVERTISE ({sources['ADVERTISE']}): {exc}") from None

    return RuntimeConfig(
        data_dir=data_dir,
        models_dir=models_dir,
        node_id=node_id,
        friendly_name=friendly,
        namespace=namespace,
        cluster_secret=secret,
        cluster_key_source=key_source,
        force_master=core.force_master,
        bootstrap_peers=bootstrap,
        listen=listen,
        multicast=values["MULTICAST"],
        lease_ms=values["LEASE_MS"],
        replay_window_s=values["REPLAY_WINDOW_S"],
        advertise=advertise,
        api_host=values["API_HOST"],
        api_port=values["API_PORT"],
        api_max_body_bytes=values["API_MAX_BODY_BYTES"],
        api_keys=tuple(values["API_KEYS"]),
        api_admin_keys=tuple(values["API_ADMIN_KEYS"]),
        api_keys_file=values["API_KEYS_FILE"],
        auto_place=values["AUTO_PLACE"],
        max_output_tokens=values["MAX_OUTPUT_TOKENS"],
        kv_queue_wait_s=values["KV_QUEUE_WAIT_SECONDS"],
        prefix_cache_bytes=values["PREFIX_CACHE_BYTES"],
        kv_budget_bytes=values["KV_BUDGET_BYTES"],
        pipeline_eval_timeout_s=values["PIPELINE_EVAL_TIMEOUT_SECONDS"],
        runner_heartbeat_s=values["RUNNER_HEARTBEAT_SECONDS"],
        runner_stop_grace_s=values["RUNNER_STOP_GRACE_SECONDS"],
        probe_interval_s=values["PROBE_INTERVAL_SECONDS"],
        probe_timeout_s=values["PROBE_TIMEOUT_SECONDS"],
        eventlog_min_free_bytes=values["EVENTLOG_MIN_FREE_BYTES"],
        models_disk_budget_bytes=values["MODELS_DISK_BUDGET"],
        hf_endpoint=values["HF_ENDPOINT"],
        hf_token=values["HF_TOKEN"],
        hf_offline=values["HF_HUB_OFFLINE"],
        logging_external=values["LOGGING_EXTERNAL"],
        log_level=values["LOG_LEVEL"].upper(),
        core=core,
        sources=sources,
    )


def _data_dir(env: Mapping[str, str], overrides: Mapping[str, Any]) -> Path:
    if overrides.get("HOME"):
        return Path(overrides["HOME"]).expanduser()
    for var in ("SKULK_HOME", "EXO_HOME"):
        if env.get(var):
            return Path(env[var]).expanduser()
    from skulk import paths

    return paths.data_dir()


def _resolve(
    setting: Setting,
    overrides: Mapping[str, Any],
    env: Mapping[str, str],
    file_env: Mapping[str, str],
    ydata: Mapping[str, Any],
    data_dir: Path,
    yaml_path: Path,
) -> tuple[Any, str]:
    if setting.name in overrides and overrides[setting.name] is not None:
        return overrides[setting.name], "command line"
    candidates: list[tuple[str, str | None]] = []
    for var in (setting.env, *setting.legacy):
        candidates.append((f"environment {var}", env.get(var)))
    for var in (setting.env, *setting.legacy):
        candidates.append((f"{data_dir / ENV_FILENAME} {var}", file_env.get(var)))
    if setting.yaml_key in ydata:
        candidates.append((f"{yaml_path} {setting.yaml_key}", _yaml_text(ydata[setting.yaml_key])))
    for source, text in candidates:
        if text is None:
            continue
        try:
            return setting.parse(text), source
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{setting.env} ({source}): {exc}") from None
    default = setting.default
    return (None if default is _LOCAL_DEFAULT else default), "default"


def _core_from_yaml(section: Any, path: Path) -> dict[str, Any]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'core' must be a mapping of CoreConfig fields")
    fields = {f.name: f for f in msgspec.structs.fields(CoreConfig)}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown core setting(s) {unknown}; known: {sorted(fields)}")
    return dict(section)


def _normalise_endpoint(text: str) -> str:
    """``host:port`` becomes ``tcp/host:port``; zenoh endpoints pass unchanged."""
    if "/" in text:
        return text
    if text.count(":") == 0:
        raise ConfigError(f"peer {text!r}: expected host:port or a zenoh endpoint such as tcp/host:port")
    return "tcp/" + text
