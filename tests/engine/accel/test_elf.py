"""``skulk.engine.accel.elf``: the ELF reader on the installed mlx wheel and on junk."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from skulk.engine.accel.elf import ElfError, read_dynamic

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fast BLAS is Linux-only")


def test_libmlx_imports_gemm_dynamically_from_a_bundled_blas() -> None:
    """The premise of the shim, checked on the installed wheel."""
    mlx_dir = Path(__import__("importlib").util.find_spec("mlx").submodule_search_locations[0])
    libmlx = mlx_dir / "lib" / "libmlx.so"
    if not libmlx.is_file():
        pytest.skip("this mlx build has no lib/libmlx.so")
    dyn = read_dynamic(libmlx)
    assert {"cblas_sgemm", "cblas_dgemm", "cblas_cgemm"} <= dyn.imports
    assert "cblas_sgemm" not in dyn.exports
    assert any("blas" in name for name in dyn.needed), dyn.needed


def test_elf_reader_rejects_non_elf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"#!/bin/sh\n" + bytes(100))
    with pytest.raises(ElfError):
        read_dynamic(junk)
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(Path(sys.executable).read_bytes()[:40])
    with pytest.raises(ElfError):
        read_dynamic(truncated)
