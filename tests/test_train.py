"""Training: schedule, batches, checkpoints, exact resume (also after SIGKILL), DDP on gloo, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentattn import checkpoint as ckpt
from latentattn.cli import main
from latentattn.train import TrainConfig, batch_at, lr_at, train

STEPS = 150


def _command(out: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        *("-m", "latentattn", "train", "--out", str(out), "--preset", "debug", "--data", str(corpus)),
        *("--cache-dir", str(corpus.parent / "cache"), "--steps", str(STEPS), "--batch-size", "4"),
        *("--log-every", "1", "--eval-every", "25", "--checkpoint-every", "5", "--quiet", *extra),
    ]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, check=False)


def _log(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k != "tokens_per_s"} for record in records]


def test_warmup_then_cosine_to_the_floor():
    config = TrainConfig(out="x", steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(55, config) == pytest.approx(0.55e-3)
    assert lr_at(100, config) == pytest.approx(1e-4)


def test_batches_are_a_function_of_seed_step_and_rank():
    tokens = torch.arange(1000).numpy()
    x, y = batch_at(tokens, window=8, batch_size=3, seed=1, step=5, micro=0, rank=0)
    assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])
    again, _ = batch_at(tokens, window=8, batch_size=3, seed=1, step=5, micro=0, rank=0)
    other, _ = batch_at(tokens, window=8, batch_size=3, seed=1, step=5, micro=0, rank=1)
    assert torch.equal(x, again) and not torch.equal(x, other)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"preset": "huge"}, "unknown preset 'huge'; choose one of debug, small"),
        ({"attn": "mlp"}, "TrainConfig.attn must be one of mha, gqa, mqa, mla, got 'mlp'"),
        ({"steps": 0}, "TrainConfig.steps must be positive, got 0"),
        ({"context": 65, "preset": "debug"}, r"TrainConfig.context must lie in \[1, 64\]"),
        ({"dtype": "fp8"}, "TrainConfig.dtype must be one of float32, fp32, bfloat16, bf16, got .fp8."),
    ],
)
def test_config_errors(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out="x", **options)


def test_resume_after_sigkill_reaches_the_same_losses(tmp_path, corpus):
    """Oracle: the same run uninterrupted. Losses, val losses and final weights must be identical."""
    reference = _run(_command(tmp_path / "reference", corpus))
    assert reference.returncode == 0, reference.stderr

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, *_command(killed, corpus)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "latest").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = ckpt.load_checkpoint(killed).step
    assert 0 < interrupted_at < STEPS, "the run should have been killed between checkpoints"

    resumed = _run(_command(killed, corpus, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert _log(killed) == _log(tmp_path / "reference")
    final = [load_file(ckpt.find_checkpoint(run) / ckpt.WEIGHTS) for run in (killed, tmp_path / "reference")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])


def test_ddp_two_processes_on_gloo(tmp_path, corpus):
    out = tmp_path / "ddp"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = _command(out, corpus)
    command[command.index(str(STEPS))] = "6"
    result = _run([*args, *command])
    assert result.returncode == 0, result.stderr
    records = [r for r in _log(out) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["tokens"] == 6 * 2 * 4 * 64  # steps · processes · batch · context
    assert ckpt.load_checkpoint(out).step == 6 and ckpt.load_checkpoint(out).train["world_size"] == 2


@pytest.mark.parametrize("failure", ["empty corpus", "cache under a file"])
def test_ddp_error_on_rank_0_reaches_every_rank_in_one_line(tmp_path, corpus, failure):
    """Only rank 0 prepares the data; its error (an empty corpus, or an OSError writing the cache) must
    reach rank 1 too, which would otherwise die inside a collective with a traceback, and rank 0 must
    not print a traceback either. torchrun writes each rank's stderr to a file."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "file").write_text("")
    data, cache = {
        "empty corpus": (tmp_path / "empty.txt", tmp_path / "cache"),
        "cache under a file": (corpus, tmp_path / "file" / "cache"),
    }[failure]
    logs = tmp_path / "logs"
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = _run(
        [
            *(*torchrun, "--log-dir", str(logs), "--redirects", "2"),
            *("-m", "latentattn", "train", "--data", str(data), "--preset", "debug"),
            *("--out", str(tmp_path / "run"), "--cache-dir", str(cache)),
        ]
    )
    assert result.returncode != 0
    stderr_files = sorted(logs.glob("*/attempt_0/*/stderr.log"))
    assert [path.parent.name for path in stderr_files] == ["0", "1"]
    message = {
        "empty corpus": "the corpus is empty: no non-blank text in the given --data files",
        "cache under a file": f"Not a directory: '{cache}'",
    }[failure]
    assert [path.read_text() for path in stderr_files] == [f"latentattn train: error: {message}\n"] * 2


