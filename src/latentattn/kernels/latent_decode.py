"""The fused latent-attention decode kernel: one pass over raw cache storage, split across threads.

    fused_latent_decode(q, kv, lengths, scale, value_width, *, block_table=None, scales=None,
                        k_pe=None, values=None, n_keys=None, threads=None) -> o_lat

computes `softmax(q · kvᵀ · scale) · kv[..., :value_width]` per sequence (or `· values` when the
values are stored apart, as in GQA/MQA caches), exactly what
`latentattn.attention.latent_attention` computes over a causal mask with per-sequence offsets, but
reads each cached row `[c_KV | k_pe]` once: scores for all heads, online softmax and value
accumulation while the row is in the core's cache, the context split across threads and merged at
the end (flash-decoding). The C++ source is `csrc/latent_decode.cpp`, built by `kernels.build`.

Notation: B batch, T new tokens, H heads, W = C + R row width, L rows per sequence (or per block of
a paged pool), P pool blocks, G scale groups per row.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from latentattn.kernels.build import MAX_THREADS, function

FLOAT_STORAGE = {torch.float32: 0, torch.float64: 0, torch.bfloat16: 1}
"""Storage kind codes of `csrc/latent_decode.cpp` (`StorageKind`): rows in the query dtype or bf16 …"""
QUANTIZED_STORAGE = {torch.int8: 2, torch.float8_e4m3fn: 3}
"""… or c_KV in 8 bits with fp32 scales per group and bf16 k_pe."""


class _Component(ctypes.Structure):
    _fields_ = (("data", ctypes.c_void_p), ("block_stride", ctypes.c_int64), ("row_stride", ctypes.c_int64))


class _DecodeArgs(ctypes.Structure):
    """Mirrors `DecodeArgs` in csrc/latent_decode.cpp (field for field)."""

    _fields_ = (
        ("double_precision", ctypes.c_int32),
        ("storage", ctypes.c_int32),
        ("bf16_queries", ctypes.c_int32),
        ("batch", ctypes.c_int64),
        ("n_tokens", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("width", ctypes.c_int64),
        ("value_width", ctypes.c_int64),
        ("latent_width", ctypes.c_int64),
        ("group_size", ctypes.c_int64),
        ("n_keys", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("block_table", ctypes.c_void_p),
        ("table_stride", ctypes.c_int64),
        ("lengths", ctypes.c_void_p),
        ("q", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("kv", _Component),
        ("scales", _Component),
        ("k_pe", _Component),
        ("values", _Component),
        ("scale", ctypes.c_double),
        ("threads", ctypes.c_int32),
    )


def fused_latent_decode(
    q: Tensor,
    kv: Tensor,
    lengths: Tensor,
    scale: float,
    value_width: int,
    *,
    block_table: Tensor | None = None,
    scales: Tensor | None = None,
    k_pe: Tensor | None = None,
    values: Tensor | None = None,
    n_keys: int | None = None,
    threads: int | None = None,
) -> Tensor:
    """`o_lat: [B, T, H, value_width]` in q's dtype for `q: [B, T, H, W]` (fp32, bf16 or fp64).

    Storage (CPU, last dimension contiguous), one row of width W per token:
    - contiguous: `kv: [B, L, W]` in q's dtype;
    - paged: `kv: [P, block, W]` with `block_table: [B, blocks]` (sequence b's position s lives in
      block `block_table[b, s // block]`, row `s % block`);
    - 8-bit (contiguous or paged): `kv: [.., C]` int8 or float8_e4m3fn, `scales: [.., G]` fp32 (one
      per C/G values), `k_pe: [.., W - C]` bf16; a row is `[kv · scale | k_pe]`;
    - keys and values apart (GQA/MQA caches, one K/V head as one sequence): `kv` holds the keys and
      `values: [.., value_width]` (laid out like `kv`, same dtype) the values.
    Query t of sequence b sees keys at positions `< min(lengths[b] + t + 1, n_keys)` (`n_keys`
    default: all the storage holds). Scores are scaled by `scale`; the value is the first
    `value_width` columns. Accumulates in fp32 (fp64 for fp64 queries) on `threads` threads
    (default: torch's). Raises ValueError naming a bad argument, RuntimeError if the kernel is
    unavailable (see `kernel_status`).
    """
    decode = function("latent_decode", _DecodeArgs, ctypes.c_char_p)
    if q.dim() != 4 or min(q.shape, default=0) < 1 or q.dtype not in FLOAT_STORAGE:
        raise ValueError(f"q must be [B, T, H, W] in fp32, bf16 or fp64, got {q.dtype} {tuple(q.shape)}")
    batch, n_tokens, heads, width = q.shape
    if value_width < 1 or (values is None and value_width > width):
        raise ValueError(f"value_width must lie in [1, {width}] (the row width), got {value_width}")
    kind, latent_width, group_size = _check_storage(q, kv, scales, k_pe, values, value_width)
    if lengths.shape != (batch,) or lengths.dtype.is_floating_point or bool((lengths < 0).any()):
        raise ValueError(f"lengths must be {batch} integers >= 0, got {lengths.dtype} {lengths.tolist()}")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must lie in [1, {MAX_THREADS}], got {threads}")
    block_size, block_table, n_keys = _check_paging(kv, batch, block_table, n_keys)

    accumulate = torch.float64 if q.dtype == torch.float64 else torch.float32
    queries = q.to(accumulate).contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    out = torch.empty(batch, n_tokens, heads, value_width, dtype=accumulate)
    args = _DecodeArgs(
        double_precision=int(accumulate == torch.float64),
        storage=kind,
        bf16_queries=int(q.dtype == torch.bfloat16),
        batch=batch,
        n_tokens=n_tokens,
        heads=heads,
        width=width,
        value_width=value_width,
        latent_width=latent_width,
        group_size=group_size,
        n_keys=n_keys,
        block_size=block_size,
        block_table=None if block_table is None else block_table.data_ptr(),
        table_stride=0 if block_table is None else block_table.stride(0),
        lengths=lengths.data_ptr(),
        q=queries.data_ptr(),
        out=out.data_ptr(),
        kv=_component(kv),
        scales=_component(scales),
        k_pe=_component(k_pe),
        values=_component(values),
        scale=float(scale),
        threads=threads or torch.get_num_threads(),
    )
    if decode(ctypes.byref(args)) is None:
        raise RuntimeError("the fused decode kernel rejected its arguments (a latentattn bug)")
    return out.to(q.dtype)


def _check_storage(
    q: Tensor,
    kv: Tensor,
    scales: Tensor | None,
    k_pe: Tensor | None,
    values: Tensor | None,
    value_width: int,
) -> tuple[int, int, int]:
    """The storage kind code, stored columns of `kv` and values per scale (8-bit) — or a ValueError."""
    width = q.shape[-1]
    quantized = kv.dtype in QUANTIZED_STORAGE
    parts = {"kv": kv, **({"scales": scales, "k_pe": k_pe} if quantized else {})}
    if values is not None:
        if quantized or values.dtype != kv.dtype or values.shape[-1:] != (value_width,):
            raise ValueError(
                f"values must be [.., value_width={value_width}] in kv's float dtype, got {values.dtype} "
                f"{tuple(values.shape)} with kv {kv.dtype}"
            )
        parts["values"] = values
    for name, tensor in parts.items():
        if tensor is None:
            raise ValueError(f"8-bit storage ({kv.dtype}) needs '{name}' (fp32 scales / bf16 k_pe)")
        if tensor.device.type != "cpu" or q.device.type != "cpu":
            raise ValueError(
                f"the fused decode kernel runs on CPU; q is on {q.device}, '{name}' on {tensor.device}"
            )
        if tensor.dim() != 3 or tensor.stride(-1) != 1 or tensor.shape[:2] != kv.shape[:2]:
            raise ValueError(
                f"'{name}' must be 3-D like kv {tuple(kv.shape)} with a contiguous last dimension, got "
                f"shape {tuple(tensor.shape)} and strides {tensor.stride()}"
            )
    if not quantized:
        if kv.dtype != q.dtype or kv.shape[-1] != width:
            raise ValueError(
                f"kv must be [.., {width}] in q's dtype {q.dtype}, got {kv.dtype} {tuple(kv.shape)}"
            )
        return FLOAT_STORAGE[kv.dtype], width, 0
    latent_width, groups = kv.shape[-1], scales.shape[-1]
    if scales.dtype != torch.float32 or k_pe.dtype != torch.bfloat16:
        raise ValueError(f"8-bit storage needs fp32 scales, bf16 k_pe; got {scales.dtype}, {k_pe.dtype}")
    if latent_width + k_pe.shape[-1] != width or groups == 0 or latent_width % groups:
        raise ValueError(
            f"8-bit rows of {latent_width} values in {groups} scale groups plus {k_pe.shape[-1]} k_pe "
            f"values do not make q's width {width}"
        )
    return QUANTIZED_STORAGE[kv.dtype], latent_width, latent_width // groups


def _check_paging(
    kv: Tensor, batch: int, block_table: Tensor | None, n_keys: int | None
) -> tuple[int, Tensor | None, int]:
    """Rows per block (0: contiguous), the block table as int64 covering `n_keys`, and `n_keys`
    (default: all the storage holds) — or a ValueError."""
    if block_table is None:
        if kv.shape[0] != batch:
            raise ValueError(f"contiguous kv holds {kv.shape[0]} sequences, q {batch}")
        block_size, extent = 0, kv.shape[1]
    else:
        if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype.is_floating_point:
            raise ValueError(
                f"block_table must be integer [B={batch}, blocks], got {block_table.dtype} "
                f"{tuple(block_table.shape)}"
            )
        block_size, extent = kv.shape[1], block_table.shape[1] * kv.shape[1]
    n_keys = extent if n_keys is None else n_keys
    if not 0 < n_keys <= min(extent, 2**31 - 1):
        raise ValueError(f"n_keys must lie in [1, {extent}] (what the storage holds), got {n_keys}")
    if block_table is not None:
        block_table = block_table[:, : -(-n_keys // block_size)].to(torch.int64).contiguous()
        if bool(((block_table < 0) | (block_table >= kv.shape[0])).any()):
            raise ValueError(f"block_table holds blocks outside the pool's {kv.shape[0]}")
    return block_size, block_table, n_keys


def _component(tensor: Tensor | None) -> _Component:
    if tensor is None:
        return _Component(None, 0, 0)
    return _Component(tensor.data_ptr(), tensor.stride(0), tensor.stride(1))
