"""ExportUserData: one JSON document, streamed in chunks, built from sections that each domain adds.

Document (format "everything.export.v1"):
    {"format": ..., "exported_at": ..., "user": {...},
     "<section>": [record, ...], ...}
Each section reads in short transactions of its own, page by page, so a big export never holds a
connection or a transaction open for long.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import orjson

from everything_server.rpc.context import Principal

# A section yields JSON-ready dicts for one user. `include_bytes` asks for large payloads inline.
Section = Callable[[Principal, bool], AsyncIterator[dict]]
Header = Callable[[Principal], Awaitable[dict]]

CHUNK_BYTES = 64 * 1024


class Exporter:
    def __init__(self, header: Header):
        self._header = header
        self._sections: list[tuple[str, Section]] = []

    def add_section(self, name: str, section: Section) -> None:
        self._sections.append((name, section))

    async def export(self, p: Principal, *, include_bytes: bool) -> AsyncIterator[bytes]:
        buf = bytearray()
        user = await self._header(p)
        head = {"format": "everything.export.v1", "exported_at": datetime.now(UTC).isoformat(), "user": user}
        buf += orjson.dumps(head)[:-1]  # keep the object open for the sections
        for name, section in self._sections:
            buf += b"," + orjson.dumps(name) + b":["
            first = True
            async for record in section(p, include_bytes):
                if not first:
                    buf += b","
                buf += orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS)
                first = False
                if len(buf) >= CHUNK_BYTES:
                    yield bytes(buf)
                    buf.clear()
            buf += b"]"
        buf += b"}"
        yield bytes(buf)
