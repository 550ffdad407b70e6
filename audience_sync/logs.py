"""How log lines are written: ``key=value`` text (the default) or one JSON object per line
(``--log-format json``) for a log pipeline.

Messages are written as ``audience=vip run=5 status=succeeded ...``; the JSON form keeps the
message and lifts those ``key=value`` pairs into fields of their own.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

__all__ = ["TEXT_FORMAT", "JsonFormatter"]

TEXT_FORMAT = "%(asctime)s level=%(levelname)s %(message)s"

# key=value where the value has no space (a reason in prose stays in the message only).
_PAIR = re.compile(r"(?:^|\s)([a-z_]+)=([^\s=]+)(?=\s|$)")
_RESERVED = {"time", "level", "logger", "message", "exception"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the message's
    ``key=value`` fields (numbers as numbers) and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for key, value in _PAIR.findall(message):
            if key not in _RESERVED and key not in entry:
                entry[key] = int(value) if value.isdigit() else value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)
