"""Building and loading the CPU kernels' shared library (csrc/*.cpp).

The C++ sources are compiled on first use with torch's `cpp_extension.load` (ninja, `-O3
-march=native`, OpenMP) into the per-user torch extensions directory, under a file lock, and called
through ctypes. `LATENTATTN_KERNEL=0` in the environment turns the kernels off (`kernel_status()`
then says so and callers take the torch path).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SOURCES = tuple(sorted((Path(__file__).parent / "csrc").glob("*.cpp")))
HEADERS = tuple(sorted((Path(__file__).parent / "csrc").glob("*.h")))
COMPILE_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp")
MAX_THREADS = 4096
"""Most threads a kernel call may ask for (the C ABI takes an int32)."""
DISABLE_VARIABLE = "LATENTATTN_KERNEL"
"""Set to 0 (or off, false, torch) to run the pure torch path everywhere."""


@dataclass(frozen=True)
class KernelStatus:
    """Whether the kernels can run here; `detail` is their instruction set ("avx512+bf16", "avx512",
    "avx2", "generic") or why they cannot (build error, disabled by the environment)."""

    available: bool
    detail: str


def kernel_status() -> KernelStatus:
    """Build (once per process, cached on disk) and report; warns once when the build fails."""
    if os.environ.get(DISABLE_VARIABLE, "1").strip().lower() in ("0", "off", "false", "torch"):
        return KernelStatus(False, f"disabled by {DISABLE_VARIABLE}={os.environ[DISABLE_VARIABLE]}")
    built = library()
    if isinstance(built, str):
        return KernelStatus(False, built)
    return KernelStatus(True, built.latent_decode_isa().decode())


@functools.cache
def library() -> ctypes.CDLL | str:
    """The compiled library, or the reason it could not be built (warned once)."""
    try:
        from torch.utils.cpp_extension import load

        with _ninja_on_path():
            path = load(
                name=f"latentattn_kernels_{_machine_tag()}",
                sources=[str(source) for source in SOURCES],
                extra_cflags=list(COMPILE_FLAGS),
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
        built = ctypes.CDLL(path)
    except Exception as error:  # no compiler or ninja, another platform: the torch path runs
        lines = str(error).strip().splitlines() or [""]
        reason = f"{type(error).__name__}: {lines[-1]}"
        warnings.warn(
            f"latentattn: the fused decode kernel could not be built ({reason}); using the torch path",
            RuntimeWarning,
            stacklevel=3,
        )
        return f"build failed: {reason}"
    built.latent_decode_isa.restype = ctypes.c_char_p
    return built


def function(name: str, args: type[ctypes.Structure], restype: type) -> ctypes._CFuncPtr:
    """The library's C function `name`, taking a pointer to `args` and returning `restype`; raises
    RuntimeError if the kernels are unavailable (see `kernel_status`)."""
    status = kernel_status()
    if not status.available:
        raise RuntimeError(f"the fused decode kernel is unavailable: {status.detail}")
    call = getattr(library(), name)
    call.argtypes = [ctypes.POINTER(args)]
    call.restype = restype
    return call


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs `ninja` from PATH; pip's ninja sits next to the interpreter, which an unactivated
    virtualenv (`.venv/bin/pytest`) leaves off PATH. Adds it while building, when needed."""
    if shutil.which("ninja") is not None:
        yield
        return
    import ninja

    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def _machine_tag() -> str:
    """A short hash of the CPU's instruction-set flags and the sources, so a build for one CPU
    (`-march=native`) is never loaded on another that shares the cache directory."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            flags += next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags += platform.processor()
    digest = hashlib.sha256(flags.encode())
    for path in SOURCES + HEADERS:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
