"""Service installers: the generated systemd unit and launchd plist, and the optional log shipper."""

from __future__ import annotations

import configparser
import os
import plistlib
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deployment" / "install-systemd.sh"
LAUNCHD = ROOT / "deployment" / "install-launchd.sh"


def _fake_skulk(tmp_path: Path) -> Path:
    """An executable standing where the skulk entry point would be installed."""
    bin_dir = tmp_path / "venv dir" / "bin"
    bin_dir.mkdir(parents=True)
    exe = bin_dir / "skulk"
    exe.write_text("#!/bin/sh\nexec true\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def _run(script: Path, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    full = {"HOME": str(tmp_path), "PATH": os.environ["PATH"], **(env or {})}
    out = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment]
    parser.read_string(text)
    return parser


def test_systemd_unit_restarts_with_backoff_and_stops_a_crash_loop(tmp_path: Path) -> None:
    exe = _fake_skulk(tmp_path)
    text = _run(SYSTEMD, tmp_path, "--print", "--skulk-bin", str(exe))
    unit = _unit(text)
    assert unit["Service"]["ExecStart"] == f'"{exe}" run'
    assert unit["Service"]["Restart"] == "on-failure"
    assert "RestartSec" in unit["Service"]
    assert int(unit["Unit"]["StartLimitBurst"]) >= 3 and int(unit["Unit"]["StartLimitIntervalSec"]) >= 60
    assert unit["Service"]["KillMode"] == "mixed" and unit["Service"]["KillSignal"] == "SIGTERM"
    assert unit["Service"]["EnvironmentFile"] == f"-{tmp_path}/.local/share/skulk/skulk.env"
    assert unit["Install"]["WantedBy"] == "default.target"
    assert not (tmp_path / ".config").exists(), "--print changes nothing"


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (the unit is still checked by the parser test)")
    exe = _fake_skulk(tmp_path)
    unit = tmp_path / "skulk.service"
    unit.write_text(_run(SYSTEMD, tmp_path, "--print", "--skulk-bin", str(exe), "--json-logs"))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr  # warnings count as failures
    assert "SKULK_LOGGING_EXTERNAL=1" in unit.read_text()
    # The verifier is not a rubber stamp: a broken directive fails.
    bad = tmp_path / "bad.service"
    bad.write_text(unit.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    out = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "restart specifier" in out.stderr


def test_systemd_unit_uses_an_existing_exo_directory(tmp_path: Path) -> None:
    exe = _fake_skulk(tmp_path)
    (tmp_path / ".exo").mkdir()
    unit = _unit(_run(SYSTEMD, tmp_path, "--print", "--skulk-bin", str(exe)))
    assert unit["Service"]["EnvironmentFile"] == f"-{tmp_path}/.exo/skulk.env"


def test_launchd_plist_loads_the_env_file_and_restarts_on_failure(tmp_path: Path) -> None:
    exe = _fake_skulk(tmp_path)
    raw = _run(LAUNCHD, tmp_path, "--print", "--skulk-bin", str(exe))
    plist = plistlib.loads(raw.encode())
    assert plist["Label"] == "io.skulk.node"
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] >= 10
    sh, flag, script = plist["ProgramArguments"]
    assert (sh, flag) == ("/bin/sh", "-c")
    env_file = f"{tmp_path}/.skulk/skulk.env"
    assert f". '{env_file}'" in script and script.endswith(f"exec '{exe}' run")
    assert plist["EnvironmentVariables"]["SKULK_HOME"] == f"{tmp_path}/.skulk"
    assert plist["StandardOutPath"] == f"{tmp_path}/Library/Logs/skulk/skulk.log"
    assert not (tmp_path / "Library").exists(), "--print changes nothing"


