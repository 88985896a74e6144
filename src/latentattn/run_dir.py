"""The rules that keep a run directory (`--out` of train, demo and study) safe for the user's files.

- `--out` must be a new or empty directory, or one this tool already writes (it holds one of the
  caller's `markers`, e.g. `latest` or `lock`); anything else is refused before any work starts.
- One process at a time: `RUN_DIR/lock` holds the PID of the process that owns the run under an
  exclusive `fcntl.flock`, which the kernel drops when that process ends, however it ends. The PID is
  cleared on a clean exit, so a PID found there by the next process names a run that crashed or was
  killed: its lock is taken over and reported.
- Only own names are ever deleted: temporaries are `tmp-<name>-<pid>` for the names in `TEMP_NAME`,
  and a leftover one of a dead process is removed when the lock is taken.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

LOCK = "lock"
TEMP_NAME = re.compile(
    r"tmp-(?P<name>step-\d{7}|latest|best|checkpoints\.json|log\.jsonl|journal\.json|probe)-(?P<pid>\d+)"
    r"(?:\.old)?"
)
"""Temporary names this package writes into a run directory: a target name and the writer's PID (and
`.old`: a directory being replaced, see `publish_directory`)."""


def temp_path(target: Path) -> Path:
    """This process's temporary sibling of `target` (a name `TEMP_NAME` matches for run files)."""
    return target.with_name(f"tmp-{target.name}-{os.getpid()}")


def probe_writable(folder: Path) -> None:
    """Create and remove a probe file in `folder`, raising the OSError if that fails: the only test of
    writability that holds for every user (root ignores mode bits) and file system (read-only mounts)."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".latentattn-probe-"):
        pass


def publish_directory(
    target: Path,
    write: Callable[[Path], None],
    *,
    tmp: Path | None = None,
    before_publish: Callable[[], None] | None = None,
    keep_existing: bool = False,
) -> bool:
    """Write the directory `target` completely or not at all: `write(tmp)` in a fresh temporary sibling
    (`tmp`, by default `temp_path(target)`), then `before_publish()`, then a rename onto `target`.

    An existing `target` is replaced only once the new one is complete (moved aside to `tmp.old`, put
    back if the rename fails); with `keep_existing` it is kept instead and ours dropped (another process
    published the same content first). On any error the temporary directory is removed and `target` is
    left as it was. Returns whether ours was published."""
    if tmp is None:
        tmp = temp_path(target)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        write(tmp)
        if before_publish is not None:
            before_publish()
        if target.exists():
            if keep_existing:
                return False
            old = tmp.with_name(f"{tmp.name}.old")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except OSError:
                os.replace(old, target)
                raise
            shutil.rmtree(old)
            return True
        try:
            os.replace(tmp, target)
        except OSError:
            if keep_existing and target.exists():  # published by another process meanwhile
                return False
            raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_out(path: Path, *, markers: tuple[str, ...], owner: str) -> None:
    """Refuse an `--out` that is a file, or a non-empty directory holding none of `markers` (so not an
    earlier `owner` run). Reads only; `lock_run` then tries the writes."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not any((path / name).exists() for name in markers):
        raise ValueError(
            f"--out {str(path)!r} is a non-empty directory that holds no latentattn {owner}; "
            "choose a new or empty directory"
        )


@dataclass(frozen=True)
class RunLock:
    """The held lock of one run directory."""

    path: Path
    fd: int
    stale_pid: int | None
    """The PID left in the lock file by a process that ended without releasing it, if any."""

    def release(self) -> None:
        """Clear the PID, then drop the lock (closing the file)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def acquire(directory: Path, *, owner: str) -> RunLock:
    """Create `directory` if needed and take its lock; a one-line ValueError if the directory cannot be
    written (tried with a probe file, not judged by permission bits) or another process holds it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise ValueError(f"cannot write to --out {str(directory)!r}: {error.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _read_pid(fd)
        os.close(fd)
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            raise ValueError(f"cannot lock {str(directory / LOCK)!r}: {error.strerror}") from None
        raise ValueError(
            f"--out {str(directory)!r} is in use by another {owner} (process {holder}); "
            "wait for it to finish or choose another --out"
        ) from None
    try:
        stale = _read_pid(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        probe_writable(directory)
    except OSError as error:
        os.close(fd)
        raise ValueError(f"cannot write to --out {str(directory)!r}: {error.strerror}") from None
    remove_stale_temps(directory)
    return RunLock(path=directory / LOCK, fd=fd, stale_pid=stale)


@contextlib.contextmanager
def locked(directory: Path, *, owner: str) -> Iterator[RunLock]:
    """`acquire` for the duration of a `with` block."""
    lock = acquire(directory, owner=owner)
    try:
        yield lock
    finally:
        lock.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temps(directory: Path) -> None:
    """Delete the temporaries (`TEMP_NAME`) that dead processes left in `directory`; nothing else."""
    for entry in directory.iterdir():
        match = TEMP_NAME.fullmatch(entry.name)
        if match is None or _alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
