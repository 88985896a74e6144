"""Corpus discovery, the deterministic split, tokenizer training and the token-id cache."""

from __future__ import annotations

import os
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest

from latentattn import data
from latentattn.data import EOS, VAL_EVERY, default_corpus_files, prepare_corpus, resolve_files, split_blocks


def _write_corpus(root: Path) -> list[Path]:
    source = Path(textwrap.__file__).read_text()
    (root / "sub").mkdir(parents=True)
    files = [root / "a.py", root / "sub" / "b.txt"]
    files[0].write_text(source[: len(source) // 2])
    files[1].write_text(source[len(source) // 2 :])
    return files


def test_default_corpus_is_the_sorted_standard_library_without_tests(tmp_path):
    files = default_corpus_files(max_chars=200_000)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert files == sorted(files)
    assert all(path.suffix == ".py" and path.is_relative_to(root) for path in files)
    assert not any({"site-packages", "test", "tests"} & set(path.relative_to(root).parts) for path in files)
    sizes = [path.stat().st_size for path in files]
    assert sum(sizes) >= 200_000 > sum(sizes[:-1])


def test_resolve_files_walks_folders_sorted_and_skips_hidden_and_binary(tmp_path):
    files = _write_corpus(tmp_path)
    (tmp_path / ".hidden").write_text("secret")
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    assert resolve_files([tmp_path]) == files
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_files([tmp_path / "missing"])


def test_split_is_deterministic_and_interleaved():
    documents = [f"document {i} " * 50 for i in range(10)]
    train, val = split_blocks(documents)
    assert (train, val) == split_blocks(documents)
    blocks = len(train) + len(val)
    assert len(val) == blocks // VAL_EVERY >= 2
    assert "".join(train + val).count(EOS) == 9


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="the corpus is empty"):
        prepare_corpus(resolve_files([tmp_path]), vocab_size=300, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="the corpus is empty"):
        prepare_corpus([], vocab_size=300, cache_dir=tmp_path / "cache")


def test_a_tiny_corpus_has_an_empty_validation_split(tmp_path):
    """12 characters make 12 one-character blocks, none of them the 20th (validation)."""
    (tmp_path / "tiny.txt").write_text("hello world\n")
    corpus = prepare_corpus([tmp_path / "tiny.txt"], vocab_size=300, cache_dir=tmp_path / "cache")
    assert corpus.tokenizer.decode(corpus.train.tolist()) == "hello world\n"
    assert corpus.val.shape == (0,) and corpus.val.dtype == corpus.train.dtype


def test_token_ids_are_cached_and_reused_until_the_files_change(tmp_path, monkeypatch):
    files = _write_corpus(tmp_path / "corpus")
    cache_dir = tmp_path / "cache"
    corpus = prepare_corpus(files, vocab_size=300, cache_dir=cache_dir)
    assert corpus.tokenizer.get_vocab_size() == 300
    assert isinstance(corpus.train, np.memmap) and len(corpus.train) > 10 * len(corpus.val) > 0
    text = corpus.tokenizer.decode(corpus.train[:50].tolist())
    assert text == Path(textwrap.__file__).read_text()[: len(text)]

    def no_reading(files):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(data, "read_documents", no_reading)
    again = prepare_corpus(files, vocab_size=300, cache_dir=cache_dir)
    assert np.array_equal(again.train, corpus.train) and again.tokenizer.to_str() == corpus.tokenizer.to_str()
    # The checkpoint's tokenizer (on --resume) finds the same ids.
    prepare_corpus(files, vocab_size=300, cache_dir=cache_dir, tokenizer=corpus.tokenizer)
    monkeypatch.undo()

    files[1].write_text(files[1].read_text() + "\nextra = 1\n")
    os.utime(files[1], ns=(0, 1))  # a new mtime even on coarse clocks
    changed = prepare_corpus(files, vocab_size=300, cache_dir=cache_dir)
    assert len(changed.train) + len(changed.val) > len(corpus.train) + len(corpus.val)
    assert not list(cache_dir.glob("tmp-*"))
