"""Model files on this node's disk: what is verified, what is partial, what a shard needs.

Theory of operation
-------------------
A model lives in ``<models_dir>/<org>/<name>/`` in mlx-lm's layout. Next to
its files, Skulk keeps ``.skulk/``:

- ``.skulk/files.json``, the *manifest*: every file Skulk has verified, with
  its size and SHA-256, where it came from (``hub``, a peer, or ``local`` for a
  directory that was already there) and the hub commit when known;
- ``.skulk/partial/``, bytes still arriving: a file is written there, checked
  against the hash its source published, and only then renamed into the model
  directory and added to the manifest.

So a file under the model directory proper is always whole and verified, and
nothing half-written is ever where a runner looks (runners read
``model*.safetensors`` at the top level only). A crash leaves at most a
partial file, which the next attempt resumes.

Several node processes may share one models directory (``skulk cluster up``
on one machine): the manifest is updated under a lock (``.skulk/files.lock``)
and each file is fetched under its own (``<partial>.lock``), so two
processes never write one partial file, and the second finds the file the
first verified.

Which files a shard needs: a pipeline rank holding layers ``[start, end)``
needs the weight files that hold those layers (from the safetensors index's
``weight_map``), the files holding the embedding, final norm and output head
when it is the rank that embeds and samples, and every file that is not
weights (config, tokenizer, index).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec

from skulk.core.files import Need

__all__ = [
    "META_DIR",
    "MANIFEST_NAME",
    "PARTIAL_DIR",
    "FileRecord",
    "Manifest",
    "load_manifest",
    "adopt_local",
    "save_manifest",
    "record_file",
    "sha256_file",
    "git_blob_id_file",
    "is_weight_file",
    "layer_of_tensor",
    "files_for_shard",
    "read_index",
    "Coverage",
    "coverage",
    "n_layers_of",
    "disk_free_bytes",
    "format_bytes",
    "dir_bytes",
    "partial_path",
    "locked",
    "file_lock",
]

META_DIR = ".skulk"
MANIFEST_NAME = "files.json"
PARTIAL_DIR = "partial"
_HASH_CHUNK = 1 << 20
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class FileRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One verified file of a model directory."""

    size: int
    sha256: str
    etag: str | None = None  # the hub's ETag (blob id or LFS SHA-256) when it came from a hub


class Manifest(msgspec.Struct, kw_only=True):
    """``.skulk/files.json``: the verified files of one model directory."""

    model_id: str
    source: str  # "hub", "peer:<node id>" or "local"
    commit: str | None = None
    files: dict[str, FileRecord] = msgspec.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def _meta(model_dir: Path) -> Path:
    return model_dir / META_DIR


def load_manifest(model_dir: Path) -> Manifest | None:
    """The manifest of ``model_dir``; None when absent or unreadable (then nothing is verified)."""
    path = _meta(model_dir) / MANIFEST_NAME
    try:
        return msgspec.json.decode(path.read_bytes(), type=Manifest)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def save_manifest(model_dir: Path, manifest: Manifest) -> None:
    """Atomically replace the manifest (temp file, fsync, rename)."""
    meta = _meta(model_dir)
    meta.mkdir(parents=True, exist_ok=True)
    data = msgspec.json.encode(manifest)
    fd, tmp = tempfile.mkstemp(prefix=".files-", dir=meta)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, meta / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(lock_path: Path, *, cancel: threading.Event | None = None, poll_s: float = 0.2) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created) across processes; poll so ``cancel`` is seen."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as f:
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if cancel is not None and cancel.is_set():
                    raise InterruptedError(f"gave up waiting for {lock_path}") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def file_lock(model_dir: Path, path: str) -> Path:
    """The lock a process holds while it fetches ``path`` of ``model_dir``."""
    return _meta(model_dir) / PARTIAL_DIR / f"{path}.lock"


def record_file(model_dir: Path, model_id: str, source: str, path: str, record: FileRecord,
                commit: str | None = None) -> Manifest:
    """Add one verified file to the manifest (creating it) and save; returns the new manifest."""
    with locked(_meta(model_dir) / "files.lock"):
        manifest = load_manifest(model_dir) or Manifest(model_id=model_id, source=source, commit=commit)
        manifest.files[path] = record
        if commit is not None:
            manifest.commit = commit
        save_manifest(model_dir, manifest)
    return manifest