def test_launchd_update_on_boot_script_runs_and_still_starts_skulk(tmp_path: Path) -> None:
    exe = _fake_skulk(tmp_path)
    marker = tmp_path / "started"
    exe.write_text(f"#!/bin/sh\necho \"$SKULK_API_PORT $*\" > '{marker}'\n")
    repo = tmp_path / "odd & <repo>"
    repo.mkdir()
    plist = plistlib.loads(
        _run(LAUNCHD, tmp_path, "--print", "--skulk-bin", str(exe), "--update-on-boot", "--repo", str(repo)).encode()
    )
    script = plist["ProgramArguments"][2]
    assert "git pull --ff-only" in script and str(repo) in script
    # Run the very command launchd would run: the env file is loaded, the update
    # (not a git checkout here) fails and is reported, and Skulk starts anyway.
    (tmp_path / ".skulk").mkdir()
    (tmp_path / ".skulk" / "skulk.env").write_text("SKULK_API_PORT=6123\n")
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=30,
                         env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]})
    assert out.returncode == 0, out.stderr
    assert "update failed" in out.stderr
    assert marker.read_text().strip() == "6123 run"


# --- the optional log shipper (skulk-vector) ---------------------------------------------


def _fake_vector(tmp_path: Path) -> Path:
    """An executable named ``vector`` (the installers only need it to exist)."""
    bin_dir = tmp_path / "vector bin"
    bin_dir.mkdir()
    exe = bin_dir / "vector"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def _parts(text: str) -> dict[str, str]:
    """``--print`` output split at its ``### <name>`` markers (the first part is the node's)."""
    chunks = text.split("\n### ")
    out = {"": chunks[0] + "\n"}
    for chunk in chunks[1:]:
        name, _, body = chunk.partition("\n")
        out[name] = body
    return out


