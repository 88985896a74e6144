"""The checks every verb shares (`latentattn.cli_checks`) and bench's warning on a busy machine.

Oracles: paths that no user can write to, root included (under a regular file, in /proc); a
refused check leaves the folder as it was. The warning is compared with the idle cores it was given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from latentattn.bench import idle_cores
from latentattn.cli import main
from latentattn.cli_checks import check_device, check_output_dir, check_output_file, check_threads


def test_output_folder_checks(tmp_path):
    (tmp_path / "notes.txt").write_text("kept\n")
    assert check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"  # creatable, not created
    with pytest.raises(ValueError, match=r"--out '.*notes.txt' is a file, not a folder"):
        check_output_dir(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"'.*notes.txt' is a file, not a folder"):
        check_output_dir(tmp_path / "notes.txt" / "run", "--out")
    if Path("/proc").is_dir():
        with pytest.raises(ValueError, match=r"--out '/proc/run': cannot write in '/proc'"):
            check_output_dir("/proc/run")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "kept\n"


def test_output_file_checks(tmp_path):
    (tmp_path / "old.png").write_bytes(b"replaced later")
    assert check_output_file(tmp_path / "old.png", "--plot") == tmp_path / "old.png"
    with pytest.raises(ValueError, match="is a folder; name a file"):
        check_output_file(tmp_path, "--plot")
    assert [path.name for path in tmp_path.iterdir()] == ["old.png"]


def test_device_and_thread_checks():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device 'gpu0' is not a torch device"):
        check_device("gpu0")
    assert check_threads(None) is None and check_threads(3) == 3
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="--threads must be a positive number of threads"):
            check_threads(bad)


def test_idle_cores_lie_within_this_process_cores():
    idle = idle_cores(0.05)
    if idle is not None:  # Linux
        assert 0 <= idle <= len(os.sched_getaffinity(0)) + 1e-9


@pytest.mark.parametrize(("idle", "warned"), [(0.4, True), (2.0, False)])
def test_bench_warns_when_torch_has_more_threads_than_idle_cores(idle, warned, capsys, monkeypatch):
    monkeypatch.setattr("latentattn.bench.idle_cores", lambda: idle)
    monkeypatch.setattr("latentattn.bench.run_bench", lambda config, progress: {"results": []})
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--threads", "2", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"results": []}
    warnings = captured.err.splitlines()
    assert len(warnings) == warned
    if warned:
        assert warnings[0].startswith("latentattn bench: warning: torch runs 2 threads but only 0.4 of ")
        assert "(try --threads 1 or a quieter machine)" in warnings[0]
