"""A local stand-in for the Hugging Face Hub, so downloads are tested without the internet.

Theory of operation
-------------------
``LocalHub(root)`` serves every directory ``<root>/<org>/<name>/`` as a model
repository through the subset of the Hub's HTTP API that ``huggingface_hub``
(the official client, unmodified, pointed here through ``HF_ENDPOINT`` or
``endpoint=``) uses to download:

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``:
  ``model_info``/``repo_info`` (``?blobs=true`` adds sizes and hashes);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=``: ``list_repo_tree``;
- ``POST /api/models/{repo}/paths-info/{rev}``: ``get_paths_info``;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``get_hf_file_metadata``
  and the download itself, with ``Range`` (206) for resumption.

Files are described the way the Hub describes them: every file has a git
blob id (``oid``, the SHA-1 of ``blob <size>\\0<bytes>``); large and binary
files (``*.safetensors``, ``*.gguf``, anything over 10 MiB) are LFS files
whose ``oid`` is the blob id of their LFS pointer and whose ``lfs.oid`` is the
SHA-256 of the content. ``resolve`` answers with ``X-Repo-Commit``, an
``ETag`` (the blob id, or for LFS files the SHA-256 in ``X-Linked-Etag``)
and ``X-Linked-Size``; errors carry the Hub's ``X-Error-Code``
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``). A repository's
commit is a SHA-1 over its file list, so it changes when a file does.

Faults, for the tests that need them: ``rate_bps`` throttles file bodies,
``corrupt(repo, path, times)`` flips a byte in the next responses for a file,
``cut(repo, path, after_bytes, times)`` drops the connection mid-body, and
``private`` repositories need ``Authorization: Bearer <token>``. Every request
is recorded in ``requests`` (method, path, Range header, authorised or not).

This replaces only the internet, never the client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.asgi import ThreadedServer

__all__ = ["HubFile", "HubRepo", "HubRequest", "LocalHub", "scan_repo", "git_blob_id", "shard_repo", "build_hub"]

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".npz", ".msgpack", ".h5")
LFS_MIN_BYTES = 10 << 20
_CHUNK = 64 << 10
_CREATED = "2026-01-01T00:00:00.000Z"


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob: SHA-1 over ``blob <size>\\0`` and the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    blob_id: str
    sha256: str | None  # set for LFS files

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.sha256 is not None:
            entry["lfs"] = {"oid": self.sha256, "size": self.size,
                            "pointerSize": len(_lfs_pointer(self.sha256, self.size))}
        return entry


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    root: Path
    files: dict[str, HubFile]
    sha: str
    private: bool = False

    @property
    def directories(self) -> list[str]:
        dirs = {str(Path(p).parent) for p in self.files}
        out: set[str] = set()
        for d in dirs:
            parts = Path(d).parts
            for i in range(1, len(parts) + 1):
                out.add("/".join(parts[:i]))
        out.discard(".")
        return sorted(out)


def scan_repo(repo_id: str, root: Path, *, private: bool = False) -> HubRepo:
    """Describe the files under ``root`` as the Hub would (hidden files and folders skipped)."""
    files: dict[str, HubFile] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        data = path.read_bytes()
        lfs = rel.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_BYTES
        if lfs:
            sha = hashlib.sha256(data).hexdigest()
            files[rel] = HubFile(rel, len(data), git_blob_id(_lfs_pointer(sha, len(data))), sha)
        else:
            files[rel] = HubFile(rel, len(data), git_blob_id(data), None)
    listing = "\n".join(f"{f.path} {f.blob_id}" for f in files.values()).encode()
    return HubRepo(repo_id=repo_id, root=root, files=files, sha=hashlib.sha1(listing).hexdigest(), private=private)


@dataclass(frozen=True)
class HubRequest:
    method: str
    path: str
    range: str | None
    authorized: bool


@dataclass
class _Faults:
    rate_bps: float | None = None
    corrupt: dict[tuple[str, str], int] = field(default_factory=dict)
    cut: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)


def _error(status: int, code: str, message: str, sha: str | None = None) -> Response:
    headers = {"X-Error-Code": code, "X-Error-Message": message}
    if sha is not None:
        headers["X-Repo-Commit"] = sha
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class LocalHub:
    """Serve ``root``'s repositories on a free loopback port (``with LocalHub(root) as hub:``)."""

    def __init__(self, root: Path, *, token: str | None = None, private: Iterable[str] = (),
                 host: str = "127.0.0.1") -> None:
        self.root = root
        self.token = token
        self.private = set(private)
        self.host = host
        self.requests: list[HubRequest] = []
        self.faults = _Faults()
        self._lock = threading.Lock()
        self.repos: dict[str, HubRepo] = {}
        self.rescan()
        self._server: ThreadedServer | None = None
        self.port = 0

    # --- control -----------------------------------------------------------------------

    def rescan(self) -> None:
        """Re-read the repositories (after a test changed a file on purpose)."""
        repos: dict[str, HubRepo] = {}
        for org in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for repo in sorted(p for p in org.iterdir() if p.is_dir() and not p.name.startswith(".")):
                repo_id = f"{org.name}/{repo.name}"
                repos[repo_id] = scan_repo(repo_id, repo, private=repo_id in self.private)
        with self._lock:
            self.repos = repos

    @property
    def endpoint(self) -> str:
        assert self.port, "the hub is not started"
        return f"http://{self.host}:{self.port}"

    def set_rate(self, bytes_per_s: float | None) -> None:
        self.faults.rate_bps = bytes_per_s

    def corrupt(self, repo_id: str, path: str, times: int = 1) -> None:
        """Flip one byte of ``path`` in the next ``times`` bodies served."""
        with self._lock:
            self.faults.corrupt[(repo_id, path)] = times

    def cut(self, repo_id: str, path: str, after_bytes: int, times: int = 1) -> None:
        """Drop the connection after ``after_bytes`` of the next ``times`` bodies of ``path``."""
        with self._lock:
            self.faults.cut[(repo_id, path)] = (after_bytes, times)

    def downloads(self, repo_id: str | None = None) -> list[HubRequest]:
        """The GET requests for file bodies (optionally of one repository)."""
        prefix = f"/{repo_id}/resolve/" if repo_id else None
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path
                    and (prefix is None or r.path.startswith(prefix))]

    def start(self) -> LocalHub:
        self._server = ThreadedServer(self._app(), self.host).start()
        self.port = self._server.port
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._server = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- HTTP ----------------------------------------------------------------------------

    def _record(self, request: Request, authorized: bool) -> None:
        with self._lock:
            self.requests.append(HubRequest(request.method, request.url.path, request.headers.get("range"), authorized))

    def _repo(self, request: Request) -> tuple[HubRepo | None, Response | None]:
        repo_id = f"{request.path_params['org']}/{request.path_params['name']}"
        auth = request.headers.get("authorization", "")
        authorized = self.token is not None and auth == f"Bearer {self.token}"
        self._record(request, authorized)
        with self._lock:
            repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            # Like the Hub: a missing repo and one you may not see look the same.
            return None, _error(401, "RepoNotFound", "Repository not found")
        return repo, None

    def _revision(self, repo: HubRepo, rev: str) -> Response | None:
        if rev in ("main", repo.sha):
            return None
        return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def _info(self, repo: HubRepo, blobs: bool) -> dict[str, Any]:
        siblings = []
        for f in repo.files.values():
            s: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                s.update(size=f.size, blobId=f.blob_id)
                if f.sha256 is not None:
                    s["lfs"] = f.tree_entry()["lfs"] | {"sha256": f.sha256}
            siblings.append(s)
        config: dict[str, Any] = {}
        if "config.json" in repo.files:
            raw = json.loads((repo.root / "config.json").read_text())
            config = {k: raw[k] for k in ("architectures", "model_type") if k in raw}
        org = repo.repo_id.split("/")[0]
        return {
            "_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": org, "sha": repo.sha,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "library_name": "mlx", "tags": ["mlx", "safetensors"], "pipeline_tag": "text-generation",
            "lastModified": _CREATED, "createdAt": _CREATED, "config": config, "siblings": siblings,
            "usedStorage": sum(f.size for f in repo.files.values()),
        }

    async def _model_info(self, request: Request) -> Response:
        repo, err = self._repo(request)
        if err is not None:
            return err
        assert repo is not None
        rev = request.path_params.get("rev", "main")
        if (bad := self._revision(repo, rev)) is not None:
            return bad
        blobs = request.query_params.get("blobs", "").lower() in ("1", "true")
        return JSONResponse(self._info(repo, blobs))

    async def _tree(self, request: Request) -> Response:
        repo, err = self._repo(request)
        if err is not None:
            return err
        assert repo is not None
        if (bad := self._revision(repo, request.path_params["rev"])) is not None:
            return bad
        base = request.path_params.get("path", "").strip("/")
        recursive = request.query_params.get("recursive", "").lower() in ("1", "true")
        prefix = base + "/" if base else ""
        if base and base not in repo.directories:
            return _error(404, "EntryNotFound", f"{base} does not exist on main", repo.sha)
        out: list[dict[str, Any]] = []
        for d in repo.directories:
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix):]):
                out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
        for f in repo.files.values():
            if f.path.startswith(prefix) and (recursive or "/" not in f.path[len(prefix):]):
                out.append(f.tree_entry())
        out.sort(key=lambda e: e["path"])
        return JSONResponse(out)

    async def _paths_info(self, request: Request) -> Response:
        repo, err = self._repo(request)
        if err is not None:
            return err
        assert repo is not None
        if (bad := self._revision(repo, request.path_params["rev"])) is not None:
            return bad
        # ``data={"paths": [...]}`` arrives form-encoded (no multipart parser needed).
        form = urllib.parse.parse_qs((await request.body()).decode())
        wanted = form.get("paths", [])
        out: list[dict[str, Any]] = []
        for p in wanted:
            if p in repo.files:
                out.append(repo.files[p].tree_entry())
            elif p in repo.directories:
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
        return JSONResponse(out)

    async def _resolve(self, request: Request) -> Response:
        repo, err = self._repo(request)
        if err is not None:
            return err
        assert repo is not None
        if (bad := self._revision(repo, request.path_params["rev"])) is not None:
            return bad
        path = request.path_params["path"]
        f = repo.files.get(path)
        if f is None:
            return _error(404, "EntryNotFound", f"{path} does not exist on main", repo.sha)
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if f.sha256 is not None:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        start, end = 0, f.size - 1
        status = 200
        rng = request.headers.get("range")
        if rng is not None and f.size > 0:
            spec = rng.strip().removeprefix("bytes=")
            first, _, last = spec.partition("-")
            try:
                start = int(first) if first else max(0, f.size - int(last))
                end = int(last) if first and last else f.size - 1
            except ValueError:
                return _error(400, "BadRange", f"bad Range {rng!r}")
            if start >= f.size or start > end:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{f.size}"})
            end = min(end, f.size - 1)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        headers["Content-Length"] = str(end - start + 1)
        if request.method == "HEAD":
            return Response(b"", status_code=status, headers=headers)
        key = (repo.repo_id, path)
        with self._lock:
            corrupt = self.faults.corrupt.get(key, 0) > 0
            if corrupt:
                self.faults.corrupt[key] -= 1
            cut_after: int | None = None
            if key in self.faults.cut:
                after, times = self.faults.cut[key]
                if times > 0:
                    cut_after = after
                    self.faults.cut[key] = (after, times - 1)
        return StreamingResponse(self._body(repo.root / path, start, end, corrupt, cut_after),
                                 status_code=status, headers=headers)

    async def _body(self, path: Path, start: int, end: int, corrupt: bool,
                    cut_after: int | None) -> AsyncIterator[bytes]:
        sent = 0
        remaining = end - start + 1
        flip_at = start + remaining // 2 if corrupt else -1
        with open(path, "rb") as fh:
            fh.seek(start)
            pos = start
            while remaining > 0:
                chunk = fh.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                if pos <= flip_at < pos + len(chunk):
                    i = flip_at - pos
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
                if cut_after is not None and sent + len(chunk) > cut_after:
                    yield chunk[: max(0, cut_after - sent)]
                    raise ConnectionAbortedError("local hub: connection cut on purpose")
                yield chunk
                sent += len(chunk)
                pos += len(chunk)
                remaining -= len(chunk)
                rate = self.faults.rate_bps
                if rate:
                    await asyncio.sleep(len(chunk) / rate)

    def _app(self) -> Starlette:
        repo = "/{org}/{name}"
        return Starlette(routes=[
            Route("/api/models" + repo, self._model_info, methods=["GET"]),
            Route("/api/models" + repo + "/revision/{rev}", self._model_info, methods=["GET"]),
            Route("/api/models" + repo + "/tree/{rev}", self._tree, methods=["GET"]),
            Route("/api/models" + repo + "/tree/{rev}/{path:path}", self._tree, methods=["GET"]),
            Route("/api/models" + repo + "/paths-info/{rev}", self._paths_info, methods=["POST"]),
            Route(repo + "/resolve/{rev}/{path:path}", self._resolve, methods=["GET", "HEAD"]),
        ])


