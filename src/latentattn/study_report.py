"""The study's report folder: `report.md` (tables and findings read off the numbers) and PNG plots,
from the `results` dictionary `latentattn.study.run_study` also writes to `results.json`."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from latentattn.calculator import format_bytes

PLOTS = ("loss_vs_cache.png", "loss_curves.png", "decode_vs_context.png")


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points (cost, loss) that no other point beats on both (≤ both and < one), by cost."""
    front = [
        name
        for name, (cost, loss) in points.items()
        if not any(c <= cost and v <= loss and (c, v) != (cost, loss) for c, v in points.values())
    ]
    return sorted(front, key=lambda name: points[name])


def _figure(width: float = 7.5, height: float = 4.8) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _conversion_means(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per method: mean validation loss right after conversion and after healing, over the seeds."""
    methods = dict.fromkeys(row["method"] for row in results["conversion"])
    return {
        method: {
            key: statistics.fmean(row[key] for row in results["conversion"] if row["method"] == method)
            for key in ("converted_val_loss", "healed_val_loss", "mha_continued_val_loss")
        }
        for method in methods
    }


def plot_loss_vs_cache(results: dict[str, Any], path: Path) -> None:
    """Mean validation loss (error bar: seed std) against bf16 cache bytes per token, trained variants
    with their Pareto frontier, and the healed post-hoc conversions."""
    variants = results["variants"]
    points = {name: (v["cache_bytes_per_token_bf16"], v["val_loss"]["mean"]) for name, v in variants.items()}
    figure = _figure()
    axes = figure.add_subplot()
    for name, v in variants.items():
        cost, loss = points[name]
        color = {"mla": "tab:red", "gqa": "tab:blue"}.get(v["variant"]["kind"], "tab:green")
        axes.errorbar(cost, loss, yerr=v["val_loss"]["std"], fmt="o", color=color, capsize=3)
        axes.annotate(name, (cost, loss), textcoords="offset points", xytext=(5, 4), fontsize="small")
    front = pareto_front(points)
    axes.plot(*zip(*(points[name] for name in front), strict=True), "k--", lw=1, label="Pareto frontier")
    cost = results["conversion"][0]["cache_bytes_per_token_bf16"]
    means = _conversion_means(results)
    for method, mean in means.items():
        axes.plot(cost, mean["healed_val_loss"], "s", mfc="none", ms=9, label=f"MHA→MLA {method}, healed")
    control = next(iter(means.values()))["mha_continued_val_loss"]
    axes.plot(points["mha"][0], control, "D", mfc="none", color="grey", label="MHA fine-tuned alike")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("KV cache per token, all layers (bytes, bf16)")
    axes.set_ylabel("validation loss (nats/token)")
    axes.set_title("Validation loss vs cache size (mean ± std over seeds)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=110)


def plot_loss_curves(results: dict[str, Any], path: Path) -> None:
    """Training loss (seed mean) against step per variant, and the healing runs' curves."""
    figure = _figure(11, 4.5)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for name, v in results["variants"].items():
        curves = [run["curves"]["train"] for run in v["runs"]]
        steps = [step for step, _ in curves[0]]
        mean = [statistics.fmean(curve[i][1] for curve in curves) for i in range(len(steps))]
        left.plot(steps, mean, label=name, lw=1.2, ls="-" if v["variant"]["kind"] == "mla" else "--")
    left.set_xlabel("step")
    left.set_ylabel("training loss (seed mean)")
    left.set_title("Training from scratch")
    for row in results["conversion"]:
        steps, losses = zip(*row["curves"]["train"], strict=True)
        right.plot(steps, losses, label=f"{row['method']} seed {row['seed']}")
        color = right.lines[-1].get_color()
        right.plot(0, row["converted_val_loss"], "x", color=color)
        right.plot(steps[-1], row["healed_val_loss"], "o", mfc="none", color=color)
    control = statistics.fmean(row["mha_continued_val_loss"] for row in results["conversion"])
    right.axhline(control, color="grey", ls=":", label="MHA fine-tuned alike (val)")
    right.set_xlabel("healing step")
    right.set_ylabel("training loss (x: val at conversion, o: val healed)")
    right.set_title("Healing the converted MHA")
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="x-small")
    figure.savefig(path, dpi=110)


