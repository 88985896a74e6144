"""Corpus, tokenizer and token-id cache for training.

The default corpus is the running interpreter's standard library (`.py` files, sorted, capped), so it
exists on every machine without a download; `--data` takes text files or folders instead. The text is
split deterministically: every `VAL_EVERY`-th block of the concatenated corpus is validation. A
byte-level BPE tokenizer is trained on the training split, and both splits are encoded once and
cached on disk as flat token-id files (read back as numpy memmaps), keyed by a hash of the file list
(paths, sizes, mtimes) and the tokenizer, so unchanged inputs are never re-read or re-encoded.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from latentattn.run_dir import publish_directory

EOS = "<|endoftext|>"
"""Separates documents; generation also starts every prompt with it."""
VAL_EVERY = 20
"""One block in this many goes to validation (5%)."""
MAX_BLOCK_CHARS = 1 << 16
DEFAULT_CORPUS_CHARS = 6_000_000
"""Cap on the default corpus (the first files in sorted order), to keep tokenizer training quick."""
_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
)
"""Third-party code, tests, and generated tables (codecs, pydoc topics) that are not representative code."""
_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/latentattn`, else `~/.cache/latentattn`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latentattn"


def default_corpus_files(max_chars: int = DEFAULT_CORPUS_CHARS) -> list[Path]:
    """The standard library's `.py` files, sorted, skipping `_SKIPPED_DIRS`, up to `max_chars` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        files.append(path)
        total += path.stat().st_size
        if total >= max_chars:
            break
    return files


def resolve_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, sorted, hidden entries skipped) into a list of text files."""
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = (p for p in sorted(path.rglob("*")) if p.is_file())
            files.extend(
                p for p in found if not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            raise FileNotFoundError(f"--data path {str(path)!r} does not exist")
    return [path for path in files if _is_text(path)]


def _is_text(path: Path) -> bool:
    with path.open("rb") as handle:
        return b"\0" not in handle.read(8192)


def read_documents(files: Sequence[Path]) -> list[str]:
    """File contents as UTF-8 text (undecodable bytes replaced), empty files dropped."""
    texts = (path.read_text(encoding="utf-8", errors="replace") for path in files)
    return [text for text in texts if text.strip()]


def split_blocks(documents: Sequence[str]) -> tuple[list[str], list[str]]:
    """Train and validation blocks: the documents joined by EOS, cut into equal blocks, every
    `VAL_EVERY`-th one (from the `VAL_EVERY`-th on) for validation. At least `2·VAL_EVERY` blocks."""
    text = EOS.join(documents)
    if not text.strip():
        raise ValueError("the corpus is empty: no non-blank text in the given --data files")
    size = max(1, min(MAX_BLOCK_CHARS, len(text) // (2 * VAL_EVERY)))
    blocks = [text[i : i + size] for i in range(0, len(text), size)]
    train = [block for i, block in enumerate(blocks) if i % VAL_EVERY != VAL_EVERY - 1]
    val = [block for i, block in enumerate(blocks) if i % VAL_EVERY == VAL_EVERY - 1]
    return train, val


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) with `EOS` as its only special token; at most `vocab_size` ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


@dataclass(frozen=True)
class Corpus:
    """A tokenizer and the token ids of both splits (`[N]` integer memmaps; plain arrays when empty)."""

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _manifest(files: Sequence[Path]) -> list[tuple[str, int, int]]:
    stats = [(path.resolve(), path.stat()) for path in files]
    return [(str(path), stat.st_size, stat.st_mtime_ns) for path, stat in stats]


def _write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """`write` a cache entry `target` completely or not at all; one that another process (a DDP rank)
    published first is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    publish_directory(target, write, keep_existing=True)


def load_corpus(
    data: Sequence[str | Path],
    *,
    vocab_size: int,
    cache_dir: str | Path | None,
    tokenizer: Tokenizer | None = None,
) -> Corpus:
    """`prepare_corpus` over `data` (files or folders; empty: the default corpus) in `cache_dir`
    (None: `default_cache_dir()`)."""
    files = resolve_files(data) if data else default_corpus_files()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return prepare_corpus(files, vocab_size=vocab_size, cache_dir=cache, tokenizer=tokenizer)


def prepare_corpus(
    files: Sequence[Path],
    *,
    vocab_size: int,
    cache_dir: Path,
    tokenizer: Tokenizer | None = None,
) -> Corpus:
    """Tokenizer (trained on the train split unless given) and token ids, from the cache when unchanged."""
    if not files:
        raise ValueError("the corpus is empty: no text files found")
    manifest = _manifest(files)
    blocks: tuple[list[str], list[str]] | None = None

    def load_blocks() -> tuple[list[str], list[str]]:
        nonlocal blocks
        if blocks is None:
            blocks = split_blocks(read_documents(files))
        return blocks

    if tokenizer is None:
        tokenizer_dir = cache_dir / f"tokenizer-{_digest(_FORMAT_VERSION, manifest, vocab_size)}"
        if not (tokenizer_dir / "tokenizer.json").exists():
            trained = train_tokenizer(load_blocks()[0], vocab_size)
            _write_dir_atomically(tokenizer_dir, lambda tmp: trained.save(str(tmp / "tokenizer.json")))
        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))

    ids_dir = cache_dir / f"ids-{_digest(_FORMAT_VERSION, manifest, tokenizer.to_str())}"
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    if not (ids_dir / "meta.json").exists():

        def encode(tmp: Path) -> None:
            for name, split in zip(("train", "val"), load_blocks(), strict=True):
                ids = [i for encoding in tokenizer.encode_batch(split) for i in encoding.ids]
                np.asarray(ids, dtype=dtype).tofile(tmp / f"{name}.bin")
            (tmp / "meta.json").write_text(
                json.dumps({"files": len(manifest), "dtype": np.dtype(dtype).name})
            )

        _write_dir_atomically(ids_dir, encode)
    train, val = (_read_ids(ids_dir / f"{name}.bin", dtype) for name in ("train", "val"))
    return Corpus(tokenizer=tokenizer, train=train, val=val)


def window_starts(n_tokens: int, window: int, count: int) -> np.ndarray:
    """First token of each of `count` evenly spaced windows of `window + 1` tokens in a split of
    `n_tokens`: the fixed validation windows of training and of `latentattn eval`."""
    return np.linspace(0, n_tokens - window - 1, count).astype(np.int64)


def gather_windows(tokens: np.ndarray, starts: np.ndarray, window: int) -> torch.Tensor:
    """The windows `tokens[s : s + window + 1]` for each start, as int64 `[len(starts), window + 1]`."""
    return torch.from_numpy(np.stack([tokens[s : s + window + 1] for s in starts]).astype(np.int64))


def _read_ids(path: Path, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """Token ids `[N]` mapped from `path`; an empty array for an empty split (mmap needs one byte)."""
    if path.stat().st_size == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")
