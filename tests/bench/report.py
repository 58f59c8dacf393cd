"""Figures out of raw worker results, ratios between systems, and the printed/markdown tables."""

from __future__ import annotations

import math
from array import array
from collections import Counter
from typing import Any


def percentile(values: list[float] | array, q: float) -> float | None:
    if not len(values):
        return None
    data = sorted(values)
    k = (len(data) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def _round(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(v, nd)


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One worker-result out of several."""
    out: dict[str, Any] = {
        "started": 0,
        "completed": 0,
        "tokens": 0,
        "tokens_in_window": 0,
        "no_first_token": 0,
    }
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}
    ttft, ttfe, gaps, latency, elat = array("d"), array("d"), array("d"), array("d"), array("d")
    firsts, lasts = [], []
    for r in results:
        for k in out:
            out[k] += r[k]
        errors.update(r["errors"])
        for k, v in r["error_samples"].items():
            samples.setdefault(k, v)
        ttft.frombytes(r["ttft"])
        ttfe.frombytes(r["ttfe"])
        gaps.frombytes(r["gaps"])
        latency.frombytes(r["latency"])
        elat.frombytes(r["error_latency"])
        if r["first_start"] is not None:
            firsts.append(r["first_start"])
        if r["last_end"] is not None:
            lasts.append(r["last_end"])
    out.update(
        errors=dict(errors),
        error_samples=samples,
        ttft=ttft,
        ttfe=ttfe,
        gaps=gaps,
        latency=latency,
        error_latency=elat,
        first_start=min(firsts) if firsts else None,
        last_end=max(lasts) if lasts else None,
    )
    return out


def stream_figures(
    merged: dict[str, Any],
    *,
    concurrency: int,
    steady_s: float,
    cpu: dict[str, float | None],
    mem: dict[str, Any],
) -> dict[str, Any]:
    """The figures of one (system, concurrency) stream run. `steady_s`: the part of the window in
    which every slot was busy (after the ramp), over which tokens/s is counted."""
    tokens = merged["tokens"]
    per_1k = {k: (_round(v / tokens * 1000, 4) if tokens and v is not None else None) for k, v in cpu.items()}
    span = (merged["last_end"] - merged["first_start"]) if merged["first_start"] and merged["last_end"] else 0
    errors = merged["errors"]
    return {
        "concurrency": concurrency,
        "steady_window_s": round(steady_s, 2),
        "streams_started": merged["started"],
        "streams_completed": merged["completed"],
        "streams_without_first_token": merged["no_first_token"],
        "errors": errors,
        "error_samples": merged["error_samples"],
        "refused_resource_exhausted": errors.get("RESOURCE_EXHAUSTED", 0),
        # How long a failed attempt took to fail (a refusal should be quick, not a timeout).
        "error_after_ms": {
            "p50": _ms(percentile(merged["error_latency"], 0.5)),
            "p99": _ms(percentile(merged["error_latency"], 0.99)),
        },
        "ttft_ms": {
            "p50": _ms(percentile(merged["ttft"], 0.5)),
            "p99": _ms(percentile(merged["ttft"], 0.99)),
            "max": _ms(max(merged["ttft"]) if len(merged["ttft"]) else None),
        },
        # gRPC only: call to user_message_saved (the transaction before the model is called).
        "time_to_first_event_ms": {
            "p50": _ms(percentile(merged["ttfe"], 0.5)),
            "p99": _ms(percentile(merged["ttfe"], 0.99)),
        },
        "inter_token_ms": {
            "p50": _ms(percentile(merged["gaps"], 0.5)),
            "p99": _ms(percentile(merged["gaps"], 0.99)),
        },
        # Completed streams over the whole run (first start to last end, the drain included).
        "streams_per_s": _round(merged["completed"] / span, 3) if span > 0 else None,
        "tokens_per_s": _round(merged["tokens_in_window"] / steady_s, 1) if steady_s > 0 else None,
        "tokens": tokens,
        "cpu_s": {k: _round(v, 3) for k, v in cpu.items()},
        "cpu_s_per_1k_tokens": per_1k["server"],
        "cpu_s_per_1k_tokens_by_process": per_1k,
        "memory": mem,
    }


def unary_figures(merged: dict[str, Any], *, duration: float, cpu: dict[str, float | None]) -> dict[str, Any]:
    ok = len(merged["latency"])
    server_cpu = cpu.get("server") or 0.0
    db_cpu = cpu.get("postgres") or 0.0
    return {
        "requests_ok": ok,
        "errors": merged["errors"],
        "error_samples": merged["error_samples"],
        "requests_per_s": _round(ok / duration, 1),
        "latency_ms": {
            "p50": _ms(percentile(merged["latency"], 0.5)),
            "p99": _ms(percentile(merged["latency"], 0.99)),
        },
        "cpu_s": {k: _round(v, 3) for k, v in cpu.items()},
        # Requests per CPU-second: what one fully busy core would serve.
        "requests_per_server_core_s": _round(ok / server_cpu, 1) if server_cpu > 0 else None,
        "requests_per_core_s_with_postgres": (
            _round(ok / (server_cpu + db_cpu), 1) if server_cpu + db_cpu > 0 else None
        ),
    }


def add_ratios(results: dict[str, Any]) -> None:
    """TTFT added over direct, and ratios against direct and against LiteLLM, per concurrency."""
    for block in ("streams", "max_throughput"):
        runs = results.get(block, {})
        with_ttft = block == "streams"  # with no delay the clients, not the servers, bound TTFT
        by = {(r["system"], r["concurrency"]): r for rs in runs.values() for r in rs}
        for (system, c), r in by.items():
            d = by.get(("direct", c))
            lite = by.get(("litellm", c))
            added = {}
            if d is not None and system != "direct" and with_ttft:
                for q in ("p50", "p99"):
                    a, b = r["ttft_ms"][q], d["ttft_ms"][q]
                    added[q] = None if a is None or b is None else round(a - b, 3)
            r["ttft_added_ms"] = added or None
            ratios: dict[str, Any] = {}
            if d is not None and system != "direct" and d["tokens_per_s"]:
                ratios["tokens_per_s_vs_direct"] = _round(r["tokens_per_s"] / d["tokens_per_s"], 3)
            if lite is not None and system != "litellm":
                if lite["tokens_per_s"]:
                    ratios["tokens_per_s_vs_litellm"] = _round(r["tokens_per_s"] / lite["tokens_per_s"], 3)
                a, b = r["cpu_s_per_1k_tokens"], lite["cpu_s_per_1k_tokens"]
                if a and b:
                    ratios["cpu_per_1k_tokens_vs_litellm"] = _round(a / b, 3)
                a, b = r.get("total_cpu_s_per_1k_tokens"), lite.get("total_cpu_s_per_1k_tokens")
                if a and b:
                    ratios["total_cpu_per_1k_tokens_vs_litellm"] = _round(a / b, 3)
            r["ratios"] = ratios


# -- tables ---------------------------------------------------------------------------------------------


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


STREAM_HEAD = [
    "system",
    "streams",
    "TTFT p50 ms",
    "TTFT +p50",
    "TTFT +p99",
    "ITL p99 ms",
    "streams/s",
    "tokens/s",
    "CPU s/1k tok",
    "PG CPU s/1k",
    "GW CPU s/1k",
    "total s/1k",
    "peak RSS MB",
    "KB/stream",
    "errors",
    "refused",
    "no 1st tok",
    "loadgen cores",
    "other cores",
]


def stream_row(r: dict[str, Any]) -> list[str]:
    per = r["cpu_s_per_1k_tokens_by_process"]
    added = r.get("ttft_added_ms") or {}
    errors = sum(v for k, v in r["errors"].items() if k != "RESOURCE_EXHAUSTED")
    mem = r["memory"]
    return [
        r["system"],
        str(r["concurrency"]),
        _f(r["ttft_ms"]["p50"]),
        _f(added.get("p50")),
        _f(added.get("p99")),
        _f(r["inter_token_ms"]["p99"]),
        _f(r["streams_per_s"], 2),
        _f(r["tokens_per_s"], 0),
        _f(per.get("server"), 3),
        _f(per.get("postgres"), 3),
        _f(per.get("gateway"), 3),
        _f(r.get("total_cpu_s_per_1k_tokens"), 3),
        _f(mem.get("server_peak_rss_mb")),
        _f(mem.get("server_kb_per_stream"), 0),
        str(errors),
        str(r["refused_resource_exhausted"]),
        str(r["streams_without_first_token"]),
        _f(r.get("loadgen_cores_busy"), 2),
        _f(r.get("other_cores_busy"), 2),
    ]


UNARY_HEAD = [
    "system",
    "method",
    "conc.",
    "req/s",
    "p50 ms",
    "p99 ms",
    "req/server-core-s",
    "req/core-s +PG",
    "errors",
]


def unary_row(r: dict[str, Any]) -> list[str]:
    return [
        r["system"],
        r["method"],
        str(r["concurrency"]),
        _f(r["requests_per_s"], 0),
        _f(r["latency_ms"]["p50"], 2),
        _f(r["latency_ms"]["p99"], 2),
        _f(r["requests_per_server_core_s"], 0),
        _f(r["requests_per_core_s_with_postgres"], 0),
        str(sum(r["errors"].values())),
    ]


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render(results: dict[str, Any], table=text_table) -> str:
    h = "\n### " if table is md_table else "\n"  # section titles
    out = []
    meta = results["meta"]
    out.append(
        f"everything benchmark: {meta['cores']} cores, mock {meta['tokens']} tokens/reply at "
        f"{meta['rate']} tokens/s, {meta['duration_s']} s per run, database {meta['database']}"
    )
    for rate_key, title in (
        ("streams", "Streams"),
        ("max_throughput", "No-delay (rate 0): maximum throughput"),
    ):
        runs = results.get(rate_key) or {}
        if not runs:
            continue
        out.append(f"{h}{title}")
        rows = []
        for c in sorted({r["concurrency"] for rs in runs.values() for r in rs}):
            for system in runs:
                for r in runs[system]:
                    if r["concurrency"] == c:
                        rows.append(stream_row(r))
        out.append(table(STREAM_HEAD, rows))
    ratios = []
    for rs in (results.get("streams") or {}).values():
        for r in rs:
            if r.get("ratios"):
                ratios.append(
                    [
                        r["system"],
                        str(r["concurrency"]),
                        _f(r["ratios"].get("tokens_per_s_vs_direct"), 2),
                        _f(r["ratios"].get("tokens_per_s_vs_litellm"), 2),
                        _f(r["ratios"].get("cpu_per_1k_tokens_vs_litellm"), 2),
                        _f(r["ratios"].get("total_cpu_per_1k_tokens_vs_litellm"), 2),
                    ]
                )
    if ratios:
        out.append(
            f"{h}Ratios (tokens/s vs direct and vs LiteLLM; CPU per 1k tokens vs LiteLLM, lower is better)"
        )
        out.append(
            table(
                [
                    "system",
                    "streams",
                    "tok/s ÷ direct",
                    "tok/s ÷ LiteLLM",
                    "CPU/1k ÷ LiteLLM",
                    "total/1k ÷ LiteLLM",
                ],
                ratios,
            )
        )
    unary = results.get("unary") or []
    if unary:
        out.append(f"{h}Unary RPCs")
        out.append(table(UNARY_HEAD, [unary_row(r) for r in unary]))
    writes = results.get("db_writes_per_reply") or []
    if writes:
        out.append(f"{h}Database writes per reply (pg_stat_user_tables inserts+updates, WAL bytes)")
        rows = [
            [
                str(w["reply_tokens"]),
                _f(w["rate"], 0),
                str(w["replies"]),
                _f(w["writes_per_reply"], 1),
                _f(w["messages_writes_per_reply"], 1),
                _f(w["message_events_writes_per_reply"], 1),
                _f(w["wal_kb_per_reply"], 1),
                _f(w["reply_seconds"], 2),
            ]
            for w in writes
        ]
        out.append(
            table(
                [
                    "tokens",
                    "rate",
                    "replies",
                    "writes/reply",
                    "messages",
                    "message_events",
                    "WAL KB/reply",
                    "reply s",
                ],
                rows,
            )
        )
    return "\n".join(out)