def plot_decode(results: dict[str, Any], path: Path) -> None:
    """Decode tokens/s against context per variant (seed-0 weights)."""
    figure = _figure()
    axes = figure.add_subplot()
    for name, v in results["variants"].items():
        rows = v["decode"]
        axes.plot(
            [r["context"] for r in rows],
            [r["tokens_per_s"] for r in rows],
            marker="o",
            label=name,
            ls="-" if v["variant"]["kind"] == "mla" else "--",
        )
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("context (cached tokens per sequence)")
    axes.set_ylabel(f"decode tokens/s (batch {results['config']['decode_batch']})")
    axes.set_title("Decode speed vs context")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=110)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def _pm(summary: dict[str, float], digits: int = 3) -> str:
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def _findings(results: dict[str, Any]) -> list[str]:
    """Statements read off the numbers; a gap counts only when it exceeds twice the larger seed std."""
    variants = results["variants"]
    mha = variants["mha"]
    findings = []

    def compare(name: str) -> str:
        v = variants[name]
        gap = v["val_loss"]["mean"] - mha["val_loss"]["mean"]
        noise = 2 * max(v["val_loss"]["std"], mha["val_loss"]["std"])
        verdict = (
            "within seed noise of" if abs(gap) <= noise else ("worse than" if gap > 0 else "better than")
        )
        factor = v["deepseek_v2_projection"]["factor_vs_mha"]
        return (
            f"`{name}` ({factor:.1f}x smaller cache) is {verdict} MHA: "
            f"Δ val loss {gap:+.3f} (noise ±{noise:.3f})"
        )

    findings += [compare(name) for name in variants if name != "mha"]
    points = {name: (v["cache_bytes_per_token_bf16"], v["val_loss"]["mean"]) for name, v in variants.items()}
    findings.append(
        "Pareto frontier (cache bytes ↑, loss ↓): " + " → ".join(f"`{n}`" for n in pareto_front(points))
    )
    for kind in ("gqa", "mqa"):
        for name, v in variants.items():
            if v["variant"]["kind"] != kind:
                continue
            cheaper = [
                n
                for n, m in variants.items()
                if m["variant"]["kind"] == "mla"
                and m["cache_bytes_per_token_bf16"] <= v["cache_bytes_per_token_bf16"]
                and m["val_loss"]["mean"] < v["val_loss"]["mean"]
            ]
            if cheaper:
                findings.append(
                    f"MLA beats `{name}` at no more cache: {', '.join(f'`{n}`' for n in cheaper)}"
                )
    target = results["config"]["convert_target"]
    target_name = f"mla-{target['kv_lora_rank']}+{target['qk_rope_head_dim']}"
    scratch = variants[target_name]["val_loss"]["mean"]
    for method, means in _conversion_means(results).items():
        findings.append(
            f"MHA → `{target_name}` by {method}: {means['converted_val_loss']:.3f} right after conversion, "
            f"{means['healed_val_loss']:.3f} after {results['config']['heal_steps']} healing steps, vs "
            f"{scratch:.3f} for the same MLA trained from scratch "
            f"({'better' if means['healed_val_loss'] < scratch else 'worse'}) and "
            f"{means['mha_continued_val_loss']:.3f} for the MHA fine-tuned alike (the converted model has "
            "seen the MHA's training steps plus the healing steps)"
        )
    memory = results["training_memory"]
    mha_saved = memory["mha"]["saved_activation_bytes"]
    mla, recompute = memory["mla"], memory["mla-recompute-kv"]
    findings.append(
        f"Training step (batch {memory['mha']['batch']} × {memory['mha']['context']}): MLA keeps "
        f"{mla['saved_activation_bytes'] / mha_saved:.2f}x MHA's activation bytes for backward, "
        f"{recompute['saved_activation_bytes'] / mha_saved:.2f}x with recompute_kv, at "
        f"{recompute['ms_per_step'] / mla['ms_per_step']:.2f}x MLA's step time"
    )
    return findings


