"""Node-to-node file copies (issue 14, item 2): only cluster members read files, copies resume and verify.

The serving side is the real ``TransferServer`` routes under uvicorn on
loopback; the fetching side is the real ``PeerFetcher``. The source node's
files come from the local hub stand-in (so they carry a hub manifest), the
way a store node's would.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from starlette.applications import Starlette

from skulk.core.files import Need
from skulk.runtime.downloads import DownloadFailed, HubDownloader, HubSettings, Progress
from skulk.runtime.modelfiles import load_manifest, partial_path
from skulk.runtime.transfer import PeerFetcher, TransferAuth, TransferServer
from tests.support.asgi import ThreadedServer
from tests.support.hub import LocalHub

SHARDED = "skulk/tiny-qwen2-sharded"
SMALL = "skulk/small-qwen2-10m"
F1, F2, F3 = (f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3))
SECRET = b"cluster-secret-for-tests"
NS = "skulk-test"


@pytest.fixture(scope="module")
def source_models(tmp_path_factory: pytest.TempPathFactory, hub_dir: Path) -> Path:
    """A store node's models directory: the sharded and the 42 MB model, downloaded from the hub."""
    root = tmp_path_factory.mktemp("store-models")
    with LocalHub(hub_dir) as hub:
        for model in (SHARDED, SMALL):
            HubDownloader(HubSettings(endpoint=hub.endpoint)).download(model, root / model)
    return root


@pytest.fixture
def peer(source_models: Path):
    server = TransferServer(source_models, TransferAuth(SECRET, NS))
    with ThreadedServer(Starlette(routes=server.routes())) as http:
        yield server, http


def _fetcher(**kw) -> PeerFetcher:
    return PeerFetcher(TransferAuth(SECRET, NS), "node-b", **kw)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_whole_model_is_copied_verified_and_recorded_as_from_the_peer(
    peer, source_models: Path, tmp_path: Path
) -> None:
    _, http = peer
    reports: list[Progress] = []
    result = _fetcher(on_progress=reports.append).fetch(SHARDED, tmp_path / SHARDED, http.url, source_node="node-a")
    src = load_manifest(source_models / SHARDED)
    assert src is not None and sorted(result.files) == sorted(src.files)
    for name, rec in src.files.items():
        assert _sha(tmp_path / SHARDED / name) == rec.sha256
    mine = load_manifest(tmp_path / SHARDED)
    assert mine is not None and mine.source == "peer:node-a" and mine.commit == src.commit
    assert result.fetched_bytes == src.total_bytes
    assert reports[-1].final and reports[-1].done_bytes == src.total_bytes
    again = _fetcher().fetch(SHARDED, tmp_path / SHARDED, http.url, source_node="node-a")
    assert again.fetched_bytes == 0


def test_a_rank_copies_only_its_layers_files(peer, tmp_path: Path) -> None:
    server, http = peer
    before = server.served_bytes
    result = _fetcher().fetch(SHARDED, tmp_path / "m", http.url, source_node="node-a",
                              layers=Need(start=2, end=4, n_layers=6, head=False))
    assert sorted(f for f in result.files if f.endswith(".safetensors")) == [F2]
    assert not (tmp_path / "m" / F1).exists() and not (tmp_path / "m" / F3).exists()
    assert server.served_bytes - before == result.fetched_bytes


def test_only_members_of_the_cluster_may_read_files(peer, tmp_path: Path) -> None:
    server, http = peer
    stranger = PeerFetcher(TransferAuth(b"another-secret", NS), "intruder")
    with pytest.raises(DownloadFailed) as err:
        stranger.fetch(SHARDED, tmp_path / "x", http.url, source_node="node-a")
    assert err.value.code == "unauthorized"
    # No header at all, and an old (replayed) signature, are refused too.
    with pytest.raises(urllib.error.HTTPError) as plain:
        urllib.request.urlopen(f"{http.url}/transfer/manifest?model={SHARDED}")
    assert plain.value.code == 401
    old = TransferAuth(SECRET, NS, clock=lambda: time.time() - 3600)
    req = urllib.request.Request(f"{http.url}/transfer/manifest?model={SHARDED}")
    req.add_header("Authorization", old.header("GET", f"/transfer/manifest?model={SHARDED}", "node-b"))
    with pytest.raises(urllib.error.HTTPError) as stale:
        urllib.request.urlopen(req)
    assert stale.value.code == 401
    assert server.refused >= 3


@pytest.mark.parametrize("model, path", [
    ("../etc", "passwd"),
    (SHARDED, "../../../../etc/passwd"),
    (SHARDED, ".skulk/files.json"),
    ("skulk/.hidden", "config.json"),
])
def test_nothing_outside_a_models_verified_files_is_served(peer, model: str, path: str) -> None:
    _, http = peer
    fetcher = _fetcher()
    with pytest.raises(urllib.error.HTTPError) as err:
        fetcher._open(http.url, "/transfer/file", {"model": model, "path": path})
    assert err.value.code == 404


def test_a_file_on_disk_that_is_not_in_the_manifest_is_not_served(peer, source_models: Path) -> None:
    _, http = peer
    stray = source_models / SHARDED / "notes.txt"
    stray.write_text("not verified")
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            _fetcher()._open(http.url, "/transfer/file", {"model": SHARDED, "path": "notes.txt"})
        assert err.value.code == 404
    finally:
        stray.unlink()


