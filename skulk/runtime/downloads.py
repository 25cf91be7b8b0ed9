"""Downloading model files from a Hugging Face-compatible hub, with ``huggingface_hub``.

Theory of operation
-------------------
``HubDownloader.download(model_id, model_dir, layers=...)`` makes
``model_dir`` hold, verified, every file the shard ``layers`` needs:

1. *List* the repository at a revision with ``HfApi.repo_info`` (the commit)
   and ``HfApi.list_repo_tree`` (every file's size, git blob id and, for LFS
   files, SHA-256): the hub's own hashes, which the download is checked against.
2. Fetch the small files first (config, tokenizer, the safetensors index),
   then choose the weight files the layers need from the index
   (``modelfiles.files_for_shard``), so a rank holding layers 0-15 never
   fetches the file with layers 16-31.
3. For each file not already verified in the manifest: resolve it with
   ``get_hf_file_metadata`` (ETag, size, download location) and stream it
   with ``huggingface_hub.file_download.http_get`` into
   ``.skulk/partial/<file>.<etag>.part``, *resuming* from the bytes already
   there (a ``Range`` request). ``http_get`` itself retries a dropped
   connection from where it stopped.
4. Verify: SHA-256 for LFS files, the git blob id otherwise. A mismatch
   deletes the partial file and fetches again (``max_refetch`` times), then
   fails with ``integrity``. Only a verified file is renamed into the model
   directory and recorded in the manifest (``modelfiles``).

No hub protocol is written by hand: listing, resolving, headers (``HF_TOKEN``)
and the byte stream are ``huggingface_hub``'s. Settings come from the node's
configuration (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``); offline, the
downloader never touches the network and succeeds only if every needed file is
already verified on disk.

Progress (bytes done and total, rate, ETA) goes to ``on_progress`` at most
every ``progress_interval_s`` and once at the end; the node turns it into local
events. Failures raise ``DownloadFailed`` with a code (``not_found``,
``unauthorized``, ``offline``, ``integrity``, ``disk_full``, ``network``,
``cancelled``) and a message a user can act on. Blocking: run it in a thread.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import urlparse

from skulk.core.files import Need
from skulk.runtime.modelfiles import (
    FileRecord,
    adopt_local,
    file_lock,
    locked,
    disk_free_bytes,
    files_for_shard,
    format_bytes,
    git_blob_id_file,
    is_weight_file,
    load_manifest,
    partial_path,
    read_index,
    record_file,
    sha256_file,
)

__all__ = [
    "HubSettings",
    "RemoteFile",
    "RepoListing",
    "Progress",
    "ProgressMeter",
    "DownloadFailed",
    "DownloadResult",
    "HubDownloader",
    "DISK_MARGIN_BYTES",
]

log = logging.getLogger("skulk.downloads")

# Free space kept beyond what a file needs, so a download never fills a disk to the last byte.
DISK_MARGIN_BYTES = 64 << 20


@dataclass(frozen=True)
class HubSettings:
    """Where files come from. ``endpoint`` None means huggingface_hub's default (huggingface.co)."""

    endpoint: str | None = None
    token: str | None = None
    offline: bool = False


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    blob_id: str
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str:
        """What the hub's ETag for this file is: the LFS SHA-256, or the git blob id."""
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class RepoListing:
    model_id: str
    commit: str
    files: dict[str, RemoteFile]


@dataclass(frozen=True)
class Progress:
    """One progress report of a transfer (hub download or peer copy)."""

    model_id: str
    done_bytes: int
    total_bytes: int
    rate_bps: float
    eta_s: float | None
    file: str
    final: bool = False


