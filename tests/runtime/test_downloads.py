"""Hub downloads with the real ``huggingface_hub`` against the local hub stand-in (issue 14, items 1 and 6).

Each test checks what a user relies on: the bytes on disk are the hub's bytes,
verified against the hub's own hashes; only the files a shard needs cross the
network; an interrupted download resumes instead of starting over; a corrupted
transfer is fetched again and never lands in the model directory; tokens,
offline mode and a full disk give clear answers.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from skulk.core.files import Need
from skulk.runtime.downloads import DownloadFailed, HubDownloader, HubSettings, Progress
from skulk.runtime.modelfiles import load_manifest, partial_path
from tests.support.hub import LocalHub
from tests.support.tmpfs import fill_disk, small_tmpfs

SHARDED = "skulk/tiny-qwen2-sharded"
PLAIN = "skulk/tiny-qwen2"
SMALL = "skulk/small-qwen2-10m"  # one 42 MB weight file
CHUNK = 10 << 20  # huggingface_hub writes a body in 10 MiB pieces
F1, F2, F3 = (f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3))
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hub(hub_dir: Path):
    with LocalHub(hub_dir) as h:
        yield h


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bodies(hub: LocalHub, repo: str) -> list[str]:
    return [r.path.rsplit("/", 1)[-1] for r in hub.downloads(repo)]


def test_a_whole_model_arrives_verified_byte_for_byte_and_a_second_call_fetches_nothing(
    hub: LocalHub, hub_dir: Path, tmp_path: Path
) -> None:
    reports: list[Progress] = []
    dl = HubDownloader(HubSettings(endpoint=hub.endpoint), on_progress=reports.append)
    dest = tmp_path / SHARDED
    result = dl.download(SHARDED, dest)
    src = hub_dir / SHARDED
    expected = sorted(p.name for p in src.iterdir())
    assert sorted(result.files) == expected
    for name in expected:
        assert _sha(dest / name) == _sha(src / name), name
    manifest = load_manifest(dest)
    assert manifest is not None and manifest.source == "hub" and manifest.commit == hub.repos[SHARDED].sha
    assert set(manifest.files) == set(expected)
    assert all(manifest.files[n].sha256 == _sha(src / n) for n in expected)
    total = sum((src / n).stat().st_size for n in expected)
    assert result.fetched_bytes == total
    assert reports[-1].final and reports[-1].done_bytes == reports[-1].total_bytes == total
    assert [r.done_bytes for r in reports] == sorted(r.done_bytes for r in reports)
    # Nothing partial is left behind.
    assert not list((dest / ".skulk" / "partial").rglob("*.part"))

    before = len(hub.downloads(SHARDED))
    again = dl.download(SHARDED, dest)
    assert again.fetched_bytes == 0 and len(hub.downloads(SHARDED)) == before


def test_a_pipeline_rank_fetches_only_the_weight_files_holding_its_layers(hub: LocalHub, tmp_path: Path) -> None:
    dl = HubDownloader(HubSettings(endpoint=hub.endpoint))
    # Layers 2-3 of 6, not the embedding rank: only the middle file.
    middle = dl.download(SHARDED, tmp_path / "mid", layers=Need(start=2, end=4, n_layers=6, head=False))
    weights = sorted(f for f in middle.files if f.endswith(".safetensors"))
    assert weights == [F2]
    assert sorted(f for f in _bodies(hub, SHARDED) if f.endswith(".safetensors")) == [F2]
    assert not (tmp_path / "mid" / F1).exists() and not (tmp_path / "mid" / F3).exists()
    # The rank that embeds and samples also needs the embedding (file 1) and the head (file 3).
    first = dl.download(SHARDED, tmp_path / "first", layers=Need(start=0, end=2, n_layers=6, head=True))
    assert sorted(f for f in first.files if f.endswith(".safetensors")) == [F1, F3]


def test_a_corrupted_transfer_is_fetched_again_and_never_lands_in_the_model_directory(
    hub: LocalHub, hub_dir: Path, tmp_path: Path
) -> None:
    dl = HubDownloader(HubSettings(endpoint=hub.endpoint), max_refetch=2)
    hub.corrupt(SHARDED, F2, times=1)
    dl.download(SHARDED, tmp_path / "a")
    assert _bodies(hub, SHARDED).count(F2) == 2
    assert _sha(tmp_path / "a" / F2) == _sha(hub_dir / SHARDED / F2)

    hub.corrupt(SHARDED, F2, times=3)
    with pytest.raises(DownloadFailed) as err:
        dl.download(SHARDED, tmp_path / "b")
    assert err.value.code == "integrity" and F2 in err.value.message
    assert not (tmp_path / "b" / F2).exists()
    manifest = load_manifest(tmp_path / "b")
    assert manifest is not None and F2 not in manifest.files
    # A file the hub lists as a plain git blob (not LFS) is checked by its blob id.
    hub.corrupt(SHARDED, "config.json", times=1)
    dl.download(SHARDED, tmp_path / "c")
    assert _bodies(hub, SHARDED).count("config.json") >= 4


def test_a_dropped_connection_resumes_where_it_stopped(hub: LocalHub, hub_dir: Path, tmp_path: Path) -> None:
    f = hub.repos[SMALL].files["model.safetensors"]
    hub.cut(SMALL, "model.safetensors", after_bytes=f.size // 2, times=1)
    result = HubDownloader(HubSettings(endpoint=hub.endpoint)).download(SMALL, tmp_path / SMALL)
    ranges = [r.range for r in hub.downloads(SMALL) if r.path.endswith("model.safetensors")]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    # Everything written before the cut (whole 10 MiB pieces) is kept.
    assert resumed_at == (f.size // 2) // CHUNK * CHUNK > 0
    assert _sha(tmp_path / SMALL / "model.safetensors") == f.sha256
    small = sum(g.size for g in hub.repos[SMALL].files.values() if g.path != "model.safetensors")
    assert result.fetched_bytes == f.size + small


_KILLABLE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from skulk.runtime.downloads import HubDownloader, HubSettings
    HubDownloader(HubSettings(endpoint=sys.argv[1])).download(sys.argv[2], Path(sys.argv[3]))
""")


