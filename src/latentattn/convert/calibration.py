"""Calibration tokens: a text file, or the built-in corpus's training split, in the model's own tokenizer.

Text is encoded block by block (blocks of `data.MAX_BLOCK_CHARS` characters; the built-in corpus's
training blocks in a fixed shuffled order, so the windows span the corpus), until `n_tokens` tokens are
reached; they are cut into windows of `window` tokens. Tokens beyond the last whole window are left
out, so at most `n_tokens` and at least one window are used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from latentattn.data import MAX_BLOCK_CHARS, default_corpus_files, read_documents, split_blocks


def _text_blocks(file: str | Path | None) -> list[str]:
    if file is None:
        train, _ = split_blocks(read_documents(default_corpus_files()))
        return [train[i] for i in np.random.default_rng(0).permutation(len(train))]
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"calibration file {str(path)!r} is empty")
    return [text[i : i + MAX_BLOCK_CHARS] for i in range(0, len(text), MAX_BLOCK_CHARS)]


def calibration_windows(
    tokenizer: Tokenizer, *, n_tokens: int, window: int, file: str | Path | None = None
) -> Tensor:
    """Token windows `[B, T]` (T = `window`, or fewer if the text is shorter), B·T ≤ `n_tokens`, from
    `file` or, without one, the built-in corpus."""
    if n_tokens <= 0 or window <= 0:
        raise ValueError(f"calibration needs a positive token count and window, got {n_tokens} and {window}")
    ids: list[int] = []
    for block in _text_blocks(file):
        ids.extend(tokenizer.encode(block).ids)
        if len(ids) >= n_tokens:
            break
    if not ids:
        raise ValueError(f"calibration text {str(file)!r} encodes to no tokens")
    length = min(window, n_tokens, len(ids))
    count = min(n_tokens, len(ids)) // length
    return torch.tensor(ids[: count * length], dtype=torch.long).view(count, length)
