"""``skulk.engine.accel.route``: fast BLAS for MLX on Linux is active here,
numerically sane, and falls back cleanly.

The BLAS must be chosen before ``import mlx.core``, and this test process may
already have imported mlx, so every behavioural check runs a fresh Python
process (``skulk.engine.accel.probe``) and reads its JSON reply. Each test
gives the child its own SKULK_HOME so it never touches the user's data dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from skulk.engine.accel import route
from skulk.engine.accel.elf import read_dynamic
from skulk.engine.accel.probe import QWEN2_TINY

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fast BLAS is Linux-only")

PROBE_TIMEOUT_S = 180
F32_TOLERANCE = 1e-5  # max |C - C_ref| / max(1, max |C_ref|) for the probe's shapes
F64_TOLERANCE = 1e-12


def probe(request: dict[str, Any], home: Path, **env_changes: str | None) -> dict[str, Any]:
    """Run the probe in a new interpreter with SKULK_HOME=home; return its reply."""
    env = dict(os.environ)
    env.pop("SKULK_FAST_BLAS", None)
    env["SKULK_HOME"] = str(home)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    done = subprocess.run(
        [sys.executable, "-m", "skulk.engine.accel.probe", json.dumps(request)],
        env=env,
        cwd=Path(__file__).resolve().parents[3],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The status line must be the only output: enabling logs nothing.
    assert done.stderr.strip() == "", done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir shared by this module's children, so the shim is built once."""
    return tmp_path_factory.mktemp("skulk-home")


def assert_matmuls_sane(reply: dict[str, Any]) -> None:
    errors = reply["matmul_errors"]
    assert set(errors) >= {"square_f32", "transposed_f32", "batched_f32", "row_f32", "square_f64"}
    for name, error in errors.items():
        limit = F64_TOLERANCE if name.endswith("f64") else F32_TOLERANCE
        assert error <= limit, (name, error)


def cached_shims(home: Path) -> list[Path]:
    return sorted((home / "cache" / "blas").glob("*"))


def test_fast_blas_is_active_here_and_matmuls_match_numpy(home: Path) -> None:
    reply = probe({"matmul_check": True}, home)
    status = reply["status"]
    assert status["active"] is True, status
    assert status["backend"] == "scipy-openblas32", status
    assert "self-check" in status["reason"] and status["threads"] >= 1
    # The probe's own matmuls (beyond enable's self-check) went through the shim.
    assert reply["shim_calls"] > 20
    assert_matmuls_sane(reply)
    shims = cached_shims(home)
    assert len(shims) == 1 and shims[0].suffix == ".so", shims  # no temp files left behind
    dyn = read_dynamic(shims[0])
    assert {"cblas_sgemm", "cblas_dgemm", "cblas_cgemm", "skulk_blas_bind"} <= dyn.exports
    # The shim links to no BLAS: OpenBLAS's unprefixed extras must not reach
    # the global scope through it.
    assert not any("blas" in name for name in dyn.needed), dyn.needed


def test_greedy_tokens_identical_with_and_without_fast_blas(home: Path) -> None:
    request = {"model": {**QWEN2_TINY, "seed": 3}, "greedy": {"prompt_tokens": 48, "steps": 24}}
    fast = probe(request, home)
    reference = probe(request, home, SKULK_FAST_BLAS="0")
    assert fast["status"]["active"] is True and reference["status"]["active"] is False
    assert fast["shim_calls"] > 0 and reference["shim_calls"] == 0
    assert fast["params"] == reference["params"] > 100_000
    assert len(fast["tokens"]) == 24
    assert len(set(fast["tokens"])) > 3, "degenerate model: the comparison would prove little"
    assert fast["tokens"] == reference["tokens"]
    drift = max(abs(a - b) for a, b in zip(fast["first_logits"], reference["first_logits"], strict=True))
    assert drift < 1e-4, drift


def test_opt_out_env_var_keeps_mlx_blas(home: Path) -> None:
    for value in ("0", "off"):
        reply = probe({"matmul_check": True}, home, SKULK_FAST_BLAS=value)
        status = reply["status"]
        assert status == {
            "active": False,
            "backend": "mlx-reference",
            "reason": f"disabled by SKULK_FAST_BLAS={value}",
            "threads": 0,
        }
        assert reply["shim_calls"] == 0
        assert_matmuls_sane(reply)


def test_unknown_opt_out_value_falls_back_and_says_so(home: Path) -> None:
    reply = probe({}, home, SKULK_FAST_BLAS="mkl")
    assert reply["status"]["active"] is False
    assert "SKULK_FAST_BLAS=mkl" in reply["status"]["reason"]


