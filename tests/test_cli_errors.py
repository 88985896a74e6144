"""`latentattn` refuses bad input before any work, stops cleanly on Ctrl-C and never loses results.

Oracle: the real command in a subprocess. A refused command exits 2 with exactly one line on stderr,
`latentattn VERB: error: ...`, naming the problem, before any work (a verb that had started would have
printed progress, or a checkpoint error for the missing checkpoints some cases name); the user's files
are byte for byte what they were. Ctrl-C (SIGINT to a running verb) exits 130 with one line.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from latentattn import checkpoint as ckpt
from latentattn.cli import main
from latentattn.data import train_tokenizer
from latentattn.model import LanguageModel, get_preset

TEXT = Path(textwrap.__file__).read_text()
PROC_IS_READ_ONLY = Path("/proc").is_dir()


def latentattn(*argv: str | bytes, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "latentattn", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, check=False)


def assert_refused(result: subprocess.CompletedProcess, verb: str, *fragments: str) -> None:
    """Exit 2, nothing on stdout, one stderr line naming the problem."""
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"latentattn {verb}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders)."""
    return {
        str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
        for path in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Untrained debug checkpoints (MLA, GQA) whose run recorded a text file as its data."""
    root = tmp_path_factory.mktemp("runs")
    (root / "text.py").write_text(TEXT)
    torch.manual_seed(0)
    tokenizer = train_tokenizer([TEXT], vocab_size=300)
    train = {"data": [str(root / "text.py")], "cache_dir": str(root / "cache")}
    found = {"root": root}
    for kind in ("mla", "gqa"):
        model = LanguageModel(get_preset("debug").model(kind, vocab_size=tokenizer.get_vocab_size()))
        ckpt.save_checkpoint(
            root / kind, step=1, model=model, tokenizer=tokenizer, train=train, trainer_state={}
        )
        found[kind] = root / kind
    return found


def copy_run(run: Path, target: Path, edit) -> Path:
    """A copy of `run` whose checkpoint's config.json went through `edit(metadata)`."""
    shutil.copytree(run, target)
    config = ckpt.find_checkpoint(target) / ckpt.CONFIG
    metadata = json.loads(config.read_text())
    edit(metadata)
    config.write_text(json.dumps(metadata))
    return target


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--gqa-kv-heads", "0"], ["gqa_kv_heads=0 must be positive and divide the 16 heads"]),
        (["--device", "bogus"], ["--device 'bogus' is not a torch device"]),
        (["--device", "meta"], ["--device meta holds no data"]),
        (["--threads", "-1"], ["--threads must be a positive number of threads, got -1"]),
        (["--threads", "0"], ["--threads must be a positive number of threads, got 0"]),
    ],
)
def test_bench_refuses_bad_values_before_measuring(flags, fragments):
    assert_refused(latentattn("bench", *flags), "bench", *fragments)


def test_study_refuses_bad_threads_before_training(tmp_path):
    out = tmp_path / "study"
    result = latentattn("study", "--preset", "smoke", "--out", str(out), "--threads", "0")
    assert_refused(result, "study", "--threads must be a positive number of threads, got 0")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("verb", ["bench", "generate", "eval"])
def test_cuda_without_cuda_is_refused(verb, tmp_path):
    checkpoint = [] if verb == "bench" else [str(tmp_path / "no-run")]  # checked before loading
    assert_refused(latentattn(verb, *checkpoint, "--device", "cuda"), verb, "has no cuda device here")


def _bad_plot_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "notes.txt").write_text("the user's notes\n")
    paths = {
        "a folder": (tmp_path / "folder.png", "is a folder; name a file"),
        "under a file": (tmp_path / "notes.txt" / "plot.png", "notes.txt' is not a folder"),
        "in a missing folder": (tmp_path / "missing" / "plot.png", "missing' does not exist"),
    }
    if PROC_IS_READ_ONLY:  # no file can be created there, not even by root
        paths["in a read-only folder"] = (Path("/proc/latentattn-plot.png"), "cannot write in '/proc'")
    return paths