class DownloadFailed(Exception):
    """A transfer that cannot complete; ``code`` says why, the message what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DownloadResult:
    model_id: str
    commit: str | None
    files: tuple[str, ...]  # every file the shard needs, now verified on disk
    fetched_bytes: int  # bytes that crossed the network in this call
    seconds: float


class ProgressMeter:
    """Bytes done against a total, a rate over a sliding window, reports at most every ``interval_s``."""

    def __init__(self, model_id: str, total_bytes: int, on_progress: Callable[[Progress], None] | None,
                 *, interval_s: float = 0.5, window_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 cancel: threading.Event | None = None) -> None:
        self.model_id = model_id
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self.fetched_bytes = 0
        self.file = ""
        self._on_progress = on_progress
        self._interval_s = interval_s
        self._window_s = window_s
        self._clock = clock
        self._cancel = cancel
        self._samples: deque[tuple[float, int]] = deque()
        self._last_report = float("-inf")

    def add_done(self, n: int) -> None:
        """Bytes already on disk (verified or resumed): counted as done, not in the rate."""
        self.done_bytes += n

    def advance(self, n: int) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise DownloadFailed("cancelled", f"transfer of {self.model_id} cancelled")
        self.done_bytes += n
        self.fetched_bytes += n
        now = self._clock()
        self._samples.append((now, self.fetched_bytes))
        while self._samples and now - self._samples[0][0] > self._window_s:
            self._samples.popleft()
        if now - self._last_report >= self._interval_s:
            self.report()

    def rewind(self, n: int) -> None:
        """A resumed file was restarted from zero by the server: its bytes are not done after all."""
        self.done_bytes = max(0, self.done_bytes - n)

    @property
    def rate_bps(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def report(self, final: bool = False) -> None:
        self._last_report = self._clock()
        if self._on_progress is None:
            return
        rate = self.rate_bps
        left = max(0, self.total_bytes - self.done_bytes)
        eta = 0.0 if left == 0 else (left / rate if rate > 0 else None)
        self._on_progress(Progress(self.model_id, min(self.done_bytes, self.total_bytes), self.total_bytes,
                                   rate, eta, self.file, final))


class _CountingWriter:
    """The partial file, counting bytes as ``http_get`` writes them."""

    def __init__(self, f: BinaryIO, meter: ProgressMeter) -> None:
        self._f = f
        self._meter = meter

    def write(self, data: bytes) -> int:
        n = self._f.write(data)
        self._meter.advance(len(data))
        return n

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        # The server ignored our Range and restarts from 0: the resumed bytes were not done.
        before = os.fstat(self._f.fileno()).st_size
        out = self._f.truncate(size)
        self._meter.rewind(max(0, before - out))
        return out

    def flush(self) -> None:
        self._f.flush()


def _classify(exc: BaseException, model_id: str, what: str) -> DownloadFailed:
    """A huggingface_hub or OS error as a ``DownloadFailed`` a user can act on."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, DownloadFailed):
        return exc
    if isinstance(exc, (RepositoryNotFoundError, GatedRepoError)):
        return DownloadFailed("unauthorized" if isinstance(exc, GatedRepoError) else "not_found",
                              f"{model_id}: repository not found on the hub, or not visible without a token "
                              f"(set HF_TOKEN for private or gated models)")
    if isinstance(exc, RevisionNotFoundError):
        return DownloadFailed("not_found", f"{model_id}: revision not found on the hub")
    if isinstance(exc, RemoteEntryNotFoundError):
        return DownloadFailed("not_found", f"{model_id}: {what} is not in the repository")
    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return DownloadFailed("offline", f"{model_id}: the hub cannot be reached ({exc})")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            return DownloadFailed("unauthorized", f"{model_id}: the hub refused {what} (HTTP {status}); check HF_TOKEN")
        return DownloadFailed("network", f"{model_id}: the hub answered HTTP {status} for {what}")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DownloadFailed("disk_full", f"{model_id}: the disk filled up while writing {what}: {exc}")
    return DownloadFailed("network", f"{model_id}: {what} failed: {type(exc).__name__}: {exc}")