def test_an_interrupted_copy_resumes_from_its_partial_file(peer, source_models: Path, tmp_path: Path) -> None:
    _, http = peer
    src = load_manifest(source_models / SMALL)
    assert src is not None
    rec = src.files["model.safetensors"]
    dest = tmp_path / SMALL
    part = partial_path(dest, "model.safetensors", rec.sha256)
    part.parent.mkdir(parents=True)
    have = 7_000_001
    with open(source_models / SMALL / "model.safetensors", "rb") as f:
        part.write_bytes(f.read(have))
    result = _fetcher().fetch(SMALL, dest, http.url, source_node="node-a")
    small = sum(r.size for p, r in src.files.items() if p != "model.safetensors")
    assert result.fetched_bytes == rec.size - have + small
    assert _sha(dest / "model.safetensors") == rec.sha256


def test_a_garbled_partial_file_is_caught_and_copied_again(peer, source_models: Path, tmp_path: Path) -> None:
    _, http = peer
    src = load_manifest(source_models / SMALL)
    assert src is not None
    rec = src.files["model.safetensors"]
    dest = tmp_path / SMALL
    part = partial_path(dest, "model.safetensors", rec.sha256)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * 1_000_000)  # not the file's first bytes
    _fetcher(max_refetch=1).fetch(SMALL, dest, http.url, source_node="node-a")
    assert _sha(dest / "model.safetensors") == rec.sha256


def test_a_peer_whose_file_rotted_on_disk_never_gets_it_loaded_elsewhere(
    source_models: Path, tmp_path: Path
) -> None:
    rotten = tmp_path / "rotten"
    shutil.copytree(source_models / SHARDED, rotten / SHARDED)
    with open(rotten / SHARDED / F2, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    server = TransferServer(rotten, TransferAuth(SECRET, NS))
    with ThreadedServer(Starlette(routes=server.routes())) as http:
        with pytest.raises(DownloadFailed) as err:
            _fetcher(max_refetch=1).fetch(SHARDED, tmp_path / "dest", http.url, source_node="node-a")
    assert err.value.code == "integrity" and F2 in err.value.message
    assert not (tmp_path / "dest" / F2).exists()


def test_a_peer_that_goes_away_mid_copy_fails_the_copy_and_another_peer_finishes_it(
    source_models: Path, tmp_path: Path
) -> None:
    from starlette.middleware import Middleware
    from starlette.types import ASGIApp, Receive, Scope, Send

    class Slow:
        """Sends file bodies at about 8 MB/s, so the copy is still running when the peer dies."""

        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            import asyncio

            async def slow_send(message):
                if message["type"] == "http.response.body" and message.get("body"):
                    await asyncio.sleep(len(message["body"]) / 8e6)
                await send(message)

            await self.app(scope, receive, slow_send)

    dying = TransferServer(source_models, TransferAuth(SECRET, NS))
    http = ThreadedServer(Starlette(routes=dying.routes(), middleware=[Middleware(Slow)])).start()
    dest = tmp_path / SMALL
    src = load_manifest(source_models / SMALL)
    assert src is not None
    rec = src.files["model.safetensors"]
    part = partial_path(dest, "model.safetensors", rec.sha256)
    failure: list[DownloadFailed] = []

    def run() -> None:
        try:
            _fetcher(read_timeout_s=2.0).fetch(SMALL, dest, http.url, source_node="node-a")
        except DownloadFailed as exc:
            failure.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size > 4_000_000):
        assert worker.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    http.stop()
    worker.join(timeout=30)
    assert failure and failure[0].code == "network", failure
    had = part.stat().st_size
    assert 0 < had < rec.size and not (dest / "model.safetensors").exists()
    other = TransferServer(source_models, TransferAuth(SECRET, NS))
    with ThreadedServer(Starlette(routes=other.routes())) as http2:
        result = _fetcher().fetch(SMALL, dest, http2.url, source_node="node-c")
    assert result.fetched_bytes == rec.size - had
    assert _sha(dest / "model.safetensors") == rec.sha256
    mine = load_manifest(dest)
    assert mine is not None and mine.files["model.safetensors"].sha256 == rec.sha256


def test_with_api_keys_the_node_still_serves_signed_copies_and_nothing_else_without_a_key(
    source_models: Path, tmp_path: Path
) -> None:
    from skulk.api.app import create_app
    from skulk.api.config import ApiConfig
    from skulk.api.keys import ApiKeys
    from tests.api.node_double import ScriptedNode

    server = TransferServer(source_models, TransferAuth(SECRET, NS))
    app = create_app(ScriptedNode.three_nodes(), config=ApiConfig(keys=ApiKeys.of(["sk-user"])),
                     extra_routes=server.routes())
    with ThreadedServer(app) as http:
        result = _fetcher().fetch(SHARDED, tmp_path / SHARDED, http.url, source_node="node-a")
        assert result.fetched_bytes > 0
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{http.url}/state")
        assert err.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as err2:
            urllib.request.urlopen(f"{http.url}/transfer/manifest?model={SHARDED}")
        assert err2.value.code == 401  # refused by the transfer endpoint itself: not signed
