"""Per-head products of absorbed MLA decode by the CPU kernel (`csrc/head_products.cpp`):

    fused_head_products(x, w, *, transposed=False, bias=None, threads=None) -> y

`y[m, h] = x[m, h] · w[h] + bias[h]` for `w: [H, K, N]`, or `x[m, h] · w[h]ᵀ + bias[h]` for
`w: [H, N, K]` (transposed), with `x: [M, H, K]` → `y: [M, H, N]`: the query absorbing W_UK
(`q_lat = q_nope · W_UK`), the output absorbing W_UV (`o = o_lat · W_UVᵀ`) and, with H = 1, a linear
layer, for the few rows of a decode step. Each weight row is read once where it lies (strided views of
`w_ukv` are fine), in fp32, bf16 or fp64; accumulation in fp32 (fp64).

Notation: M rows (B·T), H heads, K reduction width, N output width.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from latentattn.kernels.build import MAX_THREADS, function

WEIGHT_KINDS = {torch.float32: 0, torch.float64: 0, torch.bfloat16: 1}
"""Weight kind codes of `csrc/head_products.cpp` (`WeightKind`): the accumulation type, or bf16."""


class _HeadProductArgs(ctypes.Structure):
    """Mirrors `HeadProductArgs` in csrc/head_products.cpp (field for field)."""

    _fields_ = (
        ("double_precision", ctypes.c_int32),
        ("weights", ctypes.c_int32),
        ("transposed", ctypes.c_int32),
        ("rows", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("reduce", ctypes.c_int64),
        ("width", ctypes.c_int64),
        ("x", ctypes.c_void_p),
        ("w", ctypes.c_void_p),
        ("head_stride", ctypes.c_int64),
        ("row_stride", ctypes.c_int64),
        ("bias", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("threads", ctypes.c_int32),
    )


def fused_head_products(
    x: Tensor,
    w: Tensor,
    *,
    transposed: bool = False,
    bias: Tensor | None = None,
    threads: int | None = None,
) -> Tensor:
    """`y: [M, H, N]` in x's dtype (see the module docstring) on `threads` threads (default: torch's).
    Raises ValueError naming a bad argument, RuntimeError if the kernel is unavailable."""
    products = function("head_products", _HeadProductArgs, ctypes.c_int32)
    if x.dim() != 3 or w.dim() != 3:
        raise ValueError(f"x must be [M, H, K] and w 3-D, got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.device.type != "cpu" or w.device.type != "cpu":
        raise ValueError(f"the head-product kernel runs on CPU; x is on {x.device}, w on {w.device}")
    if w.dtype not in WEIGHT_KINDS or x.dtype not in WEIGHT_KINDS or w.stride(-1) != 1:
        raise ValueError(
            f"w must be fp32, bf16 or fp64 with a contiguous last dimension and x a float of those, got "
            f"w {w.dtype} with strides {w.stride()}, x {x.dtype}"
        )
    rows, heads, reduce = x.shape
    width = w.shape[1] if transposed else w.shape[2]
    if w.shape[0] != heads or (w.shape[2] if transposed else w.shape[1]) != reduce:
        layout = "[H, N, K]" if transposed else "[H, K, N]"
        raise ValueError(f"w must be {layout} for x [M={rows}, H={heads}, K={reduce}], got {tuple(w.shape)}")
    if bias is not None and (
        bias.dtype != w.dtype
        or bias.shape != (heads, width)
        or not bias.is_contiguous()
        or bias.device.type != "cpu"
    ):
        raise ValueError(
            f"bias must be a contiguous [H={heads}, N={width}] CPU tensor in w's dtype {w.dtype}, got "
            f"{bias.dtype} {tuple(bias.shape)} on {bias.device}"
        )
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must lie in [1, {MAX_THREADS}], got {threads}")
    double = w.dtype == torch.float64
    accumulate = torch.float64 if double else torch.float32
    x_in = x.to(accumulate).contiguous()
    y = torch.empty(rows, heads, width, dtype=accumulate)
    args = _HeadProductArgs(
        double_precision=int(double),
        weights=WEIGHT_KINDS[w.dtype],
        transposed=int(transposed),
        rows=rows,
        heads=heads,
        reduce=reduce,
        width=width,
        x=x_in.data_ptr(),
        w=w.data_ptr(),
        head_stride=w.stride(0),
        row_stride=w.stride(1),
        bias=None if bias is None else bias.data_ptr(),
        y=y.data_ptr(),
        threads=threads or torch.get_num_threads(),
    )
    if products(ctypes.byref(args)) != 0:
        raise RuntimeError("the head-product kernel rejected its arguments (a latentattn bug)")
    return y.to(x.dtype)