def adopt_local(model_dir: Path, model_id: str) -> Manifest:
    """Hash a directory Skulk did not fetch (generated, or copied by hand) into a ``local`` manifest.

    Every regular file outside ``.skulk/`` is recorded with its size and SHA-256.
    """
    with locked(_meta(model_dir) / "files.lock"):
        existing = load_manifest(model_dir)
        if existing is not None:
            return existing  # another process sharing this directory got here first
        manifest = Manifest(model_id=model_id, source="local")
        for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(model_dir).as_posix()
            if rel.split("/")[0] == META_DIR:
                continue
            manifest.files[rel] = FileRecord(size=path.stat().st_size, sha256=sha256_file(path))
        save_manifest(model_dir, manifest)
    return manifest


def partial_path(model_dir: Path, path: str, tag: str) -> Path:
    """Where the bytes of ``path`` arrive before they are verified (``tag``: the expected hash)."""
    return _meta(model_dir) / PARTIAL_DIR / f"{path}.{tag[:16]}.part"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_id_file(path: Path) -> str:
    """The git blob id of a file (the Hub's ETag for a file not stored with LFS)."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_weight_file(path: str) -> bool:
    return path.endswith(".safetensors") and "/" not in path


def layer_of_tensor(name: str) -> int | None:
    """``model.layers.7.mlp.up_proj.weight`` -> 7; None for tensors outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def files_for_shard(files: Iterable[str], weight_map: Mapping[str, str] | None, layers: Need | None) -> list[str]:
    """The files of ``files`` a runner holding ``layers`` needs (None: the whole model).

    Without an index every weight file is needed. Returns paths in sorted order.
    """
    all_files = sorted(set(files))
    if layers is None or layers.is_whole or not weight_map:
        return all_files
    wanted_weights: set[str] = set()
    for tensor, file in weight_map.items():
        layer = layer_of_tensor(tensor)
        if layer is None:
            if layers.head:
                wanted_weights.add(file)
        elif layers.start <= layer < layers.end:
            wanted_weights.add(file)
    indexed = set(weight_map.values())
    return [f for f in all_files if not is_weight_file(f) or f in wanted_weights or f not in indexed]


@dataclass(frozen=True)
class Coverage:
    """Which parts of a model a set of verified files holds, in layers (what the core reasons about)."""

    n_layers: int
    layers: tuple[tuple[int, int], ...]  # merged [start, end) runs of layers whose weights are all here
    head: bool  # the tensors outside the layers (embedding, final norm, output head)
    complete: bool  # every weight file of the model is here


def coverage(model_dir: Path, verified: Iterable[str]) -> Coverage | None:
    """The coverage of ``verified`` files of ``model_dir``; None when the model's layout is unknown.

    Needs ``config.json`` (the layer count). With a safetensors index, a layer
    is covered when every file holding one of its tensors is verified; without
    one, any verified weight file holds everything.
    """
    n_layers = n_layers_of(model_dir)
    have = set(verified)
    if n_layers is None or "config.json" not in have:
        return None
    index = read_index(model_dir)
    if not index:
        whole = any(is_weight_file(p) for p in have)
        return Coverage(n_layers, ((0, n_layers),) if whole else (), whole, whole)
    layer_files: dict[int, set[str]] = {}
    head_files: set[str] = set()
    for tensor, file in index.items():
        layer = layer_of_tensor(tensor)
        if layer is None:
            head_files.add(file)
        elif layer < n_layers:
            layer_files.setdefault(layer, set()).add(file)
    covered = [layer for layer in range(n_layers) if layer in layer_files and layer_files[layer] <= have]
    runs: list[tuple[int, int]] = []
    for layer in covered:
        if runs and runs[-1][1] == layer:
            runs[-1] = (runs[-1][0], layer + 1)
        else:
            runs.append((layer, layer + 1))
    return Coverage(n_layers, tuple(runs), head_files <= have, set(index.values()) <= have)


def read_index(model_dir: Path) -> dict[str, str] | None:
    """The ``weight_map`` of ``model.safetensors.index.json`` (None when absent or unreadable)."""
    try:
        raw = json.loads((model_dir / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return None
    wm = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        return None
    return dict(wm)


def n_layers_of(model_dir: Path) -> int | None:
    """``num_hidden_layers`` of the model's ``config.json`` (or its ``text_config``)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for source in (cfg, cfg.get("text_config") or {}):
        n = source.get("num_hidden_layers") if isinstance(source, dict) else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def format_bytes(n_bytes: int) -> str:
    """Decimal units with one decimal, the unit chosen by size: '4.2 GB', '512.0 MB', '3.1 kB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n_bytes) >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def disk_free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (its nearest existing ancestor)."""
    import shutil

    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def dir_bytes(path: Path) -> int:
    """Bytes used by the files under ``path`` (0 when it does not exist)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