def test_ilp64_backend_from_numpy_wheel(home: Path) -> None:
    """numpy's bundled OpenBLAS has 64-bit integers: the shim widens mlx's ints."""
    numpy_libs = Path(__import__("numpy").__file__).parent.parent / "numpy.libs"
    if not list(numpy_libs.glob("libscipy_openblas64_*.so*")):
        pytest.skip("this numpy does not bundle scipy-openblas64")
    reply = probe({"matmul_check": True}, home, SKULK_FAST_BLAS="numpy-openblas64")
    assert reply["status"]["active"] is True, reply["status"]
    assert reply["status"]["backend"] == "numpy-openblas64"
    assert reply["shim_calls"] > 20
    assert_matmuls_sane(reply)


def test_missing_compiler_falls_back_cleanly(tmp_path: Path) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    fresh_home = tmp_path / "home"
    reply = probe({"matmul_check": True}, fresh_home, CC="/nonexistent/cc", PATH=str(empty_bin))
    status = reply["status"]
    assert status["active"] is False and status["backend"] == "mlx-reference"
    assert "CC=/nonexistent/cc" in status["reason"], status
    assert reply["shim_calls"] == 0
    assert_matmuls_sane(reply)
    assert cached_shims(fresh_home) == []

    reply = probe({}, fresh_home, CC=None, PATH=str(empty_bin))
    assert reply["status"]["active"] is False
    assert "no C compiler" in reply["status"]["reason"], reply["status"]


def test_cached_shim_needs_no_compiler(home: Path, tmp_path: Path) -> None:
    probe({}, home)  # builds the shim if no earlier test did
    assert len(cached_shims(home)) == 1
    reply = probe({"matmul_check": True}, home, CC="/nonexistent/cc", PATH=str(tmp_path))
    assert reply["status"]["active"] is True, reply["status"]
    assert_matmuls_sane(reply)


def test_broken_compiler_output_is_reported_not_raised(tmp_path: Path) -> None:
    fake_cc = tmp_path / "fakecc"
    fake_cc.write_text("#!/bin/sh\necho 'fakecc: internal error' >&2\nexit 3\n")
    fake_cc.chmod(0o755)
    fresh_home = tmp_path / "home"
    reply = probe({}, fresh_home, CC=str(fake_cc))
    assert reply["status"]["active"] is False
    assert "exit 3" in reply["status"]["reason"] and "internal error" in reply["status"]["reason"]
    assert cached_shims(fresh_home) == []  # the failed build left no temp file


def test_corrupt_cached_shim_is_rebuilt(tmp_path: Path) -> None:
    fresh_home = tmp_path / "home"
    probe({}, fresh_home)
    (shim,) = cached_shims(fresh_home)
    shim.write_bytes(b"not a shared library")
    reply = probe({"matmul_check": True}, fresh_home)
    assert reply["status"]["active"] is True, reply["status"]
    assert_matmuls_sane(reply)
    assert shim.read_bytes()[:4] == b"\x7fELF"


def run_python(code: str, home: Path) -> dict[str, Any]:
    env = {**os.environ, "SKULK_HOME": str(home)}
    env.pop("SKULK_FAST_BLAS", None)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True,
        timeout=PROBE_TIMEOUT_S, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_after_mlx_import_it_refuses_and_is_idempotent(home: Path) -> None:
    reply = run_python(
        "import json, mlx.core as mx\n"
        "from skulk.engine.accel import enable_fast_blas, fast_blas_calls\n"
        "first = enable_fast_blas()\n"
        "x = mx.ones((64, 64)); y = (x @ x)[0, 0].item()\n"
        "print(json.dumps({'active': first.active, 'reason': first.reason, 'same': enable_fast_blas() is first,"
        " 'y': y, 'calls': fast_blas_calls()}))\n",
        home,
    )
    assert reply["active"] is False and "before" in reply["reason"], reply
    assert reply["same"] is True and reply["y"] == 64.0 and reply["calls"] == 0


def test_enable_twice_returns_the_first_status(home: Path) -> None:
    reply = run_python(
        "import json\n"
        "from skulk.engine.accel import enable_fast_blas, fast_blas_calls\n"
        "first = enable_fast_blas(); calls = fast_blas_calls()\n"
        "second = enable_fast_blas()\n"
        "print(json.dumps({'active': first.active, 'same': second is first,"
        " 'calls_unchanged': fast_blas_calls() == calls}))\n",
        home,
    )
    assert reply == {"active": True, "same": True, "calls_unchanged": True}


# --- in-process: pure functions that load nothing into the global scope -------


def test_shim_cache_key_follows_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKULK_HOME", str(tmp_path))
    original = route._shim_path()
    assert original.parent == tmp_path / "cache" / "blas"
    edited = tmp_path / "shim.c"
    edited.write_text(route._SHIM_SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(route, "_SHIM_SOURCE", edited)
    assert route._shim_path() != original
    assert route._shim_path().parent == original.parent
