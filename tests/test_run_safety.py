"""Run directories never lose the user's data and errors are one line: `--out` checks, the run lock,
own-names-only cleanup, a diverging run, resuming and extending runs, and where a run's data lives.

Each CLI case runs the real command in a subprocess and checks the exit code, the one-line stderr and
that the user's files are untouched. Oracles: the files as they were; for extending, the same
extension run without an interruption (exact losses and weights)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentattn import checkpoint as ckpt
from latentattn import run_dir
from latentattn import train as train_module
from latentattn.data import train_tokenizer
from latentattn.model import LanguageModel, get_preset
from latentattn.train import TrainConfig, lr_at, resume_config, train


def _train_args(out: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        *("train", "--out", str(out), "--preset", "debug", "--data", str(corpus)),
        *("--cache-dir", str(corpus.parent / "cache"), "--batch-size", "2", "--eval-batches", "1", *extra),
    ]


def _latentattn(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "latentattn", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False, cwd=cwd)


def _one_line_error(result: subprocess.CompletedProcess, verb: str) -> str:
    """The message of a one-line `latentattn VERB: error: ...` and exit 2."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    prefix = f"latentattn {verb}: error: "
    assert result.stderr.startswith(prefix), result.stderr
    return result.stderr[len(prefix) : -1]


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders)."""
    return {
        str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
        for path in sorted(folder.rglob("*"))
    }


def _config(tmp_path: Path, corpus: Path, name: str, **options) -> TrainConfig:
    defaults = {"steps": 4, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "log_every": 1}
    paths = {"out": str(tmp_path / name), "data": (str(corpus),), "cache_dir": str(corpus.parent / "cache")}
    return TrainConfig(preset="debug", **{**paths, **defaults, **options})


def _log(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k != "tokens_per_s"} for record in records]


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, corpus):
    """The issue's reproduction: `tmp-data` and `step-notes` in --out were deleted by the cleanup."""
    out = tmp_path / "p"
    (out / "tmp-data").mkdir(parents=True)
    (out / "step-notes").mkdir()
    (out / "tmp-data" / "f").write_text("x\n")
    before = _tree(out)
    message = _one_line_error(_latentattn(*_train_args(out, corpus, "--steps", "3")), "train")
    assert message == (
        f"--out '{out}' is a non-empty directory that holds no latentattn training run; "
        "choose a new or empty directory"
    )
    assert _tree(out) == before


