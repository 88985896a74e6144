"""Measure `latentattn convert`'s options on a trained model: the evidence behind its defaults.

    latentattn train --preset small --attn gqa --steps 200 --out runs/small-gqa
    python docs/convert/measure_options.py runs/small-gqa --out docs/convert

Calibrates once (the built-in corpus, as `latentattn convert` does), converts the model at every cache
size, RoPE width and option combination, and reports the validation loss right after conversion (no
healing) against the source's, with the kv-head merging baseline where its cache sizes allow. Writes
`options.json` and prints a Markdown summary. `--held-out` measures on measure_smollm2's two held-out
texts (Python and English, 512-token windows) instead, the loss being their mean, with each text's
perplexity recorded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from dataclasses import fields
from pathlib import Path

import torch

from latentattn.checkpoint import load_checkpoint
from latentattn.convert import ConversionConfig, layer_input_moments, merge_kv_heads, model_to_mla
from latentattn.convert.calibration import calibration_windows
from latentattn.convert.checkpoint import CALIBRATION_WINDOW
from latentattn.evaluate import validation_tokens, window_length, window_loss, windows

OPTIONS = {
    "method": ("svd", "pca"),
    "rope_frequencies": ("highest", "score"),
    "rope_residual": ("drop", "nope"),
    "balance_kv": (False, True),
    "kv_objective": ("activations", "attention"),
    "key_weight": (1.0, 0.25, 4.0),
    "value_metric": ("group", "heads"),
    "refit": ("attention", "none"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="the model to convert (not with --summary-of)")
    parser.add_argument("--out", type=Path, help="where options.json goes")
    parser.add_argument("--caches", type=int, nargs="+", default=[144, 96, 64, 48], help="C + R per layer")
    parser.add_argument("--rope-dims", type=int, nargs="+", default=[8, 16, 24, 48])
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--windows", type=int, default=32, help="validation windows")
    parser.add_argument(
        "--calibration-sweep",
        type=int,
        nargs="*",
        default=[1024, 4096, 32768],
        help="also convert with the defaults at each cache size's best R on this many calibration tokens",
    )
    parser.add_argument(
        "--vary",
        choices=("all", "one"),
        default="all",
        help="every option combination, or the defaults and each option changed alone",
    )
    parser.add_argument(
        "--held-out", action="store_true", help="measure on measure_smollm2's Python and English texts"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--summary-of", type=Path, metavar="JSON", help="print an options.json's summary, no run"
    )
    args = parser.parse_args()
    if args.summary_of:
        print(summary(json.loads(args.summary_of.read_text())))
        return
    if args.checkpoint is None or args.out is None:
        parser.error("a run needs the checkpoint to convert and --out")
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    loaded = load_checkpoint(args.checkpoint)
    model, context = loaded.model, window_length(loaded)
    if args.held_out:
        from measure_smollm2 import held_out_texts  # this script's folder is on sys.path

        texts = held_out_texts(loaded.tokenizer, args.windows)
    else:
        texts = {"validation": windows(validation_tokens(loaded), context, args.windows)}

    def measure(candidate: torch.nn.Module) -> dict:
        """`candidate`'s loss (the mean over the texts) and each text's perplexity."""
        losses = {
            text: window_loss(candidate, rows, cache_format="none", chunk=context)[0]
            for text, rows in texts.items()
        }
        perplexity = {text: math.exp(value) for text, value in losses.items()}
        return {"val_loss": statistics.fmean(losses.values()), "perplexity": perplexity}

    tokens = calibration_windows(
        loaded.tokenizer, n_tokens=args.calibration_tokens, window=min(CALIBRATION_WINDOW, context)
    )
    moments = layer_input_moments(model, tokens)
    source = loaded.config.attention
    results = {
        "checkpoint": str(loaded.directory),
        "source": {"kind": source.kind, "cache_width": source.cache_width, **measure(model)},
        "calibration_tokens": tokens.numel(),
        "validation_tokens": {text: rows[:, 1:].numel() for text, rows in texts.items()},
        "conversions": [],
        "merges": [],
    }
    for kv_heads in range(1, source.n_kv_heads):
        if source.n_kv_heads % kv_heads == 0:
            merged = merge_kv_heads(model, kv_heads)
            cache_width = merged.config.attention.cache_width
            results["merges"].append({"kv_heads": kv_heads, "cache_width": cache_width, **measure(merged)})
    for cache, qk_rope_head_dim in itertools.product(args.caches, args.rope_dims):
        if cache - qk_rope_head_dim <= 0:
            continue
        for options in option_sets(args.vary):
            config = ConversionConfig(
                kv_lora_rank=cache - qk_rope_head_dim, qk_rope_head_dim=qk_rope_head_dim, **options
            )
            try:
                converted = model_to_mla(model, config, tokens, moments=moments).eval()
            except ValueError as error:
                print(f"skip C {cache - qk_rope_head_dim} R {qk_rope_head_dim} {options}: {error}")
                continue
            results["conversions"].append(
                {
                    "cache_width": cache,
                    "qk_rope_head_dim": qk_rope_head_dim,
                    **options,
                    **measure(converted),
                }
            )
        print(f"cache {cache}, R {qk_rope_head_dim}: {time.perf_counter() - started:.0f} s", flush=True)
    chosen = option_sets("one")[0]
    results["defaults"] = chosen
    results["calibration_sweep"] = []
    for count in args.calibration_sweep:
        swept_tokens = calibration_windows(
            loaded.tokenizer, n_tokens=count, window=min(CALIBRATION_WINDOW, context)
        )
        swept = layer_input_moments(model, swept_tokens)
        for cache in args.caches:
            rows_at = [
                r
                for r in results["conversions"]
                if r["cache_width"] == cache and all(r[k] == v for k, v in chosen.items())
            ]
            if not rows_at:
                continue
            qk_rope_head_dim = min(rows_at, key=lambda r: r["val_loss"])["qk_rope_head_dim"]
            config = ConversionConfig(
                kv_lora_rank=cache - qk_rope_head_dim, qk_rope_head_dim=qk_rope_head_dim
            )
            results["calibration_sweep"].append(
                {
                    "calibration_tokens": count,
                    "cache_width": cache,
                    "qk_rope_head_dim": qk_rope_head_dim,
                    **measure(model_to_mla(model, config, swept_tokens, moments=swept)),
                }
            )
        print(f"calibration {count}: {time.perf_counter() - started:.0f} s", flush=True)
    results["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "options.json").write_text(json.dumps(results, indent=1) + "\n")
    print(summary(results))


def option_sets(vary: str) -> list[dict]:
    """Every combination of `OPTIONS` ("all"), or the defaults and each option changed alone ("one");
    without the combinations that repeat another: balance_kv is read by the activation objective only,
    key_weight and value_metric by the attention objective or the refit only (the other keeps its
    default)."""
    defaults = {field.name: field.default for field in fields(ConversionConfig) if field.name in OPTIONS}
    if vary == "all":
        sets = [dict(zip(OPTIONS, values, strict=True)) for values in itertools.product(*OPTIONS.values())]
    else:
        changed = [{**defaults, name: value} for name, values in OPTIONS.items() for value in values]
        sets = [defaults, *(options for options in changed if options != defaults)]

    def repeats_another(options: dict) -> bool:
        """Whether an option the conversion does not read is set away from its default."""
        unread = {"balance_kv"} if options["kv_objective"] == "attention" else set()
        if options["kv_objective"] == "activations" and options["refit"] == "none":
            unread |= {"key_weight", "value_metric"}
        return any(options[name] != defaults[name] for name in unread)

    return [o for o in sets if not repeats_another(o)]


def summary(results: dict) -> str:
    """Markdown: the loss added by conversion, averaged per option value; the best per cache size."""
    base = results["source"]["val_loss"]
    rows = results["conversions"]
    lines = [
        f"source {results['source']['kind']}: {results['source']['cache_width']} values per layer, "
        f"val loss {base:.3f} ({', '.join(f'{t} {n:,}' for t, n in results['validation_tokens'].items())} "
        "tokens); "
        f"calibration {results['calibration_tokens']:,} tokens",
        "",
        "Each option value against the same conversion with another value of that option (everything",
        "else equal): the conversions so paired, their mean loss added, and how often the value wins.",
        "",
        "| option | value | pairs | mean loss added | wins |",
        "|---|---|---|---|---|",
    ]
    for name, values in OPTIONS.items():
        for value in values:
            pairs = [
                (r, twin)
                for r in rows
                if r[name] == value
                for twin in rows
                if twin[name] != value
                and all(twin[k] == r[k] for k in r if k not in (name, "val_loss", "perplexity"))
            ]
            if not pairs:
                continue
            mean = statistics.fmean(r["val_loss"] - base for r, _ in pairs)
            wins = sum(r["val_loss"] < twin["val_loss"] for r, twin in pairs)
            lines.append(f"| {name} | {value} | {len(pairs)} | {mean:+.3f} | {wins} |")
    lines += [
        "",
        "| cache (C + R) | best R | best options | loss added | perplexity | merge baseline |",
        "|---|---|---|---|---|---|",
    ]
    merges = {m["cache_width"]: m["val_loss"] - base for m in results["merges"]}
    for cache in sorted({r["cache_width"] for r in rows}, reverse=True):
        best = min((r for r in rows if r["cache_width"] == cache), key=lambda r: r["val_loss"])
        options = ", ".join(f"{k}={best[k]}" for k in OPTIONS)
        merge = f"{merges[cache]:+.3f}" if cache in merges else "—"
        lines.append(
            f"| {cache} | {best['qk_rope_head_dim']} | {options} | {best['val_loss'] - base:+.3f} | "
            f"{perplexities(best, results['source'])} | {merge} |"
        )
    lines += ["", *one_at_a_time(results)]
    sweep = results["calibration_sweep"]
    if sweep:
        counts = sorted({r["calibration_tokens"] for r in sweep} | {results["calibration_tokens"]})
        lines += ["", "Defaults at each cache size's best R, by calibration tokens (loss added):", ""]
        lines += [
            "| cache (C + R) | R | " + " | ".join(f"{c:,}" for c in counts) + " |",
            "|---" * (len(counts) + 2) + "|",
        ]
        for cache in sorted({r["cache_width"] for r in sweep}, reverse=True):
            at = {r["calibration_tokens"]: r for r in sweep if r["cache_width"] == cache}
            qk_rope_head_dim = next(iter(at.values()))["qk_rope_head_dim"]
            main_row = next(
                r
                for r in rows
                if r["cache_width"] == cache
                and r["qk_rope_head_dim"] == qk_rope_head_dim
                and all(r[k] == v for k, v in results["defaults"].items())
            )
            at[results["calibration_tokens"]] = main_row
            lines.append(
                f"| {cache} | {qk_rope_head_dim} | "
                + " | ".join(f"{at[c]['val_loss'] - base:+.3f}" for c in counts)
                + " |"
            )
    return "\n".join(lines)


def one_at_a_time(results: dict) -> list[str]:
    """Markdown: per cache size and R, the defaults and each option changed alone (each text's
    perplexity; "—" where a conversion was not possible)."""
    defaults = results["defaults"]
    changes = [{}] + [{name: value} for name, values in OPTIONS.items() for value in values]
    by_setting = {
        (r["cache_width"], r["qk_rope_head_dim"], *(r[k] for k in OPTIONS)): r for r in results["conversions"]
    }
    settings = sorted(
        {(r["cache_width"], r["qk_rope_head_dim"]) for r in by_setting.values()}, key=lambda k: (-k[0], k[1])
    )
    columns = {}  # label: the cells of each setting
    for change in changes:
        if change and not change.items() - defaults.items():
            continue
        rows = [
            by_setting.get((*setting, *({**defaults, **change}[k] for k in OPTIONS))) for setting in settings
        ]
        if any(rows):
            label = "defaults" if not change else ", ".join(f"{k}={v}" for k, v in change.items())
            columns[label] = [
                "—" if row is None else " / ".join(f"{p:.2f}" for p in row["perplexity"].values())
                for row in rows
            ]
    texts = " / ".join(results["source"]["perplexity"])
    lines = [
        f"The defaults and each option changed alone ({texts} perplexity):",
        "",
        "| cache | R | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for index, (cache, rope) in enumerate(settings):
        lines.append(f"| {cache} | {rope} | " + " | ".join(cells[index] for cells in columns.values()) + " |")
    return lines


def perplexities(row: dict, source: dict) -> str:
    """Each text's perplexity in `row`, with its change relative to the source's."""
    return ", ".join(
        f"{text} {value:.2f} ({value / source['perplexity'][text] - 1:+.0%})"
        for text, value in row["perplexity"].items()
    )


if __name__ == "__main__":
    main()
