"""A short tour: what MLA caches, measured on real layers and on published model configs."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from latentattn import calculator
from latentattn.attention import MLA, GQAAttention
from latentattn.config import MLAConfig, mha_counterpart
from latentattn.metrics import relative_error

TOUR_MODELS = ("deepseek-v2", "deepseek-v3", "deepseek-v2-lite", "llama-3-8b", "llama-3-70b", "deepseek-67b")


@dataclass(frozen=True)
class DecodeRun:
    """Prefill + decode through a layer's cache: median times over repeats after a warm-up run."""

    name: str
    cache_bytes_per_token: int
    cache_used_bytes: int
    prefill_ms: float
    decode_ms_per_token: float
    max_rel_error: float


def _decode_run(
    name: str,
    layer: MLA | GQAAttention,
    prompt: torch.Tensor,
    steps: torch.Tensor,
    mode: str,
    *,
    repeats: int,
    warmup: int = 1,
) -> DecodeRun:
    """Prefill `prompt: [B, P, d]`, decode `steps: [B, N, d]` one token at a time, `warmup + repeats`
    times into the reset cache; median times of the repeats; the output compared with no cache."""
    batch, n_prompt = prompt.shape[:2]
    cache = layer.new_cache(batch, n_prompt + steps.shape[1])
    prefill_times, decode_times = [], []
    for _ in range(warmup + repeats):
        cache.reset()
        start = time.perf_counter()
        layer(prompt, cache)
        prefill_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        outs = [layer(steps[:, t : t + 1], cache, mode=mode) for t in range(steps.shape[1])]
        decode_times.append(time.perf_counter() - start)
    prefill, decode = (statistics.median(times[warmup:]) for times in (prefill_times, decode_times))
    decoded = torch.cat(outs, dim=1)
    reference = layer(torch.cat([prompt, steps], dim=1))[:, n_prompt:]
    return DecodeRun(
        name=name,
        cache_bytes_per_token=cache.bytes_per_token,
        cache_used_bytes=cache.used_bytes,
        prefill_ms=prefill * 1e3,
        decode_ms_per_token=decode * 1e3 / steps.shape[1],
        max_rel_error=relative_error(decoded, reference),
    )


@torch.no_grad()
def compare_decode(
    mla_config: MLAConfig,
    *,
    batch_size: int = 2,
    prompt_len: int = 512,
    new_tokens: int = 16,
    seed: int = 0,
    repeats: int = 3,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[DecodeRun]:
    """MLA (absorbed and naive decode) next to MHA of the same shape (`config.mha_counterpart`).

    Each run prefills the same prompt, decodes the same tokens through its cache, and checks the
    decoded outputs against one full forward without a cache.
    """
    torch.manual_seed(seed)
    mla = MLA(mla_config, device=device, dtype=dtype).eval()
    mha_config = mha_counterpart(mla_config)
    mha = GQAAttention(mha_config, device=device, dtype=dtype).eval()
    prompt = torch.randn(batch_size, prompt_len, mla_config.d_model, device=device, dtype=dtype)
    steps = torch.randn(batch_size, new_tokens, mla_config.d_model, device=device, dtype=dtype)
    mha_name = f"MHA {mha_config.n_heads}×{mha_config.head_dim}"
    absorbed = _decode_run("MLA, absorbed decode", mla, prompt, steps, "absorbed", repeats=repeats)
    naive = _decode_run("MLA, naive decode", mla, prompt, steps, "naive", repeats=repeats)
    baseline = _decode_run(mha_name, mha, prompt, steps, "auto", repeats=repeats)
    return [absorbed, naive, baseline]


def run_tour(console: Console | None = None) -> None:
    """Print the tour: published models' caches, then MLA vs MHA on a DeepSeek-V2-Lite-shaped layer."""
    console = console or Console()
    console.rule("[bold]KV cache of published models at 128K context, bf16 (`latentattn cache`)")
    comparison = calculator.compare(
        [calculator.resolve_model(name) for name in TOUR_MODELS], budget_bytes=calculator.parse_size("80GiB")
    )
    calculator.print_table(calculator.comparison_table(comparison))
    config = MLAConfig()  # DeepSeek-V2-Lite's attention: d 2048, 16 heads, d_c 512, d_R 64
    repeats = 3
    console.rule(f"[bold]V2-Lite-shaped MLA: prefill 512, decode 16 (fp32, median of {repeats} runs)")
    runs = compare_decode(config, repeats=repeats)
    table = Table()
    for column in ("layer", "cache B/token", "cache used", "prefill ms", "decode ms/token", "max rel err"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for run in runs:
        table.add_row(
            run.name,
            f"{run.cache_bytes_per_token:,}",
            f"{run.cache_used_bytes / 2**20:.2f} MiB",
            f"{run.prefill_ms:.1f}",
            f"{run.decode_ms_per_token:.2f}",
            f"{run.max_rel_error:.1e}",
        )
    calculator.print_table(table)
    ratio = runs[2].cache_bytes_per_token / runs[0].cache_bytes_per_token
    console.print(
        f"MLA caches {config.kv_lora_rank} + {config.qk_rope_head_dim} = {config.cache_width} numbers "
        f"per token per layer; MHA with the same {config.n_heads} heads caches "
        f"2·{config.n_heads}·{config.v_head_dim} = {2 * config.n_heads * config.v_head_dim} — {ratio:.1f}× "
        "more. Max rel err: decode through the cache vs one full forward without it."
    )