def test_a_plot_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    """Every kind of bad path on `bench` (hours of work to lose); `cache` takes the same check."""
    cases = _bad_plot_paths(tmp_path)
    before = snapshot(tmp_path)
    for path, fragment in cases.values():
        result = latentattn("bench", "--contexts", "1K", "--impl", "mla-absorbed", "--plot", str(path))
        assert_refused(result, "bench", f"--plot '{path}'", fragment)
    path, fragment = cases["a folder"]
    assert_refused(latentattn("cache", "deepseek-v2", "--plot", str(path)), "cache", fragment)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("json_output", [False, True], ids=["table", "json"])
def test_a_plot_failing_late_comes_after_the_results(json_output, tmp_path, capsys, monkeypatch):
    """The write itself fails (disk full, a folder removed meanwhile): the results are printed first."""

    def fail(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("latentattn.plots.plot_cache_vs_context", fail)
    argv = ["cache", "deepseek-v2", "--plot", str(tmp_path / "cache.png")] + ["--json"] * json_output
    assert main(argv) == 2
    captured = capsys.readouterr()
    if json_output:
        assert json.loads(captured.out)["models"][0]["name"] == "deepseek-v2"
    else:
        assert "deepseek-v2" in captured.out
    assert captured.err.splitlines() == [
        f"latentattn cache: error: --plot '{tmp_path / 'cache.png'}': cannot write it (Permission denied); "
        "the results are printed above"
    ]


def test_generate_refuses_a_temperature_it_cannot_sample_with(tmp_path):
    """Every value SamplingConfig refuses is in test_validation.py; here the CLI's path."""
    result = latentattn("generate", str(tmp_path / "no-run"), "--temperature", "nan")
    assert_refused(result, "generate", "temperature must be 0 (greedy) or a finite number >= 1.18e-38")


def test_generate_refuses_a_prompt_that_is_not_utf8(tmp_path):
    """The shell passes `$'abc\\xff'` as raw bytes; Python hands them over as lone surrogates."""
    result = latentattn("generate", str(tmp_path / "no-run"), "--prompt", b"abc\xff")
    assert_refused(result, "generate", "prompt 1 is not valid UTF-8 text: byte 0xff at character 3")


def test_generate_on_a_chosen_device(runs):
    result = latentattn("generate", str(runs["mla"]), "--device", "cpu", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert "3 new tokens" in result.stdout


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--windows", "0"], "--windows must be positive, got 0"),
        (["--chunk", "0"], "--chunk must be a positive number of tokens, got 0"),
        (["--device", "bogus"], "--device 'bogus' is not a torch device"),
    ],
)
def test_eval_refuses_bad_values_before_loading(flags, fragment, tmp_path):
    assert_refused(latentattn("eval", str(tmp_path / "no-run"), *flags), "eval", fragment)


def test_eval_names_the_most_windows_the_split_holds(runs):
    result = latentattn("eval", str(runs["gqa"]), "--windows", "100000000")  # no note before the error
    assert_refused(result, "eval", "--windows must lie in [1, ", "got 100000000")


