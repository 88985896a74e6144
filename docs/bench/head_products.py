r"""How fast a decode step's projections read their weights: `fused_head_products` from memory.

    python docs/bench/head_products.py                   # fp32 and bf16, 1 and 2 threads
    python docs/bench/head_products.py --dtypes bfloat16 --threads 2 --repeats 21

For `latentattn bench`'s MLA layer (DeepSeek-V2-Lite's attention) it times each product of one
decode token as the absorbed path runs it — the projections `W_Q`, `W_DKV`, `W_O` (`project`) and
the per-head `q_nope · W_UK`, `o_lat · W_UVᵀ` on `w_ukv`'s strided views — with 64 MiB read in
between, so the weights come from memory as in a model with many layers. It prints the median
milliseconds and the GB/s they read at; a step reads these weights once.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from latentattn.attention import MLA
from latentattn.bench import BenchConfig, machine_info
from latentattn.kernels import fused_head_products


def products(mla: MLA) -> dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor]]:
    """Each product of a decode token's absorbed step and the weight it reads."""
    c, dtype = mla.config, mla.w_o.weight.dtype
    w_uk, w_uv = mla.absorbed_weights()
    x = torch.randn(1, 1, c.d_model, dtype=dtype)
    q_nope = torch.randn(1, c.n_heads, c.qk_nope_head_dim, dtype=dtype)
    o_lat = torch.randn(1, c.n_heads, c.kv_lora_rank, dtype=dtype)
    o = torch.randn(1, 1, c.n_heads * c.v_head_dim, dtype=dtype)

    def linear(weight: torch.Tensor, rows: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: fused_head_products(rows, weight[None], transposed=True)

    return {
        "W_Q": (linear(mla.w_q.weight, x), mla.w_q.weight),
        "W_DKV": (linear(mla.w_dkv.weight, x), mla.w_dkv.weight),
        "q_nope · W_UK": (lambda: fused_head_products(q_nope, w_uk), w_uk),
        "o_lat · W_UVᵀ": (lambda: fused_head_products(o_lat, w_uv, transposed=True), w_uv),
        "W_O": (linear(mla.w_o.weight, o), mla.w_o.weight),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    console = Console(width=140)
    console.print(machine_info())
    config = BenchConfig().mla
    if config.q_lora_rank is not None:
        raise SystemExit("this script times the bench layer's W_Q; the config has a low-rank query")
    sweep = torch.ones(16 * 2**20)  # 64 MiB, read between calls: the weights leave the caches
    table = Table(title=f"decode-token products from memory, median of {args.repeats} (ms, GB/s of weights)")
    for column in ("dtype", "threads", *products(MLA(config)).keys(), "all"):
        table.add_column(column, justify="right")
    default_threads = torch.get_num_threads()
    for dtype_name in args.dtypes:
        torch.manual_seed(0)
        mla = MLA(config, dtype=getattr(torch, dtype_name)).eval()
        cases = products(mla)
        for threads in args.threads:
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.repeats + 2):  # round-robin; the first two rounds warm up
                for name, (product, _) in cases.items():
                    sweep.sum()
                    start = time.perf_counter()
                    product()
                    times[name].append(time.perf_counter() - start)
            cells, total_ms, total_bytes = [], 0.0, 0
            for name, (_, weight) in cases.items():
                ms = statistics.median(times[name][2:]) * 1e3
                weight_bytes = weight.numel() * weight.element_size()
                cells.append(f"{ms:.3f} ({weight_bytes / ms / 1e6:.0f})")
                total_ms, total_bytes = total_ms + ms, total_bytes + weight_bytes
            cells.append(f"{total_ms:.2f} ({total_bytes / total_ms / 1e6:.0f})")
            table.add_row(dtype_name, str(threads), *cells)
    torch.set_num_threads(default_threads)
    console.print(table)


if __name__ == "__main__":
    with torch.no_grad():
        main()