# --- repositories ----------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    tensors = {name: raw[base + h["data_offsets"][0] : base + h["data_offsets"][1]] for name, h in header.items()}
    return {"__metadata__": meta, **header}, tensors


def _write_safetensors(path: Path, header_in: dict[str, Any], tensors: dict[str, bytes], names: list[str]) -> None:
    header: dict[str, Any] = {"__metadata__": header_in["__metadata__"]}
    offset = 0
    for name in names:
        h = header_in[name]
        header[name] = {"data_offsets": [offset, offset + len(tensors[name])], "dtype": h["dtype"], "shape": h["shape"]}
        offset += len(tensors[name])
    raw = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            f.write(tensors[name])


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None


def shard_repo(src: Path, dest: Path, n_files: int) -> Path:
    """Copy mlx-lm model ``src`` to ``dest`` with its weights split by layer into ``n_files`` files.

    File k holds a contiguous run of layers; the first also holds the embedding,
    the last the final norm and the output head, as a real multi-file
    checkpoint does. ``model.safetensors.index.json`` maps every tensor to its file.
    """
    assert not dest.exists(), dest
    header, tensors = _read_safetensors(src / "model.safetensors")
    n_layers = 1 + max(layer for name in tensors if (layer := _layer_of(name)) is not None)
    assert 1 <= n_files <= n_layers, (n_files, n_layers)
    dest.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and p.name not in ("model.safetensors", "model.safetensors.index.json"):
            shutil.copy2(p, dest / p.name)
    bounds = [round(i * n_layers / n_files) for i in range(n_files + 1)]

    def file_of(name: str) -> int:
        layer = _layer_of(name)
        if layer is None:
            return 0 if "embed_tokens" in name else n_files - 1
        return next(k for k in range(n_files) if bounds[k] <= layer < bounds[k + 1])

    names = sorted(tensors)
    weight_map: dict[str, str] = {}
    for k in range(n_files):
        fname = f"model-{k + 1:05d}-of-{n_files:05d}.safetensors"
        mine = [n for n in names if file_of(n) == k]
        _write_safetensors(dest / fname, header, tensors, mine)
        weight_map.update({n: fname for n in mine})
    total = sum(len(b) for b in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dest


def build_hub(root: Path, models_dir: Path, *, sharded: int = 3, small: bool = True) -> Path:
    """A hub directory with the default model and the generated test models.

    ``skulk/tiny-qwen2`` (one 4.6 MB weight file), ``skulk/tiny-qwen2-sharded``
    (the same weights in ``sharded`` files, split by layer) and, with
    ``small``, ``skulk/small-qwen2-10m`` (one 42 MB weight file: bigger than
    ``huggingface_hub``'s 10 MiB write chunk, so an interrupted transfer
    leaves bytes to resume from). Returns ``root``.
    """
    from skulk.engine.models import CARD_FILENAME, DEFAULT_MODEL_ID, SMALL_MODEL_ID, ensure_model

    # A hub repository has no Skulk card: a node derives one from config.json.
    no_card = shutil.ignore_patterns(CARD_FILENAME)
    for model_id in (DEFAULT_MODEL_ID, SMALL_MODEL_ID) if small else (DEFAULT_MODEL_ID,):
        if not (root / model_id).exists():
            shutil.copytree(ensure_model(model_id, root=models_dir), root / model_id, ignore=no_card)
    split = root / (DEFAULT_MODEL_ID + "-sharded")
    if not split.exists():
        shard_repo(root / DEFAULT_MODEL_ID, split, sharded)
    return root
