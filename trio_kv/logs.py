"""Node logging: one JSON object per line, or readable text; every line names the request.

``log_format`` ``auto`` picks text when stderr is a terminal (a person is reading) and JSON
otherwise (a collector is).  The request id comes from ``observe.REQUEST_ID``, so a line
logged while serving a request, on any node it was forwarded through, carries its id.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from .config import Config
from .observe import REQUEST_ID

FORMATS = ("auto", "json", "text")
# attributes every LogRecord has; anything else was passed with extra= and is logged too
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "request_id", "node"}


class _Context(logging.Filter):
    def __init__(self, node: int | None) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        record.node = self.node
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,  # as Python names it: INFO, WARNING, ...
            "logger": record.name,
            "node": getattr(record, "node", None),
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            out["request_id"] = request_id
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s node%(node)s %(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} [req {request_id}]" if request_id else text


def configure(config: Config, stream: Any = None) -> None:
    """Root logging for a node process, replacing any handler set before."""
    if config.log_format not in FORMATS:
        raise ValueError(f"log_format: {config.log_format!r} is not one of {', '.join(FORMATS)}")
    stream = stream or sys.stderr
    use_json = config.log_format == "json" or (
        config.log_format == "auto" and not (hasattr(stream, "isatty") and stream.isatty())
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(_Context(config.node_id))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.log_level.upper())
    for noisy in ("httpx", "httpcore"):  # one line per peer request: too costly and too loud
        logging.getLogger(noisy).setLevel(logging.WARNING)
