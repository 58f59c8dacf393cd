"""Structured JSON logs on stderr. Records carry only the fields named in `extra`; the access log
adds method, code, duration and request id. Nothing here ever receives tokens, passwords, emails
or prompts: callers pass ids and counts, not payloads.

The access log writes one line per RPC, so formatting is kept cheap: the time's seconds part is
formatted once per second, and records do not look up their caller's file and line (`setup`
turns that off: the JSON lines never show them).
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._prefix = ""

    def _time(self, created: float) -> str:
        """ISO 8601 in UTC with milliseconds, as datetime.isoformat(timespec="milliseconds") gives."""
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self._time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key[0] != "_":
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup(level: str = "INFO", json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # No lines show the caller's file, line, thread or process name: do not compute them per record
    # (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    # Libraries that would log request details at INFO.
    for noisy in ("httpx", "httpx2", "httpcore", "openai", "aiohttp.access", "asyncio", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
