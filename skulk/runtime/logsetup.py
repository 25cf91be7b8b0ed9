"""Process logging: human-readable lines, or JSON lines for log shippers.

With ``SKULK_LOGGING_EXTERNAL=1`` every record is one JSON object on stdout
(``ts``, ``level``, ``logger``, ``msg``, ``node_id`` and any ``extra`` fields),
which journald, Loki or Vector ingest without parsing. Otherwise lines are
``HH:MM:SS.mmm LEVEL logger: message`` on stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["setup_logging", "JsonFormatter"]

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields passed via ``extra`` are kept."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "node_id": self.node_id,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class _HumanFormatter(logging.Formatter):
    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        line = f"{stamp} {record.levelname:<8} [{self.node_id}] {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(*, node_id: str, external: bool, level: str = "INFO") -> None:
    """Configure the root logger once for this process (replaces earlier handlers)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout if external else sys.stderr)
    handler.setFormatter(JsonFormatter(node_id) if external else _HumanFormatter(node_id))
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root.setLevel(numeric)
    # zenoh and uvicorn are chatty at INFO; keep their warnings.
    for noisy in ("uvicorn.access", "zenoh"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