def test_a_process_killed_mid_download_resumes_from_its_partial_file(hub: LocalHub, tmp_path: Path) -> None:
    dest = tmp_path / SMALL
    f = hub.repos[SMALL].files["model.safetensors"]
    hub.set_rate(8 << 20)  # 8 MiB/s: the 42 MB file takes about 5 s
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, hub.endpoint, SMALL, str(dest)], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    part = partial_path(dest, "model.safetensors", f.etag)
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size >= CHUNK):
        assert proc.poll() is None, "the download ended before it could be killed"
        assert time.monotonic() < deadline, "the download never wrote its first piece"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    had = part.stat().st_size
    assert 0 < had < f.size and not (dest / "model.safetensors").exists()
    hub.set_rate(None)
    result = HubDownloader(HubSettings(endpoint=hub.endpoint)).download(SMALL, dest)
    last = [r for r in hub.downloads(SMALL) if r.path.endswith("model.safetensors")][-1]
    assert last.range == f"bytes={had}-"
    assert result.fetched_bytes == f.size - had
    assert _sha(dest / "model.safetensors") == f.sha256


def test_a_private_repository_needs_hf_token(hub_dir: Path, tmp_path: Path) -> None:
    with LocalHub(hub_dir, token="hf_secret", private=[PLAIN]) as hub:
        with pytest.raises(DownloadFailed) as err:
            HubDownloader(HubSettings(endpoint=hub.endpoint)).download(PLAIN, tmp_path / "a")
        assert err.value.code == "not_found" and "HF_TOKEN" in err.value.message
        with pytest.raises(DownloadFailed):
            HubDownloader(HubSettings(endpoint=hub.endpoint, token="hf_wrong")).download(PLAIN, tmp_path / "b")
        HubDownloader(HubSettings(endpoint=hub.endpoint, token="hf_secret")).download(PLAIN, tmp_path / "c")
        assert (tmp_path / "c" / "model.safetensors").is_file()
        assert all(r.authorized for r in hub.downloads(PLAIN))


