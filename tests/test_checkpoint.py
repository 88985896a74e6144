"""Checkpoints: round trip, atomic layout, and one-line errors for missing or corrupt files."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from latentattn import checkpoint as ckpt
from latentattn.cli import main
from latentattn.data import train_tokenizer
from latentattn.model import ATTENTION_KINDS, LanguageModel, get_preset


def _save(run_dir: Path, kind: str = "mla", step: int = 3) -> LanguageModel:
    torch.manual_seed(0)
    tokenizer = train_tokenizer([Path(textwrap.__file__).read_text()], vocab_size=300)
    model = LanguageModel(get_preset("debug").model(kind, vocab_size=tokenizer.get_vocab_size()))
    ckpt.save_checkpoint(
        run_dir, step=step, model=model, tokenizer=tokenizer, train={"seed": 0}, trainer_state={"step": step}
    )
    return model


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_round_trip(tmp_path, kind):
    model = _save(tmp_path, kind)
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.config == model.config and loaded.step == 3 and loaded.train == {"seed": 0}
    assert loaded.directory == tmp_path / "step-0000003"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert ckpt.load_trainer_state(loaded.directory) == {"step": 3}
    assert ckpt.load_checkpoint(loaded.directory).config == model.config  # a checkpoint dir directly


def test_newer_checkpoint_replaces_the_older_one(tmp_path):
    _save(tmp_path, step=3)
    _save(tmp_path, step=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000006"]
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "step-0000006"


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.load_checkpoint(tmp_path)
    _save(tmp_path)
    (tmp_path / "step-0000003" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"incomplete: model.safetensors is missing"):
        ckpt.load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("model.safetensors", b"\x10\x00garbage", "corrupt checkpoint: cannot read"),
        ("config.json", b"{not json", "is not valid JSON"),
        ("config.json", b"[]", r"step-0000003/config.json must hold a JSON object, got \[\]"),
        ("config.json", b'{"train": [], "step": 3}', r"config.json: 'train' must be an object, got \[\]"),
        ("config.json", b'{"train": {}, "step": "3"}', r"config.json: 'step' must be an integer, got \"3\""),
        ("tokenizer.json", b"[]", "corrupt checkpoint: cannot read"),
    ],
)
def test_corrupt_files(tmp_path, name, content, message):
    _save(tmp_path)
    (tmp_path / "step-0000003" / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        ckpt.load_checkpoint(tmp_path)


def test_corrupt_trainer_state(tmp_path):
    _save(tmp_path)
    (tmp_path / "step-0000003" / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt checkpoint: cannot read"):
        ckpt.load_trainer_state(tmp_path / "step-0000003")


def test_config_weights_mismatch(tmp_path):
    _save(tmp_path)
    config_path = tmp_path / "step-0000003" / "config.json"
    metadata = json.loads(config_path.read_text())
    metadata["model"]["n_layers"] = 3
    metadata["model"]["d_ff"] = 96
    config_path.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"do not match its config .*missing: blocks\.2\..*shape: "):
        ckpt.load_checkpoint(tmp_path)
    metadata["model"]["attention"]["type"] = "linear"
    config_path.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="malformed model config"):
        ckpt.load_checkpoint(tmp_path)


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentattn generate: error: no checkpoint in") and err.count("\n") == 1


def test_configs_written_before_rope_scaling_and_biases_still_load(tmp_path):
    """config.json of older checkpoints lacks `qkv_bias`, `llama3`, `linear_factor` and "tokens"."""
    model = _save(tmp_path, "gqa")
    config_path = tmp_path / "step-0000003" / "config.json"
    metadata = json.loads(config_path.read_text())
    for key in ("qkv_bias",):
        del metadata["model"]["attention"][key]
    for key in ("llama3", "linear_factor"):
        del metadata["model"]["attention"]["rope"][key]
    config_path.write_text(json.dumps(metadata))
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.config == model.config
    separator = loaded.tokenizer.token_to_id("<|endoftext|>")
    assert (loaded.tokens.bos_id, loaded.tokens.eos_ids, loaded.tokens.add_bos) == (
        separator,
        (separator,),
        True,
    )


def test_special_tokens_are_checked(tmp_path):
    _save(tmp_path)
    config_path = tmp_path / "step-0000003" / "config.json"
    metadata = json.loads(config_path.read_text())
    tokens = {"bos_token_id": 1, "eos_token_ids": [9999], "add_bos_token": True, "chat_template": None}
    config_path.write_text(json.dumps({**metadata, "tokens": tokens}))
    with pytest.raises(ValueError, match=r"special token ids \[9999\] lie outside the vocabulary"):
        ckpt.load_checkpoint(tmp_path)
    config_path.write_text(json.dumps({**metadata, "tokens": {"bos_token_id": 1}}))
    with pytest.raises(ValueError, match="malformed special tokens"):
        ckpt.load_checkpoint(tmp_path)
