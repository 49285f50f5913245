"""Log lines as JSON objects, one per line (``streambroker worker --log-format json``)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

__all__ = ["JsonFormatter"]

#: Fields the broker's log calls add (``extra=``), copied into each object when present.
FIELDS = ("group", "consumer", "stream", "ids")


class JsonFormatter(logging.Formatter):
    """Each record as one JSON object: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, the broker's fields that apply (``group``, ``consumer``, ``stream``,
    ``ids``) and ``error`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)