def test_offline_mode_uses_what_is_present_and_names_what_is_missing(hub: LocalHub, tmp_path: Path) -> None:
    dest = tmp_path / SHARDED
    HubDownloader(HubSettings(endpoint=hub.endpoint)).download(SHARDED, dest,
                                                               layers=Need(start=2, end=4, n_layers=6, head=False))
    seen = len(hub.requests)
    offline = HubDownloader(HubSettings(endpoint=hub.endpoint, offline=True))
    result = offline.download(SHARDED, dest, layers=Need(start=2, end=4, n_layers=6, head=False))
    assert result.fetched_bytes == 0 and F2 in result.files
    with pytest.raises(DownloadFailed) as err:
        offline.download(SHARDED, dest)  # the whole model: files 1 and 3 are not here
    assert err.value.code == "offline" and "2 needed file(s)" in err.value.message and F1 in err.value.message
    with pytest.raises(DownloadFailed) as err2:
        offline.download(PLAIN, tmp_path / "absent")
    assert err2.value.code == "offline"
    assert len(hub.requests) == seen, "offline mode never touches the network"


def test_offline_mode_adopts_a_model_directory_that_was_already_there(models_dir: Path, tmp_path: Path) -> None:
    import shutil

    dest = tmp_path / PLAIN
    shutil.copytree(models_dir / PLAIN, dest)
    result = HubDownloader(HubSettings(endpoint="http://127.0.0.1:9", offline=True)).download(PLAIN, dest)
    manifest = load_manifest(dest)
    assert manifest is not None and manifest.source == "local" and "model.safetensors" in result.files


def test_unknown_repositories_and_unreachable_hubs_fail_clearly(hub: LocalHub, tmp_path: Path) -> None:
    with pytest.raises(DownloadFailed) as err:
        HubDownloader(HubSettings(endpoint=hub.endpoint)).download("skulk/no-such-model", tmp_path / "x")
    assert err.value.code == "not_found"
    with pytest.raises(DownloadFailed) as err2:
        HubDownloader(HubSettings(endpoint="http://127.0.0.1:9")).download(PLAIN, tmp_path / "y")
    assert err2.value.code in ("network", "offline")


def test_too_little_disk_is_refused_before_writing_with_the_arithmetic(hub: LocalHub, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", 2 << 20) as small:
        with pytest.raises(DownloadFailed) as err:
            HubDownloader(HubSettings(endpoint=hub.endpoint), disk_margin_bytes=0).download(PLAIN, small / PLAIN)
        assert err.value.code == "disk_full"
        m = re.search(r"needs ([\d.]+) MB of disk, has ([\d.]+) MB free", err.value.message)
        assert m is not None, err.value.message
        assert float(m.group(1)) == 4.6 and 1.5 < float(m.group(2)) < 2.2, err.value.message
        assert not (small / PLAIN / "model.safetensors").exists()


def test_a_disk_that_fills_mid_download_fails_clearly_and_leaves_no_weight_file(
    hub: LocalHub, tmp_path: Path
) -> None:
    f = hub.repos[SMALL].files["model.safetensors"]
    with small_tmpfs(tmp_path / "small", 64 << 20) as small:
        dest = small / SMALL
        hub.set_rate(8 << 20)
        failure: list[DownloadFailed] = []

        def run() -> None:
            try:
                HubDownloader(HubSettings(endpoint=hub.endpoint), disk_margin_bytes=0).download(SMALL, dest)
            except DownloadFailed as exc:
                failure.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        part = partial_path(dest, "model.safetensors", f.etag)
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size >= CHUNK):
            assert worker.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        fill_disk(small)  # another program fills the disk while the weights arrive
        worker.join(timeout=60)
        assert not worker.is_alive()
        assert failure and failure[0].code == "disk_full", failure
        assert "disk filled up" in failure[0].message
        assert not (dest / "model.safetensors").exists()
        manifest = load_manifest(dest)
        assert manifest is None or "model.safetensors" not in manifest.files


