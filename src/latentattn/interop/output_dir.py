"""Write an output directory completely or not at all: into a temporary sibling, then renamed."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from latentattn import cli_checks
from latentattn.run_dir import publish_directory


def check_output_dir(out: str | Path, *, force: bool, keep: Path | None = None) -> Path:
    """`out` as a Path, or a ValueError if it is a file, holds or is `keep` (the input being read), is
    a non-empty directory and not `force`, or cannot be written (`cli_checks.check_output_dir`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    if keep is not None and (out.resolve() == keep.resolve() or out.resolve() in keep.resolve().parents):
        raise ValueError(f"--out {str(out)!r} holds the input {str(keep)!r}; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {str(out)!r} is not empty; pass --force to replace it")
    return cli_checks.check_output_dir(out, "--out")


def write_directory(
    out: str | Path, write: Callable[[Path], None], *, force: bool = False, keep: Path | None = None
) -> Path:
    """Run `write(tmp)` in a fresh temporary directory beside `out`, then rename it to `out`.

    A non-empty `out` is refused unless `force` (then replaced, after `write` succeeded); so is an `out`
    that holds or is `keep` (the input being read). On any error the temporary directory is removed
    and `out` is left as it was. Unwritable locations raise ValueError naming them.
    """
    out = check_output_dir(out, force=force, keep=keep)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as error:
        raise ValueError(f"cannot write --out {str(out)!r}: {error.strerror or error}") from None

    def write_public(directory: Path) -> None:
        write(directory)
        directory.chmod(0o755)  # mkdtemp makes it private

    try:
        publish_directory(out, write_public, tmp=tmp)
    except OSError as error:
        raise ValueError(f"cannot write --out {str(out)!r}: {error.strerror or error}") from None
    return out
