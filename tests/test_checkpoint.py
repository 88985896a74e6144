"""Checkpoints: round trip, atomic layout, and one-line errors for missing or corrupt files."""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path

import pytest
import torch

from latentattn import checkpoint as ckpt
from latentattn.cli import main
from latentattn.data import train_tokenizer
from latentattn.model import LanguageModel, get_preset
from latentattn.registry import ATTENTION_KINDS


def _save(run_dir: Path, kind: str = "mla", step: int = 3, **options) -> LanguageModel:
    torch.manual_seed(0)
    tokenizer = train_tokenizer([Path(textwrap.__file__).read_text()], vocab_size=300)
    model = LanguageModel(get_preset("debug").model(kind, vocab_size=tokenizer.get_vocab_size()))
    ckpt.save_checkpoint(
        run_dir,
        step=step,
        model=model,
        tokenizer=tokenizer,
        train={"seed": 0},
        trainer_state={"step": step},
        **options,
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


def test_keep_the_newest_and_the_best(tmp_path):
    """--keep 2: the two newest stay, and `best` (lowest val loss) besides; `latest` and `best` load."""
    for step, val_loss in ((3, 4.0), (6, 3.0), (9, 3.5), (12, None), (15, 3.2)):
        _save(tmp_path, step=step, val_loss=val_loss, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best", "checkpoints.json", "latest", "step-0000006", "step-0000012", "step-0000015"]
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "step-0000015"
    assert ckpt.load_checkpoint(tmp_path / "best").directory == tmp_path / "step-0000006"
    assert ckpt.load_checkpoint(tmp_path / "latest").step == 15
    listed = ckpt.list_checkpoints(tmp_path)
    assert [(c.step, c.val_loss, c.latest, c.best) for c in listed] == [
        (6, 3.0, False, True),
        (12, None, False, False),
        (15, 3.2, True, False),
    ]
    with pytest.raises(ValueError, match="keep must be at least 1, got 0"):
        _save(tmp_path, step=18, keep=0)


def test_cleanup_deletes_only_what_the_run_wrote(tmp_path):
    """Folders named like the run's (`tmp-*`, `step-*`, even an exact `step-NNNNNNN` the run's
    checkpoints.json does not list) are never touched; a same-named foreign folder is refused."""
    foreign = ["tmp-data", "step-notes", "step-0000001", "step-00000020", "tmp-step-0000005"]
    for name in foreign:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("mine")
    for step in (3, 6, 9):
        _save(tmp_path, step=step, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*foreign, "checkpoints.json", "latest", "step-0000009"]
    )
    assert all((tmp_path / name / "f").read_text() == "mine" for name in foreign)
    with pytest.raises(ValueError, match="step-0000001 exists but was not written by this run"):
        _save(tmp_path, step=1)


def test_checkpoint_files_share_one_mode(tmp_path):
    """safetensors creates its file 0600; the weights get the mode of the other files (umask 022: 0644)."""
    umask = os.umask(0o022)
    try:
        _save(tmp_path)
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "step-0000003").iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_pointer_must_name_a_checkpoint(tmp_path):
    _save(tmp_path)
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(ValueError, match=r"latest must name a checkpoint like step-0000400, got '../../etc'"):
        ckpt.load_checkpoint(tmp_path)


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
    with pytest.raises(
        ValueError, match="'model.attention.type' must be one of mha, gqa, mqa, mla, got \"linear\""
    ):
        ckpt.load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(attention="mla"), "'model.attention' must be an object, got \"mla\""),
        (lambda m: m.pop("attention"), "'model.attention' must be an object, got nothing"),
        (lambda m: m["attention"].update(rope=[]), r"'model.attention.rope' must be an object, got \[\]"),
        (lambda m: m["attention"].update(n_head=4), r"'model.attention' is malformed \(.*'n_head'"),
        (lambda m: m["attention"].update(n_heads=0), "MLAConfig.n_heads must be positive, got 0"),
        (lambda m: m.update(d_ff="96"), "ModelConfig.d_ff must be an integer, got '96'"),
    ],
)
def test_config_errors_name_the_file_and_the_field(tmp_path, edit, message):
    _save(tmp_path)
    config_path = tmp_path / "step-0000003" / "config.json"
    metadata = json.loads(config_path.read_text())
    edit(metadata["model"])
    config_path.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=f"^corrupt checkpoint: {config_path}: {message}"):
        ckpt.load_checkpoint(tmp_path)


def test_resuming_a_checkpoint_without_a_train_record_names_the_file(tmp_path, capsys):
    """A checkpoint not written by train (converted, imported) cannot be continued: the message names
    its config.json and the missing record, instead of `error: preset`."""
    _save(tmp_path)
    config_path = tmp_path / "step-0000003" / "config.json"
    metadata = json.loads(config_path.read_text())
    del metadata["train"]
    config_path.write_text(json.dumps(metadata))
    assert main(["train", "--out", str(tmp_path), "--resume"]) == 2
    assert capsys.readouterr().err == (
        f'latentattn train: error: {config_path} has no "train" record of latentattn train, so its run '
        "cannot be continued; start a new run from it with --init-from\n"
    )


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


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa", "mla"])
def test_model_configs_round_trip_by_kind_and_older_gqa_types_still_read(kind):
    """ "type" is the attention kind, whose registry entry names the config class; checkpoints written
    before said "gqa" for every K/V kind."""
    config = get_preset("debug").model(kind)
    data = ckpt.model_config_to_dict(config)
    assert data["attention"]["type"] == kind
    assert ckpt.model_config_from_dict(data) == config
    if kind != "mla":
        data["attention"]["type"] = "gqa"
        assert ckpt.model_config_from_dict(data) == config
