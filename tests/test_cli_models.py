"""``skulk models import`` and ``skulk models list``: a GGUF file becomes a model directory nodes serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skulk.cli import main
from skulk.engine.archmodels import write_arch_model
from skulk.cards import card_for_model_dir
from tests.engine.gguf_files import write_gguf


@pytest.fixture(scope="module")
def qwen3_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-gguf")
    return write_gguf(write_arch_model("qwen3", root / "src"), root / "Tiny-Qwen3.Q8_0.gguf",
                      types=lambda name: "Q8_0" if name.endswith("proj.weight") else None)  # fmt: skip


def test_import_writes_a_model_directory_with_its_card(qwen3_gguf: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    models = tmp_path / "models"
    assert main(["models", "import", str(qwen3_gguf), "--models-dir", str(models)]) == 0
    out = capsys.readouterr()
    path = models / "local" / "Tiny-Qwen3.Q8_0"
    assert "imported Tiny-Qwen3.Q8_0.gguf as local/Tiny-Qwen3.Q8_0 (qwen3" in out.out
    assert "28 Q8_0" in out.out and "[import] tensors" in out.err
    card = card_for_model_dir(path)
    assert card.model_id == "local/Tiny-Qwen3.Q8_0" and card.family == "qwen3" and card.n_layers == 4
    assert json.loads((path / "config.json").read_text())["quantization"]["bits"] == 8
    # The same id again is refused (nothing is overwritten) unless --replace.
    assert main(["models", "import", str(qwen3_gguf), "--models-dir", str(models)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["models", "import", str(qwen3_gguf), "--models-dir", str(models), "--id", "lab/q3"]) == 0
    assert main(["models", "import", str(qwen3_gguf), "--models-dir", str(models), "--id", "lab/q3", "--replace"]) == 0
    capsys.readouterr()
    assert main(["models", "list", "--models-dir", str(models)]) == 0
    listed = capsys.readouterr().out
    assert "# 2 model(s)" in listed and "lab/q3  qwen3  4 layers" in listed and "local/Tiny-Qwen3.Q8_0" in listed


def test_import_refuses_what_it_cannot_do_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    assert main(["models", "import", str(tmp_path / "nope.gguf"), "--models-dir", str(models)]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.gguf").write_bytes(b"GGUF but not really")
    assert main(["models", "import", str(tmp_path / "bad.gguf"), "--models-dir", str(models)]) == 1
    assert "not a readable GGUF file" in capsys.readouterr().err
    assert main(["models", "import", str(tmp_path / "bad.gguf"), "--models-dir", str(models), "--id", "../x"]) == 2
    assert not models.exists() or not any(models.rglob("config.json"))
