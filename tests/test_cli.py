"""`latentattn` behaviour shared by its verbs: closed output pipes and --plot file names.

Oracles: a child process writing into a pipe whose reader is already gone (as after `| head -c 10`)
must exit 1 with an empty stderr; a --plot file is written under exactly the name given or refused.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from latentattn.cli import main


@pytest.mark.parametrize(
    "argv",
    [["cache", "deepseek-v2", "--json"], ["cache", "deepseek-v2"]],
    ids=["json", "table"],
)
def test_closed_pipe_exits_quietly(argv):
    reader, writer = os.pipe()
    os.close(reader)  # every write now fails with EPIPE, deterministically
    try:
        result = subprocess.run(
            [sys.executable, "-m", "latentattn", *argv],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(writer)
    assert (result.returncode, result.stderr) == (1, "")


@pytest.mark.parametrize(("name", "found"), [("cache", "no suffix"), ("cache.v2", "the suffix '.v2'")])
def test_cache_plot_without_an_image_suffix_is_refused(capsys, tmp_path, name, found):
    path = tmp_path / name
    assert main(["cache", "deepseek-v2", "--plot", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"latentattn cache: error: plot file '{path}' has {found}; ")
    assert ".png, " in captured.err
    assert list(tmp_path.iterdir()) == []


def test_cache_plot_reports_the_file_written(capsys, tmp_path):
    path = tmp_path / "cache.SVG"
    assert main(["cache", "deepseek-v2", "--plot", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"plot written to {path}"
    assert list(tmp_path.iterdir()) == [path]
    assert b"<svg" in path.read_bytes()


def test_bench_plot_name_is_checked_before_the_benchmark_runs(capsys, tmp_path, monkeypatch):
    def run_bench(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr("latentattn.bench.run_bench", run_bench)
    assert main(["bench", "--plot", str(tmp_path / "latency")]) == 2
    assert "latentattn bench: error: plot file" in capsys.readouterr().err
