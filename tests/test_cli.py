"""`latentattn` behaviour shared by its verbs: closed output pipes.

Oracle: a child process writing into a pipe whose reader is already gone (as after `| head -c 10`)
must exit 1 with an empty stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


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