def test_stale_temporaries_of_dead_processes_go_and_nothing_else(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    own, stale = os.getpid(), dead.pid
    keep = ["tmp-data", "step-notes", f"tmp-step-0000004-{own}", f"tmp-notes-{stale}", f"tmp-step-4-{stale}"]
    gone = [f"tmp-step-0000004-{stale}", f"tmp-latest-{stale}", f"tmp-checkpoints.json-{stale}"]
    for name in keep + gone:
        (tmp_path / name).mkdir()
    with run_dir.locked(tmp_path, owner="training run") as lock:
        assert lock.stale_pid is None and (tmp_path / "lock").read_text() == f"{own}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "lock"])
    assert (tmp_path / "lock").read_text() == ""  # released cleanly: no PID left behind


def test_a_second_train_on_the_same_out_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, corpus):
    """Two real processes: the second is refused while the first trains; after a SIGKILL of the first,
    the next run takes its lock over and says so."""
    out = tmp_path / "run"
    long_run = ("--steps", "100000", "--checkpoint-every", "100000", "--quiet")
    first = subprocess.Popen(
        [sys.executable, "-m", "latentattn", *_train_args(out, corpus, *long_run)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if (out / "lock").exists() and (out / "lock").read_text() == f"{first.pid}\n":
                break
            time.sleep(0.05)
        message = _one_line_error(_latentattn(*_train_args(out, corpus, "--steps", "3")), "train")
        assert first.poll() is None, "the first run should still be training"
    finally:
        first.kill()
        first.wait()
    assert message == (
        f"--out '{out}' is in use by another training run (process {first.pid}); "
        "wait for it to finish or choose another --out"
    )
    assert not (out / "latest").exists()  # the refused run wrote no checkpoint
    resumed = _latentattn(*_train_args(out, corpus, "--steps", "2", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"note: took over the lock of process {first.pid}, which ended without releasing it\n" in (
        resumed.stderr
    )
    assert [r["step"] for r in _log(out) if "loss" in r] == [2]  # the killed run's records are gone


def test_a_diverging_run_stops_and_keeps_its_good_checkpoints(tmp_path, corpus):
    out = tmp_path / "run"
    args = ("--steps", "30", "--lr", "1e6", "--warmup", "0", "--checkpoint-every", "1", "--keep", "30")
    message = _one_line_error(_latentattn(*_train_args(out, corpus, *args, "--quiet")), "train")
    kept = ckpt.latest_checkpoint(out)
    assert kept is not None
    step = int(kept.name.removeprefix("step-"))
    assert message.startswith(f"training diverged at step {step + 1}: the ")
    assert message.endswith(
        f"; stopped without saving (the last good checkpoint, {kept}, is kept). "
        "Lower --lr or lengthen --warmup"
    )
    saved = sorted(out.glob("step-*"))
    assert saved[-1] == kept
    for directory in saved:
        weights = load_file(directory / ckpt.WEIGHTS)
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), directory


@pytest.mark.parametrize("verb", ["train", "demo", "study"])
@pytest.mark.parametrize("where", ["a file", "under a file", "a read-only folder"])
def test_unusable_out_is_refused_before_any_work(tmp_path, corpus, verb, where):
    if where == "a read-only folder" and os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder; 'under a file' fails even for root")
    (tmp_path / "file").write_text("mine\n")
    (tmp_path / "ro").mkdir()
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "run", "a read-only folder": None}
    out = out[where] or tmp_path / "ro" / "run"
    os.chmod(tmp_path / "ro", 0o555)
    before = _tree(tmp_path)
    try:
        cache = str(tmp_path / "cache")
        args = {
            "train": _train_args(out, corpus),
            "demo": ["demo", "--out", str(out), "--steps", "1"],
            "study": ["study", "--preset", "smoke", "--out", str(out), "--cache-dir", cache],
        }[verb]
        message = _one_line_error(_latentattn(*args), verb)
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    expected = {
        "a file": f"--out '{out}' exists and is not a directory",
        "under a file": f"cannot write to --out '{out}': Not a directory",
        "a read-only folder": f"cannot write to --out '{out}': Permission denied",
    }[where]
    assert message == expected
    assert _tree(tmp_path) == before


def test_resume_takes_the_saved_settings_and_refuses_only_trajectory_changes(tmp_path, corpus):
    first = train(_config(tmp_path, corpus, "run", batch_size=3, warmup=3), quiet=True)
    out = tmp_path / "run"
    # only --out, --resume and settings that do not shape training: the rest is the run's own
    args = ("train", "--out", str(out), "--resume", "--steps", "6", "--eval-every", "3", "--keep", "1")
    resumed = _latentattn(*args, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    record = ckpt.load_checkpoint(out).train
    assert (record["batch_size"], record["warmup"], record["steps"], record["eval_every"]) == (3, 3, 6, 3)
    assert record["data"] == [str(corpus)] and record["preset"] == "debug"
    assert [r["step"] for r in _log(out) if "loss" in r] == list(range(1, 7))
    assert first.step == 4

    listed = _latentattn("checkpoints", str(out), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [row["step"] for row in rows if row["best"]] == [ckpt.load_checkpoint(out / "best").step]
    assert (rows[-1]["step"], rows[-1]["latest"]) == (6, True) and len(rows) <= 2  # --keep 1, plus best

    before = _tree(out)
    message = _one_line_error(_latentattn(*args[:4], "--lr", "1e-3", "--batch-size", "2"), "train")
    assert message == (
        f"the run in '{out}' was trained with other settings, which shape its trajectory: "
        "batch_size 3 -> 2, lr 0.002 -> 0.001 (continue it with its own settings, or choose another --out)"
    )
    message = _one_line_error(_latentattn(*args[:4], "--steps", "5"), "train")
    assert message == (
        f"--steps 5 is below step 6 of the run in '{out}': a run can be extended, not shortened; "
        "choose another --out for a new run"
    )
    assert _tree(out) == before


def test_an_extended_run_resumes_exactly(tmp_path, corpus, monkeypatch):
    """Oracle: the same extension (4 steps, then --resume --steps 8) without interruption. Extending
    continues the cosine towards the new horizon from the step reached; earlier steps keep theirs."""
    reference = _config(tmp_path, corpus, "reference", checkpoint_every=2)
    train(reference, quiet=True)
    train(resume_config(reference.out, steps=8), quiet=True)

    interrupted = replace(reference, out=str(tmp_path / "interrupted"))
    train(interrupted, quiet=True)
    real_step = train_module._train_step

    def step_until_6(*args, **kwargs):
        if args[-1] == 6:  # the 7th step, after the checkpoint at step 6
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "_train_step", step_until_6)
    with pytest.raises(KeyboardInterrupt):
        train(resume_config(interrupted.out, steps=8), quiet=True)
    monkeypatch.setattr(train_module, "_train_step", real_step)
    assert ckpt.load_checkpoint(interrupted.out).step == 6
    train(resume_config(interrupted.out), quiet=True)  # the saved settings: 8 steps

    assert _log(Path(interrupted.out)) == _log(Path(reference.out))
    lrs = {r["step"]: r["lr"] for r in _log(Path(reference.out)) if "lr" in r}
    extended = replace(reference, steps=8)
    assert lrs == {s: lr_at(s - 1, reference if s <= 4 else extended) for s in range(1, 9)}
    weights = [
        load_file(ckpt.find_checkpoint(out) / ckpt.WEIGHTS) for out in (interrupted.out, reference.out)
    ]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[1])


def _saved_run(out: Path, step: int, record: dict) -> None:
    """A run directory with one checkpoint of a debug-sized model and the "train" `record`."""
    tokenizer = train_tokenizer([Path(textwrap.__file__).read_text()], vocab_size=300)
    model = LanguageModel(get_preset("debug").model("mla", vocab_size=tokenizer.get_vocab_size()))
    ckpt.save_checkpoint(out, step=step, model=model, tokenizer=tokenizer, train=record, trainer_state={})


def test_a_checkpoint_not_written_by_train_cannot_be_resumed(tmp_path):
    _saved_run(tmp_path, 0, {"converted_from": "runs/mha", "method": "svd"})
    config = tmp_path / "step-0000000" / "config.json"
    with pytest.raises(ValueError, match=f'^{config} has no "train" record of latentattn train, so its run '):
        resume_config(str(tmp_path))


def test_demo_on_a_longer_run_names_its_own_options(tmp_path):
    """demo continues the run in --out; fewer --steps than it has taken is refused in demo's terms."""
    out = tmp_path / "demo"
    _saved_run(out, 5, {**asdict(TrainConfig(out=str(out), steps=5)), "data": [], "world_size": 1})
    before = _tree(out)
    message = _one_line_error(_latentattn("demo", "--out", str(out), "--steps", "3"), "demo")
    assert message == (
        f"--steps 3 is below step 5 of the run in '{out}': a run can be extended, not shortened; "
        "choose another --out for a new run"
    )
    after = _tree(out)
    assert after.pop("lock") == b"" and after == before  # only the run's lock was added, and released


def test_eval_finds_the_data_from_another_directory(tmp_path, corpus, monkeypatch):
    """The run records absolute data and cache paths, so a relative --data works from anywhere."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    relative = os.path.relpath(corpus, tmp_path / "a")
    config = _config(tmp_path, corpus, "run", data=(relative,), cache_dir="cache", steps=2)
    train(config, quiet=True)
    record = ckpt.load_checkpoint(config.out).train
    assert record["data"] == [str(corpus)] and record["cache_dir"] == str(tmp_path / "a" / "cache")
    args = ("eval", str(tmp_path / "run"), "--windows", "2", "--formats", "none", "--json")
    result = _latentattn(*args, cwd=tmp_path / "b")
    assert result.returncode == 0, result.stderr
    assert math.isfinite(json.loads(result.stdout)[0]["val_loss"])


def test_short_runs_warn_about_the_warmup_and_progress_prints_lines(tmp_path, corpus):
    """stderr is a pipe here: the progress shows as plain lines, one per tenth of the run at most."""
    out = tmp_path / "run"
    result = _latentattn(*_train_args(out, corpus, "--steps", "4", "--warmup", "8", "--eval-every", "10"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    warning = [line for line in lines if line.startswith("warning:")]
    assert warning == [
        "warning: --warmup 8 is longer than --steps 4: the learning rate peaks at 0.001, not --lr 0.002; "
        "lower --warmup to reach it"
    ]
    assert [line.split()[1] for line in lines if line.startswith("train ")] == ["1/4", "2/4", "3/4", "4/4"]


def test_publish_directory_is_all_or_nothing(tmp_path):
    """The one atomic directory write (caches, checkpoints, --out of import/export/convert): a failed
    write leaves the old target and no temporary; a finished one replaces it; `keep_existing` keeps it."""
    from latentattn.run_dir import publish_directory

    target = tmp_path / "entry"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def fail(directory):
        (directory / "half.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_directory(target, fail)
    assert [p.name for p in tmp_path.iterdir()] == ["entry"] and (target / "old.txt").exists()
    assert not publish_directory(target, lambda d: (d / "new.txt").write_text("new"), keep_existing=True)
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert publish_directory(target, lambda d: (d / "new.txt").write_text("new"))
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
