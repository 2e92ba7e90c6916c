"""Logging set-up: text for people, JSON (one object per line) for collectors."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str | int] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str, worker: int | None = None) -> None:
    """Log to stderr; `worker` (with --workers) tags every line with its process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        tag = "" if worker is None else f" [worker {worker}]"
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s")
        )
    logging.basicConfig(level=level, handlers=[handler], force=True)
