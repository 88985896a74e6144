"""`latentattn bench serve`: how many sequences one KV byte budget serves, MLA against MHA, GQA and MQA.

Every model has DeepSeek-V2-Lite's attention width (d 2048, 16 heads of 128; MLA: d_c 512, d_R 64),
random weights and a few layers (CPU-feasible). Each serves the same workload through the engine at
the same KV byte budget: `requests` requests of `prompt_tokens` prompt tokens and `output_tokens`
output tokens, all queued at once, no EOS (every request runs to `max_tokens`). The budget, not the
scheduler, limits concurrency (`max_batch_seqs` is far above it), so the maximum concurrent
sequences measure what the cache holds: MLA over MHA approaches the cache-size ratio, 4096 / 576 =
7.1x in bf16 and 8192 / 656 = 12.5x with int8 latents.

Step time is split with forward hooks: attention projections (the attention block's Linear layers),
attention itself (the rest of the attention block: RoPE, cache writes and reads, scores), MLP, the
scheduler (from the engine), and the rest (embedding, norms, LM head, sampling). A last row runs MLA
with `max_batch_seqs = 32` to give the scheduler's share of a step at 32 running sequences.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter
from rich.table import Table
from torch import nn

from latentattn.model import LanguageModel, Preset
from latentattn.plots import image_path
from latentattn.registry import torch_dtype
from latentattn.serve.engine import Engine, EngineConfig
from latentattn.serve.request import Output
from latentattn.serve.sampling import SamplingParams


@dataclass(frozen=True)
class CapacityConfig:
    """The models (`n_layers`, `d_ff`, `vocab_size` small for speed) and the workload."""

    budget_mib: float = 8.0
    n_layers: int = 2
    d_ff: int = 512
    vocab_size: int = 512
    gqa_kv_heads: int = 4
    dtype: str = "bfloat16"
    block_size: int = 16
    prompt_tokens: int = 24
    output_tokens: int = 8
    requests: int = 200
    max_batch_tokens: int = 2048
    seed: int = 0

    def preset(self) -> Preset:
        return Preset(
            vocab_size=self.vocab_size,
            n_layers=self.n_layers,
            d_model=2048,
            d_ff=self.d_ff,
            n_heads=16,
            head_dim=128,
            n_kv_heads=self.gqa_kv_heads,
            kv_lora_rank=512,
            qk_rope_head_dim=64,
            max_seq_len=max(256, self.prompt_tokens + self.output_tokens),
        )


RUNS = (
    ("MHA", "mha", None, None),
    ("GQA", "gqa", None, None),
    ("MQA", "mqa", None, None),
    ("MLA", "mla", None, None),
    ("MLA int8", "mla", "int8", None),
    ("MLA, 32 seqs", "mla", None, 32),
)
"""(row name, attention kind, latent format, max_batch_seqs cap or None: the budget limits)."""


@dataclass(frozen=True)
class CapacityRow:
    name: str
    bytes_per_token: int
    num_blocks: int
    max_concurrent: int
    preemptions: int
    output_tokens_per_s: float
    ttft_p99_s: float
    seconds: float
    step_ms: float
    """Median step time."""
    split: dict[str, float]
    """Share of all step time: projections, attention, mlp, scheduler, other."""


class _Timers:
    """Seconds spent inside modules, summed by part name, via forward pre-hooks and hooks."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.handles: list = []

    def watch(self, module: nn.Module, part: str) -> None:
        starts: list[float] = []
        self.handles.append(module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())))

        def stop(*_: object) -> None:
            self.seconds[part] += time.perf_counter() - starts.pop()

        self.handles.append(module.register_forward_hook(stop))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def _timed(model: LanguageModel) -> Iterator[_Timers]:
    timers = _Timers()
    for block in model.blocks:
        timers.watch(block.attn, "attention block")
        timers.watch(block.mlp, "mlp")
        for module in block.attn.modules():
            if isinstance(module, nn.Linear):
                timers.watch(module, "projections")
    try:
        yield timers
    finally:
        timers.remove()


