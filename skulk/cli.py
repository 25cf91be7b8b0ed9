"""The ``skulk`` command.

::

    skulk [run] [--api-port N] [--force-master] [--bootstrap-peers P] ...   start a node
    skulk cluster up -n N [--dir D]          N local nodes on loopback (Ctrl-C stops them)
    skulk status [--url URL]                 summarise the cluster (asks a node's API)
    skulk models [--url URL] [--watch]       model files on every node: copies, transfers, disk
    skulk key                                print this node's cluster key (copy it to new nodes)
    skulk config                             print every resolved setting and where it came from
    skulk --version                          print the installed version

Settings come from flags, ``SKULK_*``/``EXO_*`` variables, ``skulk.env`` and
``skulk.yaml`` (see docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-port", type=int, help="HTTP API port (SKULK_API_PORT, default 52415)")
    p.add_argument("--api-host", help="address the API binds to (SKULK_API_HOST, default 0.0.0.0)")
    p.add_argument("--force-master", action="store_true", default=None, help="win elections (SKULK_FORCE_MASTER)")
    p.add_argument("--bootstrap-peers", help="comma-separated peers, tcp/host:port (SKULK_BOOTSTRAP_PEERS)")
    p.add_argument("--listen", help="comma-separated zenoh listen endpoints (SKULK_LISTEN)")
    p.add_argument("--namespace", help="cluster namespace (SKULK_NAMESPACE)")
    p.add_argument("--node-id", help="node id (SKULK_NODE_ID; default: generated once and kept)")
    p.add_argument("--auto-place", help="model to place when none is placed; 'none' disables (SKULK_AUTO_PLACE)")
    p.add_argument("--no-multicast", action="store_true", help="no LAN multicast scouting (SKULK_MULTICAST=0)")
    p.add_argument("--home", help="data directory (SKULK_HOME)")


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from skulk.runtime.config import SETTINGS

    by_name = {s.name: s for s in SETTINGS}
    out: dict[str, Any] = {}
    if args.api_port is not None:
        out["API_PORT"] = args.api_port
    if args.api_host:
        out["API_HOST"] = args.api_host
    if args.force_master:
        out["FORCE_MASTER"] = True
    for flag, name in (("bootstrap_peers", "BOOTSTRAP_PEERS"), ("listen", "LISTEN"), ("namespace", "NAMESPACE"),
                       ("node_id", "NODE_ID"), ("auto_place", "AUTO_PLACE")):
        value = getattr(args, flag)
        if value is not None:
            out[name] = by_name[name].parse(value)
    if args.no_multicast:
        out["MULTICAST"] = False
    if args.home:
        out["HOME"] = args.home
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from skulk.runtime.config import ConfigError, load_config
    from skulk.runtime.logsetup import setup_logging
    from skulk.runtime.node import NodeRuntime

    try:
        config = load_config(overrides=_run_overrides(args))
    except ConfigError as exc:
        print(f"skulk: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(node_id=config.node_id, external=config.logging_external, level=config.log_level)
    runtime = NodeRuntime(config)
    try:
        return asyncio.run(runtime.run())
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(f"skulk: {exc.code}", file=sys.stderr)
            return 1
        raise


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from skulk.runtime.localcluster import LocalCluster, plan_local_cluster

    base = Path(args.dir).expanduser() if args.dir else Path(tempfile.gettempdir()) / f"skulk-cluster-{os.getuid()}"
    extra = {}
    if args.auto_place is not None:
        extra["SKULK_AUTO_PLACE"] = args.auto_place
    plans = plan_local_cluster(args.n, base, api_base_port=args.api_port, zenoh_base_port=args.zenoh_port,
                               extra_env=extra)
    cluster = LocalCluster(plans)
    stop = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cluster.start()
    try:
        cluster.wait_ready(timeout_s=120)
        print(f"skulk: {args.n} node(s) up under {base}", flush=True)
        for p in plans:
            print(f"  {p.node_id}: API {p.url}  data {p.home}", flush=True)
        print("  Ctrl-C stops them all.", flush=True)
        while not stop["flag"] and cluster.alive():
            time.sleep(0.2)
    except (TimeoutError, RuntimeError) as exc:
        print(f"skulk: {exc}", file=sys.stderr)
        cluster.stop()
        return 1
    codes = cluster.stop()
    bad = {n: c for n, c in codes.items() if c not in (0, -signal.SIGTERM)}
    return 1 if bad else 0


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def cmd_status(args: argparse.Namespace) -> int:
    from skulk.runtime.localcluster import http_json

    url = args.url
    if not url:
        from skulk.runtime.config import load_config

        cfg = load_config(create=False)
        host = "127.0.0.1" if cfg.api_host in ("0.0.0.0", "::", "") else cfg.api_host
        url = f"http://{host}:{cfg.api_port}"
    url = url.rstrip("/")
    try:
        state = http_json(url + "/state", timeout_s=args.timeout)
        node_id = http_json(url + "/node_id", timeout_s=args.timeout)
    except OSError as exc:
        print(f"skulk: no node answers at {url}: {exc}", file=sys.stderr)
        return 1
    print(summarise_state(state, node_id, url))
    return 0


def summarise_state(state: dict[str, Any], node_id: str, url: str) -> str:
    """A human summary of a ``/state`` document (as served by the API)."""
    lines = [f"asked {node_id} at {url}"]
    session = state.get("session")
    if session:
        lines.append(f"master: {session['master']} (election clock {session['clock']}), "
                     f"log index {state.get('lastIndex', -1)}")
    else:
        lines.append("master: none yet")
    topo = state.get("topology", {})
    names = state.get("nodeIdentities", {})
    memory = state.get("nodeMemory", {})
    seen = state.get("lastSeen", {})
    nodes = topo.get("nodes", [])
    lines.append(f"nodes ({len(nodes)}):")
    for n in nodes:
        ident = names.get(n, {})
        mem = memory.get(n)
        mem_txt = (f"{_fmt_bytes(mem['ramAvailable']['inBytes'])} free of {_fmt_bytes(mem['ramTotal']['inBytes'])}"
                   if mem else "memory unknown")
        mark = " (master)" if session and session.get("master") == n else ""
        age = f", seen {time.time() - seen[n]:.0f} s ago" if n in seen else ""
        lines.append(f"  {n}{mark}: {ident.get('friendlyName', '?')} {ident.get('version', '')}; {mem_txt}{age}")
    links = topo.get("connections", [])
    lines.append(f"links observed: {len(links)}")
    instances = state.get("instances", {})
    runners = state.get("runners", {})
    lines.append(f"instances ({len(instances)}):")
    for iid, wrapped in sorted(instances.items()):
        ((kind, body),) = wrapped.items()
        sa = body["shardAssignments"]
        parts = []
        for node, runner in sorted(sa["nodeToRunner"].items()):
            status = runners.get(runner)
            status_name = next(iter(status)) if isinstance(status, dict) and status else "no report"
            parts.append(f"{node}={status_name}")
        lines.append(f"  {iid}: {sa['modelId']} [{kind}] " + ", ".join(parts))
    tasks = state.get("tasks", {})
    lines.append(f"tasks in flight: {len(tasks)}")
    return "\n".join(lines)


def _models_status(args: argparse.Namespace) -> int:
    from skulk.models_status import cmd_models_status

    return cmd_models_status(args)


def cmd_key(args: argparse.Namespace) -> int:
    """Print the cluster key (as hex, which every node accepts) and where it came from."""
    from skulk.runtime.config import load_config

    cfg = load_config()
    print(cfg.cluster_secret.hex())
    print(f"# from {cfg.cluster_key_source}; give every node of the cluster the same SKULK_CLUSTER_KEY",
          file=sys.stderr)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from skulk.runtime.config import SETTINGS, load_config

    cfg = load_config(create=False)
    print(f"data dir: {cfg.data_dir}\nmodels dir: {cfg.models_dir}\nnode id: {cfg.node_id}")
    for s in SETTINGS:
        if s.name == "CLUSTER_KEY":
            shown: object = "(set)" if cfg.sources[s.name] != "default" else f"(file {cfg.cluster_key_source})"
        elif s.name == "HF_TOKEN":
            shown = "(set)" if cfg.hf_token else "(not set)"
        elif s.name in ("API_KEYS", "API_ADMIN_KEYS"):
            # Secrets: say how many, never print them.
            count = len(cfg.api_keys if s.name == "API_KEYS" else cfg.api_admin_keys)
            shown = f"({count} key{'s' if count != 1 else ''})" if count else "(none)"
        else:
            shown = _setting_value(cfg, s.name)
        print(f"{s.env} = {shown}   [{cfg.sources[s.name]}]")
    return 0


def _setting_value(cfg: Any, name: str) -> object:
    attr = {
        "NODE_ID": "node_id", "FRIENDLY_NAME": "friendly_name", "NAMESPACE": "namespace",
        "FORCE_MASTER": "force_master", "BOOTSTRAP_PEERS": "bootstrap_peers", "LISTEN": "listen",
        "MULTICAST": "multicast", "LEASE_MS": "lease_ms", "REPLAY_WINDOW_S": "replay_window_s", "ADVERTISE": "advertise",
        "API_HOST": "api_host",
        "API_PORT": "api_port", "API_MAX_BODY_BYTES": "api_max_body_bytes", "API_KEYS_FILE": "api_keys_file",
        "AUTO_PLACE": "auto_place", "MAX_OUTPUT_TOKENS": "max_output_tokens",
        "KV_QUEUE_WAIT_SECONDS": "kv_queue_wait_s", "PREFIX_CACHE_BYTES": "prefix_cache_bytes", "KV_BUDGET_BYTES": "kv_budget_bytes",
        "PIPELINE_EVAL_TIMEOUT_SECONDS": "pipeline_eval_timeout_s", "RUNNER_HEARTBEAT_SECONDS": "runner_heartbeat_s",
        "RUNNER_STOP_GRACE_SECONDS": "runner_stop_grace_s", "PROBE_INTERVAL_SECONDS": "probe_interval_s",
        "PROBE_TIMEOUT_SECONDS": "probe_timeout_s",
        "EVENTLOG_MIN_FREE_BYTES": "eventlog_min_free_bytes", "LOGGING_EXTERNAL": "logging_external", "LOG_LEVEL": "log_level",
        "MODELS_DISK_BUDGET": "models_disk_budget_bytes", "HF_ENDPOINT": "hf_endpoint", "HF_HUB_OFFLINE": "hf_offline",
    }.get(name)
    if attr is not None:
        return getattr(cfg, attr)
    from skulk.runtime.config import SETTINGS

    setting = next(s for s in SETTINGS if s.name == name)
    assert setting.core_field is not None, name
    return getattr(cfg.core, setting.core_field)


def build_parser() -> argparse.ArgumentParser:
    import skulk

    parser = argparse.ArgumentParser(prog="skulk", description="Skulk: one inference cluster from several machines.")
    parser.add_argument("--version", action="version", version=f"skulk {skulk.__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="start a node (the default)")
    _add_run_flags(run)
    run.set_defaults(fn=cmd_run)
    cluster = sub.add_parser("cluster", help="local clusters")
    csub = cluster.add_subparsers(dest="cluster_command", required=True)
    up = csub.add_parser("up", help="start N nodes on loopback")
    up.add_argument("-n", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--dir", help="base directory for the nodes' data (default: a temp dir per user)")
    up.add_argument("--api-port", type=int, default=52415, help="API port of the first node; the others follow")
    up.add_argument("--zenoh-port", type=int, default=51415, help="zenoh port of the first node; the others follow")
    up.add_argument("--auto-place", help="model the master places ('none' disables)")
    up.set_defaults(fn=cmd_cluster_up)
    status = sub.add_parser("status", help="summarise the cluster")
    status.add_argument("--url", help="a node's API (default: this machine's configured port)")
    status.add_argument("--timeout", type=float, default=5.0)
    status.set_defaults(fn=cmd_status)
    models = sub.add_parser("models", help="model files on every node: copies, transfers in flight, disk")
    models.add_argument("--url", help="a node's API (default: this machine's configured port)")
    models.add_argument("--timeout", type=float, default=5.0)
    models.add_argument("--watch", action="store_true", help="print again every --interval seconds")
    models.add_argument("--interval", type=float, default=2.0)
    models.set_defaults(fn=_models_status)
    key = sub.add_parser("key", help="print the cluster key")
    key.set_defaults(fn=cmd_key)
    cfg = sub.add_parser("config", help="print every setting and its source")
    cfg.set_defaults(fn=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["run", *argv]
    args = parser.parse_args(argv)
    if not hasattr(args, "fn"):
        parser.print_help()
        return 2
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