def test_eval_of_a_gqa_model_skips_the_8_bit_formats_and_shows_progress(runs):
    result = latentattn("eval", str(runs["gqa"]), "--windows", "2", "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    assert [row["format"] for row in json.loads(result.stdout)] == ["none", "full"]
    notes = result.stderr.splitlines()
    assert notes[0] == "  skipping int8, fp8: 8-bit latent caches need an MLA model, this one is gqa"
    assert notes[1:] == ["  none: 2/2 windows", "  full: 2/2 windows"]


def test_eval_of_8_bit_formats_on_a_gqa_model_is_refused_before_work(runs):
    assert_refused(
        latentattn("eval", str(runs["gqa"]), "--formats", "full", "int8"),
        "eval",
        "8-bit latent caches need an MLA model, this one is gqa",
    )


def test_eval_data_replaces_a_run_data_path_missing_here(runs, tmp_path):
    """An older run recorded its --data relative to the folder it trained in."""
    run = copy_run(runs["mla"], tmp_path / "run", lambda metadata: metadata["train"].update(data=["text.py"]))
    refused = latentattn("eval", str(run), "--windows", "2", cwd=tmp_path)
    assert_refused(refused, "eval", "the run trained on 'text.py', which does not exist from", "pass --data")
    given = latentattn("eval", str(run), "--windows", "2", "--data", str(runs["root"] / "text.py"), "--json")
    assert given.returncode == 0, given.stderr
    assert [row["format"] for row in json.loads(given.stdout)] == ["none", "full", "int8", "fp8"]


def test_a_malformed_config_names_the_file_and_the_field(runs, tmp_path):
    def break_attention(metadata):
        metadata["model"]["attention"] = "mla"

    run = copy_run(runs["mla"], tmp_path / "run", break_attention)
    config = ckpt.find_checkpoint(run) / ckpt.CONFIG
    assert_refused(
        latentattn("generate", str(run)), "generate", str(config), "'model.attention' must be an object"
    )


def test_cache_latent_format_for_models_without_a_latent():
    assert_refused(
        latentattn("cache", "llama-3-8b", "--latent-format", "int8"),
        "cache",
        "latent format int8 stores MLA latents and no model here is MLA (llama-3-8b)",
    )
    mixed = latentattn("cache", "deepseek-v2", "llama-3-8b", "--latent-format", "int8", "--json")
    assert mixed.returncode == 0
    rows = {row["name"]: row for row in json.loads(mixed.stdout)["models"]}
    assert (rows["deepseek-v2"]["latent_format"], rows["llama-3-8b"]["latent_format"]) == ("int8", None)
    assert (
        mixed.stderr == "note: --latent-format int8 stores MLA latents only; llama-3-8b counted at 16 bits\n"
    )


def test_cache_latent_format_needs_a_latent_the_8_bit_cache_can_hold():
    custom = ["--attn", "mla", "--layers", "1", "--kv-lora-rank", "200", "--rope-dim", "64"]
    assert_refused(
        latentattn("cache", *custom, "--latent-format", "int8"),
        "cache",
        "kv_lora_rank (d_c) must be at most 128 or a multiple of it, got 200",
    )


def test_version_is_the_installed_one():
    result = latentattn("--version")
    assert (result.returncode, result.stdout) == (
        0,
        f"latentattn {importlib.metadata.version('latentattn')}\n",
    )


def test_a_bug_shows_its_traceback(monkeypatch):
    """Only errors raised on purpose are the user's; an internal KeyError is a bug to report."""

    def broken(*args, **kwargs):
        raise KeyError("deepseek-v2")

    monkeypatch.setattr("latentattn.calculator.compare", broken)
    with pytest.raises(KeyError):
        main(["cache", "deepseek-v2"])


def _interrupt(argv: list[str], started) -> subprocess.CompletedProcess:
    """Start `latentattn *argv`, let `started(process)` wait for a sign of work (it returns the stdout
    it read), send SIGINT and collect the process; a process that shows no sign within 5 minutes is
    killed, so a test fails rather than hangs."""
    command = [sys.executable, "-m", "latentattn", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a shell's background job (`make test &`) ignores SIGINT and its children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        seen = started(process)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        watchdog.cancel()
        process.kill()
    return subprocess.CompletedProcess(command, process.returncode, seen + stdout, stderr)


def test_ctrl_c_in_bench_json_exits_130_with_one_line():
    """Progress goes to stderr even with --json; stdout (JSON only) stays empty."""
    progress: list[str] = []

    def started(process):
        while not progress:  # a line from the measuring loop, past the set-up
            line = process.stderr.readline()
            assert line, "bench ended before it started measuring"
            if line.startswith("  mla-absorbed"):
                progress.append(line)
        return ""

    argv = ["bench", "--contexts", "1K", "--dtype", "float32", "--impl", "mla-absorbed", "--json"]
    result = _interrupt([*argv, "--repeats", "1000000", "--max-seconds", "10000"], started)
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "latentattn bench: interrupted\n")


def test_ctrl_c_in_tour_exits_130_with_exactly_one_line():
    result = _interrupt(["tour"], lambda process: process.stdout.readline())
    assert result.returncode == 130
    assert "KV cache of published models" in result.stdout
    assert result.stderr == "latentattn tour: interrupted\n"


def test_ctrl_c_in_train_says_how_to_resume(runs, tmp_path):
    out = tmp_path / "run"
    flags = ["--preset", "debug", "--steps", "100000", "--batch-size", "2", "--log-every", "1", "--quiet"]
    data = ["--data", str(runs["root"] / "text.py"), "--cache-dir", str(tmp_path / "cache")]

    def started(process):
        while not (out / "log.jsonl").exists():
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.1)
        return ""

    result = _interrupt(["train", "--out", str(out), *flags, *data], started)
    assert (result.returncode, result.stderr) == (
        130,
        "latentattn train: interrupted; resume with --resume\n",
    )
