"""`latentattn eval`: validation loss of a trained model when its keys come back from a cache format.

Each validation window is fed in chunks of `chunk` tokens through the model's cache, so every query
attends to keys and values read back from the cache (written, then read, even within its own chunk):
a full-precision cache reproduces the plain forward pass, an 8-bit one (MLA: int8 or fp8 latents in
FlashMLA's 656-byte layout) shows what its rounding costs in loss and perplexity.

Notation: B windows per batch, T window length, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table

from latentattn.checkpoint import Checkpoint, load_checkpoint
from latentattn.data import load_corpus
from latentattn.model import LanguageModel

FORMATS = ("none", "full", "int8", "fp8")
"""`none`: plain forward, no cache; `full`: the model-dtype cache; `int8`, `fp8`: MLA's 8-bit latents."""


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
    """`count` evenly spaced windows of `window + 1` tokens, `[count, T + 1]`."""
    if len(tokens) <= window:
        raise ValueError(
            f"the validation split has {len(tokens)} tokens, not more than the window of {window}"
        )
    starts = np.linspace(0, len(tokens) - window - 1, count).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s : s + window + 1] for s in starts]).astype(np.int64))


@torch.inference_mode()
def window_loss(
    model: LanguageModel, rows: torch.Tensor, *, cache_format: str, chunk: int, batch_size: int = 8
) -> tuple[float, int | None]:
    """Mean next-token loss over `rows: [N, T + 1]` and the cache's bytes per token (None for "none")."""
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
            logits = model(inputs)  # [B, T, V]
        else:
            latent_format = None if cache_format == "full" else cache_format
            cache = model.new_cache(len(batch), inputs.shape[1], latent_format=latent_format)
            logits = torch.cat([model(part, cache) for part in inputs.split(chunk, dim=1)], dim=1)
            bytes_per_token = cache.bytes_per_token
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"))
    return total / rows[:, 1:].numel(), bytes_per_token


IMPORTED_WINDOW = 512
"""Window length for models not trained here (imported), whose context may be 128K tokens."""


def validation_tokens(checkpoint: Checkpoint) -> np.ndarray:
    """The validation split the checkpoint's run trained against (from the data cache when unchanged);
    for an imported model, the built-in corpus's, encoded with its tokenizer."""
    train = checkpoint.train
    corpus = load_corpus(
        train.get("data") or (),
        vocab_size=checkpoint.tokenizer.get_vocab_size(),  # unused: the tokenizer is given
        cache_dir=train.get("cache_dir"),
        tokenizer=checkpoint.tokenizer,
    )
    return corpus.val


def window_length(checkpoint: Checkpoint) -> int:
    """The training context of a trained model; at most `IMPORTED_WINDOW` tokens for an imported one."""
    context = checkpoint.config.max_seq_len
    return context if "preset" in checkpoint.train else min(context, IMPORTED_WINDOW)


def compare_cache_formats(
    checkpoint_path: str | Path,
    *,
    formats: tuple[str, ...] = FORMATS,
    n_windows: int = 32,
    chunk: int = 16,
) -> list[FormatResult]:
    """Validation loss of the checkpoint's model through each cache format (MLA models for 8-bit)."""
    checkpoint = load_checkpoint(checkpoint_path)
    rows = windows(validation_tokens(checkpoint), window_length(checkpoint), n_windows)
    reference, _ = window_loss(checkpoint.model, rows, cache_format="none", chunk=chunk)
    results = []
    for cache_format in formats:
        loss, bytes_per_token = window_loss(checkpoint.model, rows, cache_format=cache_format, chunk=chunk)
        results.append(FormatResult(cache_format, bytes_per_token, loss, math.exp(loss), loss - reference))
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
