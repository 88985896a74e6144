"""Checks of command-line values that every verb shares, run before any work starts.

Each failure is a ValueError naming the flag and the value; `latentattn` prints it as one line,
`latentattn VERB: error: ...`, and exits 2. The output-path checks touch nothing the user owns: they
only create and remove a uniquely named probe file next to where the output will go.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from latentattn.run_dir import probe_writable


def check_device(text: str, flag: str = "--device") -> torch.device:
    """The torch device `text` names, if this machine has it: cpu, or an accelerator type (cuda, mps,
    xpu, ...) that torch reports available, with an index below its device count. `meta` is refused:
    it holds no data to compute on."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"{flag} {text!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise ValueError(f"{flag} meta holds no data to compute on; choose cpu or an accelerator")
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"{flag} {text!r}: torch {torch.__version__} has no {device.type} device here")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"{flag} {text!r}: this machine has {count} {device.type} device(s), from index 0")
    return device


def check_threads(value: int | None, flag: str = "--threads") -> int | None:
    """`value` (torch's intra-op threads) if it is a positive integer; None (torch's choice) passes."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{flag} must be a positive number of threads, got {value!r}")
    return value


def check_output_file(path: str | Path, flag: str) -> Path:
    """`path` if a file can be written there: not a folder, in an existing folder that accepts new
    files, and writable if it exists (it will be replaced)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; name a file")
    folder = path.parent
    if not folder.is_dir():
        found = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"{flag} {str(path)!r}: {str(folder)!r} {found}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {str(path)!r} exists and is not writable")
    _probe(folder, flag, path)
    return path


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """`path` if it is, or can become, a folder that accepts new files: not a file, and its nearest
    existing ancestor a writable folder (nothing is created)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file, not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(existing)!r} is a file, not a folder")
    _probe(existing, flag, path)
    return path


def _probe(folder: Path, flag: str, path: Path) -> None:
    """`run_dir.probe_writable(folder)`, or a ValueError naming `flag` and `path`."""
    try:
        probe_writable(folder)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"{flag} {str(path)!r}: cannot write in {str(folder)!r} ({reason})") from None
