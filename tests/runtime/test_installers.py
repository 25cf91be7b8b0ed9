"""Service installers: the generated systemd unit and launchd plist (issue 5, item 9)."""

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
