"""``python -m skulk.bench transfer``: node-to-node model copies over loopback, against local baselines.

Serves a real model's verified files with the node's ``TransferServer``
(Starlette under uvicorn, as on a node's API port) and copies them with
``PeerFetcher`` (HTTP, partial file, SHA-256 check, rename into place), several
times, and prints in the same run the two local ceilings a copy cannot beat:
a plain file copy (``shutil.copyfile``) and hashing alone (``sha256``). The
ratios are what to read; absolute figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

__all__ = ["main"]


def _serve(app: object) -> tuple[uvicorn.Server, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    from starlette.applications import Starlette

    from skulk.engine.models import PRESETS, SMALL_MODEL_ID, ensure_model
    from skulk.runtime.modelfiles import adopt_local
    from skulk.runtime.transfer import PeerFetcher, TransferAuth, TransferServer

    parser = argparse.ArgumentParser(prog="python -m skulk.bench transfer", description=__doc__)
    parser.add_argument("--model", default=SMALL_MODEL_ID, choices=sorted(PRESETS))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="skulk-bench-transfer-") as tmp:
        root = Path(tmp)
        src = ensure_model(args.model, root=root / "src")
        manifest = adopt_local(src, args.model)
        total = manifest.total_bytes
        weights = src / "model.safetensors"
        auth = TransferAuth(b"bench-secret", "bench")
        server, port = _serve(Starlette(routes=TransferServer(root / "src", auth).routes()))
        url = f"http://127.0.0.1:{port}"
        print(f"model {args.model}: {len(manifest.files)} files, {total / 1e6:.1f} MB; {args.rounds} rounds")
        copy_s, hash_s, peer_s = [], [], []
        for i in range(args.rounds):
            t0 = time.perf_counter()
            shutil.copyfile(weights, root / f"plain-{i}")
            copy_s.append(time.perf_counter() - t0)
            (root / f"plain-{i}").unlink()
            t0 = time.perf_counter()
            hashlib.sha256(weights.read_bytes()).hexdigest()
            hash_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            result = PeerFetcher(auth, "bench-b").fetch(args.model, root / f"dst-{i}" / args.model, url,
                                                        source_node="bench-a")
            peer_s.append(time.perf_counter() - t0)
            assert result.fetched_bytes == total, (result.fetched_bytes, total)
            shutil.rmtree(root / f"dst-{i}")
        server.should_exit = True
        size = weights.stat().st_size
        best_copy, best_hash, best_peer = min(copy_s), min(hash_s), min(peer_s)
        print(f"plain file copy (weights only):   {size / best_copy / 1e6:8.1f} MB/s")
        print(f"sha256 alone (weights only):      {size / best_hash / 1e6:8.1f} MB/s")
        print(f"peer copy over loopback (all):    {total / best_peer / 1e6:8.1f} MB/s "
              f"(best of {args.rounds}; median {total / sorted(peer_s)[len(peer_s) // 2] / 1e6:.1f} MB/s)")
        print(f"peer copy / plain copy:           {best_copy / best_peer * total / size:8.2f}")
        print(f"peer copy / sha256 alone:         {best_hash / best_peer * total / size:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
