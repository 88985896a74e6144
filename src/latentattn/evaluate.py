"""`latentattn eval`: validation loss of a trained model when its keys come back from a cache format.

Each validation window is fed in chunks of `chunk` tokens through the model's cache, so every query
attends to keys and values read back from the cache (written, then read, even within its own chunk):
a full-precision cache reproduces the plain forward pass, an 8-bit one (MLA: int8 or fp8 latents in
FlashMLA's 656-byte layout) shows what its rounding costs in loss and perplexity.

Notation: B windows per batch, T window length, vocab the vocabulary size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table

from latentattn.checkpoint import Checkpoint, load_checkpoint
from latentattn.config import MLAConfig
from latentattn.data import gather_windows, load_corpus, window_starts
from latentattn.model import LanguageModel
from latentattn.registry import LATENT_FORMATS

LATENT_ONLY = tuple(LATENT_FORMATS)
"""Formats only MLA models have: the 8-bit latents."""
FORMATS = ("none", "full", *LATENT_ONLY)
"""`none`: plain forward, no cache; `full`: the model-dtype cache; then MLA's 8-bit latents."""


@dataclass(frozen=True)
class FormatResult:
    format: str
    bytes_per_token: int | None
    """Cache bytes per token over all layers, read off the cache object (None without a cache)."""
    val_loss: float
    perplexity: float
    delta_loss: float
    """val_loss minus the plain forward's."""


def windows(tokens: np.ndarray, window: int, count: int) -> torch.Tensor:
    """`count` evenly spaced windows of `window + 1` tokens, `[count, T + 1]`; at most as many as fit
    side by side in `tokens` (more would count tokens twice, and grow without bound)."""
    if len(tokens) <= window:
        raise ValueError(
            f"the validation split has {len(tokens)} tokens, not more than the window of {window}"
        )
    most = len(tokens) // (window + 1)
    if not 0 < count <= most:
        raise ValueError(
            f"--windows must lie in [1, {most}]: the validation split holds {len(tokens):,} tokens, "
            f"{most} windows of {window + 1}; got {count}"
        )
    return gather_windows(tokens, window_starts(len(tokens), window, count), window)


@torch.inference_mode()
def window_loss(
    model: LanguageModel,
    rows: torch.Tensor,
    *,
    cache_format: str,
    chunk: int,
    batch_size: int = 8,
    say: Callable[[str], None] | None = None,
) -> tuple[float, int | None]:
    """Mean next-token loss over `rows: [N, T + 1]` and the cache's bytes per token (None for "none");
    `say` hears the progress after each batch."""
    if cache_format not in FORMATS:
        raise ValueError(f"unknown cache format {cache_format!r}; choose from {', '.join(FORMATS)}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    device = model.embed.weight.device
    total, bytes_per_token = 0.0, None
    for first in range(0, len(rows), batch_size):
        batch = rows[first : first + batch_size].to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T]
        if cache_format == "none":
            logits = model(inputs)  # [B, T, vocab]
        else:
            latent_format = None if cache_format == "full" else cache_format
            cache = model.new_cache(len(batch), inputs.shape[1], latent_format=latent_format)
            logits = torch.cat([model(part, cache) for part in inputs.split(chunk, dim=1)], dim=1)
            bytes_per_token = cache.bytes_per_token
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"))
        if say is not None:
            say(f"{cache_format}: {min(first + batch_size, len(rows))}/{len(rows)} windows")
    return total / rows[:, 1:].numel(), bytes_per_token


IMPORTED_WINDOW = 512
"""Window length for models not trained here (imported), whose context may be 128K tokens."""


def validation_tokens(checkpoint: Checkpoint, data: Sequence[str] | None = None) -> np.ndarray:
    """The validation split of `data` (text files or folders), tokenized by the checkpoint's tokenizer;
    by default of the data the checkpoint's run trained on (from the data cache when unchanged), or
    for a model not trained here (imported), of the built-in corpus."""
    train = checkpoint.train
    if data is None:
        data = train.get("data") or ()
        missing = [path for path in data if not Path(path).exists()]
        if missing:
            raise FileNotFoundError(
                f"the run trained on {missing[0]!r}, which does not exist from {str(Path.cwd())!r} "
                "(relative paths are read from the current folder): pass --data"
            )
    corpus = load_corpus(
        data,
        vocab_size=checkpoint.tokenizer.get_vocab_size(),  # unused: the tokenizer is given
        cache_dir=train.get("cache_dir"),
        tokenizer=checkpoint.tokenizer,
    )
    return corpus.val


def window_length(checkpoint: Checkpoint) -> int:
    """The training context of a model trained from scratch here; at most `IMPORTED_WINDOW` tokens for any
    other (imported, converted, or fine-tuned from a checkpoint, e.g. healed)."""
    context = checkpoint.config.max_seq_len
    trained_here = "preset" in checkpoint.train and checkpoint.train.get("init_from") is None
    return context if trained_here else min(context, IMPORTED_WINDOW)


def compare_cache_formats(
    checkpoint_path: str | Path,
    *,
    formats: tuple[str, ...] | None = None,
    n_windows: int = 32,
    chunk: int = 16,
    data: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    say: Callable[[str], None] | None = None,
) -> list[FormatResult]:
    """Validation loss of the checkpoint's model through each cache format (None: every format that
    applies to the model, so no 8-bit latents for MHA/GQA/MQA); `data` replaces the run's training
    data (see `validation_tokens`); `say` hears progress and skipped formats. A format that does not
    apply, a bad `chunk` or `n_windows` raise before any loss is computed."""
    if chunk <= 0:
        raise ValueError(f"--chunk must be a positive number of tokens, got {chunk}")
    if n_windows <= 0:
        raise ValueError(f"--windows must be positive, got {n_windows}")
    unknown = sorted(set(formats or ()) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown cache format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    checkpoint = load_checkpoint(checkpoint_path, device=device)
    kind = checkpoint.config.attention.kind
    latent = isinstance(checkpoint.config.attention, MLAConfig)
    if not latent and set(formats or ()) & set(LATENT_ONLY):
        raise ValueError(f"8-bit latent caches need an MLA model, this one is {kind}")
    rows = windows(validation_tokens(checkpoint, data), window_length(checkpoint), n_windows)
    if formats is None and not latent:
        formats = tuple(name for name in FORMATS if name not in LATENT_ONLY)
        if say is not None:
            say(
                f"skipping {', '.join(LATENT_ONLY)}: 8-bit latent caches need an MLA model, "
                f"this one is {kind}"
            )
    formats = formats or FORMATS
    measured = {  # the plain forward first, and once
        name: window_loss(checkpoint.model, rows, cache_format=name, chunk=chunk, say=say)
        for name in dict.fromkeys(("none", *formats))
    }
    reference = measured["none"][0]
    results = []
    for name in formats:
        loss, bytes_per_token = measured[name]
        results.append(FormatResult(name, bytes_per_token, loss, math.exp(loss), loss - reference))
    return results


def results_table(results: list[FormatResult], title: str) -> Table:
    table = Table(title=title, caption="Δ loss: against the plain forward pass without a cache")
    for header in ("cache", "B/token (all layers)", "val loss", "perplexity", "Δ loss"):
        table.add_column(header, justify="left" if header == "cache" else "right")
    for row in results:
        size = "-" if row.bytes_per_token is None else f"{row.bytes_per_token:,}"
        table.add_row(
            row.format, size, f"{row.val_loss:.4f}", f"{row.perplexity:.2f}", f"{row.delta_loss:+.2e}"
        )
    return table
