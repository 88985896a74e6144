"""`latentattn study`: MHA vs GQA vs MQA vs MLA, and learned vs post-hoc compression, measured.

Every variant trains with the same depth, width, data, steps, schedule and seeds; only the attention
(and, with `match_params`, the MLP width d_ff that keeps the total parameter count equal to MHA's)
differ. Per variant and seed: validation loss and perplexity, KV-cache bytes per token (from the cache
object), parameters and training tokens/s; per variant: decode tokens/s at long contexts. Then the
trained MHA models are converted post hoc to MLA of a trained MLA's cache width (`convert.model_to_mla`,
SVD and PCA) and healed by a short fine-tune; and one training step is measured for MHA, MLA and MLA
with `recompute_kv` (saved activation bytes and time).

Notation: H query heads, D head width, G kv heads, C = d_c latent width, R = d_R RoPE key width.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from latentattn import calculator as calc
from latentattn import run_dir
from latentattn.attention import build_attention
from latentattn.bench import machine_info, time_ms
from latentattn.caches import ModelCache
from latentattn.checkpoint import load_checkpoint, save_checkpoint, write_text_atomically
from latentattn.config import AttentionConfig, AttentionKind, MLAConfig
from latentattn.convert import ConversionConfig, Method, model_to_mla
from latentattn.data import Corpus, load_corpus
from latentattn.model import LanguageModel, get_preset
from latentattn.profiling import saved_activation_bytes
from latentattn.registry import ATTENTION_KINDS, lookup
from latentattn.train import (
    SHAPE_OVERRIDES,
    TrainConfig,
    TrainResult,
    batch_at,
    evaluate,
    next_token_loss,
    train,
)

METHODS: tuple[Method, ...] = ("svd", "pca")
V2_BASELINE = calc.DEFAULT_BASELINE
"""The projection's reference: MHA over DeepSeek-V2's 128 heads of 128 and 60 layers, in bf16."""
JOURNAL = "journal.json"
"""A study's settings and the results of its finished parts; a rerun with the same --out continues."""


_VARIANT_FIELDS = ("n_kv_heads", "kv_lora_rank", "qk_rope_head_dim")


@dataclass(frozen=True)
class Variant:
    """One attention variant: `kind` with G = `n_kv_heads` (gqa) or C = `kv_lora_rank`, R =
    `qk_rope_head_dim` (mla): the shape fields its cache is sized by (`registry.ATTENTION_KINDS`) that the
    preset does not fix; unused fields stay None."""

    kind: AttentionKind
    n_kv_heads: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None

    def __post_init__(self) -> None:
        wanted = lookup(ATTENTION_KINDS, self.kind, "attention kind").cache_fields
        for name in _VARIANT_FIELDS:
            value = getattr(self, name)
            if (value is None) == (name in wanted):
                need = "needs" if name in wanted else "takes no"
                raise ValueError(f"Variant {self.kind} {need} {name}, got {value!r}")
            if value is not None and value <= 0:
                raise ValueError(f"Variant.{name} must be positive, got {value!r}")

    @property
    def name(self) -> str:
        """`mha`, `gqa-2`, `mqa`, `mla-64+16` (C + R)."""
        if self.kind == "gqa":
            return f"gqa-{self.n_kv_heads}"
        if self.kind == "mla":
            return f"mla-{self.kv_lora_rank}+{self.qk_rope_head_dim}"
        return self.kind

    def overrides(self) -> dict[str, int]:
        """`TrainConfig` shape overrides selecting this variant."""
        return {name: getattr(self, name) for name in _VARIANT_FIELDS if getattr(self, name) is not None}


