"""The study's report folder: `report.md` (tables and findings read off the numbers) and PNG plots,
from the `results` dictionary `latentattn.study.run_study` also writes to `results.json`."""

from __future__ import annotations

import statistics
from importlib import resources
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from latentattn import calculator as calc
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
    """`report.md` (the `templates/study_report.md` template filled in) and the PNG plots in `out`."""
    plot_loss_vs_cache(results, out / PLOTS[0])
    plot_loss_curves(results, out / PLOTS[1])
    plot_decode(results, out / PLOTS[2])
    template = resources.files("latentattn").joinpath("templates/study_report.md").read_text()
    path = out / "report.md"
    path.write_text(template.format_map({**_setup_fields(results), **_tables(results)}))
    return path


def _setup_fields(results: dict[str, Any]) -> dict[str, Any]:
    """The template's figures: the run's settings and environment, and the DeepSeek-V2 yardsticks
    computed by the calculator."""
    config, env, variants = results["config"], results["environment"], results["variants"]
    v2_mha = calc.resolve_model(calc.DEFAULT_BASELINE)
    v2 = calc.resolve_model("deepseek-v2")
    target = config["convert_target"]
    return {
        "preset": config["name"],
        "minutes": f"{results['seconds'] / 60:.1f}",
        **{name: env[name] for name in ("cpu", "torch_threads", "torch", "git_commit", "logical_cpus")},
        **{
            name: config[name]
            for name in (
                *("model_preset", "n_heads", "head_dim", "match_params", "steps", "batch_size", "context"),
                *("lr", "warmup", "seeds", "decode_batch", "timing_repeats", "heal_steps", "heal_lr"),
                "calibration_windows",
            )
        },
        "tokens": f"{config['steps'] * config['batch_size'] * config['context']:,}",
        "eval_windows": config["eval_batches"] * config["batch_size"],
        "v2_heads": v2_mha.n_heads,
        "v2_head_dim": v2_mha.head_dim,
        "v2_layers": v2_mha.n_layers,
        "v2_mha_bytes": f"{calc.CacheEstimate(v2_mha).bytes_per_token:,}",
        "v2_kv_lora_rank": v2.kv_lora_rank,
        "v2_rope_dim": v2.qk_rope_head_dim,
        "v2_bytes": f"{calc.CacheEstimate(v2).bytes_per_token:,}",
        "n_seeds": len(config["seeds"]),
        "target_kv_lora_rank": target["kv_lora_rank"],
        "target_rope_dim": target["qk_rope_head_dim"],
        "target_name": f"mla-{target['kv_lora_rank']}+{target['qk_rope_head_dim']}",
        "mha_params_m": f"{variants['mha']['params']['total'] / 1e6:.1f}",
        "mha_width": variants["mha"]["cache_elements_per_token_per_layer"],
    }


def _tables(results: dict[str, Any]) -> dict[str, str]:
    """The template's tables (markdown) and findings (a list)."""
    config, variants = results["config"], results["variants"]
    variant_header = [
        *("variant", "cached numbers/token/layer", "cache B/token (bf16)", "vs MHA", "projected to V2 scale"),
        *("params (attention)", "d_ff", "val loss", "perplexity", "train tok/s"),
        f"decode tok/s @ {config['decode_contexts'][-1]:,}",
    ]
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
            *(f"{row[key]:.3f}" for key in ("mha_val_loss", "mha_continued_val_loss")),
            *(f"{row[key]:.3f}" for key in ("converted_val_loss", "healed_val_loss")),
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
    conversion_header = ["method", "seed", "MHA", "MHA fine-tuned alike", "converted", "healed"]
    return {
        "variant_table": _table(variant_header, variant_rows),
        "conversion_table": _table([*conversion_header, "cache B/token (bf16)"], conversion_rows),
        "memory_table": _table(
            ["model", "variant", "saved activations", "ms per step (fwd+bwd+AdamW)"], memory_rows
        ),
        "decode_table": _table(["variant", *(f"{c:,}" for c in config["decode_contexts"])], decode_rows),
        "findings": "\n".join(f"- {finding}." for finding in _findings(results)),
    }
