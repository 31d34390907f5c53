"""JSON log records on stdout, one object per line: ts, level, event, fields.

Code logs with a stable event name as the message and the fields in `extra`:

    log.info("state", extra={"fields": {"process": "game", "to": "running", "pid": 42}})
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log would double every request; our API logs errors itself.
    logging.getLogger("uvicorn.access").disabled = True
    # http probes would log every attempt (code-server's /healthz every few seconds).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.Formatter.converter = time.gmtime


def fields(**values: object) -> dict[str, dict[str, object]]:
    """Shorthand for `extra=`: log.info("event", extra=fields(pid=1))."""
    return {"fields": values}
