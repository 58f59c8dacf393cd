"""The benchmark harness (tests/bench, `make bench`) in its tiny mode: one stream of a few tokens,
direct and everything over gRPC only, a concurrency run of 8 streams open together, and database
writes per reply for a short and a long reply at two rates. It checks the harness works and its JSON
holds sane figures, not the figures themselves (those are for `make bench`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie waiting for its parent is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(240)
def test_bench_smoke_measures_direct_and_grpc_and_cleans_up(pg_admin_url: str, tmp_path: Path):
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVERYTHING_")}
    # The systems under test on a CPU of their own, where there are two to choose from.
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu = cpus[-1] if len(cpus) > 1 else None
    pinning = ["--server-cpus", str(server_cpu)] if server_cpu is not None else []
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench.run",
            "--smoke",
            "--out",
            str(out),
            "--database-url",
            pg_admin_url,
            # The server's admission control, made deterministic: at most 4 open streams (so the
            # 8-stream concurrency run has exactly 4 refused, to check how refusals are counted),
            # and no event-loop lag check (a machine busy with other work must not refuse more).
            "--server-env",
            "EVERYTHING_MAX_STREAMS_PER_PROCESS=4",
            "--server-env",
            "EVERYTHING_MAX_LOOP_LAG_MS=0",
            *pinning,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert proc.returncode == 0, (
        f"harness failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().count("| grpc-1 |") >= 1

    assert results["problems"] == []
    assert results["meta"]["mode"] == "smoke"
    assert set(results["streams"]) == {"direct", "grpc-1"}
    if server_cpu is not None:  # the server ran on its CPU, the rest of the run on the others
        meta = results["meta"]
        assert meta["server_cpus"] == [server_cpu]
        assert meta["server_affinity"] == {"grpc-1": [server_cpu]}
        assert meta["other_cpus"] and server_cpu not in meta["other_cpus"]
        assert f"systems under test on CPUs [{server_cpu}]" in (out / "results.md").read_text()

    direct = results["streams"]["direct"][0]
    grpc = results["streams"]["grpc-1"][0]
    for run in (direct, grpc):
        assert run["concurrency"] == 1
        assert run["errors"] == {}, run["error_samples"]
        assert run["refused_resource_exhausted"] == 0, run["error_samples"]
        assert run["streams_admitted"] == run["streams_started"]
        assert run["streams_completed"] >= 1
        assert run["streams_completed"] == run["streams_started"]
        assert run["tokens"] > 0
        assert run["tokens_per_s"] > 0
        assert 0 < run["ttft_ms"]["p50"] < 5000
        assert run["inter_token_ms"]["p99"] is not None
    # The mock's tokens (20 per reply) all arrive, through the server too.
    assert grpc["tokens"] == 20 * grpc["streams_completed"]

    # CPU is accounted from /proc for the server and PostgreSQL, per relayed token.
    assert grpc["cpu_s_per_1k_tokens"] > 0
    assert grpc["cpu_s_per_1k_tokens_by_process"]["postgres"] is not None
    assert grpc["total_cpu_s_per_1k_tokens"] >= grpc["cpu_s_per_1k_tokens"]
    assert grpc["memory"]["server_peak_rss_mb"] > 10
    assert direct["cpu_s_per_1k_tokens"] is None  # no server between the client and the mock
    assert grpc["time_to_first_event_ms"]["p50"] <= grpc["ttft_ms"]["p50"]
    assert grpc["ttft_added_ms"]["p50"] is not None
    assert grpc["ratios"]["tokens_per_s_vs_direct"] > 0

    # TTFT alone: one stream of short replies back to back, several first tokens per system.
    ttft = {r["system"]: r for r in results["ttft"]}
    assert set(ttft) == {"direct", "grpc-1"}
    for r in ttft.values():
        assert r["replies"] >= 3 and r["errors"] == 0
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] < 5000
    assert "Time to first token: one stream" in (out / "results.md").read_text()

    # The concurrency scenario: 8 streams at once against a cap of 4 open streams. The 4 admitted
    # ones are open together and complete; the 4 others are refused (RESOURCE_EXHAUSTED, counted
    # apart from errors, with how fast the refusal came back and the server's own count by cause)
    # and ask again as their RetryInfo says while the window lasts; nothing else fails.
    (conc,) = results["concurrency"]
    assert conc["system"] == "grpc-1" and conc["concurrency"] == 8
    assert conc["errors"] == {}, conc["error_samples"]
    assert conc["refused_resource_exhausted"] >= 4, conc["error_samples"]
    assert conc["refused_by_cause"] == {"streams": conc["refused_resource_exhausted"]}
    assert 0 < conc["refusal_ms"]["p50"] <= conc["refusal_ms"]["p99"] < 5000
    assert 4 <= conc["streams_admitted"] == conc["streams_completed"] <= 8
    assert conc["peak_open_streams"] == 4
    assert conc["tokens"] == 10 * conc["streams_completed"]
    assert conc["memory"]["server_peak_rss_mb"] >= conc["memory"]["server_rss_before_mb"] > 10
    assert conc["memory"]["server_kb_per_open_stream"] is not None
    md = (out / "results.md").read_text()
    assert "Concurrency: 8 streams" in md and "Overload and admission control" not in md
    assert f"| streams:{conc['refused_resource_exhausted']} |" in md

    # Database writes per reply: short and long replies, at a rate and with no delay. Every reply
    # writes something and commits transactions; rows counted by table add up.
    writes = results["db_writes_per_reply"]
    assert [(w["reply_tokens"], w["rate"]) for w in writes] == [(10, 200), (80, 200), (10, 0), (80, 0)]
    for w in writes:
        assert w["replies"] == 2, w
        assert w["transactions_per_reply"] > 0, w
        assert w["rows_written_per_reply"] > 0, w
        assert w["messages_writes_per_reply"] >= 2, w  # at least the user's message and the reply
        parts = (
            w["messages_writes_per_reply"] + w["message_events_writes_per_reply"] + w["other_rows_per_reply"]
        )
        assert abs(parts - w["rows_written_per_reply"]) < 0.02, w
    dependence = results["db_writes_length_dependence"]
    assert [(d["rate"], d["from_tokens"], d["to_tokens"]) for d in dependence] == [(200, 10, 80), (0, 10, 80)]
    assert all(d["rows_per_100_tokens"] is not None for d in dependence)
    assert "xacts/reply" in (out / "results.md").read_text()

    # Every process the harness started is gone.
    left = [pid for pid in results["meta"]["pids"] if _alive(pid)]
    assert left == [], f"processes left running: {left}"


def test_the_profile_summary_leaves_out_the_servers_start_and_stop(tmp_path: Path):
    """py-spy samples from the process's start: imports and the app's set-up (under `_serve`) are
    not the work per token the summary is for."""
    from tests.bench import profile

    main = "main (everything_server/__main__.py:141);Handle._run (asyncio/events.py:80)"
    raw = tmp_path / "profile.raw"
    raw.write_text(
        f"{main};_serve (everything_server/__main__.py:39);App.__init__ (everything_server/app.py:90) 40\n"
        f"{main};<module> (x.py:1);_find_and_load (<frozen importlib._bootstrap>:1) 30\n"
        f"{main};Generation.emit (everything_server/chat/generation.py:184) 20\n"
        f"{main};_ChatStream.feed (everything_server/ai/provider.py:300) 10\n"
    )
    summary = profile.summarize(raw, rate_hz=100, units=1000)
    assert summary["samples"] == 30
    assert summary["by_area_self"][0]["us_per_unit"] == 200.0  # 20 samples at 100 Hz over 1,000
    callers = {r["name"]: r["samples"] for r in summary["by_everything_caller"]}
    assert callers == {
        "Generation.emit (everything_server/chat/generation.py)": 20,
        "_ChatStream.feed (everything_server/ai/provider.py)": 10,
    }
