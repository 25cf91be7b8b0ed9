"""``python -m skulk.bench``: one front door reaches every tool, and each keeps its flags.

The tools pick the BLAS before importing ``mlx.core``, so each is started
here as its own process, with ``SKULK_FAST_BLAS=0`` and a private
``SKULK_HOME`` so nothing is built in the user's data directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from skulk.bench.__main__ import TOOLS, main

ROOT = Path(__file__).resolve().parents[2]
# Every flag each tool had before it moved to skulk.bench, so none is lost.
FLAGS = {
    "engine": ["--quick", "--models", "--concurrency-model", "--streams", "--skip-reference-blas", "--rounds", "--server-blas"],
    "blas": ["--sizes", "--prompt-tokens", "--runs", "--decode-steps", "--rounds"],
    "speculative": ["--root", "--preset", "--tokens", "--repetitions", "--stream-repetitions", "--depths", "--drafters",
                    "--streams", "--stream-tokens", "--sampled", "--json"],
    "tune": ["--drafter", "--depths", "--tokens", "--repetitions", "--min-gain", "--write"],
    "constrained": ["--quick", "--rounds", "--max-tokens", "--model", "--tokenizer"],
    "transfer": ["--model", "--rounds"],
}  # fmt: skip


def run_bench(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SKULK_HOME": str(home), "SKULK_FAST_BLAS": "0"}
    return subprocess.run(
        [sys.executable, "-m", "skulk.bench", *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_without_a_known_tool_it_lists_the_tools_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["bench_blas"]) == 2
    err = capsys.readouterr().err
    assert "unknown tool 'bench_blas'" in err
    for name in TOOLS:
        assert f"\n  {name} " in err
    assert main(["--help"]) == 0
    assert "python -m skulk.bench <tool>" in capsys.readouterr().out


@pytest.mark.parametrize("tool", sorted(FLAGS))
def test_each_tool_answers_help_with_its_own_flags(tool: str, tmp_path: Path) -> None:
    assert set(FLAGS) == set(TOOLS)
    done = run_bench([tool, "--help"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"usage: python -m skulk.bench {tool} "), done.stdout[:200]
    for flag in FLAGS[tool]:
        assert flag in done.stdout, (tool, flag)


def test_engine_sections_can_be_chosen_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    """The registry's names are the ``--sections`` vocabulary; a typo fails before anything is measured."""
    done = run_bench(["engine", "--sections", "single,nonesuch"], tmp_path)
    assert done.returncode == 2
    assert "unknown section(s) nonesuch; sections: single, reference-blas, concurrent" in done.stderr
    assert done.stdout == ""
