"""Node-to-node model file copies: a peer serves its verified files, another fetches them.

Theory of operation
-------------------
Every node serves, on its API port, the files it holds *verified* (listed in
the model's manifest, ``modelfiles``) to the other nodes of its cluster:

- ``GET /transfer/manifest?model=<id>``: the manifest (files, sizes, SHA-256);
- ``GET /transfer/file?model=<id>&path=<file>``: one file, with ``Range``
  (206) so an interrupted copy resumes.

Requests carry ``Authorization: Skulk <node>:<ms>:<mac>``, an HMAC-SHA256 over
the method, path and query, the node id and the time, keyed from the cluster
secret (HKDF, info ``file-transfer/<namespace>``), so only members of the
cluster can read a node's files (a gated model stays gated). Requests more
than ``window_s`` old are refused. Nothing else of the node is reachable this
way: a model id or path that leaves the models directory, or a file the
manifest does not list, is 404.

``PeerFetcher.fetch`` copies the files a shard needs from one peer's base URL
(the core picks the peer and the address: the best observed link, ranked as
rings rank them) into ``.skulk/partial/``, resuming from what is there, checks
each file's SHA-256 against the peer's manifest, and only then renames it into
the model directory and records it (source ``peer:<node>``). Progress and
failures use the same types as hub downloads (``downloads.Progress``,
``DownloadFailed``). A peer that stops sending for ``read_timeout_s`` fails
the copy with ``network``; deciding to try another peer is the core's.
Blocking: run it in a thread.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import http.client
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import msgspec
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from skulk.core.files import Need
from skulk.runtime.auth import derive_transfer_key
from skulk.runtime.downloads import DownloadFailed, DownloadResult, Progress, ProgressMeter
from skulk.runtime.modelfiles import (
    FileRecord,
    Manifest,
    disk_free_bytes,
    file_lock,
    locked,
    files_for_shard,
    format_bytes,
    load_manifest,
    partial_path,
    read_index,
    record_file,
)

__all__ = ["TransferAuth", "TransferServer", "PeerFetcher", "AUTH_SCHEME"]

log = logging.getLogger("skulk.transfer")

AUTH_SCHEME = "Skulk"
_CHUNK = 1 << 20


class TransferAuth:
    """Signs and checks file-transfer requests with a key derived from the cluster secret."""

    def __init__(self, secret: bytes, namespace: str, *, window_s: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.key = derive_transfer_key(secret, namespace)
        self.window_s = window_s
        self.clock = clock

    def _mac(self, method: str, target: str, node: str, ms: int) -> str:
        msg = f"{method}\n{target}\n{node}\n{ms}".encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def header(self, method: str, target: str, node: str) -> str:
        """The ``Authorization`` value for ``method target`` (path and query) sent by ``node``."""
        ms = int(self.clock() * 1000)
        return f"{AUTH_SCHEME} {node}:{ms}:{self._mac(method, target, node, ms)}"

    def check(self, method: str, target: str, value: str | None) -> str | None:
        """The sending node's id when ``value`` authenticates ``method target``; None otherwise."""
        if not value or not value.startswith(AUTH_SCHEME + " "):
            return None
        try:
            node, ms_text, mac = value[len(AUTH_SCHEME) + 1 :].rsplit(":", 2)
            ms = int(ms_text)
        except ValueError:
            return None
        if abs(self.clock() * 1000 - ms) > self.window_s * 1000:
            return None
        if not hmac.compare_digest(mac, self._mac(method, target, node, ms)):
            return None
        return node


def _target(request: Request) -> str:
    query = request.url.query
    return request.url.path + ("?" + query if query else "")


class _FileResponse(FileResponse):
    # Starlette reads 64 KiB at a time; model files are large, and 1 MiB reads
    # cut the per-chunk overhead that dominates a loopback or Thunderbolt copy.
    chunk_size = _CHUNK


