"""Figures for the calculator, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from latentattn.calculator import CacheEstimate, Comparison, format_bytes

GIB = 2**30
IMAGE_FORMATS = tuple(sorted(FigureCanvasAgg.get_supported_filetypes()))
"""File suffixes (without the dot) that the Agg canvas writes: png, svg, pdf, …"""
_LINESTYLES = ("-", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_MARKER_EVERY = 8


def image_path(path: str | Path) -> Path:
    """`path` if it ends in an image suffix (IMAGE_FORMATS), else a ValueError: matplotlib would save
    'foo' as 'foo.png', a file other than the one named."""
    path = Path(path)
    if path.suffix[1:].lower() not in IMAGE_FORMATS:
        found = f"the suffix {path.suffix!r}" if path.suffix else "no suffix"
        suffixes = ", ".join(f".{name}" for name in IMAGE_FORMATS)
        raise ValueError(f"plot file {str(path)!r} has {found}; end it in an image suffix: {suffixes}")
    return path


def _save(figure: Figure, path: str | Path) -> Path:
    """Write `figure` to `path` in the format its suffix names; the path written."""
    path = image_path(path)
    figure.savefig(path, dpi=120)
    return path


def _tokens(value: float, _position: int) -> str:
    """Tick label for a context length: 512, 4K, 128K, 1M (binary K and M)."""
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if value >= size:
            return f"{value / size:g}{unit}"
    return f"{value:g}"


def cache_vs_context_figure(comparison: Comparison) -> Figure:
    """Cache size (GiB, whole batch) against context length (tokens) on log-log axes, one line per
    model, the baseline dashed, the chosen context as a dotted vertical line and the budget, if any,
    as a horizontal line. Each model has its own line style and marker, markers staggered, so lines
    that nearly coincide (deepseek-v2 and -v3 differ by one layer in 61) stay distinguishable."""
    base = comparison.baseline
    top = max(2**20, 4 * base.context)
    contexts = np.geomspace(min(2**10, base.context), top, num=64)  # tokens per sequence
    figure = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()

    def draw(row: CacheEstimate, prefix: str = "", **style: object) -> None:
        gib = contexts * (row.cache_bytes / row.context) / GIB  # cache_bytes is linear in context
        label = f"{prefix}{row.model.name} ({row.model.kind}, {row.storage})"
        axes.plot(contexts, gib, label=label, **style)

    for index, row in enumerate(comparison.rows):
        draw(
            row,
            linewidth=2,
            linestyle=_LINESTYLES[index % len(_LINESTYLES)],
            marker=_MARKERS[index % len(_MARKERS)],
            markevery=(index * 3 % _MARKER_EVERY, _MARKER_EVERY),  # (first point, stride): no stacking
        )
    draw(base, "baseline: ", color="grey", linestyle="--", linewidth=1.5)
    axes.axvline(base.context, color="black", linestyle=":", linewidth=1, label=f"context {base.context:,}")
    if base.budget_bytes is not None:
        axes.axhline(
            base.budget_bytes / GIB,
            color="red",
            linewidth=1,
            label=f"budget {format_bytes(base.budget_bytes)}",
        )
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.xaxis.set_major_formatter(FuncFormatter(_tokens))
    axes.set_xlabel("context length per sequence (tokens)")
    axes.set_ylabel(f"KV cache for batch {base.batch} (GiB)")
    axes.set_title(f"KV cache vs context; baseline {base.model.name} at {base.bits} bits")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def plot_cache_vs_context(comparison: Comparison, path: str | Path) -> Path:
    """Write `cache_vs_context_figure` to `path` (an image suffix, see `image_path`); the path."""
    return _save(cache_vs_context_figure(comparison), path)


def plot_decode_latency(report: dict, path: str | Path) -> Path:
    """`latentattn bench`: ms per decode step against context, one line per implementation, one panel
    per dtype (the first batch size), with each point's roofline bound as a dotted line for MLA-absorbed.
    `path` must end in an image suffix (see `image_path`); returns it."""
    results = report["results"]
    dtypes = list(dict.fromkeys(row["dtype"] for row in results))
    batch = results[0]["batch"]
    figure = Figure(figsize=(6 * len(dtypes), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    for index, dtype in enumerate(dtypes):
        axes = figure.add_subplot(1, len(dtypes), index + 1)
        rows = [row for row in results if row["dtype"] == dtype and row["batch"] == batch]
        for impl in dict.fromkeys(row["impl"] for row in rows):
            points = [row for row in rows if row["impl"] == impl]
            contexts = [row["context"] for row in points]
            axes.plot(contexts, [row["ms_per_step"] for row in points], marker="o", label=impl)
            if impl == "mla-absorbed":
                bound = [row["roofline_ms"] for row in points]
                axes.plot(contexts, bound, linestyle=":", color="black", label="mla-absorbed roofline")
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.xaxis.set_major_formatter(FuncFormatter(_tokens))
        axes.set_xlabel("context (tokens)")
        axes.set_ylabel("ms per decode step (median)")
        axes.set_title(f"{dtype}, batch {batch}")
        axes.grid(True, which="major", alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(
        f"Decode step latency on {report['machine']['cpu']}, {report['machine']['torch_threads']} threads"
    )
    return _save(figure, path)
