r"""Where an absorbed MLA decode step's time goes: the fused attention kernel against the whole step.

    python docs/bench/kernel_share.py                    # 16K and 64K context, fp32 and bf16, 1 and 2 threads
    python docs/bench/kernel_share.py --contexts 16384 --dtypes float32 --repeats 15

For `latentattn bench`'s MLA layer (DeepSeek-V2-Lite's attention, batch 1) it times, round-robin within
each (dtype, context, threads), the fused kernel alone (`fused_latent_attention` on the step's cache)
and the whole `mla-absorbed` step, and prints medians against this machine's GEMM peak (measured with
the same thread count) and memory bandwidth. `bench`'s roofline is max(compute, memory) of the step;
a step runs its weight-streaming projections and its compute-bound attention one after the other, so
the sum of the two bounds ("serial bound") is what it can reach without overlapping them.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from rich.console import Console
from rich.table import Table

from latentattn.attention import fused_latent_attention, mla_path_flops
from latentattn.bench import (
    BenchConfig,
    bench_layers,
    gemm_peak_gflops,
    machine_info,
    measure_roofline,
    mla_decode_case,
    time_interleaved,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    console = Console(width=180)
    console.print(machine_info())
    bandwidth = measure_roofline(("float32",), "cpu").bandwidth_gbs
    config = BenchConfig(impls=("mla-absorbed",))
    table = Table(
        title=f"absorbed MLA decode, batch 1, median of {args.repeats}; bandwidth {bandwidth:.1f} GB/s"
    )
    for column in (
        "dtype",
        "context",
        "threads",
        "kernel ms",
        "kernel GFLOP/s",
        "of GEMM peak",
        "step ms",
        "kernel share",
        "step / serial bound",
        "step / roofline",
    ):
        table.add_column(column, justify="right")
    default_threads = torch.get_num_threads()
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        mla = bench_layers(config, dtype)["mla"]
        for context in args.contexts:
            torch.manual_seed(0)
            x = torch.randn(1, 1, config.mla.d_model, dtype=dtype)
            positions = torch.arange(context)[None]
            latent = mla.latent(torch.randn(1, context, config.mla.d_model, dtype=dtype), positions)
            case = mla_decode_case(mla, x, latent, "mla-absorbed")
            keys = mla.new_cache(1, context).update(latent)[0]  # LatentKeys over the context's rows
            q = torch.randn(1, 1, config.mla.n_heads, config.mla.cache_width, dtype=dtype) * 0.05
            lengths = torch.tensor([context - 1])  # the kernel reads the context's keys, no more
            weight_bytes = case.bytes_moved - case.cache_bytes
            attention_flops = mla_path_flops(config.mla, n_queries=1, n_keys=context + 1)["absorbed"]
            folding_flops = mla_path_flops(config.mla, n_queries=1, n_keys=0)["absorbed"]  # W_UK, W_UV
            kernel_flops = mla_path_flops(config.mla, n_queries=1, n_keys=context)["absorbed"] - folding_flops
            for threads in args.threads:
                torch.set_num_threads(threads)
                peak = gemm_peak_gflops(dtype, "cpu")
                kernel = functools.partial(
                    fused_latent_attention,
                    q,
                    keys,
                    lengths,
                    mla.config.softmax_scale,
                    config.mla.kv_lora_rank,
                )
                if kernel() is None:
                    raise SystemExit(
                        f"the fused kernel does not serve here: {machine_info()['fused_kernel']}"
                    )

                # round-robin: a busy moment slows both alike
                times = time_interleaved({"kernel": kernel, "step": case.step}, 2, args.repeats)
                kernel_ms, step_ms = (statistics.median(times[name]) for name in ("kernel", "step"))
                seconds = {  # at the GEMM peak or the bandwidth, whichever binds
                    "attention": max(attention_flops / (peak * 1e9), case.cache_bytes / (bandwidth * 1e9)),
                    "projections": max(
                        (case.flops - attention_flops) / (peak * 1e9), weight_bytes / (bandwidth * 1e9)
                    ),
                    "roofline": max(case.flops / (peak * 1e9), case.bytes_moved / (bandwidth * 1e9)),
                }
                serial_ms = 1e3 * (seconds["attention"] + seconds["projections"])
                kernel_gflops = kernel_flops / (kernel_ms * 1e-3) / 1e9
                table.add_row(
                    dtype_name,
                    f"{context:,}",
                    str(threads),
                    f"{kernel_ms:.2f}",
                    f"{kernel_gflops:.0f}",
                    f"{kernel_gflops / peak:.0%}",
                    f"{step_ms:.2f}",
                    f"{kernel_ms / step_ms:.0%}",
                    f"{step_ms / serial_ms:.2f}x",
                    f"{step_ms / (1e3 * seconds['roofline']):.2f}x",
                )
    torch.set_num_threads(default_threads)
    console.print(table)


if __name__ == "__main__":
    with torch.no_grad():
        main()