def write_report(results: dict[str, Any], out: Path) -> Path:
    """`report.md` and the PNG plots in `out`."""
    plot_loss_vs_cache(results, out / PLOTS[0])
    plot_loss_curves(results, out / PLOTS[1])
    plot_decode(results, out / PLOTS[2])
    config, env, variants = results["config"], results["environment"], results["variants"]
    longest = config["decode_contexts"][-1]
    tokens = config["steps"] * config["batch_size"] * config["context"]
    variant_rows = [
        [
            f"`{name}`",
            f"{v['cache_elements_per_token_per_layer']}",
            f"{v['cache_bytes_per_token_bf16']:,}",
            f"{v['deepseek_v2_projection']['factor_vs_mha']:.1f}x",
            format_bytes(v["deepseek_v2_projection"]["bytes_per_token"]),
            f"{v['params']['total'] / 1e6:.3f}M ({v['params']['attention'] / 1e3:.0f}K)",
            f"{v['d_ff']}",
            _pm(v["val_loss"]),
            _pm(v["val_ppl"], 1),
            f"{v['tokens_per_s']['mean']:,.0f}",
            f"{v['decode'][-1]['tokens_per_s']:,.0f}",
        ]
        for name, v in variants.items()
    ]
    conversion_rows = [
        [
            row["method"],
            str(row["seed"]),
            f"{row['mha_val_loss']:.3f}",
            f"{row['mha_continued_val_loss']:.3f}",
            f"{row['converted_val_loss']:.3f}",
            f"{row['healed_val_loss']:.3f}",
            f"{row['cache_bytes_per_token_bf16']:,}",
        ]
        for row in results["conversion"]
    ]
    memory_rows = [
        [
            name,
            f"`{row['variant']}`",
            format_bytes(row["saved_activation_bytes"]),
            f"{row['ms_per_step']:.0f}",
        ]
        for name, row in results["training_memory"].items()
    ]
    decode_rows = [
        [f"`{name}`", *(f"{r['tokens_per_s']:,.0f}" for r in v["decode"])] for name, v in variants.items()
    ]
    target = config["convert_target"]
    text = f"""# Attention study: MHA vs GQA vs MQA vs MLA, learned vs post-hoc compression

Generated by `latentattn study --preset {config["name"]}` in {results["seconds"] / 60:.1f} minutes on {
        env["cpu"]
    }
({env["torch_threads"]} torch threads, torch {env["torch"]}, commit `{env["git_commit"]}`). Raw numbers:
`results.json`.

## Setup

- Model: preset `{config["model_preset"]}` with {config["n_heads"]} heads of {config["head_dim"]}; every
  variant has the same depth, width, data, schedule, steps and seeds. With `match_params`
  ({config["match_params"]}) each variant's MLP width `d_ff` is adjusted so the total parameter count
  matches MHA's to within one MLP column per layer.
- Training: {config["steps"]} steps × {config["batch_size"]} windows × {config["context"]} tokens =
  {tokens:,} tokens, AdamW lr {config["lr"]} (warmup {config["warmup"]}, cosine), seeds {config["seeds"]}.
  Validation loss on {config["eval_batches"] * config["batch_size"]} fixed windows of the held-out split.
- Cache bytes per token: read from each model's cache object in bf16, all layers. DeepSeek-V2
  projection: the variant's cache relative to MHA with the study's heads (× smaller), applied to MHA over
  DeepSeek-V2's 128 heads × 128 × 60 layers in bf16 (3,932,160 B/token); real DeepSeek-V2 (MLA 512 + 64)
  is 69,120 B/token.
- Decode: seed-0 weights, batch {config["decode_batch"]}, one token per sequence per step over a cache
  pre-filled with random entries (cost does not depend on values); the model is rebuilt with a longer
  max_seq_len for timing only. MLA decodes on its absorbed path. Median of {config["timing_repeats"]}
  steps. Timings share 2 CPU cores with other work: compare within a column, not across reports.

## Variants (mean ± std over {len(config["seeds"])} seeds)

{
        _table(
            [
                "variant",
                "cached numbers/token/layer",
                "cache B/token (bf16)",
                "vs MHA",
                "projected to V2 scale",
                "params (attention)",
                "d_ff",
                "val loss",
                "perplexity",
                "train tok/s",
                f"decode tok/s @ {longest:,}",
            ],
            variant_rows,
        )
    }

![validation loss vs cache](loss_vs_cache.png)

![loss curves](loss_curves.png)

## Learned vs post-hoc compression

Each seed's trained MHA converted to MLA with d_c = {target["kv_lora_rank"]}, d_R = {
        target["qk_rope_head_dim"]
    }
(`mla-{target["kv_lora_rank"]}+{target["qk_rope_head_dim"]}`'s cache) by RoRoPE plus a joint low-rank K/V
factorisation (`latentattn.convert.model_to_mla`), then fine-tuned for {config["heal_steps"]} steps at lr
{config["heal_lr"]}; calibration: {config["calibration_windows"]} training windows. Control: the same MHA
fine-tuned with the same schedule (validation losses below).

{
        _table(
            ["method", "seed", "MHA", "MHA fine-tuned alike", "converted", "healed", "cache B/token (bf16)"],
            conversion_rows,
        )
    }

## Training memory and compute

{_table(["model", "variant", "saved activations", "ms per step (fwd+bwd+AdamW)"], memory_rows)}

## Decode tokens/s vs context

{_table(["variant", *(f"{c:,}" for c in config["decode_contexts"])], decode_rows)}

![decode speed](decode_vs_context.png)

## Findings

Read off the numbers above. A loss gap counts only when it exceeds twice the larger of the two
variants' seed standard deviations — with {
        len(config["seeds"])
    } seeds a rough screen, not a significance test.

{chr(10).join(f"- {finding}." for finding in _findings(results))}

## Caveats

- Tiny models ({variants["mha"]["params"]["total"] / 1e6:.1f}M parameters) trained for minutes: the
  attention's share of parameters and compute is small, contexts are short, and differences between
  variants are of the order of the seed spread. Low-rank K/V matters most when heads are many and wide;
  here MHA's K/V is only {variants["mha"]["cache_elements_per_token_per_layer"]} numbers per layer.
- MLA's decoupled RoPE key is shared by all heads; at head width {config["head_dim"]} its d_R is a large
  fraction of the cache.
- CPU decode at these widths is dominated by per-layer overheads until the cache is large; the absorbed
  path costs more FLOPs per cached token than MHA (2·H·(2C+R) vs 4·H·D) but reads fewer bytes.
"""
    path = out / "report.md"
    path.write_text(text)
    return path