class TransferServer:
    """The ``/transfer/*`` routes: this node's verified model files, for its cluster only."""

    def __init__(self, models_dir: Path, auth: TransferAuth) -> None:
        self.models_dir = models_dir
        self.auth = auth
        self.served_bytes = 0
        self.refused = 0

    def routes(self) -> list[Route]:
        return [
            Route("/transfer/manifest", self._manifest, methods=["GET"]),
            Route("/transfer/file", self._file, methods=["GET", "HEAD"]),
        ]

    def _model_dir(self, model_id: str) -> Path | None:
        parts = model_id.split("/")
        if not model_id or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            return None
        path = self.models_dir.joinpath(*parts)
        return path if path.resolve().is_relative_to(self.models_dir.resolve()) else None

    def _deny(self, request: Request) -> Response | None:
        if self.auth.check(request.method, _target(request), request.headers.get("authorization")) is None:
            self.refused += 1
            return JSONResponse({"error": "not a member of this cluster"}, status_code=401)
        return None

    async def _manifest(self, request: Request) -> Response:
        if (denied := self._deny(request)) is not None:
            return denied
        model_dir = self._model_dir(request.query_params.get("model", ""))
        manifest = load_manifest(model_dir) if model_dir is not None else None
        if manifest is None:
            return JSONResponse({"error": "no verified files of this model here"}, status_code=404)
        return Response(msgspec.json.encode(manifest), media_type="application/json")

    async def _file(self, request: Request) -> Response:
        if (denied := self._deny(request)) is not None:
            return denied
        model_dir = self._model_dir(request.query_params.get("model", ""))
        path = request.query_params.get("path", "")
        manifest = load_manifest(model_dir) if model_dir is not None else None
        if model_dir is None or manifest is None or path not in manifest.files:
            return JSONResponse({"error": "no verified file at this path"}, status_code=404)
        full = (model_dir / path).resolve()
        if not full.is_relative_to(model_dir.resolve()) or not full.is_file():
            return JSONResponse({"error": "no verified file at this path"}, status_code=404)
        self.served_bytes += manifest.files[path].size
        return _FileResponse(full, media_type="application/octet-stream")