def _run_full(script: Path, tmp_path: Path, *args: str, path_prefix: str = "") -> subprocess.CompletedProcess[str]:
    env = {"HOME": str(tmp_path), "PATH": f"{path_prefix}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=30)


def test_systemd_with_vector_adds_a_shipper_service_reading_the_nodes_journal(tmp_path: Path) -> None:
    import yaml

    exe, vector = _fake_skulk(tmp_path), _fake_vector(tmp_path)
    out = _run_full(SYSTEMD, tmp_path, "--print", "--skulk-bin", str(exe), "--with-vector", "--name", "node-a",
                    "--ingest-url", "http://logs.example:9428/insert/jsonline", path_prefix=f"{vector.parent}:")
    assert out.returncode == 0, out.stderr
    parts = _parts(out.stdout)
    data = f"{tmp_path}/.local/share/skulk"
    assert set(parts) == {"", "node-a-vector.service", f"{data}/vector.yaml"}
    assert "\nEnvironment=SKULK_LOGGING_EXTERNAL=1\n" in parts[""], "the shipper needs JSON lines"
    assert _unit(parts[""])["Service"]["ExecStart"] == f'"{exe}" run'
    shipper = _unit(parts["node-a-vector.service"])
    assert shipper["Service"]["ExecStart"] == f'"{vector}" --config "{data}/vector.yaml"'
    assert shipper["Unit"]["After"] == "node-a.service" and shipper["Service"]["Restart"] == "on-failure"
    config = yaml.safe_load(parts[f"{data}/vector.yaml"])
    source = config["sources"]["skulk_journal"]
    assert source["type"] == "journald" and source["extra_args"] == ["--user"]
    assert source["include_matches"] == {"_SYSTEMD_USER_UNIT": ["node-a.service"]}
    assert config["transforms"]["skulk_json"]["inputs"] == ["skulk_journal"]
    sink = config["sinks"]["skulk_out"]
    assert sink["type"] == "http" and sink["uri"] == "http://logs.example:9428/insert/jsonline"
    assert sink["inputs"] == ["skulk_json"] and sink["framing"] == {"method": "newline_delimited"}
    assert config["data_dir"] == f"{data}/vector"
    assert not (tmp_path / ".config").exists(), "--print changes nothing"


def test_systemd_shipper_takes_the_ingest_url_from_the_env_file_else_writes_local_files(tmp_path: Path) -> None:
    import yaml

    exe, vector = _fake_skulk(tmp_path), _fake_vector(tmp_path)
    data = tmp_path / ".local" / "share" / "skulk"
    args = ("--print", "--skulk-bin", str(exe), "--with-vector")
    local = yaml.safe_load(_parts(_run_full(SYSTEMD, tmp_path, *args, path_prefix=f"{vector.parent}:").stdout)
                           [f"{data}/vector.yaml"])
    assert local["sinks"]["skulk_out"]["type"] == "file"
    assert local["sinks"]["skulk_out"]["path"] == f"{data}/logs/shipped/skulk-%Y-%m-%d.jsonl"
    data.mkdir(parents=True)
    (data / "skulk.env").write_text("SKULK_API_PORT=1\nSKULK_LOGGING_INGEST_URL=http://10.0.0.9:9428/x\n")
    shipped = yaml.safe_load(_parts(_run_full(SYSTEMD, tmp_path, *args, path_prefix=f"{vector.parent}:").stdout)
                             [f"{data}/vector.yaml"])
    assert shipped["sinks"]["skulk_out"]["uri"] == "http://10.0.0.9:9428/x"


def test_systemd_without_vector_installs_the_node_alone_and_says_why(tmp_path: Path) -> None:
    exe = _fake_skulk(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"HOME": str(tmp_path), "PATH": f"{empty}:/usr/bin:/bin"}
    out = subprocess.run(["bash", str(SYSTEMD), "--print", "--skulk-bin", str(exe), "--with-vector"],
                         capture_output=True, text=True, env=env, timeout=30)
    if shutil.which("vector", path=env["PATH"]) is not None:
        pytest.skip("a real vector is installed in /usr/bin or /bin")
    assert out.returncode == 0, out.stderr
    assert "no 'vector' executable found" in out.stderr and "skipping the log shipper" in out.stderr
    assert "###" not in out.stdout and _unit(out.stdout)["Service"]["Restart"] == "on-failure"


def test_systemd_shipper_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (the unit is still checked by the parser test)")
    exe, vector = _fake_skulk(tmp_path), _fake_vector(tmp_path)
    out = _run_full(SYSTEMD, tmp_path, "--print", "--skulk-bin", str(exe), "--with-vector",
                    path_prefix=f"{vector.parent}:")
    unit = tmp_path / "skulk-vector.service"
    unit.write_text(_parts(out.stdout)["skulk-vector.service"])
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


def test_launchd_with_vector_adds_a_shipper_agent_tailing_the_node_log(tmp_path: Path) -> None:
    import yaml

    exe, vector = _fake_skulk(tmp_path), _fake_vector(tmp_path)
    out = _run_full(LAUNCHD, tmp_path, "--print", "--skulk-bin", str(exe), "--with-vector",
                    path_prefix=f"{vector.parent}:")
    assert out.returncode == 0, out.stderr
    parts = _parts(out.stdout)
    data = f"{tmp_path}/.skulk"
    node = plistlib.loads(parts[""].encode())
    assert node["EnvironmentVariables"]["SKULK_LOGGING_EXTERNAL"] == "1"
    shipper = plistlib.loads(parts["io.skulk.node.vector.plist"].encode())
    assert shipper["Label"] == "io.skulk.node.vector"
    assert shipper["ProgramArguments"] == [str(vector), "--config", f"{data}/vector.yaml"]
    assert shipper["KeepAlive"] == {"SuccessfulExit": False} and shipper["ThrottleInterval"] >= 10
    assert shipper["StandardOutPath"] != node["StandardOutPath"], "the shipper logs apart from the node"
    config = yaml.safe_load(parts[f"{data}/vector.yaml"])
    assert config["sources"]["skulk_log"] == {"type": "file", "include": [node["StandardOutPath"]],
                                              "read_from": "beginning"}
    assert config["sinks"]["skulk_out"]["type"] == "file"
    # Without vector: the node's agent alone, without JSON logs, and a message.
    empty = tmp_path / "empty"
    empty.mkdir()
    alone = subprocess.run(["bash", str(LAUNCHD), "--print", "--skulk-bin", str(exe), "--with-vector"],
                           capture_output=True, text=True, env={"HOME": str(tmp_path), "PATH": f"{empty}:/usr/bin:/bin"},
                           timeout=30)
    if shutil.which("vector", path=f"{empty}:/usr/bin:/bin") is None:
        assert alone.returncode == 0 and "skipping the log shipper" in alone.stderr
        assert "SKULK_LOGGING_EXTERNAL" not in plistlib.loads(alone.stdout.encode())["EnvironmentVariables"]
