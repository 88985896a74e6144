"""`latentattn bench serve`: MLA against MHA/GQA/MQA at one KV budget through the serving engine.

Oracle: the cache sizes. With fixed lengths (24 + 8 tokens: 2 blocks of 16 per sequence) and the
budget the only limit, MHA's maximum concurrency is its blocks / 2 and MLA's over MHA's lies within 5%
of the cache-size ratio 4096 / 576 = 7.1x. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_serve_concurrency_follows_the_cache_size(tmp_path):
    plot = tmp_path / "capacity.png"
    args = ["bench", "serve", "--kv-budget", "2MiB", "--requests", "60", "--layers", "1", "--threads", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "latentattn", *args, "--json", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = {row["name"]: row for row in report["rows"]}
    assert [rows[name]["bytes_per_token"] for name in ("MHA", "GQA", "MQA", "MLA", "MLA int8")] == [
        8192,
        2048,
        512,
        1152,
        656,
    ]
    mha = rows["MHA"]
    assert mha["max_concurrent"] == mha["num_blocks"] // 2 == 8
    ratio = report["ratios_vs_mha"]["MLA"]
    assert abs(ratio["concurrency"] / ratio["cache_size"] - 1) < 0.05
    assert rows["MLA, 32 seqs"]["max_concurrent"] == 32
    for row in rows.values():
        assert set(row["split"]) == {"projections", "attention", "mlp", "scheduler", "other"}
        assert abs(sum(row["split"].values()) - 1) < 1e-6 and row["preemptions"] >= 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_bench_serve_takes_one_dtype():
    done = subprocess.run(
        [sys.executable, "-m", "latentattn", "bench", "serve", "--dtype", "float32", "bfloat16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "bench serve runs one --dtype at a time" in done.stderr
