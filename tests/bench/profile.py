"""Summaries of a py-spy profile (`py-spy record --gil -f raw`: one "frame;frame;...;leaf count" per line).

py-spy samples the Python stacks of the server's threads; time spent in C (grpc's core, asyncpg's
protocol, orjson) is charged to the Python frame that called it, and threads without Python frames
(grpc's pollers) are not seen.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Where a frame's file lives -> the area it is charged to (first match wins).
AREAS = [
    ("everything_server/chat", "everything: chat (generation, relay, events)"),
    ("everything_server/rpc", "everything: interceptor / rpc helpers"),
    ("everything_server/db", "everything: db helpers (transaction, pubsub)"),
    ("everything_server/ai", "everything: ai provider (SSE parsing)"),
    ("everything_server/limits", "everything: rate limits"),
    ("everything_server/metrics", "everything: metrics"),
    ("everything_server", "everything: other"),
    ("everything/", "generated protobuf modules"),
    ("grpc/", "grpc (python + cython)"),
    ("google/protobuf", "protobuf"),
    ("sqlalchemy", "sqlalchemy"),
    ("asyncpg", "asyncpg"),
    ("openai", "openai SDK"),
    ("httpx", "httpx"),
    ("aiohttp", "aiohttp (upstream HTTP)"),
    ("prometheus_client", "prometheus_client"),
    ("logging", "logging"),
    ("pythonjsonlogger", "logging"),
    ("json", "json"),
    ("asyncio", "asyncio event loop (with C/Cython callbacks: grpc aio)"),
    ("selectors", "asyncio event loop"),
    ("jwt", "jwt"),
]


def _parse(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m.group("func"), m.group("file")


def area_of(file: str) -> str:
    for needle, area in AREAS:
        if needle in file:
            return area
    return "other"


def _short(file: str) -> str:
    for marker in ("site-packages/", "/server/", "/lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def summarize(
    path: Path, *, rate_hz: int, units: int | None = None, unit: str = "token", top: int = 25
) -> dict[str, Any]:
    """`units`: how many `unit`s (tokens relayed, or requests served) the profiled load made, for
    the microseconds per unit of each row."""
    total = 0
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas_self: Counter[str] = Counter()
    # Who asked for the work: the deepest everything_server frame of a stack. SQLAlchemy's async
    # layer runs its sync core in greenlets whose stacks start at Session.execute (caller unseen).
    callers: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_parse(f) for f in stack.split(";") if f.strip()]
        if not frames or any(
            fn.startswith("_find_and_load") or (fn == "_serve" and fl.endswith("__main__.py"))
            for fn, fl in frames
        ):
            continue  # start-up (imports; the app's set-up and its stop, which `_serve` awaits)
        total += n
        func, file = frames[-1]
        self_time[f"{func} ({_short(file)})"] += n
        areas_self[area_of(file)] += n
        for name in {f"{fn} ({_short(fl)})" for fn, fl in frames}:
            inclusive[name] += n
        ours = [
            f"{fn} ({_short(fl)})"
            for fn, fl in frames
            if "everything_server" in fl and not fl.endswith("__main__.py")
        ]
        if ours:
            callers[ours[-1]] += n
        elif "sqlalchemy" in frames[0][1]:
            callers["(sqlalchemy in a greenlet: a query of any caller)"] += n
        else:
            callers["(no everything_server frame: event loop, grpc/asyncio callbacks)"] += n

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "samples": n,
                "percent": round(100 * n / total, 1) if total else 0.0,
                "cpu_s": round(n / rate_hz, 3),
                "us_per_unit": round(n / rate_hz / units * 1e6, 1) if units else None,
            }
            for name, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "rate_hz": rate_hz,
        "sampled_cpu_s": round(total / rate_hz, 3),
        "units": units,
        "unit": unit,
        "by_area_self": rows(areas_self),
        "by_everything_caller": rows(callers),
        "top_self": rows(self_time),
        "top_inclusive": rows(inclusive),
    }


def render(summary: dict[str, Any], limit: int = 15) -> str:
    out = [
        f"py-spy: {summary['samples']} samples at {summary['rate_hz']} Hz "
        f"(~{summary['sampled_cpu_s']} s on CPU), {summary['units']} {summary['unit']}s"
    ]
    for key, title in (
        ("by_area_self", "self time by area"),
        ("by_everything_caller", "by the deepest everything_server frame (who asked for the work)"),
        ("top_self", "top self time"),
    ):
        out.append(f"\n{title}:")
        for r in summary[key][:limit]:
            per = f"{r['us_per_unit']:>8.1f} µs/{summary['unit']}" if r["us_per_unit"] is not None else ""
            out.append(f"  {r['percent']:5.1f}%  {per}  {r['name']}")
    return "\n".join(out)
