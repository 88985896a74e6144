"""`latentattn bench` on a tiny layer: the report's shape, MLA/HF agreement and the CLI. No timing asserts."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import torch

from latentattn import MLA, MLAConfig
from latentattn.bench import (
    IMPLS,
    MIN_REPEATS,
    BenchConfig,
    _fragmented_pages,
    measure_roofline,
    run_bench,
    time_interleaved,
    time_ms,
)
from latentattn.cli import main
from latentattn.kernels import kernel_status

TINY = MLAConfig(
    d_model=64, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16
)


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("transformers")
    config = BenchConfig(mla=TINY, gqa_kv_heads=2, contexts=(8, 40), dtypes=("float32",), warmup=0, repeats=2)
    return run_bench(config)


def test_report_has_every_row_and_the_roofline(report):
    assert set(report) == {"machine", "roofline", "config", "results", "skipped"}
    assert report["skipped"] == []
    assert report["roofline"]["bandwidth_gbs"] > 0
    assert report["roofline"]["peak_gflops"]["float32"] > 0
    rows = report["results"]
    assert [(row["impl"], row["context"]) for row in rows] == [(impl, s) for s in (8, 40) for impl in IMPLS]
    for row in rows:
        assert row["ms_min"] <= row["ms_per_step"] <= row["ms_max"]
        assert row["roofline_ms"] > 0
        assert row["x_roofline"] == pytest.approx(row["ms_per_step"] / row["roofline_ms"])
    mha = next(row for row in rows if row["impl"] == "mha" and row["context"] == 40)
    assert mha["cache_bytes"] == 40 * 2 * 4 * 16 * 4  # context · K and V · 4 heads · 16 dims · fp32
    absorbed = next(row for row in rows if row["impl"] == "mla-absorbed" and row["context"] == 40)
    assert absorbed["cache_bytes"] == 40 * (32 + 8) * 4
    fp8 = next(row for row in rows if row["impl"] == "mla-fp8" and row["context"] == 40)
    assert fp8["cache_bytes"] == 40 * (32 + 4 + 8 * 2)  # 8-bit c_KV, one fp32 scale (32 < 128), bf16 k_pe
    assert absorbed["vs_mha"] == pytest.approx(mha["ms_per_step"] / absorbed["ms_per_step"])


def test_rows_say_which_path_ran(report):
    """The absorbed rows run the fused kernel where it is built; mla-absorbed-torch never does."""
    fused = "fused" if kernel_status().available else "torch"
    expected = {"mla-absorbed-torch": "torch", "mla-naive": "sdpa", "hf-deepseek-v3": "hf"}
    expected |= dict.fromkeys(["mla-absorbed", "mla-paged", "mla-int8", "mla-fp8"], fused)
    expected |= dict.fromkeys(["mha", "gqa", "mqa"], "sdpa")
    assert {row["impl"]: row["path"] for row in report["results"]} == expected
    assert report["machine"]["fused_kernel"] == kernel_status().detail


def test_mla_paths_and_hf_agree_on_the_same_weights_and_cache(report):
    """Oracle: mla-naive on the full-precision cache; 8-bit caches within their quantization error."""
    bounds = {"mla-int8": 2e-2, "mla-fp8": 1e-1}
    for row in report["results"]:
        if row["impl"].startswith(("mla", "hf")):
            assert row["max_rel_err"] <= bounds.get(row["impl"], 1e-5), row["impl"]
        else:
            assert row["max_rel_err"] is None
    assert all(row["max_rel_err"] > 0 for row in report["results"] if row["impl"] in bounds)


def test_decompressing_rows_that_would_not_fit_in_memory_are_skipped_with_the_reason(monkeypatch):
    """The naive and HF rows rebuild every head's K/V; where that exceeds half the free memory they are
    skipped (not killed by the OS mid-run), and the other rows keep their oracle, computed per sequence."""
    from latentattn import bench

    needed = bench.decompressed_bytes(TINY, 2, 40, torch.float32)
    assert needed == 3 * 2 * 40 * 4 * (24 + 16) * 4  # copies · B · S · H · (qk + v) · fp32
    monkeypatch.setattr(bench, "available_bytes", lambda device: needed)  # half of it is too little
    impls = ("mla-naive", "mla-absorbed", "hf-deepseek-v3")
    config = BenchConfig(
        mla=TINY, contexts=(40,), batch_sizes=(2,), dtypes=("float32",), impls=impls, repeats=1
    )
    report = run_bench(config)
    assert [row["impl"] for row in report["results"]] == ["mla-absorbed"]
    assert report["results"][0]["max_rel_err"] < 1e-5
    assert [row["impl"] for row in report["skipped"]] == ["mla-naive", "hf-deepseek-v3"]
    assert "available" in report["skipped"][0]["reason"]
    assert "skipped mla-naive float32 batch 2 context 40" in str(bench.results_table(report).caption)


def test_cli_json_and_plot(tmp_path, capsys):
    pytest.importorskip("transformers")
    plot = tmp_path / "latency.png"
    args = ["bench", "--contexts", "16", "--dtype", "float32", "bfloat16", "--impl", "mqa", "mla-absorbed"]
    assert main([*args, "--repeats", "1", "--warmup", "0", "--json", "--plot", str(plot)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {row["impl"] for row in report["results"]} == {"mqa", "mla-absorbed"}
    assert plot.stat().st_size > 0


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="unknown implementation 'flash'"):
        BenchConfig(impls=("flash",))
    assert main(["bench", "--contexts", "lots"]) == 2


def test_slow_steps_stop_repeating_after_the_time_budget():
    calls = []

    def step():
        calls.append(None)
        time.sleep(0.02)

    assert len(time_ms(step, warmup=2, repeats=50, max_seconds=0.05)) == MIN_REPEATS
    assert len(calls) == 1 + MIN_REPEATS  # the first warm-up step took over a third of the budget
    calls.clear()
    assert len(time_ms(step, warmup=2, repeats=2, max_seconds=0.05)) == 2  # never more than asked
    assert len(time_ms(step, warmup=0, repeats=5, max_seconds=60)) == 5


def test_steps_are_timed_round_robin_each_to_its_own_budget():
    """After the warm-ups, one call of every step per round; the slow step leaves after MIN_REPEATS
    (its budget spent), the fast one stays until it has `repeats` times."""
    calls = []

    def step(name: str, seconds: float):
        def call():
            calls.append(name)
            time.sleep(seconds)

        return call

    steps = {"fast": step("fast", 0.0), "slow": step("slow", 0.03)}
    times = time_interleaved(steps, warmup=1, repeats=6, max_seconds=0.05)
    assert len(times["fast"]) == 6 and len(times["slow"]) == MIN_REPEATS
    timed = calls[2:]  # after one warm-up call each
    assert timed[: 2 * MIN_REPEATS] == ["fast", "slow"] * MIN_REPEATS
    assert timed[2 * MIN_REPEATS :] == ["fast"] * (6 - MIN_REPEATS)


def test_bf16_peak_is_the_fastest_way_to_multiply_bf16_on_this_device():
    """On CPU the absorbed path multiplies bf16 data in fp32 (exact products), so bf16's roofline peak
    is at least fp32's, however slow native bf16 GEMMs are."""
    roofline = measure_roofline(("float32", "bfloat16"), "cpu", repeats=1)
    assert roofline.peak_gflops["bfloat16"] >= roofline.peak_gflops["float32"] > 0


def test_the_paged_row_reads_a_fragmented_pool():
    """The benchmark's paged cache holds every sequence in non-consecutive blocks, so its rows measure
    gathered pages, and the same latents as the contiguous cache."""
    mla = MLA(TINY, dtype=torch.float64)
    latent = torch.randn(2, 150, TINY.cache_width, dtype=torch.float64)
    pages = _fragmented_pages(mla, latent)
    for seq in pages.batch:
        table = pages.tables[seq]
        assert len(table) == 3 and all(b - a > 1 for a, b in itertools.pairwise(table))
    keys, _ = pages.update(torch.zeros(2, 1, TINY.cache_width, dtype=torch.float64))
    torch.testing.assert_close(keys.full()[:, :150], latent, rtol=0, atol=0)