def test_in_process_run_then_resume_rules(tmp_path, corpus):
    config = TrainConfig(
        out=str(tmp_path / "run"),
        preset="debug",
        attn="gqa",
        data=(str(corpus),),
        cache_dir=str(corpus.parent / "cache"),
        steps=4,
        batch_size=2,
        eval_every=2,
        eval_batches=1,
        checkpoint_every=2,
    )
    result = train(config, quiet=True)
    assert result.step == 4 and result.checkpoint == tmp_path / "run" / "step-0000004"
    assert [r["step"] for r in _log(tmp_path / "run") if "val_loss" in r] == [2, 4]
    with pytest.raises(ValueError, match="already holds a checkpoint; pass --resume"):
        train(config, quiet=True)
    log = tmp_path / "run" / "log.jsonl"
    complete = log.read_text()
    log.write_text(complete + '{"step": 5, "loss": 2.')  # killed mid-write: the partial line goes
    finished = train(TrainConfig(**{**config.__dict__, "resume": True}), quiet=True)
    assert finished.step == 4 and finished.val_loss == pytest.approx(result.val_loss, rel=1e-6)
    assert log.read_text() == complete
    with pytest.raises(
        ValueError, match=r"with other settings, which shape its trajectory: lr 0.002 -> 0.001 "
    ):
        train(TrainConfig(**{**config.__dict__, "resume": True, "lr": 1e-3}), quiet=True)
    log.write_text(complete.replace("\n", '\n{"step": 2, "lo\n', 1))  # not a partial last line: an error
    with pytest.raises(ValueError, match=r"log.jsonl, line 2 is not a log record \(JSONDecodeError: "):
        train(TrainConfig(**{**config.__dict__, "resume": True}), quiet=True)

    saved = result.checkpoint / ckpt.CONFIG
    metadata = json.loads(saved.read_text())
    assert metadata["train"]["world_size"] == 1
    metadata["train"]["world_size"] = 2  # as if trained under torchrun --nproc_per_node=2
    saved.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"which shape its trajectory: world_size 2 -> 1 \("):
        train(TrainConfig(**{**config.__dict__, "resume": True}), quiet=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "EMPTY"], "the corpus is empty"),
        (["--data", "MISSING"], "does not exist"),
        (
            ["--data", "TINY", "--preset", "debug", "--context", "2"],
            "the validation split has 0 tokens, not more than the context of 2; add text or lower --context",
        ),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "tiny.txt").write_text("hello world\n")
    paths = {
        "EMPTY": str(tmp_path / "empty"),
        "MISSING": str(tmp_path / "missing"),
        "TINY": str(tmp_path / "tiny.txt"),
    }
    args = [paths.get(arg, arg) for arg in args]
    assert main(["train", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentattn train: error:") and message in err and err.count("\n") == 1


def test_python_dash_m_entry_point():
    result = _run(["-m", "latentattn", "train", "--help"])
    assert result.returncode == 0 and "--resume" in result.stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"d_ff": 0}, "TrainConfig.d_ff must be positive, got 0"),
        ({"init_from": "run", "kv_lora_rank": 8}, "init_from takes the checkpoint's shape"),
        ({"attn": "gqa", "n_heads": 3}, r"n_heads \(3\) must be a multiple of n_kv_heads \(2\)"),
        ({"attn": "mla", "qk_rope_head_dim": 5}, "qk_rope_head_dim must be even"),
    ],
)
def test_shape_override_errors(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out="x", preset="debug", **options)


def _debug_run(tmp_path: Path, corpus: Path, name: str, **options) -> TrainConfig:
    defaults = {"steps": 3, "batch_size": 2, "eval_every": 3, "eval_batches": 1, "log_every": 1}
    return TrainConfig(
        out=str(tmp_path / name),
        preset="debug",
        data=(str(corpus),),
        cache_dir=str(corpus.parent / "cache"),
        **{**defaults, **options},
    )


def test_shape_overrides_init_from_and_recompute_kv(tmp_path, corpus):
    """Overrides reach the model; `init_from` starts from the checkpoint's weights and tokenizer (with a
    negligible lr the weights stay put); `recompute_kv` changes memory, not the trajectory."""
    shaped = _debug_run(
        tmp_path, corpus, "a", attn="mla", n_heads=2, kv_lora_rank=12, qk_rope_head_dim=4, d_ff=96
    )
    first = train(shaped, quiet=True)
    source = ckpt.load_checkpoint(first.checkpoint)
    attention = source.config.attention
    assert (attention.n_heads, attention.kv_lora_rank, attention.qk_rope_head_dim) == (2, 12, 4)
    assert source.config.d_ff == 96

    tuned = train(
        _debug_run(tmp_path, corpus, "b", steps=1, lr=1e-12, init_from=str(tmp_path / "a")), quiet=True
    )
    loaded = ckpt.load_checkpoint(tuned.checkpoint)
    assert loaded.config == source.config and loaded.tokenizer.to_str() == source.tokenizer.to_str()
    for name, weight in loaded.model.state_dict().items():
        torch.testing.assert_close(weight, source.model.state_dict()[name], rtol=0, atol=1e-9)

    short = train(_debug_run(tmp_path, corpus, "short", context=16), quiet=True)
    with pytest.raises(ValueError, match=r"--context 64 exceeds the context of .* \(16 tokens\)"):
        train(_debug_run(tmp_path, corpus, "long", init_from=str(short.checkpoint)), quiet=True)

    recomputed = _debug_run(tmp_path, corpus, "c", attn="mla", n_heads=2, kv_lora_rank=12, qk_rope_head_dim=4)
    plain = train(replace(recomputed, out=str(tmp_path / "d")), quiet=True)
    again = train(replace(recomputed, recompute_kv=True), quiet=True)
    assert _log(tmp_path / "c") == _log(tmp_path / "d") and again.val_loss == plain.val_loss


def test_runs_saved_under_older_names_read_as_today_s():
    """A run saved with `rope_head_dim` and `fp32` (before registry.DTYPES and qk_rope_head_dim) resumes
    with the same settings: the record is read in today's names, so nothing counts as changed."""
    from latentattn.train import _train_record

    record = _train_record(Path("run"), {"steps": 5, "rope_head_dim": 8, "dtype": "fp32"})
    assert record == {"steps": 5, "qk_rope_head_dim": 8, "dtype": "float32"}
