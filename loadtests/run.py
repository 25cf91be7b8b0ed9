"""Running Locust headless against real nodes, as a subprocess, and reading back what it wrote.

Locust monkey-patches the standard library with gevent when imported, so it
never runs inside a test process or the report command: ``LocustRun`` starts
``python -m locust -f loadtests/locustfile.py --headless`` with the users,
run time and request budget asked for, writing under ``out_dir``:

- ``<name>_stats.csv``, ``<name>_stats_history.csv``, ``<name>_failures.csv``,
  ``<name>_exceptions.csv`` (Locust's CSV);
- ``<name>.html`` (Locust's HTML report);
- ``<name>.jsonl`` (one record per request, ``loadtests.records``);
- ``<name>.log`` (Locust's own output).

A run is bounded twice: by ``run_time_s`` (Locust's ``-t``) and by
``max_requests`` (the locustfile stops the run when spent); ``wait`` adds a
hard wall-clock bound on the process itself and kills it past that.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests.records import read_records

__all__ = ["LOCUSTFILE", "LocustRun", "USER_CLASSES", "read_stats"]

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
USER_CLASSES = ("StreamingChatUser", "ChatUser", "StatePollingUser", "AbandoningUser")


def read_stats(csv_path: Path) -> dict[str, dict[str, Any]]:
    """Locust's ``_stats.csv`` as ``{"<type> <name>": {column: value}}`` (numbers parsed)."""
    out: dict[str, dict[str, Any]] = {}
    if not csv_path.is_file():
        return out
    with csv_path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value)
                except (TypeError, ValueError):
                    parsed[key] = value
            out[f"{row['Type']} {row['Name']}".strip()] = parsed
    return out


@dataclass
class LocustRun:
    """One headless Locust process against ``hosts``."""

    name: str
    out_dir: Path
    hosts: Sequence[str]
    users: int
    spawn_rate: float
    run_time_s: float
    classes: Sequence[str] = USER_CLASSES
    max_requests: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    argv_prefix: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ended_at: float = 0.0

    def __post_init__(self) -> None:
        assert self.users >= 1 and self.spawn_rate > 0 and self.run_time_s >= 1 and self.hosts
        unknown = set(self.classes) - set(USER_CLASSES)
        assert not unknown, f"unknown user classes {sorted(unknown)}"

    @property
    def prefix(self) -> Path:
        return self.out_dir / self.name

    @property
    def record_path(self) -> Path:
        return self.out_dir / f"{self.name}.jsonl"

    @property
    def html_path(self) -> Path:
        return self.out_dir / f"{self.name}.html"

    @property
    def stats_path(self) -> Path:
        return self.out_dir / f"{self.name}_stats.csv"

    def argv(self) -> list[str]:
        return [
            *self.argv_prefix, sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-H", self.hosts[0], "-u", str(self.users), "-r", f"{self.spawn_rate:g}", "-t", f"{int(self.run_time_s)}s",
            "--stop-timeout", "5", "--only-summary", "--exit-code-on-error", "0",
            "--csv", str(self.prefix), "--html", str(self.html_path), *self.classes,
        ]

    def start(self) -> LocustRun:
        assert self.proc is None, "already started"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.record_path.unlink(missing_ok=True)
        env = dict(os.environ)
        env.update({
            "SKULK_LOAD_HOSTS": ",".join(self.hosts),
            "SKULK_LOAD_RECORD": str(self.record_path),
            "SKULK_LOAD_MAX_REQUESTS": str(self.max_requests),
        })
        env.update(self.env)
        log = (self.out_dir / f"{self.name}.log").open("wb")
        self.started_at = time.time()
        self.proc = subprocess.Popen(self.argv(), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        return self

    def wait(self, slack_s: float = 30.0) -> int:
        """Wait for Locust to finish (killing it ``slack_s`` past its run time); its exit code."""
        assert self.proc is not None, "not started"
        bound = max(1.0, self.started_at + self.run_time_s + slack_s - time.time())
        try:
            code = self.proc.wait(bound)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(10)
            raise RuntimeError(f"locust run {self.name} did not end within {self.run_time_s + slack_s:g} s; killed") from None
        self.ended_at = time.time()
        if code != 0:
            tail = (self.out_dir / f"{self.name}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"locust run {self.name} exited with {code}:\n{tail}")
        return code

    def stop(self) -> None:
        """Ask Locust to stop early (SIGTERM: it still writes its reports)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.record_path)

    def stats(self) -> dict[str, dict[str, Any]]:
        return read_stats(self.stats_path)

    def __enter__(self) -> LocustRun:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
