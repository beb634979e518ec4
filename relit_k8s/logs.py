"""Log setup: plain text for people, or one JSON object per line for pods (``kubectl logs``).

Events carry a name and fields through ``extra={"event": ..., "fields": {...}}``; the JSON form
is ``{"ts", "level", "event", "msg", ...fields}``, so ``kubectl logs ... | jq 'select(.event ==
"progress")'`` works.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def log_format(requested: str | None) -> str:
    """``--log-format``, else ``$RELIT_LOG_FORMAT``, else text."""
    fmt = requested or os.environ.get("RELIT_LOG_FORMAT") or "text"
    if fmt not in FORMATS:
        from .errors import ConfigError

        raise ConfigError(f"log format {fmt!r}: use text or json")
    return fmt


def setup(fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("relit_k8s")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
