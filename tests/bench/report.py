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
        "refused": 0,
    }
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}
    ttft, ttfe, gaps, latency, elat = array("d"), array("d"), array("d"), array("d"), array("d")
    rlat = array("d")
    open_total: list[int] = []  # open streams of all workers, sample by sample (same clock)
    firsts, lasts = [], []
    for r in results:
        for k in out:
            out[k] += r.get(k, 0)
        rlat.frombytes(r.get("refusal_latency", b""))
        opened = array("i")
        opened.frombytes(r.get("open_samples", b""))
        open_total += [0] * (len(opened) - len(open_total))
        for i, n in enumerate(opened):
            open_total[i] += n
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
        refusal_latency=rlat,
        peak_open=max(open_total) if open_total else None,
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
    errors = merged["errors"]  # RESOURCE_EXHAUSTED is not among them: see refused
    refused = merged.get("refused", 0)
    rlat = merged.get("refusal_latency", array("d"))
    return {
        "concurrency": concurrency,
        "steady_window_s": round(steady_s, 2),
        "streams_started": merged["started"],
        "streams_completed": merged["completed"],
        # Started attempts that never got a token: refused ones included.
        "streams_without_first_token": merged["no_first_token"],
        # Admitted: got at least one token (TTFT and inter-token figures are theirs alone).
        "streams_admitted": len(merged["ttft"]),
        "peak_open_streams": merged.get("peak_open"),
        "errors": errors,
        "error_count": sum(errors.values()),
        "error_samples": merged["error_samples"],
        # Admission control: calls answered RESOURCE_EXHAUSTED (HTTP 429 from LiteLLM), and how long
        # that answer took from the refused call's start (it should be quick, not a timeout).
        "refused_resource_exhausted": refused,
        "refusal_ms": {
            "p50": _ms(percentile(rlat, 0.5)),
            "p99": _ms(percentile(rlat, 0.99)),
            "max": _ms(max(rlat) if len(rlat) else None),
        },
        # How long a failed attempt (not a refusal) took to fail.
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


def ttft_figures(merged: dict[str, Any], *, system: str) -> dict[str, Any]:
    """Time to first token of one stream's short replies, back to back."""
    t = merged["ttft"]
    return {
        "system": system,
        "replies": len(t),
        "errors": sum(merged["errors"].values()),
        "ttft_ms": {
            "p50": _ms(percentile(t, 0.5)),
            "p90": _ms(percentile(t, 0.9)),
            "p99": _ms(percentile(t, 0.99)),
        },
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
    errors = sum(v for k, v in r["errors"].items() if k != "RESOURCE_EXHAUSTED")  # (older results)
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


OVERLOAD_HEAD = [
    "system",
    "streams",
    "offered tok/s",
    "tokens/s",
    "started",
    "admitted",
    "refused",
    "by cause",
    "refusal p50 ms",
    "refusal p99 ms",
    "admitted TTFT p50 ms",
    "admitted TTFT p99 ms",
    "no 1st tok",
    "errors",
    "envoy retries/ejections/no-healthy",
]


def is_overload_run(r: dict[str, Any]) -> bool:
    """Runs the overload table shows: refusals came back, or 256 streams and more."""
    return bool(r.get("refused_resource_exhausted")) or r["concurrency"] >= 256


def by_cause(r: dict[str, Any]) -> str:
    """The servers' own count of refusals by admission control's cause ("-": not an everything
    server, or none)."""
    causes = r.get("refused_by_cause")
    return ",".join(f"{k}:{v}" for k, v in causes.items()) if causes else "-"


def overload_row(r: dict[str, Any]) -> list[str]:
    envoy = r.get("envoy")
    return [
        r["system"],
        str(r["concurrency"]),
        _f(r.get("offered_tokens_per_s"), 0),
        _f(r["tokens_per_s"], 0),
        str(r["streams_started"]),
        str(r.get("streams_admitted", "-")),
        str(r["refused_resource_exhausted"]),
        by_cause(r),
        _f((r.get("refusal_ms") or {}).get("p50")),
        _f((r.get("refusal_ms") or {}).get("p99")),
        _f(r["ttft_ms"]["p50"]),
        _f(r["ttft_ms"]["p99"]),
        str(r["streams_without_first_token"]),
        str(r.get("error_count", sum(r["errors"].values()))),
        "-"
        if not envoy
        else f"{envoy.get('upstream_rq_retry', 0)}/{envoy.get('outlier_detection.ejections_enforced_total', 0)}"
        f"/{envoy.get('upstream_cx_none_healthy', 0)}",
    ]


CONCURRENCY_HEAD = [
    "system",
    "streams",
    "tok/s each",
    "reply s",
    "peak open",
    "completed",
    "errors",
    "refused",
    "by cause",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "ITL p99 ms",
    "RSS before MB",
    "peak RSS MB",
    "KB/open stream",
    "CPU s/1k tok",
    "PG CPU s/1k",
    "other cores",
]


def concurrency_row(r: dict[str, Any]) -> list[str]:
    mem = r["memory"]
    per = r["cpu_s_per_1k_tokens_by_process"]
    return [
        r["system"],
        str(r["concurrency"]),
        _f(r.get("rate"), 1),
        _f(r.get("reply_seconds"), 1),
        _f(r.get("peak_open_streams"), 0),
        str(r["streams_completed"]),
        str(r.get("error_count", sum(r["errors"].values()))),
        str(r["refused_resource_exhausted"]),
        by_cause(r),
        _f(r["ttft_ms"]["p50"]),
        _f(r["ttft_ms"]["p99"]),
        _f(r["inter_token_ms"]["p99"]),
        _f(mem.get("server_rss_before_mb")),
        _f(mem.get("server_peak_rss_mb")),
        _f(mem.get("server_kb_per_open_stream"), 1),
        _f(per.get("server"), 3),
        _f(per.get("postgres"), 3),
        _f(r.get("other_cores_busy"), 2),
    ]


WRITES_HEAD = [
    "tokens",
    "rate",
    "replies",
    "xacts/reply",
    "rows/reply",
    "messages",
    "message_events",
    "other tables",
    "WAL KB/reply",
    "reply s",
]


def writes_row(w: dict[str, Any]) -> list[str]:
    return [
        str(w["reply_tokens"]),
        "no delay" if not w["rate"] else _f(w["rate"], 0),
        str(w["replies"]),
        _f(w.get("transactions_per_reply"), 2),
        _f(w.get("rows_written_per_reply", w.get("writes_per_reply")), 2),
        _f(w.get("messages_writes_per_reply"), 2),
        _f(w.get("message_events_writes_per_reply"), 2),
        _f(w.get("other_rows_per_reply"), 2),
        _f(w.get("wal_kb_per_reply"), 1),
        _f(w.get("reply_seconds"), 2),
    ]


def length_dependence(writes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rate: how much more a long reply writes than a short one (0 = independent of length)."""
    out = []
    for rate in dict.fromkeys(w["rate"] for w in writes):
        rows = sorted(
            (w for w in writes if w["rate"] == rate and w["replies"]), key=lambda w: w["reply_tokens"]
        )
        if len(rows) < 2:
            continue
        short, long = rows[0], rows[-1]
        extra = (long["reply_tokens"] - short["reply_tokens"]) / 100

        def delta(key: str, short=short, long=long) -> float | None:
            a, b = short.get(key), long.get(key)
            return None if a is None or b is None else round(b - a, 3)

        d_rows, d_xacts = delta("rows_written_per_reply"), delta("transactions_per_reply")
        out.append(
            {
                "rate": rate,
                "from_tokens": short["reply_tokens"],
                "to_tokens": long["reply_tokens"],
                "rows_per_reply_delta": d_rows,
                "transactions_per_reply_delta": d_xacts,
                "rows_per_100_tokens": None if d_rows is None or not extra else round(d_rows / extra, 3),
                "transactions_per_100_tokens": None
                if d_xacts is None or not extra
                else round(d_xacts / extra, 3),
            }
        )
    return out


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


TTFT_HEAD = ["system", "replies", "TTFT p50 ms", "p90", "p99", "added p50", "added p90", "errors"]


def ttft_row(r: dict[str, Any], direct: dict[str, Any] | None) -> list[str]:
    t = r["ttft_ms"]

    def added(q: str) -> str:
        if direct is None or r is direct or t[q] is None or direct["ttft_ms"][q] is None:
            return "-"
        return _f(t[q] - direct["ttft_ms"][q], 2)

    return [r["system"], str(r["replies"]), _f(t["p50"], 2), _f(t["p90"], 2), _f(t["p99"], 2)] + [
        added("p50"),
        added("p90"),
        str(r["errors"]),
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
        + (
            f"; systems under test on CPUs {meta['server_cpus']}, the rest of the run on {meta['other_cpus']}"
            if meta.get("server_cpus")
            else ""
        )
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
    ttft = results.get("ttft") or []
    if ttft:
        direct = next((r for r in ttft if r["system"] == "direct"), None)
        out.append(
            f"{h}Time to first token: one stream, short replies back to back (added = minus direct's, "
            "the openai SDK straight to the mock)"
        )
        out.append(table(TTFT_HEAD, [ttft_row(r, direct) for r in ttft]))
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
    overload = [r for rs in (results.get("streams") or {}).values() for r in rs if is_overload_run(r)]
    if overload:
        out.append(
            f"{h}Overload and admission control (offered = streams x the mock's rate; refusals are "
            "RESOURCE_EXHAUSTED, timed from the refused call's start; TTFT of the admitted streams)"
        )
        overload.sort(key=lambda r: (r["concurrency"], r["system"]))
        out.append(table(OVERLOAD_HEAD, [overload_row(r) for r in overload]))
    conc = results.get("concurrency") or []
    if conc:
        c0 = conc[0]
        out.append(
            f"{h}Concurrency: {c0['concurrency']} streams open at once at {_f(c0.get('rate'), 1)} tokens/s each "
            f"({c0.get('reply_tokens')}-token replies, one per client, started over {_f(c0.get('ramp_s'), 1)} s; "
            "a refused client asks again as its RetryInfo says, for up to half a reply more); "
            "KB/open stream = (peak RSS - RSS before) / peak open streams"
        )
        out.append(table(CONCURRENCY_HEAD, [concurrency_row(r) for r in conc]))
    unary = results.get("unary") or []
    if unary:
        out.append(f"{h}Unary RPCs")
        out.append(table(UNARY_HEAD, [unary_row(r) for r in unary]))
    writes = results.get("db_writes_per_reply") or []
    if writes:
        out.append(
            f"{h}Database writes per reply (one CreateThread + one SendMessage each; xacts: "
            "pg_stat_database commits+rollbacks of the server; rows: pg_stat_user_tables "
            "inserts+updates; an idle server's own writes over as long subtracted; WAL only on the run's own "
            "embedded cluster)"
        )
        out.append(table(WRITES_HEAD, [writes_row(w) for w in writes]))
        dep = results.get("db_writes_length_dependence") or length_dependence(writes)
        for d in dep:
            rate = "no delay" if not d["rate"] else f"{d['rate']:g} tokens/s"
            out.append(
                f"{'- ' if table is md_table else '  '}{rate}: {d['from_tokens']} -> {d['to_tokens']} tokens: rows/reply "
                f"{_signed(d['rows_per_reply_delta'])}, xacts/reply {_signed(d['transactions_per_reply_delta'])} "
                f"({_signed(d['rows_per_100_tokens'])} rows per 100 tokens more; 0 = independent of length)"
            )
    return "\n".join(out)


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"