class HubDownloader:
    """Fetch a model's files (or one shard's) from a hub into a model directory. One call at a time."""

    def __init__(self, settings: HubSettings, *, on_progress: Callable[[Progress], None] | None = None,
                 progress_interval_s: float = 0.5, max_refetch: int = 2, cancel: threading.Event | None = None,
                 disk_margin_bytes: int = DISK_MARGIN_BYTES) -> None:
        assert max_refetch >= 0 and progress_interval_s >= 0
        self.settings = settings
        self.on_progress = on_progress
        self.progress_interval_s = progress_interval_s
        self.max_refetch = max_refetch
        self.cancel = cancel or threading.Event()
        self.disk_margin_bytes = disk_margin_bytes

    # --- listing -------------------------------------------------------------------------

    def listing(self, model_id: str, revision: str = "main") -> RepoListing:
        """The repository's commit and files, with the hub's sizes and hashes."""
        if self.settings.offline:
            raise DownloadFailed("offline", f"{model_id}: offline (HF_HUB_OFFLINE=1)")
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=self.settings.endpoint, token=self.settings.token)
        try:
            info = api.repo_info(model_id, revision=revision)
            assert info.sha is not None, "the hub returned no commit"
            files: dict[str, RemoteFile] = {}
            for entry in api.list_repo_tree(model_id, recursive=True, revision=info.sha):
                if isinstance(entry, RepoFile):
                    sha = entry.lfs.sha256 if entry.lfs is not None else None
                    files[entry.path] = RemoteFile(entry.path, int(entry.size), entry.blob_id, sha)
        except Exception as exc:
            raise _classify(exc, model_id, "the file list") from exc
        return RepoListing(model_id=model_id, commit=info.sha, files=dict(sorted(files.items())))

    def describe(self, model_id: str, revision: str = "main") -> tuple[Any, RepoListing]:
        """A model card for a hub repository (from its ``config.json`` and weight sizes), and its listing.

        Fetches only ``config.json`` (into a temporary directory); the weight
        bytes are the sum of the repository's ``*.safetensors`` sizes. Raises
        ``DownloadFailed``; ``invalid_model`` when the repository is not an
        mlx-lm model Skulk can place (no config, no safetensors weights).
        """
        import json
        import tempfile

        from huggingface_hub import hf_hub_download

        from skulk.core.cards import CardError, card_from_mlx_config

        listing = self.listing(model_id, revision)
        weights = [f for f in listing.files.values() if is_weight_file(f.path)]
        if "config.json" not in listing.files or not weights:
            raise DownloadFailed("invalid_model", f"{model_id}: not an mlx-lm model (it needs config.json and "
                                                  f"*.safetensors weights at the top of the repository)")
        with tempfile.TemporaryDirectory(prefix="skulk-card-") as tmp:
            try:
                path = hf_hub_download(model_id, "config.json", revision=listing.commit, local_dir=tmp,
                                       endpoint=self.settings.endpoint, token=self.settings.token)
                config = json.loads(Path(path).read_text(encoding="utf-8"))
            except ValueError as exc:
                raise DownloadFailed("invalid_model", f"{model_id}: config.json is not valid JSON: {exc}") from exc
            except Exception as exc:
                raise _classify(exc, model_id, "config.json") from exc
        try:
            card = card_from_mlx_config(model_id, config, sum(f.size for f in weights))
        except CardError as exc:
            raise DownloadFailed("invalid_model", str(exc)) from exc
        return card, listing

    # --- download ------------------------------------------------------------------------

    def download(self, model_id: str, model_dir: Path, *, layers: Need | None = None,
                 revision: str = "main") -> DownloadResult:
        """Make ``model_dir`` hold every file ``layers`` needs (None: all), verified.

        Raises ``DownloadFailed``. Files already verified (manifest) are not fetched again.
        """
        started = time.monotonic()
        if self.settings.offline:
            return self._offline(model_id, model_dir, layers, started)
        listing = self.listing(model_id, revision)
        manifest = load_manifest(model_dir)
        small = [f for f in listing.files.values() if not is_weight_file(f.path)]
        meter = ProgressMeter(model_id, sum(f.size for f in small), self.on_progress,
                              interval_s=self.progress_interval_s, cancel=self.cancel)
        for f in small:
            self._ensure(model_id, model_dir, listing, f, meter, manifest)
        needed = files_for_shard(listing.files, read_index(model_dir), layers)
        weights = [listing.files[p] for p in needed if is_weight_file(p)]
        meter.total_bytes += sum(f.size for f in weights)
        self._check_space(model_id, model_dir, weights, manifest)
        for f in weights:
            self._ensure(model_id, model_dir, listing, f, meter, load_manifest(model_dir))
        meter.file = ""
        meter.report(final=True)
        return DownloadResult(model_id, listing.commit, tuple(needed), meter.fetched_bytes,
                              time.monotonic() - started)

    def _offline(self, model_id: str, model_dir: Path, layers: Need | None, started: float) -> DownloadResult:
        """Use what is present: every needed file must already be on disk (verified, or adopted as local)."""
        manifest = load_manifest(model_dir)
        if manifest is None and (model_dir / "config.json").is_file():
            manifest = adopt_local(model_dir, model_id)
        if manifest is None:
            raise DownloadFailed("offline", f"{model_id}: offline (HF_HUB_OFFLINE=1) and none of its files are "
                                            f"under {model_dir}")
        index = read_index(model_dir)
        known = set(manifest.files) | set((index or {}).values())
        needed = files_for_shard(known, index, layers)
        missing = [p for p in needed if p not in manifest.files or not (model_dir / p).is_file()]
        if missing:
            names = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise DownloadFailed("offline", f"{model_id}: offline (HF_HUB_OFFLINE=1) and {len(missing)} needed "
                                            f"file(s) are not on disk ({names})")
        return DownloadResult(model_id, manifest.commit, tuple(needed), 0, time.monotonic() - started)

    def _check_space(self, model_id: str, model_dir: Path, files: list[RemoteFile], manifest: Any) -> None:
        have = manifest.files if manifest is not None else {}
        need = 0
        for f in files:
            if f.path in have and have[f.path].etag == f.etag:
                continue
            part = partial_path(model_dir, f.path, f.etag)
            need += f.size - (part.stat().st_size if part.exists() else 0)
        free = disk_free_bytes(model_dir)
        if need + self.disk_margin_bytes > free:
            raise DownloadFailed(
                "disk_full",
                f"{model_id}: needs {format_bytes(need + self.disk_margin_bytes)} of disk, has {format_bytes(free)} "
                f"free under {model_dir}",
            )

    @staticmethod
    def _held(model_dir: Path, f: RemoteFile) -> bool:
        manifest = load_manifest(model_dir)
        known = manifest.files.get(f.path) if manifest is not None else None
        return known is not None and known.etag == f.etag and known.size == f.size and (model_dir / f.path).is_file()

    def _ensure(self, model_id: str, model_dir: Path, listing: RepoListing, f: RemoteFile,
                meter: ProgressMeter, manifest: Any = None) -> None:
        """Make ``model_dir/f.path`` the verified file the hub lists (under the file's lock)."""
        if self._held(model_dir, f):
            meter.add_done(f.size)
            return
        try:
            with locked(file_lock(model_dir, f.path), cancel=self.cancel):
                if self._held(model_dir, f):  # another process sharing the directory fetched it meanwhile
                    meter.add_done(f.size)
                    return
                self._fetch_verified(model_id, model_dir, listing, f, meter)
        except InterruptedError as exc:
            raise DownloadFailed("cancelled", f"transfer of {model_id} cancelled") from exc

    def _fetch_verified(self, model_id: str, model_dir: Path, listing: RepoListing, f: RemoteFile,
                        meter: ProgressMeter) -> None:
        final = model_dir / f.path
        meter.file = f.path
        part = partial_path(model_dir, f.path, f.etag)
        for attempt in range(self.max_refetch + 1):
            self._fetch(model_id, listing, f, part, meter)
            sha = sha256_file(part)
            ok = sha == f.sha256 if f.sha256 is not None else git_blob_id_file(part) == f.blob_id
            if ok:
                final.parent.mkdir(parents=True, exist_ok=True)
                part.replace(final)
                record_file(model_dir, model_id, "hub", f.path,
                            FileRecord(size=f.size, sha256=sha, etag=f.etag), commit=listing.commit)
                return
            log.warning("%s: %s failed verification (attempt %d of %d); fetching it again",
                        model_id, f.path, attempt + 1, self.max_refetch + 1)
            meter.rewind(f.size)
            part.unlink(missing_ok=True)
        raise DownloadFailed("integrity", f"{model_id}: {f.path} did not match the hub's hash after "
                                          f"{self.max_refetch + 1} attempts")

    def _fetch(self, model_id: str, listing: RepoListing, f: RemoteFile, part: Path, meter: ProgressMeter) -> None:
        """Bring ``part`` to ``f.size`` bytes, resuming from what is there."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        part.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > f.size:
            part.unlink()
            have = 0
        meter.add_done(have)
        if have == f.size:
            return
        try:
            url = hf_hub_url(model_id, f.path, revision=listing.commit, endpoint=self.settings.endpoint)
            meta = get_hf_file_metadata(url, token=self.settings.token, endpoint=self.settings.endpoint)
            if meta.etag is not None and meta.etag != f.etag:
                raise DownloadFailed("integrity", f"{model_id}: {f.path} changed on the hub while listing "
                                                  f"(ETag {meta.etag} vs {f.etag}); try again")
            headers = build_hf_headers(token=self.settings.token)
            location = meta.location or url
            if urlparse(location).netloc != urlparse(url).netloc:
                headers.pop("authorization", None)  # never send the token to a CDN
            with open(part, "ab") as fh:
                writer = cast(BinaryIO, _CountingWriter(fh, meter))  # duck-typed: write, tell, seek, truncate
                http_get(location, writer, resume_size=have, headers=headers, expected_size=f.size,
                         displayed_filename=f.path)
        except DownloadFailed:
            raise
        except Exception as exc:
            raise _classify(exc, model_id, f.path) from exc
