"""`latentattn heal`: distillation from the source model, exact resume, attention-only training, errors,
and a healed checkpoint that `generate` and `eval` read.

Oracles: the distillation loss on a fixed batch before and after healing (it must fall), the weights of
an uninterrupted run (a resumed one must equal them exactly), the converted checkpoint's weights (frozen
parts must not move), KL of identical logits (zero), and the real command in a subprocess.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from latentattn import checkpoint as ckpt
from latentattn.cli import main
from latentattn.convert import ConversionConfig, convert_checkpoint
from latentattn.data import train_tokenizer
from latentattn.distill import Distillation, distillation_loss, recorded_teacher
from latentattn.evaluate import IMPORTED_WINDOW, window_length
from latentattn.heal import heal_config
from latentattn.model import LanguageModel, get_preset
from latentattn.train import TrainConfig, batch_at, train

TEXT = Path(textwrap.__file__).read_text()


def _source(directory: Path, tokenizer) -> Path:
    """A random debug-preset GQA checkpoint (4 query heads, 2 kv heads of 16: 64 cached values)."""
    torch.manual_seed(0)
    model = LanguageModel(get_preset("debug").model("gqa", vocab_size=tokenizer.get_vocab_size()))
    ckpt.save_checkpoint(
        directory, step=1, model=model, tokenizer=tokenizer, train={"preset": "debug"}, trainer_state={}
    )
    return directory


@pytest.fixture(scope="module")
def converted(tmp_path_factory, corpus) -> Path:
    """A debug-preset GQA model trained briefly (4 query heads, 2 kv heads of 16: 64 cached values),
    converted to MLA at 8 (C 4 + R 4): lossy, so there is something to heal."""
    root = tmp_path_factory.mktemp("heal")
    source = root / "source"
    settings = {"steps": 40, "batch_size": 8, "eval_every": 40, "checkpoint_every": 40, "lr": 3e-3}
    data = {"data": (str(corpus),), "cache_dir": str(corpus.parent / "cache")}
    train(TrainConfig(out=str(source), preset="debug", attn="gqa", **settings, **data), quiet=True)
    config = ConversionConfig(kv_lora_rank=4, qk_rope_head_dim=4)
    convert_checkpoint(source, root / "converted", config, calibration_file=corpus / "textwrap.py")
    return root / "converted"


@pytest.fixture(scope="module")
def damaged(converted, tmp_path_factory) -> Path:
    """The converted checkpoint with noise on every weight matrix: far from its teacher (the brief
    training above leaves attention, hence conversion, nearly irrelevant to the logits)."""
    directory = tmp_path_factory.mktemp("damaged") / "converted"
    shutil.copytree(converted, directory)
    weights = load_file(directory / ckpt.WEIGHTS)
    generator = torch.Generator().manual_seed(1)
    for name, weight in weights.items():
        if weight.dim() == 2:
            weights[name] = weight + weight.std() * torch.randn(weight.shape, generator=generator)
    save_file(weights, directory / ckpt.WEIGHTS)
    return directory


def _heal(converted: Path, out: Path, corpus: Path, **options) -> TrainConfig:
    settings = {
        "steps": 6,
        "batch_size": 2,
        "context": 32,
        "lr": 1e-3,
        "warmup": 1,
        "eval_every": 3,
        "eval_batches": 1,
        "checkpoint_every": 2,
        "log_every": 1,
        "data": (str(corpus),),
        "cache_dir": str(corpus.parent / "cache"),
    }
    return heal_config(converted, out=out, **{**settings, **options})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(run).model.state_dict()


def test_identical_logits_have_zero_distillation_loss():
    logits = torch.randn(2, 5, 11)
    assert distillation_loss(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, torch.randn(2, 5, 11), 2.0).item() > 0


def test_healing_lowers_the_distillation_loss(damaged, corpus, tmp_path):
    config = _heal(damaged, tmp_path / "healed", corpus, steps=20, warmup=5, eval_every=20)
    assert config.teacher == recorded_teacher(damaged) and config.init_from == str(damaged)
    result = train(config, quiet=True)
    teacher = ckpt.load_checkpoint(config.teacher).model
    tokens = np.array(ckpt.load_checkpoint(damaged).tokenizer.encode(TEXT).ids)
    inputs, targets = batch_at(tokens, window=32, batch_size=8, seed=9, step=0, micro=0, rank=0)
    loss = Distillation(teacher, temperature=1.0, lm_weight=0.0)
    with torch.no_grad():
        before = loss(ckpt.load_checkpoint(damaged).model, inputs, targets).item()
        after = loss(ckpt.load_checkpoint(result.checkpoint).model, inputs, targets).item()
    assert after < 0.8 * before, (before, after)
    healed = ckpt.read_metadata(result.checkpoint)
    assert healed["conversion"] == ckpt.read_metadata(damaged)["conversion"]  # healable again
    assert healed["train"]["teacher"] == config.teacher and healed["step"] == 20


def test_resumed_healing_equals_an_uninterrupted_run(converted, corpus, tmp_path):
    """The run cut back to its step-4 checkpoint (as if killed after it), then resumed."""
    whole = train(_heal(converted, tmp_path / "whole", corpus, lm_weight=0.5, temperature=2.0), quiet=True)
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "whole", split)
    shutil.rmtree(split / "step-0000006")
    (split / ckpt.LATEST).write_text("step-0000004\n")
    resumed = heal_config(converted, out=split, resume=True)
    assert (resumed.lm_weight, resumed.temperature, resumed.lr) == (0.5, 2.0, 1e-3)  # the run's own
    train(resumed, quiet=True)
    expected, actual = _weights(whole.checkpoint), _weights(split)
    for name, weight in expected.items():
        assert torch.equal(actual[name], weight), name
    assert (split / "log.jsonl").read_text().count("\n") == (
        tmp_path / "whole" / "log.jsonl"
    ).read_text().count("\n")
    with pytest.raises(ValueError, match=r"other settings.*temperature 2\.0 -> 1\.5"):
        train(heal_config(converted, out=split, resume=True, steps=8, temperature=1.5))


def test_attention_only_healing_freezes_everything_else(converted, corpus, tmp_path):
    result = train(_heal(converted, tmp_path / "attn", corpus, trainable="attention", steps=2), quiet=True)
    before, after = _weights(converted), _weights(result.checkpoint)
    moved = {name for name, weight in after.items() if not torch.equal(weight, before[name])}
    attention = {name for name in after if ".attn." in name}
    assert moved and moved <= attention
    assert {name for name in after if name.endswith("w_dkv.weight")} <= moved


def test_a_checkpoint_without_its_source_needs_a_teacher(corpus, tmp_path):
    tokenizer = train_tokenizer([TEXT], vocab_size=300)
    source = _source(tmp_path / "plain", tokenizer)
    with pytest.raises(ValueError, match=r"records no source model .*name the teacher with --teacher"):
        heal_config(source, out=tmp_path / "out")


def test_a_teacher_with_another_vocabulary_is_refused(converted, corpus, tmp_path):
    other = _source(tmp_path / "other", train_tokenizer([TEXT], vocab_size=280))
    config = _heal(converted, tmp_path / "out", corpus, teacher=str(other))
    with pytest.raises(ValueError, match=r"vocabulary of 280 tokens, the model .* one of \d+"):
        train(config, quiet=True)
    assert not (tmp_path / "out" / "latest").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": 0.0, "teacher": "t", "init_from": "c"}, "temperature must be positive"),
        ({"lm_weight": -1.0, "teacher": "t", "init_from": "c"}, "lm_weight non-negative"),
        ({"lm_weight": 0.5}, "apply to distillation: name a teacher"),
        ({"teacher": "t"}, "teacher distils into a trained model: give init_from too"),
        ({"trainable": "mlp"}, "trainable must be one of all, attention, got 'mlp'"),
    ],
)
def test_bad_distillation_settings(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out="x", **options)


def _cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "latentattn", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def test_heal_command_then_generate_and_eval(converted, corpus, tmp_path):
    out = tmp_path / "healed"
    common = ("--data", str(corpus), "--cache-dir", str(corpus.parent / "cache"), "--context", "32")
    healed = _cli("heal", str(converted), "--out", str(out), "--steps", "2", "--batch-size", "2", *common)
    assert healed.returncode == 0, healed.stderr
    assert "distilling from" in healed.stderr and "step 2: val loss" in healed.stdout
    generated = _cli("generate", str(out), "--prompt", "def ", "--max-new-tokens", "4", "--temperature", "0")
    assert generated.returncode == 0, generated.stderr
    evaluated = _cli("eval", str(out), "--windows", "2", "--formats", "none", "full", "--json")
    assert evaluated.returncode == 0, evaluated.stderr


def test_heal_command_errors(converted, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["heal", str(converted), "--out", str(tmp_path / "bad"), "--train", "mlp"])
    assert exit_info.value.code == 2 and "invalid choice: 'mlp'" in capsys.readouterr().err
    plain = ckpt.find_checkpoint(recorded_teacher(converted))
    assert main(["heal", str(plain), "--out", str(tmp_path / "p")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("latentattn heal: error: ") and "records no source model" in error
    assert not (tmp_path / "p").exists()


def test_a_fine_tuned_model_is_evaluated_on_imported_windows(converted):
    """`eval` windows: a model trained here from scratch uses its context; one fine-tuned from a
    checkpoint (healed) at most IMPORTED_WINDOW tokens, like the imported model it came from."""
    loaded = ckpt.load_checkpoint(converted)
    long = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, max_seq_len=4096))
    assert window_length(dataclasses.replace(long, train={"preset": "debug"})) == 4096
    healed = dataclasses.replace(long, train={"preset": "debug", "init_from": str(converted)})
    assert window_length(healed) == IMPORTED_WINDOW
