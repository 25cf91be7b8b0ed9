"""Configuration: precedence, legacy EXO_* names, files, identity (issue 5, item 7)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from skulk.runtime import auth
from skulk.runtime.config import SETTINGS, ConfigError, load_config, read_env_file

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _env(home: Path, **kw: str) -> dict[str, str]:
    return {"SKULK_HOME": str(home), **kw}


def test_defaults_are_the_published_ones(tmp_path: Path) -> None:
    cfg = load_config(_env(tmp_path))
    assert cfg.api_port == 52415
    assert cfg.namespace == "skulk"
    assert cfg.core.group_connect_deadline_s == 120.0
    assert cfg.core.warmup_deadline_s == 300.0
    assert cfg.core.max_concurrent_requests == 8
    assert cfg.max_output_tokens == 4096
    assert cfg.pipeline_eval_timeout_s == 60.0
    assert cfg.probe_interval_s == 10.0 and cfg.probe_timeout_s == 5.0
    assert cfg.eventlog_min_free_bytes == 2 * 1024**3
    assert cfg.auto_place == "skulk/tiny-qwen2"
    assert cfg.models_dir == tmp_path / "models"
    assert all(src == "default" for name, src in cfg.sources.items() if name not in ("CLUSTER_KEY",))


def test_every_skulk_variable_has_a_working_exo_equivalent(tmp_path: Path) -> None:
    values = {
        "API_PORT": ("6001", lambda c: c.api_port == 6001),
        "NAMESPACE": ("legacy-ns", lambda c: c.namespace == "legacy-ns"),
        "GROUP_CONNECT_DEADLINE_SECONDS": ("7", lambda c: c.core.group_connect_deadline_s == 7.0),
        "WARMUP_DEADLINE_SECONDS": ("8", lambda c: c.core.warmup_deadline_s == 8.0),
        "MAX_CONCURRENT_REQUESTS": ("3", lambda c: c.core.max_concurrent_requests == 3),
        "FORCE_MASTER": ("1", lambda c: c.core.force_master and c.force_master),
        "BOOTSTRAP_PEERS": ("10.0.0.2:5000, tcp/10.0.0.3:5001", lambda c: c.bootstrap_peers ==
                            ("tcp/10.0.0.2:5000", "tcp/10.0.0.3:5001")),
        "LOGGING_EXTERNAL": ("1", lambda c: c.logging_external),
        "CLUSTER_KEY": ("ab" * 16, lambda c: c.cluster_secret == bytes.fromhex("ab" * 16)),
    }
    for name, (text, check) in values.items():
        cfg = load_config(_env(tmp_path / name, **{"EXO_" + name: text}))
        assert check(cfg), name
        assert cfg.sources[name] == f"environment EXO_{name}", name
    assert {s.name for s in SETTINGS} >= set(values)
    # The old libp2p namespace variable is honoured too.
    assert load_config(_env(tmp_path / "lp", EXO_LIBP2P_NAMESPACE="old")).namespace == "old"
    # EXO_HOME locates the data directory when SKULK_HOME is unset.
    assert load_config({"EXO_HOME": str(tmp_path / "exo-home")}).data_dir == tmp_path / "exo-home"


def test_precedence_flag_over_env_over_legacy_over_env_file_over_yaml(tmp_path: Path) -> None:
    (tmp_path / "skulk.yaml").write_text("api_port: 1001\nnamespace: from-yaml\nlease_ms: 1500\n")
    (tmp_path / "skulk.env").write_text("SKULK_API_PORT=1002\nEXO_NAMESPACE=file-legacy\n")
    cfg = load_config(_env(tmp_path))
    assert (cfg.api_port, cfg.namespace, cfg.lease_ms) == (1002, "file-legacy", 1500)
    assert cfg.sources["LEASE_MS"].endswith("skulk.yaml lease_ms")
    cfg = load_config(_env(tmp_path, EXO_API_PORT="1003"))
    assert cfg.api_port == 1003
    cfg = load_config(_env(tmp_path, EXO_API_PORT="1003", SKULK_API_PORT="1004"))
    assert cfg.api_port == 1004 and cfg.sources["API_PORT"] == "environment SKULK_API_PORT"
    cfg = load_config(_env(tmp_path, SKULK_API_PORT="1004"), overrides={"API_PORT": 1005})
    assert cfg.api_port == 1005 and cfg.sources["API_PORT"] == "command line"


def test_yaml_core_section_overrides_core_fields_and_rejects_typos(tmp_path: Path) -> None:
    (tmp_path / "skulk.yaml").write_text("core:\n  campaign_timeout_s: 1.5\n  snapshot_every: 500\n")
    cfg = load_config(_env(tmp_path))
    assert cfg.core.campaign_timeout_s == 1.5 and cfg.core.snapshot_every == 500
    (tmp_path / "skulk.yaml").write_text("core:\n  campain_timeout_s: 1.5\n")
    with pytest.raises(ConfigError, match="unknown core setting"):
        load_config(_env(tmp_path))
    (tmp_path / "skulk.yaml").write_text("core:\n  snapshot_every: lots\n")
    with pytest.raises(ConfigError, match="core settings"):
        load_config(_env(tmp_path))
    (tmp_path / "skulk.yaml").write_text("api_prot: 5\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(_env(tmp_path))


def test_invalid_values_name_the_variable_and_its_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"SKULK_API_PORT \(environment EXO_API_PORT\)"):
        load_config(_env(tmp_path, EXO_API_PORT="not-a-port"))
    with pytest.raises(ConfigError, match="SKULK_MULTICAST"):
        load_config(_env(tmp_path, SKULK_MULTICAST="maybe"))
    with pytest.raises(ConfigError, match="invalid namespace"):
        load_config(_env(tmp_path, SKULK_NAMESPACE="a/b"))
    with pytest.raises(ConfigError, match="SKULK_ADVERTISE"):
        load_config(_env(tmp_path, SKULK_ADVERTISE="10.0.0.1=fibre"))
    with pytest.raises(ConfigError, match="too short"):
        load_config(_env(tmp_path, SKULK_CLUSTER_KEY="short"))


def test_env_file_syntax(tmp_path: Path) -> None:
    f = tmp_path / "skulk.env"
    f.write_text('# comment\n\nexport SKULK_A=1\nSKULK_B="two words"\nSKULK_C=3 # trailing\nSKULK_D=\'q\'\n')
    assert read_env_file(f) == {"SKULK_A": "1", "SKULK_B": "two words", "SKULK_C": "3", "SKULK_D": "q"}
    f.write_text("NOT A LINE\n")
    with pytest.raises(ConfigError, match=":1: expected KEY=VALUE"):
        read_env_file(f)


def test_node_id_and_cluster_key_persist_across_restarts(tmp_path: Path) -> None:
    first = load_config(_env(tmp_path))
    assert re.match(r"^node-[0-9a-f]{12}$", first.node_id)
    assert first.cluster_key_source.endswith("(created)")
    second = load_config(_env(tmp_path))
    assert second.node_id == first.node_id
    assert second.cluster_secret == first.cluster_secret and "(created)" not in second.cluster_key_source
    # An explicit id is kept from then on, even without the variable.
    assert load_config(_env(tmp_path, SKULK_NODE_ID="mac-studio-1")).node_id == "mac-studio-1"
    assert load_config(_env(tmp_path)).node_id == "mac-studio-1"
    with pytest.raises(ConfigError, match="invalid node id"):
        load_config(_env(tmp_path, SKULK_NODE_ID="bad id*"))


def test_read_only_loading_writes_nothing(tmp_path: Path) -> None:
    cfg = load_config(_env(tmp_path / "fresh"), create=False)
    assert cfg.node_id == "unknown"
    assert not (tmp_path / "fresh").exists()


def test_an_existing_exo_directory_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SKULK_HOME", raising=False)
    monkeypatch.delenv("EXO_HOME", raising=False)
    (tmp_path / ".exo").mkdir()
    (tmp_path / ".exo" / auth.KEY_FILENAME).write_text("cd" * 32 + "\n")
    cfg = load_config({"HOME": str(tmp_path)})
    assert cfg.data_dir == tmp_path / ".exo"
    assert cfg.cluster_secret == bytes.fromhex("cd" * 32)


def test_operations_doc_lists_every_setting_with_its_default() -> None:
    text = DOCS.read_text()
    for setting in SETTINGS:
        assert f"`{setting.env}`" in text, f"{setting.env} is not documented in docs/operations.md"
        assert f"`EXO_{setting.name}`" in text or "every `EXO_*`" in text


def test_kv_budget_settings_reach_the_runners(tmp_path: Path) -> None:
    cfg = load_config(_env(tmp_path / "a", SKULK_KV_QUEUE_WAIT_SECONDS="12", SKULK_PREFIX_CACHE_BYTES="0", EXO_KV_BUDGET_BYTES="1048576"))
    env = cfg.runner_env()
    assert env["SKULK_KV_QUEUE_WAIT_SECONDS"] == "12.0"
    assert env["SKULK_PREFIX_CACHE_BYTES"] == "0" and env["SKULK_KV_BUDGET_BYTES"] == "1048576"
    defaults = load_config(_env(tmp_path / "b")).runner_env()
    assert defaults["SKULK_PREFIX_CACHE_BYTES"] == "auto" and defaults["SKULK_KV_BUDGET_BYTES"] == "0"
    with pytest.raises(ConfigError, match="SKULK_PREFIX_CACHE_BYTES"):
        load_config(_env(tmp_path / "c", SKULK_PREFIX_CACHE_BYTES="lots"))


def test_skulk_config_prints_every_setting_but_never_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from skulk.cli import main

    secret = "sk-never-print-this-key-0123456789"
    monkeypatch.setenv("SKULK_HOME", str(tmp_path))
    monkeypatch.setenv("SKULK_API_KEYS", secret)
    main(["config"])
    out = capsys.readouterr().out
    for setting in SETTINGS:
        assert f"{setting.env} = " in out, setting.env
    assert secret not in out and "SKULK_API_KEYS = (1 key)" in out