def run_one(
    config: CapacityConfig, name: str, kind: str, latent_format: str | None, max_seqs: int | None
) -> CapacityRow:
    """Serve the workload through one model at the budget; the figures of the run."""
    torch.manual_seed(config.seed)
    model = LanguageModel(config.preset().model(kind), dtype=torch_dtype(config.dtype)).eval()
    cache = model.new_paged_cache(
        budget_bytes=int(config.budget_mib * 2**20), block_size=config.block_size, latent_format=latent_format
    )
    engine_config = EngineConfig(
        max_batch_seqs=max_seqs or 4096,
        max_batch_tokens=config.max_batch_tokens,
        max_queue=config.requests,
        prefix_caching=False,  # random prompts share nothing; keep the blocks the requests' own
    )
    engine = Engine(model, cache, engine_config)
    engine.warm_up()
    generator = torch.Generator().manual_seed(config.seed)
    first_token: dict[int, float] = {}

    def sink_for(i: int) -> Callable[[Output], None]:
        def sink(output: Output) -> None:
            if output.token_ids and i not in first_token:
                first_token[i] = time.perf_counter()

        return sink

    params = SamplingParams(max_tokens=config.output_tokens, temperature=0)
    start = time.perf_counter()
    for i in range(config.requests):
        prompt = torch.randint(0, config.vocab_size, (config.prompt_tokens,), generator=generator).tolist()
        engine.submit(prompt, params, sink_for(i))
    steps = []
    with _timed(model) as timers:
        while engine.busy:
            before = engine.stats.step_seconds
            engine.step()
            steps.append(engine.stats.step_seconds - before)
    seconds = time.perf_counter() - start
    stats = engine.stats
    parts = dict(timers.seconds)
    attention = parts.pop("attention block", 0.0) - parts.get("projections", 0.0)
    total = stats.step_seconds
    split = {
        "projections": parts.get("projections", 0.0),
        "attention": attention,
        "mlp": parts.get("mlp", 0.0),
        "scheduler": stats.scheduler_seconds,
    }
    split["other"] = max(0.0, total - sum(split.values()))
    return CapacityRow(
        name=name,
        bytes_per_token=cache.bytes_per_token,
        num_blocks=cache.num_blocks,
        max_concurrent=stats.max_running,
        preemptions=stats.preemptions,
        output_tokens_per_s=stats.generated_tokens / seconds,
        ttft_p99_s=float(np.percentile([t - start for t in first_token.values()], 99)),
        seconds=seconds,
        step_ms=float(np.median(steps)) * 1e3,
        split={part: value / total for part, value in split.items()},
    )


def run_capacity(config: CapacityConfig, progress: Callable[[str], None] = print) -> dict:
    """Every run of `RUNS` on the same workload and budget; rows and the MLA/MHA ratios."""
    rows = []
    for name, kind, latent_format, max_seqs in RUNS:
        progress(f"{name}: {config.requests} requests at {config.budget_mib:g} MiB")
        rows.append(run_one(config, name, kind, latent_format, max_seqs))
    by_name = {row.name: row for row in rows}
    mha = by_name["MHA"]
    ratios = {
        name: {
            "cache_size": mha.bytes_per_token / by_name[name].bytes_per_token,
            "concurrency": by_name[name].max_concurrent / mha.max_concurrent,
            "throughput": by_name[name].output_tokens_per_s / mha.output_tokens_per_s,
        }
        for name in ("MLA", "MLA int8")
    }
    return {"config": asdict(config), "rows": [asdict(row) for row in rows], "ratios_vs_mha": ratios}


def capacity_table(report: dict) -> Table:
    config = report["config"]
    table = Table(
        title=f"{config['requests']} requests of {config['prompt_tokens']} + {config['output_tokens']} "
        f"tokens at {config['budget_mib']:g} MiB of KV cache ({config['dtype']}, {config['n_layers']} layers)"
    )
    columns = ("run", "B/token", "blocks", "max seqs", "preempted", "out tok/s", "TTFT p99 s", "step ms")
    for column in columns:
        table.add_column(column, justify="left" if column == "run" else "right")
    table.add_column("proj / attn / mlp / sched / other", justify="right")
    for row in report["rows"]:
        split = " / ".join(
            f"{100 * row['split'][part]:.0f}%"
            for part in ("projections", "attention", "mlp", "scheduler", "other")
        )
        table.add_row(
            row["name"],
            f"{row['bytes_per_token']:,}",
            f"{row['num_blocks']:,}",
            str(row["max_concurrent"]),
            str(row["preemptions"]),
            f"{row['output_tokens_per_s']:.1f}",
            f"{row['ttft_p99_s']:.2f}",
            f"{row['step_ms']:.1f}",
            split,
        )
    ratios = report["ratios_vs_mha"]
    table.caption = (
        "; ".join(
            f"{name}/MHA: cache {r['cache_size']:.2f}x smaller, {r['concurrency']:.2f}x sequences, "
            f"{r['throughput']:.2f}x output tokens/s"
            for name, r in ratios.items()
        )
        + f"; scheduler at 32 running: {100 * report['rows'][-1]['split']['scheduler']:.2f}% of step time"
    )
    return table


def plot_capacity(report: dict, path: str | Path) -> Path:
    """Left: max concurrent sequences per run (bars); right: output tokens/s against them."""
    rows = [row for row in report["rows"] if row["name"] in dict.fromkeys(name for name, *_ in RUNS[:-1])]
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    names = [row["name"] for row in rows]
    bars = left.bar(names, [row["max_concurrent"] for row in rows], color="tab:blue")
    left.bar_label(bars)
    left.set_ylabel("max concurrent sequences")
    left.set_title(f"same KV budget: {report['config']['budget_mib']:g} MiB")
    for row in rows:
        right.scatter(row["max_concurrent"], row["output_tokens_per_s"])
        right.annotate(
            row["name"],
            (row["max_concurrent"], row["output_tokens_per_s"]),
            xytext=(4, 4),
            textcoords="offset points",
        )
    right.set_xlabel("max concurrent sequences")
    right.set_ylabel("output tokens/s")
    right.set_xscale("log")
    right.xaxis.set_major_formatter(ScalarFormatter())
    right.xaxis.set_minor_formatter(NullFormatter())
    right.set_title("throughput vs concurrency")
    path = image_path(path)
    figure.savefig(path, dpi=120)
    return path
