"""The benchmark harness (tests/bench, `make bench`) in its tiny mode: one stream of a few tokens,
direct and everything over gRPC only. It checks the harness works and its JSON holds sane figures,
not the figures themselves (those are for `make bench`)."""

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


@pytest.mark.timeout(150)
def test_bench_smoke_measures_direct_and_grpc_and_cleans_up(pg_admin_url: str, tmp_path: Path):
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVERYTHING_")}
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
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
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

    direct = results["streams"]["direct"][0]
    grpc = results["streams"]["grpc-1"][0]
    for run in (direct, grpc):
        assert run["concurrency"] == 1
        assert run["errors"] == {}, run["error_samples"]
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

    # Every process the harness started is gone.
    left = [pid for pid in results["meta"]["pids"] if _alive(pid)]
    assert left == [], f"processes left running: {left}"