class PeerFetcher:
    """Copy a model's files (or one shard's) from a peer's ``/transfer/*`` into a model directory."""

    def __init__(self, auth: TransferAuth, node_id: str, *, on_progress: Callable[[Progress], None] | None = None,
                 progress_interval_s: float = 0.5, read_timeout_s: float = 30.0, max_refetch: int = 1,
                 cancel: threading.Event | None = None, disk_margin_bytes: int = 64 << 20) -> None:
        self.auth = auth
        self.node_id = node_id
        self.on_progress = on_progress
        self.progress_interval_s = progress_interval_s
        self.read_timeout_s = read_timeout_s
        self.max_refetch = max_refetch
        self.cancel = cancel or threading.Event()
        self.disk_margin_bytes = disk_margin_bytes

    def _open(self, base_url: str, path: str, query: dict[str, str], start: int = 0):  # -> HTTPResponse
        target = path + "?" + urllib.parse.urlencode(query)
        req = urllib.request.Request(base_url.rstrip("/") + target, method="GET")
        req.add_header("Authorization", self.auth.header("GET", target, self.node_id))
        if start > 0:
            req.add_header("Range", f"bytes={start}-")
        return urllib.request.urlopen(req, timeout=self.read_timeout_s)

    def manifest(self, base_url: str, model_id: str) -> Manifest:
        try:
            with self._open(base_url, "/transfer/manifest", {"model": model_id}) as resp:
                return msgspec.json.decode(resp.read(), type=Manifest)
        except urllib.error.HTTPError as exc:
            code = "not_found" if exc.code == 404 else "unauthorized" if exc.code == 401 else "network"
            raise DownloadFailed(code, f"{model_id}: the peer at {base_url} answered HTTP {exc.code} for its "
                                       f"manifest") from exc
        except (OSError, http.client.HTTPException, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DownloadFailed("network", f"{model_id}: cannot read the manifest of the peer at {base_url}: "
                                            f"{exc}") from exc

    def fetch(self, model_id: str, model_dir: Path, base_url: str, *, source_node: str,
              layers: Need | None = None) -> DownloadResult:
        """Make ``model_dir`` hold every file ``layers`` needs, copied from the peer at ``base_url``.

        Raises ``DownloadFailed``; files already verified here with the same SHA-256 are kept.
        """
        started = time.monotonic()
        remote = self.manifest(base_url, model_id)
        local = load_manifest(model_dir)
        small = [p for p in remote.files if not p.endswith(".safetensors")]
        meter = ProgressMeter(model_id, sum(remote.files[p].size for p in small), self.on_progress,
                              interval_s=self.progress_interval_s, cancel=self.cancel)
        for p in small:
            self._ensure(model_id, model_dir, base_url, source_node, remote, p, meter, local)
        index = read_index(model_dir)
        needed = files_for_shard(set(remote.files) | set((index or {}).values()), index, layers)
        missing_at_peer = [p for p in needed if p not in remote.files]
        if missing_at_peer:
            raise DownloadFailed("not_found", f"{model_id}: the peer {source_node} lacks {len(missing_at_peer)} "
                                              f"needed file(s) ({', '.join(missing_at_peer[:3])})")
        weights = [p for p in needed if p.endswith(".safetensors")]
        meter.total_bytes += sum(remote.files[p].size for p in weights)
        self._check_space(model_id, model_dir, remote, weights)
        for p in weights:
            self._ensure(model_id, model_dir, base_url, source_node, remote, p, meter, load_manifest(model_dir))
        meter.file = ""
        meter.report(final=True)
        return DownloadResult(model_id, remote.commit, tuple(needed), meter.fetched_bytes, time.monotonic() - started)

    def _check_space(self, model_id: str, model_dir: Path, remote: Manifest, paths: list[str]) -> None:
        local = load_manifest(model_dir)
        need = 0
        for p in paths:
            rec = remote.files[p]
            if local is not None and p in local.files and local.files[p].sha256 == rec.sha256:
                continue
            part = partial_path(model_dir, p, rec.sha256)
            need += rec.size - (part.stat().st_size if part.exists() else 0)
        free = disk_free_bytes(model_dir)
        if need + self.disk_margin_bytes > free:
            raise DownloadFailed("disk_full", f"{model_id}: needs {format_bytes(need + self.disk_margin_bytes)} of "
                                              f"disk, has {format_bytes(free)} free under {model_dir}")

    @staticmethod
    def _held(model_dir: Path, path: str, rec: FileRecord) -> bool:
        local = load_manifest(model_dir)
        mine = local.files.get(path) if local is not None else None
        return mine is not None and mine.sha256 == rec.sha256 and (model_dir / path).is_file()

    def _ensure(self, model_id: str, model_dir: Path, base_url: str, source_node: str, remote: Manifest, path: str,
                meter: ProgressMeter, local: Manifest | None = None) -> None:
        rec = remote.files[path]
        if self._held(model_dir, path, rec):
            meter.add_done(rec.size)
            return
        try:
            with locked(file_lock(model_dir, path), cancel=self.cancel):
                if self._held(model_dir, path, rec):  # another process sharing the directory got it meanwhile
                    meter.add_done(rec.size)
                    return
                self._copy_verified(model_id, model_dir, base_url, source_node, remote, path, meter)
        except InterruptedError as exc:
            raise DownloadFailed("cancelled", f"transfer of {model_id} cancelled") from exc

    def _copy_verified(self, model_id: str, model_dir: Path, base_url: str, source_node: str, remote: Manifest,
                       path: str, meter: ProgressMeter) -> None:
        rec = remote.files[path]
        final = model_dir / path
        meter.file = path
        part = partial_path(model_dir, path, rec.sha256)
        for attempt in range(self.max_refetch + 1):
            digest = self._copy(model_id, base_url, path, rec, part, meter)
            if digest == rec.sha256:
                final.parent.mkdir(parents=True, exist_ok=True)
                part.replace(final)
                record_file(model_dir, model_id, f"peer:{source_node}", path,
                            FileRecord(size=rec.size, sha256=rec.sha256, etag=rec.etag), commit=remote.commit)
                return
            log.warning("%s: %s from %s failed verification (attempt %d of %d)", model_id, path, source_node,
                        attempt + 1, self.max_refetch + 1)
            meter.rewind(rec.size)
            part.unlink(missing_ok=True)
        raise DownloadFailed("integrity", f"{model_id}: {path} from {source_node} did not match its SHA-256 after "
                                          f"{self.max_refetch + 1} attempts")

    def _copy(self, model_id: str, base_url: str, path: str, rec: FileRecord, part: Path,
              meter: ProgressMeter) -> str:
        """Bring ``part`` to ``rec.size`` bytes, resuming; returns the SHA-256 of the whole file.

        The hash is computed as the bytes arrive (and over the resumed prefix,
        read once), so verification costs no second pass over the file.
        """
        part.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > rec.size:
            part.unlink()
            have = 0
        digest = hashlib.sha256()
        if have:
            with open(part, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        meter.add_done(have)
        if have == rec.size:
            return digest.hexdigest()
        try:
            with self._open(base_url, "/transfer/file", {"model": model_id, "path": path}, have) as resp:
                if have > 0 and resp.status != 206:
                    meter.rewind(have)  # the peer ignored the Range: start over
                    have = 0
                    digest = hashlib.sha256()
                with open(part, "r+b" if have else "wb") as fh:
                    fh.seek(have)
                    fh.truncate()
                    while chunk := resp.read(_CHUNK):
                        fh.write(chunk)
                        digest.update(chunk)
                        meter.advance(len(chunk))
        except DownloadFailed:
            raise
        except urllib.error.HTTPError as exc:
            code = "not_found" if exc.code == 404 else "unauthorized" if exc.code == 401 else "network"
            raise DownloadFailed(code, f"{model_id}: the peer at {base_url} answered HTTP {exc.code} for {path}") \
                from exc
        except http.client.HTTPException as exc:  # IncompleteRead and friends are not OSErrors
            raise DownloadFailed("network", f"{model_id}: copying {path} from {base_url} failed: {exc!r}") from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DownloadFailed("disk_full", f"{model_id}: the disk filled up while writing {path}: {exc}") \
                    from exc
            raise DownloadFailed("network", f"{model_id}: copying {path} from {base_url} failed: {exc}") from exc
        got = part.stat().st_size
        if got != rec.size:
            raise DownloadFailed("network", f"{model_id}: the peer at {base_url} sent {got} of {rec.size} bytes of "
                                            f"{path}")
        return digest.hexdigest()