@dataclass(frozen=True)
class StudyConfig:
    """One study. The model is `model_preset` with `n_heads` × `head_dim` attention; every run trains
    `steps` steps of `batch_size` windows of `context` tokens, evaluated on `eval_batches · batch_size`
    fixed validation windows."""

    out: str
    """Study folder: report.md, plots, results.json, journal.json; the training runs in out/runs."""
    variants: tuple[Variant, ...]
    convert_target: Variant
    """The trained MLA variant whose C and R the post-hoc conversions of MHA use (equal cache bytes)."""
    name: str = "custom"
    """The study preset this config came from (for the report)."""
    model_preset: str = "small"
    """Model preset whose depth, width d and vocabulary every variant shares."""
    n_heads: int = 6
    """Query heads H of every variant."""
    head_dim: int = 32
    """Width D of each head of every variant."""
    seeds: tuple[int, ...] = (0, 1)
    """Training seeds: every variant trains once per seed."""
    steps: int = 300
    """Training steps per run."""
    batch_size: int = 16
    """Windows per training step."""
    context: int = 128
    """Tokens per window."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup: int = 30
    """Steps of linear warmup."""
    eval_batches: int = 16
    """Validation batches of batch_size windows."""
    match_params: bool = True
    """Widen or narrow each variant's MLP so its parameter count matches MHA's."""
    heal_steps: int = 60
    """Fine-tuning steps after the post-hoc conversion (and for the MHA control)."""
    heal_lr: float = 1e-3
    """Peak learning rate of the healing fine-tune."""
    calibration_windows: int = 32
    """Training windows whose activations calibrate the PCA conversion."""
    decode_contexts: tuple[int, ...] = (256, 1024, 4096, 16384)
    """Cached tokens at which decode speed is measured."""
    decode_batch: int = 4
    """Sequences per measured decode step."""
    timing_repeats: int = 5
    """Timed repeats per speed measurement (the median is reported)."""
    memory_batch: int = 8
    """Windows of the training step whose memory is measured."""
    data: tuple[str, ...] = ()
    """Text files or folders (default: the standard library's source)."""
    cache_dir: str | None = None
    """Tokenizer and token-id cache (default: $XDG_CACHE_HOME/latentattn or ~/.cache/latentattn)."""

    def __post_init__(self) -> None:
        for name in ("n_heads", "head_dim", "steps", "batch_size", "context", "eval_batches", "heal_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StudyConfig.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("calibration_windows", "decode_batch", "timing_repeats", "memory_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StudyConfig.{name} must be positive, got {getattr(self, name)!r}")
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"StudyConfig.seeds must be distinct and non-empty, got {self.seeds!r}")
        if not self.decode_contexts or min(self.decode_contexts) <= 0:
            raise ValueError(f"StudyConfig.decode_contexts must be positive, got {self.decode_contexts!r}")
        names = [variant.name for variant in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"StudyConfig.variants must be distinct, got {names}")
        if (
            "mha" not in names
            or self.convert_target.kind != "mla"
            or self.convert_target not in self.variants
        ):
            raise ValueError("StudyConfig.variants need mha and convert_target, an mla variant among them")
        for variant in self.variants:
            self.train_config(variant, seed=self.seeds[0])  # invalid shapes raise here

    def train_config(self, variant: Variant, *, seed: int, d_ff: int | None = None) -> TrainConfig:
        """The training run of `variant` with `seed` (`d_ff`: the MLP width, default the preset's)."""
        return TrainConfig(
            out=str(Path(self.out) / "runs" / variant.name / f"seed-{seed}"),
            preset=self.model_preset,
            attn=variant.kind,
            data=self.data,
            steps=self.steps,
            batch_size=self.batch_size,
            context=self.context,
            lr=self.lr,
            warmup=self.warmup,
            seed=seed,
            eval_every=max(1, self.steps // 5),
            eval_batches=self.eval_batches,
            checkpoint_every=self.steps,
            log_every=max(1, self.steps // 50),
            cache_dir=self.cache_dir,
            n_heads=self.n_heads,
            head_dim=self.head_dim,
            d_ff=d_ff,
            **variant.overrides(),
        )


def _preset(
    name: str,
    out: str,
    *,
    head_dim: int,
    gqa_groups: tuple[int, ...],
    latents: tuple[int, ...],
    **fields: Any,
) -> StudyConfig:
    """Variants MHA, GQA at `gqa_groups`, MQA, MLA at each C in `latents` with R = D/2, and the middle
    C with R = D/4; the conversion target is the middle C with R = D/2."""
    middle = Variant("mla", kv_lora_rank=latents[len(latents) // 2], qk_rope_head_dim=head_dim // 2)
    variants = (
        Variant("mha"),
        *(Variant("gqa", n_kv_heads=g) for g in gqa_groups),
        Variant("mqa"),
        *(Variant("mla", kv_lora_rank=c, qk_rope_head_dim=head_dim // 2) for c in latents),
        replace(middle, qk_rope_head_dim=head_dim // 4),
    )
    return StudyConfig(
        out=out, variants=variants, convert_target=middle, name=name, head_dim=head_dim, **fields
    )


STUDY_PRESETS: MappingProxyType[str, Callable[[str], StudyConfig]] = MappingProxyType(
    {
        # The test suite's: the `debug` model (d 64, 2 layers) on whatever corpus the test passes.
        "smoke": lambda out: _preset(
            "smoke",
            out,
            model_preset="debug",
            n_heads=4,
            head_dim=16,
            gqa_groups=(2,),
            latents=(8, 16, 32),
            steps=6,
            batch_size=4,
            context=32,
            warmup=2,
            eval_batches=2,
            heal_steps=2,
            calibration_windows=4,
            decode_contexts=(16, 48),
            decode_batch=2,
            timing_repeats=2,
            memory_batch=2,
        ),
        # Sized to finish within 15 minutes on 2 CPU cores (README): the `small` model, 6 heads of 32.
        "quick": lambda out: _preset(
            "quick",
            out,
            head_dim=32,
            gqa_groups=(3, 2),
            latents=(32, 64, 128),
            steps=100,
            batch_size=8,
            context=128,
            warmup=10,
            eval_batches=8,
            heal_steps=25,
            calibration_windows=16,
            decode_contexts=(256, 2048, 8192),
            timing_repeats=3,
        ),
        # The committed report (docs/study/, its run time there): quick with 2x the steps and batch.
        "full": lambda out: _preset(
            "full",
            out,
            head_dim=32,
            gqa_groups=(3, 2),
            latents=(32, 64, 128),
            steps=200,
            batch_size=16,
            context=128,
            warmup=30,
            eval_batches=16,
            heal_steps=60,
            calibration_windows=32,
        ),
    }
)


def study_preset(name: str, out: str) -> StudyConfig:
    """The study preset called exactly `name`, writing to `out`."""
    return lookup(STUDY_PRESETS, name, "study preset")(out)


def _attention_params(config: AttentionConfig) -> int:
    return sum(p.numel() for p in build_attention(config, device="meta").parameters())


def matched_d_ff(config: StudyConfig) -> dict[str, int]:
    """MLP width per variant that brings its parameter total to MHA's (the preset's d_ff for MHA):
    d_ff + round(Δ attention parameters per layer / 3d), SwiGLU having 3·d·d_ff weights per layer."""
    base = config.train_config(config.variants[0], seed=config.seeds[0]).model_preset()
    widths = {}
    for variant in config.variants:
        preset = config.train_config(variant, seed=config.seeds[0]).model_preset()
        delta = _attention_params(base.attention("mha")) - _attention_params(preset.attention(variant.kind))
        widths[variant.name] = base.d_ff + (round(delta / (3 * base.d_model)) if config.match_params else 0)
    return widths


def _log_curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """`train`: [[step, loss], …] and `val`: [[step, val_loss], …] from a run's log.jsonl."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {
        "train": [[r["step"], r["loss"]] for r in records if "loss" in r],
        "val": [[r["step"], r["val_loss"]] for r in records if "val_loss" in r],
    }


def cache_bytes_per_token(model_config: Any, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one token occupies in the model's cache over all layers, read from a cache object of
    `dtype` built on the meta device (no memory)."""
    return LanguageModel(model_config, device="meta", dtype=dtype).new_cache(1, 1).bytes_per_token


def v2_projection(attention: AttentionConfig, mha: AttentionConfig, n_layers: int) -> dict[str, float]:
    """This variant's cache relative to MHA at the study's heads (`factor`: how many times smaller),
    applied to MHA over DeepSeek-V2's heads and layers (`bytes_per_token` in bf16)."""
    rows = calc.compare(
        [calc.ModelSpec.from_attention(attention, n_layers, "variant")],
        baseline=calc.ModelSpec.from_attention(mha, n_layers, "mha"),
    )
    factor = rows.factor(rows.rows[0])
    v2 = calc.CacheEstimate(calc.resolve_model(V2_BASELINE)).bytes_per_token
    return {"factor_vs_mha": factor, "v2_mha_bytes_per_token": v2, "bytes_per_token": v2 / factor}


def _fill(cache: ModelCache, n_tokens: int) -> None:
    """Append `n_tokens` random entries to every layer (decode cost does not depend on the values)."""
    with cache.stepping(n_tokens) as step:
        for layer in cache.layers:  # LatentCache.update(latent) or KVCache.update(k, v)
            shapes = [(cache.batch_size, n_tokens, *shape) for shape in layer.inputs.values()]
            layer.update(*(torch.randn(shape, dtype=layer.dtype) for shape in shapes), step=step)


@torch.inference_mode()
def decode_speed(model: LanguageModel, contexts: tuple[int, ...], batch: int, repeats: int) -> list[dict]:
    """Decode tokens/s of `model`'s weights at each context: `batch` sequences, one new token each per
    step over a cache pre-filled with `context` random entries; median over `repeats` steps after one
    warm-up. The model is rebuilt with max_seq_len = the longest context (RoPE has no length limit);
    MLA decodes on its absorbed path."""
    extra = repeats + 1
    config = replace(model.config, max_seq_len=max(contexts) + extra)
    long = LanguageModel(config, device="cpu").eval()
    long.load_state_dict(model.state_dict())
    mode = "absorbed" if isinstance(config.attention, MLAConfig) else "auto"
    token = torch.zeros(batch, 1, dtype=torch.long)
    rows = []
    for context in contexts:
        cache = long.new_cache(batch, context + extra)
        _fill(cache, context)
        step = partial(long, token, cache, mode=mode)
        ms = statistics.median(time_ms(step, warmup=1, repeats=repeats))
        rows.append({"context": context, "ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms})
    return rows


def training_step_cost(
    model: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor, repeats: int
) -> dict:
    """Bytes autograd saves for backward (activations, weights excluded) and the median wall time of
    one forward + backward + AdamW step on `inputs`, `targets: [B, T]`."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _, saved = saved_activation_bytes(lambda: next_token_loss(model, inputs, targets), model.parameters())

    def step() -> None:
        next_token_loss(model, inputs, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ms = statistics.median(time_ms(step, warmup=1, repeats=repeats))
    return {"saved_activation_bytes": saved, "ms_per_step": ms}


def _load_study_corpus(config: StudyConfig) -> Corpus:
    vocab_size = get_preset(config.model_preset).vocab_size
    return load_corpus(config.data, vocab_size=vocab_size, cache_dir=config.cache_dir)


def _windows(tokens: np.ndarray, config: StudyConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return batch_at(tokens, window=config.context, batch_size=n, seed=seed, step=0, micro=0, rank=0)


def _git_commit() -> str | None:
    try:
        run = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return run.stdout.strip()


def _summary(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one seed), min and max."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values)}


def _settings(config: StudyConfig) -> dict[str, Any]:
    """What a continued study must share with the one it continues: the config as JSON, paths absolute,
    `out` aside."""
    settings = json.loads(json.dumps(asdict(config)))
    del settings["out"]
    settings["data"] = [os.path.abspath(path) for path in config.data]
    if config.cache_dir is not None:
        settings["cache_dir"] = os.path.abspath(config.cache_dir)
    return settings


class _Journal:
    """`out/journal.json`: the study's settings and each finished part's result (JSON), rewritten after
    every part, so that running the study again skips the finished parts and redoes the others."""

    def __init__(self, out: Path, config: StudyConfig) -> None:
        self.path, self.settings, self.parts = out / JOURNAL, _settings(config), {}
        self._seconds_before, self._started = 0.0, time.perf_counter()
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
                saved_settings, self.parts = saved["settings"], saved["parts"]
                self._seconds_before = saved["seconds"]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"corrupt study: {self.path} is unreadable ({error})") from None
            changed = [
                f"{name} {saved_settings.get(name)!r} -> {value!r}"
                for name, value in self.settings.items()
                if saved_settings.get(name) != value
            ]
            if changed:
                raise ValueError(
                    f"the study in {str(out)!r} was started with other settings: {', '.join(changed)}; "
                    "rerun it with those to continue it, or choose another --out"
                )
        self._write()

    @property
    def seconds(self) -> float:
        """Seconds spent on the study so far, earlier runs of it included."""
        return self._seconds_before + time.perf_counter() - self._started

    def _write(self) -> None:
        record = {"settings": self.settings, "parts": self.parts, "seconds": self.seconds}
        write_text_atomically(self.path, json.dumps(record, indent=1) + "\n")

    def part(self, key: str, compute: Callable[[], Any]) -> Any:
        """The recorded result of the part `key`, or `compute()`'s, recorded."""
        if key not in self.parts:
            self.parts[key] = json.loads(json.dumps(compute()))
            self._write()
        return self.parts[key]


def _fresh(path: Path) -> Path:
    """`path`, a run folder of this study, emptied of what an interrupted attempt left there."""
    if path.exists():
        shutil.rmtree(path)
    return path


def run_study(config: StudyConfig, *, say: Callable[[str], None] = lambda _text: None) -> dict[str, Any]:
    """Run every part of the study; write `results.json`, `report.md` and the plots into `config.out`;
    return the results. `say` receives one line per finished part. A study interrupted in `config.out`
    continues: parts that finished are kept, the others are redone."""
    out = Path(config.out)
    run_dir.check_out(out, markers=(JOURNAL, run_dir.LOCK), owner="study")
    with run_dir.locked(out, owner="study"):
        journal = _Journal(out, config)
        if journal.parts:
            say(f"continuing the study in {out}: {len(journal.parts)} finished parts kept")
        return _run_parts(config, journal, say)


def _train_run(config: StudyConfig, variant: Variant, seed: int, d_ff: int) -> dict[str, Any]:
    """One training run of `variant`: its validation loss, speed and loss curves."""
    train_config = config.train_config(variant, seed=seed, d_ff=d_ff)
    result = train(replace(train_config, out=str(_fresh(Path(train_config.out)))), quiet=True)
    return {
        "seed": seed,
        "checkpoint": str(result.checkpoint.relative_to(config.out)),
        "val_loss": result.val_loss,
        "val_ppl": math.exp(result.val_loss),
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.seconds,
        "curves": _log_curves(Path(train_config.out)),
    }


def _variant_results(
    config: StudyConfig, variant: Variant, d_ff: int, journal: _Journal, say: Callable[[str], None]
) -> dict[str, Any]:
    """`variant` trained once per seed, with its cache and parameter figures."""
    runs = []
    for seed in config.seeds:
        key = f"train/{variant.name}/seed-{seed}"
        done = key in journal.parts
        run = journal.part(key, lambda seed=seed: _train_run(config, variant, seed, d_ff))
        runs.append(run)
        kept = " (finished before)" if done else ""
        speed = f"{run['tokens_per_s']:,.0f} tok/s"
        say(f"{variant.name} seed {seed}: val loss {run['val_loss']:.3f}, {speed}{kept}")
    model_config = load_checkpoint(Path(config.out) / runs[-1]["checkpoint"]).config
    mha_attention = config.train_config(config.variants[0], seed=0).model_preset().attention("mha")
    return {
        "variant": asdict(variant),
        "d_ff": d_ff,
        "params": LanguageModel(model_config, device="meta").parameter_counts(),
        "cache_elements_per_token_per_layer": model_config.attention.cache_width,
        "cache_bytes_per_token_bf16": cache_bytes_per_token(model_config),
        "cache_bytes_per_token_fp32": cache_bytes_per_token(model_config, torch.float32),
        "deepseek_v2_projection": v2_projection(model_config.attention, mha_attention, model_config.n_layers),
        "runs": runs,
        "val_loss": _summary([run["val_loss"] for run in runs]),
        "val_ppl": _summary([run["val_ppl"] for run in runs]),
        "tokens_per_s": _summary([run["tokens_per_s"] for run in runs]),
    }


def _run_parts(config: StudyConfig, journal: _Journal, say: Callable[[str], None]) -> dict[str, Any]:
    """Every part of the study, each through `journal`; then results.json and the report."""
    from latentattn.study_report import write_report

    out = Path(config.out)
    corpus = _load_study_corpus(config)
    d_ff = matched_d_ff(config)
    results: dict[str, Any] = {
        "config": asdict(config),
        "environment": {**machine_info(), "git_commit": _git_commit()},
        "variants": {
            variant.name: _variant_results(config, variant, d_ff[variant.name], journal, say)
            for variant in config.variants
        },
    }
    for variant in config.variants:
        entry = results["variants"][variant.name]

        def decode(entry: dict[str, Any] = entry) -> list[dict]:
            model = load_checkpoint(out / entry["runs"][0]["checkpoint"]).model
            return decode_speed(model, config.decode_contexts, config.decode_batch, config.timing_repeats)

        entry["decode"] = journal.part(f"decode/{variant.name}", decode)
        say(
            f"{variant.name} decode: {entry['decode'][-1]['tokens_per_s']:,.0f} tok/s "
            f"at context {config.decode_contexts[-1]}"
        )

    results["conversion"] = _conversions(config, corpus, results, journal, say)
    results["training_memory"] = journal.part(
        "training_memory", lambda: _training_memory(config, corpus, d_ff)
    )
    say(
        "training step: "
        + ", ".join(f"{k} {v['ms_per_step']:.0f} ms" for k, v in results["training_memory"].items())
    )
    results["seconds"] = journal.seconds
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, out)
    return results


def _conversions(
    config: StudyConfig,
    corpus: Corpus,
    results: dict[str, Any],
    journal: _Journal,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Each seed's trained MHA converted to MLA at the target's C and R by each method: validation loss
    right after conversion, and after `heal_steps` of fine-tuning; the control is the MHA itself
    fine-tuned the same way (the converted models see the MHA's steps plus the healing steps)."""
    rows = []
    for run in results["variants"]["mha"]["runs"]:
        checkpoint = Path(config.out) / run["checkpoint"]
        control_dir = Path(config.out) / "runs" / "mha-continued" / f"seed-{run['seed']}"
        continued = journal.part(
            f"continued/seed-{run['seed']}",
            lambda checkpoint=checkpoint, control_dir=control_dir, seed=run["seed"]: (
                _fine_tune(config, checkpoint, control_dir, seed=seed).val_loss
            ),
        )
        for method in METHODS:
            row = journal.part(
                f"conversion/{method}/seed-{run['seed']}",
                lambda method=method, run=run: _convert(config, corpus, run, method),
            )
            rows.append({**row, "mha_continued_val_loss": continued})
            target = config.convert_target.name
            say(
                f"MHA seed {run['seed']} -> {target} ({method}): {run['val_loss']:.3f} -> "
                f"{row['converted_val_loss']:.3f} converted, {row['healed_val_loss']:.3f} healed "
                f"(MHA fine-tuned alike: {continued:.3f})"
            )
    return rows


def _convert(config: StudyConfig, corpus: Corpus, run: dict[str, Any], method: Method) -> dict[str, Any]:
    """The trained MHA of `run` converted by `method`, saved, evaluated, and healed by a fine-tune."""
    target = config.convert_target
    loaded = load_checkpoint(Path(config.out) / run["checkpoint"])
    calibration, _ = _windows(corpus.train, config, config.calibration_windows, seed=10_000 + run["seed"])
    converted = model_to_mla(loaded.model, study_conversion(method, target), calibration).eval()
    converted_loss = evaluate(converted, corpus.val, config.train_config(target, seed=run["seed"]))
    base = _fresh(Path(config.out) / "runs" / f"mha-to-{target.name}-{method}" / f"seed-{run['seed']}")
    start = save_checkpoint(
        base / "converted",
        step=0,
        model=converted,
        tokenizer=loaded.tokenizer,
        train={"converted_from": run["checkpoint"], "method": method},
        trainer_state={},
    )
    healed = _fine_tune(config, start, base / "healed", seed=run["seed"])
    return {
        "method": method,
        "seed": run["seed"],
        "kv_lora_rank": target.kv_lora_rank,
        "qk_rope_head_dim": target.qk_rope_head_dim,
        "mha_val_loss": run["val_loss"],
        "converted_val_loss": converted_loss,
        "healed_val_loss": healed.val_loss,
        "heal_steps": config.heal_steps,
        "cache_bytes_per_token_bf16": cache_bytes_per_token(converted.config),
        "params": converted.parameter_counts(),
        "norm_eps": converted.config.attention.norm_eps,
        "curves": _log_curves(base / "healed"),
    }


def study_conversion(method: Method, target: Variant) -> ConversionConfig:
    """The study's conversion, as first published: the highest frequencies' main RoRoPE components in
    k_pe, the rest of those frequencies dropped, the K/V activations factorised unbalanced, no refit."""
    return ConversionConfig(
        method=method,
        kv_lora_rank=target.kv_lora_rank,
        qk_rope_head_dim=target.qk_rope_head_dim,
        rope_frequencies="highest",
        rope_residual="drop",
        balance_kv=False,
        kv_objective="activations",
        refit="none",
    )


def _fine_tune(config: StudyConfig, start: Path, out: Path, *, seed: int) -> TrainResult:
    """`heal_steps` steps from the checkpoint `start` (fresh AdamW, warmup 10%, cosine from `heal_lr`)."""
    base = config.train_config(config.variants[0], seed=seed)
    return train(
        replace(
            base,
            out=str(_fresh(out)),
            steps=config.heal_steps,
            lr=config.heal_lr,
            warmup=max(1, config.heal_steps // 10),
            eval_every=config.heal_steps,
            checkpoint_every=config.heal_steps,
            log_every=max(1, config.heal_steps // 20),
            init_from=str(start),
            **dict.fromkeys(SHAPE_OVERRIDES),
        ),
        quiet=True,
    )


def _training_memory(config: StudyConfig, corpus: Corpus, d_ff: dict[str, int]) -> dict[str, dict]:
    """One training step of `memory_batch` windows for MHA, the conversion target MLA (same width) and
    that MLA with `recompute_kv`."""
    inputs, targets = _windows(corpus.train, config, config.memory_batch, seed=20_000)
    vocab_size = corpus.tokenizer.get_vocab_size()
    rows = {}
    for name, variant, recompute in (
        ("mha", config.variants[0], False),
        ("mla", config.convert_target, False),
        ("mla-recompute-kv", config.convert_target, True),
    ):
        preset = config.train_config(variant, seed=0, d_ff=d_ff[variant.name]).model_preset()
        torch.manual_seed(0)
        model = LanguageModel(
            preset.model(variant.kind, vocab_size=vocab_size, max_seq_len=config.context),
            recompute_kv=recompute,
        )
        rows[name] = {
            "variant": variant.name,
            "batch": config.memory_batch,
            "context": config.context,
            **training_step_cost(model, inputs, targets, config.timing_repeats),
        }
    return rows