def test_progress_reports_rate_and_eta_while_bytes_arrive(hub: LocalHub, tmp_path: Path) -> None:
    reports: list[Progress] = []
    hub.set_rate(16 << 20)
    HubDownloader(HubSettings(endpoint=hub.endpoint), on_progress=reports.append,
                  progress_interval_s=0.1).download(SMALL, tmp_path / SMALL)
    mid = [r for r in reports if not r.final and r.rate_bps > 0]
    assert len(mid) >= 2, reports
    assert all(r.eta_s is not None and r.eta_s > 0 for r in mid if r.done_bytes < r.total_bytes)
    # The throttle is 16 MiB/s; the rate reported is of that order (loose: the machine is shared).
    assert 0.1 * (16 << 20) < max(r.rate_bps for r in mid) < 4 * (16 << 20)
    assert reports[-1].final and reports[-1].eta_s == 0.0


def test_a_hub_repository_is_described_as_a_card_from_its_config_alone(hub: LocalHub, hub_dir: Path) -> None:
    from skulk.cards import derive_card

    card, listing = HubDownloader(HubSettings(endpoint=hub.endpoint)).describe(SHARDED)
    local = derive_card(hub_dir / SHARDED, model_id=SHARDED)
    assert card == local
    assert listing.commit == hub.repos[SHARDED].sha
    # Only config.json crossed the network.
    assert _bodies(hub, SHARDED) == ["config.json"]
    with pytest.raises(DownloadFailed) as err:
        HubDownloader(HubSettings(endpoint=hub.endpoint)).describe("skulk/absent")
    assert err.value.code == "not_found"


def test_coverage_says_which_layers_a_partial_copy_holds(hub: LocalHub, tmp_path: Path) -> None:
    from skulk.runtime.modelfiles import coverage

    dest = tmp_path / SHARDED
    HubDownloader(HubSettings(endpoint=hub.endpoint)).download(SHARDED, dest,
                                                               layers=Need(start=2, end=4, n_layers=6, head=False))
    manifest = load_manifest(dest)
    assert manifest is not None
    cov = coverage(dest, manifest.files)
    assert cov is not None and cov.layers == ((2, 4),) and not cov.head and not cov.complete
    HubDownloader(HubSettings(endpoint=hub.endpoint)).download(SHARDED, dest,
                                                               layers=Need(start=0, end=2, n_layers=6, head=True))
    manifest = load_manifest(dest)
    assert manifest is not None
    cov = coverage(dest, manifest.files)
    assert cov is not None and cov.layers == ((0, 6),) and cov.head and cov.complete


def test_two_nodes_sharing_one_models_directory_fetch_each_file_once(hub: LocalHub, tmp_path: Path) -> None:
    """`skulk cluster up` on one machine shares a models directory: concurrent downloads must not collide."""
    hub.set_rate(16 << 20)
    dest = tmp_path / SMALL
    results: list[object] = []

    def run() -> None:
        try:
            results.append(HubDownloader(HubSettings(endpoint=hub.endpoint)).download(SMALL, dest))
        except DownloadFailed as exc:  # pragma: no cover - reported by the assertion below
            results.append(exc)

    workers = [threading.Thread(target=run) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert len(results) == 2 and not any(isinstance(r, DownloadFailed) for r in results), results
    assert [r.path for r in hub.downloads(SMALL)].count(f"/{SMALL}/resolve/{hub.repos[SMALL].sha}/model.safetensors") == 1
    assert _sha(dest / "model.safetensors") == hub.repos[SMALL].files["model.safetensors"].sha256
    manifest = load_manifest(dest)
    assert manifest is not None and "model.safetensors" in manifest.files and "config.json" in manifest.files
