"""`latentattn convert`: calibration text, the kv-head merging baseline, checkpoints in and out, the CLI.

Oracles: the tokenizer's own encoding (calibration windows), the mean of the source's kv heads
(merging), `load_checkpoint` of the written directory (same logits as the returned model, the source's
extra files byte for byte), and the real command in a subprocess (exit code, stdout, stderr, nothing
written on error).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from latentattn import checkpoint as ckpt
from latentattn.cli import main
from latentattn.convert import ConversionConfig, convert_checkpoint, merge_kv_heads
from latentattn.convert.calibration import calibration_windows
from latentattn.data import train_tokenizer
from latentattn.metrics import relative_error
from latentattn.model import LanguageModel, get_preset

TEXT = Path(textwrap.__file__).read_text()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT], vocab_size=300)


def save_run(directory: Path, tokenizer, kind: str = "gqa") -> Path:
    torch.manual_seed(0)
    model = LanguageModel(get_preset("debug").model(kind, vocab_size=tokenizer.get_vocab_size()))
    step = ckpt.save_checkpoint(
        directory, step=7, model=model, tokenizer=tokenizer, train={"preset": "debug"}, trainer_state={"x": 1}
    )
    (step / "tokenizer_config.json").write_text('{"bos_token": null}\n')  # an importer's extra file
    return directory


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "calibration.txt"
    path.write_text(TEXT)
    return path


def test_calibration_windows_are_the_text_encoded_and_capped(tokenizer, corpus_file):
    ids = tokenizer.encode(TEXT).ids
    windows = calibration_windows(tokenizer, n_tokens=100, window=32, file=corpus_file)
    assert windows.shape == (3, 32) and windows.flatten().tolist() == ids[:96]
    whole = calibration_windows(tokenizer, n_tokens=10**9, window=1000, file=corpus_file)
    assert whole.shape == (len(ids) // 1000, 1000)


def test_builtin_corpus_calibration(tokenizer):
    windows = calibration_windows(tokenizer, n_tokens=256, window=64)
    assert windows.shape == (4, 64) and int(windows.max()) < tokenizer.get_vocab_size()


def test_bad_calibration_files_are_named(tokenizer, tmp_path):
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    with pytest.raises(ValueError, match=r"calibration file '.*blank.txt' is empty"):
        calibration_windows(tokenizer, n_tokens=64, window=8, file=tmp_path / "blank.txt")
    with pytest.raises(FileNotFoundError, match=r"calibration file '.*nothing.txt' does not exist"):
        calibration_windows(tokenizer, n_tokens=64, window=8, file=tmp_path / "nothing.txt")


def test_merging_averages_the_kv_heads():
    torch.manual_seed(0)
    model = LanguageModel(get_preset("debug").model("gqa")).eval()  # 4 query heads, 2 kv heads of 16
    merged = merge_kv_heads(model, 1)
    assert merged.config.attention.n_kv_heads == 1
    assert merged.config.attention.cache_width == model.config.attention.cache_width // 2
    for source, target in zip(model.blocks, merged.blocks, strict=True):
        for name in ("w_k", "w_v"):
            expected = getattr(source.attn, name).weight.view(2, 16, -1).mean(0)
            torch.testing.assert_close(getattr(target.attn, name).weight, expected, rtol=0, atol=0)
        torch.testing.assert_close(target.attn.w_q.weight, source.attn.w_q.weight, rtol=0, atol=0)
    with torch.no_grad():  # with equal kv heads merging loses nothing
        for block in model.blocks:
            for name in ("w_k", "w_v"):
                weight = getattr(block.attn, name).weight.view(2, 16, -1)
                weight[1] = weight[0]
        tokens = torch.randint(0, 384, (2, 20))
        assert relative_error(merge_kv_heads(model, 1)(tokens), model(tokens)) <= 1e-6
    with pytest.raises(
        ValueError, match="kv_heads must be fewer than the source's 2 kv heads and divide them"
    ):
        merge_kv_heads(model, 2)


def test_convert_checkpoint_writes_an_ordinary_checkpoint(tmp_path, tokenizer, corpus_file):
    source = save_run(tmp_path / "run", tokenizer)
    config = ConversionConfig(kv_lora_rank=16, qk_rope_head_dim=8)
    result = convert_checkpoint(
        source, tmp_path / "mla", config, calibration_tokens=200, calibration_file=corpus_file
    )
    assert result.calibration_shape == (3, 64)  # windows of the model's 64-token context
    assert (result.cache_bytes_before, result.cache_bytes_after) == (2 * 64 * 2, 2 * 24 * 2)
    loaded = ckpt.load_checkpoint(tmp_path / "mla")
    assert loaded.config == result.model.config
    tokens = torch.randint(0, tokenizer.get_vocab_size(), (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), result.model(tokens))
    step = ckpt.find_checkpoint(source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "mla" / name).read_bytes() == (step / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "mla").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    metadata = json.loads((tmp_path / "mla" / "config.json").read_text())
    source_metadata = json.loads((step / "config.json").read_text())
    assert {k: v for k, v in metadata.items() if k not in ("model", "conversion")} == {
        k: v for k, v in source_metadata.items() if k != "model"
    }
    assert metadata["model"]["attention"]["type"] == "mla"
    assert metadata["conversion"]["method"] == "pca" and metadata["conversion"]["calibration_tokens"] == 192
    assert metadata["conversion"]["source"] == str(step.resolve())


def test_convert_checkpoint_refuses_a_used_out_and_mla_sources(tmp_path, tokenizer):
    source = save_run(tmp_path / "run", tokenizer)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--out '.*taken' is not empty; pass --force to replace it"):
        convert_checkpoint(source, tmp_path / "taken", ConversionConfig(method="merge", kv_heads=1))
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    mla = save_run(tmp_path / "mla-run", tokenizer, kind="mla")
    with pytest.raises(ValueError, match="already uses MLA"):
        convert_checkpoint(mla, tmp_path / "out", ConversionConfig(method="merge", kv_heads=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mla-run", "run", "taken"]  # no temporary left
    convert_checkpoint(source, tmp_path / "taken", ConversionConfig(method="merge", kv_heads=1), force=True)
    assert ckpt.load_checkpoint(tmp_path / "taken").config.attention.n_kv_heads == 1


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "latentattn", "convert", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_converts_and_the_result_generates(tmp_path, tokenizer, corpus_file, capsys):
    source = save_run(tmp_path / "run", tokenizer)
    out = tmp_path / "mla"
    options = ["--kv-lora-rank", "16", "--rope-dim", "8", "--calibration-file", str(corpus_file)]
    options += ["--kv-objective", "attention", "--key-weight", "2", "--refit", "none"]
    result = run_cli(str(source), "--out", str(out), "--to", "mla", *options, "--calibration-tokens", "256")
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "config.json").read_text())["conversion"]
    assert (record["kv_objective"], record["key_weight"], record["refit"]) == ("attention", 2.0, "none")
    assert result.stdout.splitlines() == [
        f"calibration: 256 tokens (4 windows of 64) from {corpus_file}",
        "KV cache per token (2 layers, bf16): 256 -> 96 bytes (64 -> 24 values per layer, 2.67x smaller)",
        f"converted checkpoint: {out}",
    ]
    assert "converted layer 2/2" in result.stderr
    assert (
        main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    )
    assert "def " in capsys.readouterr().out


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, tokenizer, capsys):
    source = save_run(tmp_path / "run", tokenizer)
    (tmp_path / "empty.txt").write_text("")
    result = run_cli(
        str(source),
        "--out",
        str(tmp_path / "out"),
        "--kv-lora-rank",
        "8",
        "--rope-dim",
        "4",
        "--calibration-file",
        str(tmp_path / "empty.txt"),
    )
    assert result.returncode == 2
    assert (
        result.stderr == f"latentattn convert: error: calibration file '{tmp_path / 'empty.txt'}' is empty\n"
    )
    for args, message in [
        (["--kv-lora-rank", "80", "--rope-dim", "4"], "kv_lora_rank must be at most 64, the rank of"),
        (["--kv-lora-rank", "8", "--rope-dim", "5"], "qk_rope_head_dim must be even and positive, got 5"),
        (
            ["--kv-lora-rank", "8", "--rope-dim", "34"],
            "qk_rope_head_dim must be at most n_kv_heads·head_dim = 2·16 = 32",
        ),
        (
            ["--method", "merge", "--kv-heads", "1", "--to", "mla"],
            "--method merge produces GQA, not --to mla",
        ),
        (["--method", "merge", "--kv-heads", "3"], "kv_heads must be fewer than the source's 2 kv heads"),
        (
            ["--kv-lora-rank", "8", "--rope-dim", "4", "--key-weight", "0"],
            "key_weight must be positive and finite, got 0.0",
        ),
    ]:
        assert main(["convert", str(source), "--out", str(tmp_path / "out"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"latentattn convert: error: {message}") and err.count("\n") == 1, err
    mla = save_run(tmp_path / "mla-run", tokenizer, kind="mla")
    assert (
        main(["convert", str(mla), "--out", str(tmp_path / "out"), "--kv-lora-rank", "8", "--rope-dim", "4"])
        == 2
    )
    assert capsys.readouterr().err == (
        "latentattn convert: error: the model already uses MLA; conversion takes MHA/GQA/MQA models\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(source), "--out", str(tmp_path / "out"), "--method", "lora"])
    assert exit_info.value.code == 2 and "invalid choice: 'lora'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(source), "--out", str(tmp_path / "out"), "--kv-objective", "scores"])
    assert exit_info.value.code == 2 and "invalid choice: 'scores'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "mla-run", "run"]
