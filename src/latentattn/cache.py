"""Preallocated per-layer decode caches with per-sequence lengths.

Notation: B batch, T new tokens, L allocated length (`max_len`), S keys read this step
(cached + new, at most L), C kv_lora_rank, R qk_rope_head_dim, G kv heads, D head_dim.

Every buffer is `[B, L, ...]` and every sequence b has its own length `lengths[b]`, so a batch may
hold prompts of different lengths (ragged) and take chunks of new tokens at any offset. A step that
writes T tokens gives token t of sequence b the position `lengths[b] + t`, and it may attend to every
cached or new key at a position `<= lengths[b] + t` (a causal mask with a per-sequence offset).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from latentattn.config import GQAConfig, MLAConfig


class _PreallocatedCache:
    """Static-shaped buffers `[B, L, *shape]` plus the per-sequence lengths `[B]`.

    `entries` maps each buffer's name to its per-token shape and storage dtype (default: `dtype`,
    the dtype attention computes in and hands to `update`). `head_major` stores per-token shapes
    `[G, D]` as `[B, G, L, D]` (each head's rows contiguous, as attention kernels read them); the
    buffers are always seen token-major, `[B, L, *shape]`.
    """

    def __init__(
        self,
        entries: dict[str, tuple[tuple[int, ...], torch.dtype | None]],
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None,
        dtype: torch.dtype,
        head_major: bool = False,
    ) -> None:
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"cache needs batch_size > 0 and max_len > 0, got {batch_size} and {max_len}")
        self.max_len = max_len
        self.dtype = dtype
        self.buffers = {}
        for name, (shape, storage) in entries.items():
            factory = {"device": device, "dtype": storage or dtype}
            if head_major:
                heads, *rest = shape
                buffer = torch.zeros(batch_size, heads, max_len, *rest, **factory).transpose(1, 2)
            else:
                buffer = torch.zeros(batch_size, max_len, *shape, **factory)
            self.buffers[name] = buffer
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def nbytes(self) -> int:
        """Bytes allocated by all buffers."""
        return sum(buffer.nbytes for buffer in self.buffers.values())

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies (per layer: each layer owns its cache)."""
        return sum(buffer[0, 0].nbytes for buffer in self.buffers.values())

    @property
    def used_bytes(self) -> int:
        """Bytes holding cached tokens: `sum(lengths) · bytes_per_token`."""
        return int(self.lengths.sum()) * self.bytes_per_token

    def reset(self) -> None:
        """Forget every sequence (buffers are overwritten on the next writes)."""
        self.lengths.zero_()

    def positions(self, n_tokens: int) -> Tensor:
        """Positions `[B, T]` that the next `n_tokens` new tokens take: `lengths[b] + t`."""
        return self.lengths[:, None] + torch.arange(n_tokens, device=self.device)

    def _update(self, entries: dict[str, Tensor], n_new: Tensor | None) -> tuple[list[Tensor], Tensor | None]:
        """Write the new entries `[B, T, ...]`, advance the lengths and return what attention reads.

        `n_new[b]` (default T) of sequence b's T entries are real; the rest are right padding, never
        written. Returns the buffers `[B, S, ...]` and `attention_mask(...)`.
        """
        for name, value in entries.items():
            buffer = self.buffers[name]
            check_entry(
                type(self).__name__,
                name,
                value,
                buffer.shape[2:],
                self.batch_size,
                buffer.dtype,
                buffer.device,
            )
        n_tokens = next(iter(entries.values())).shape[1]
        if any(value.shape[1] != n_tokens for value in entries.values()):
            shapes = {name: tuple(value.shape) for name, value in entries.items()}
            raise ValueError(f"{type(self).__name__}: entries disagree on the number of new tokens: {shapes}")
        n_new = check_n_new(n_new, self.batch_size, n_tokens, self.device)
        ends = self.lengths + n_new
        check_capacity(self.lengths, n_new, self.max_len)
        start = int(self.lengths[0])
        if bool((n_new == n_tokens).all() and (self.lengths == start).all()):  # one length: plain copies
            for name, value in entries.items():
                self.buffers[name][:, start : start + n_tokens] = value
        else:  # ragged: write each real token at its sequence's position
            real = torch.arange(n_tokens, device=self.device)[None, :] < n_new[:, None]  # [B, T]
            rows, cols = real.nonzero(as_tuple=True)
            positions = self.lengths[rows] + cols
            for name, value in entries.items():
                _bytes(self.buffers[name])[rows, positions] = _bytes(value)[rows, cols]
        mask, n_keys = attention_mask(self.lengths, n_new, n_tokens)
        self.lengths = ends
        return [self.buffers[name][:, :n_keys] for name in entries], mask


def check_entry(
    owner: str,
    name: str,
    value: Tensor,
    tail: tuple[int, ...] | torch.Size,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Raise a ValueError naming the problem unless `value` is `[batch_size, T, *tail]`, `dtype`, `device`."""
    if value.dim() != 2 + len(tail) or value.shape[0] != batch_size or tuple(value.shape[2:]) != tuple(tail):
        raise ValueError(
            f"{owner}: '{name}' has shape {tuple(value.shape)}, expected "
            f"[batch={batch_size}, new_tokens, {', '.join(map(str, tail))}]"
        )
    if value.dtype != dtype:
        raise ValueError(
            f"{owner}: new '{name}' entries are {value.dtype} but the cache holds {dtype} "
            "(build it with the layer's new_cache())"
        )
    if value.device != device:
        raise ValueError(f"{owner}: new '{name}' entries are on {value.device} but the cache is on {device}")


def check_n_new(n_new: Tensor | None, batch_size: int, n_tokens: int, device: torch.device) -> Tensor:
    """`n_new` as a long tensor `[B]` with values in [0, T] (None: all T tokens are real)."""
    if n_new is None:
        return torch.full((batch_size,), n_tokens, dtype=torch.long, device=device)
    n_new = torch.as_tensor(n_new, device=device)
    integer = not (n_new.dtype.is_floating_point or n_new.dtype.is_complex or n_new.dtype == torch.bool)
    if n_new.shape != (batch_size,) or not integer:
        raise ValueError(
            f"n_new must be an integer tensor of shape [batch={batch_size}], "
            f"got {n_new.dtype} {tuple(n_new.shape)}"
        )
    if bool(((n_new < 0) | (n_new > n_tokens)).any()):
        raise ValueError(f"n_new must lie in [0, {n_tokens}] (the chunk length), got {n_new.tolist()}")
    return n_new.long()


def check_capacity(lengths: Tensor, n_new: Tensor, max_len: int) -> None:
    """Raise a ValueError naming the first sequence that `n_new` more tokens would push past `max_len`."""
    over = lengths + n_new > max_len
    if bool(over.any()):
        b = int(over.nonzero()[0, 0])
        raise ValueError(
            f"cache overflow: sequence {b} holds {int(lengths[b])} tokens and gets {int(n_new[b])} more, "
            f"past max_len={max_len}"
        )


def attention_mask(lengths: Tensor, n_new: Tensor, n_tokens: int) -> tuple[Tensor | None, int]:
    """The keys S to read after appending, and the mask `[B, T, S]` (True = attend) for T new tokens.

    Token t of sequence b sits at `lengths[b] + t` and sees keys at positions `<= lengths[b] + t`.
    The mask is None when all sequences had one length and get all T tokens: then it is the causal
    mask aligned so the last new token sees all S keys, which attention builds cheaply (or skips, for
    T = 1).
    """
    ends = lengths + n_new
    n_keys = max(int(ends.max()), 1)
    if bool((ends == n_keys).all() and (n_new == n_tokens).all()):
        return None, n_keys
    positions = lengths[:, None] + torch.arange(n_tokens, device=lengths.device)  # [B, T]
    return torch.arange(n_keys, device=lengths.device)[None, None, :] <= positions[:, :, None], n_keys


def _bytes(tensor: Tensor) -> Tensor:
    """One-byte tensors (int8, fp8) as uint8, since indexed writes do not support fp8 on every device."""
    return tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor


COPIED_BLOCK = 4096
"""Rows per block of a paged or 8-bit cache, gathered or dequantized for attention (9 MiB at 576 fp32)."""


class Workspace:
    """One reusable buffer for the blocks a cache copies out for attention (gathered pages,
    dequantized rows). A fresh multi-MiB tensor per block costs page faults: 8 of the 22 ms of an
    int8 decode step at 16K context on CPU (measured). What is taken stays valid until the next take."""

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of `shape` on the buffer (grown, or rebuilt for another dtype/device)."""
        numel = math.prod(shape)
        buffer = self.buffer
        if (
            buffer is None
            or buffer.numel() < numel
            or buffer.dtype != dtype
            or buffer.device != device
            or (buffer.is_inference() and not torch.is_inference_mode_enabled())  # read-only outside
        ):
            buffer = self.buffer = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


Reader = Callable[[int, int, Workspace | None, torch.dtype | None], Tensor]
"""`read(start, stop, workspace, dtype)`: rows `[B, stop - start, C + R]` in `dtype` (None: the
compute dtype), built in `workspace` when given."""


class LatentKeys:
    """The S latent rows `[B, S, C + R]` that MLA reads this step, fetched on demand: whole (`full()`,
    for the naive path) or in consecutive blocks (`blocks(size)`, for the absorbed path), so a paged
    cache is gathered, and an 8-bit one dequantized, one block at a time instead of whole.

    `dtype` is the compute dtype rows come in by default. Block sizes are capped at `max_block` rows
    (for reads that copy: `COPIED_BLOCK`; None for views, which copy only to change dtype, then in
    `COPIED_BLOCK` rows too) and rounded down to a multiple of `granule` (the paged cache's page).
    Outside autograd, copied blocks reuse the cache's `workspace`, so each block is valid until the
    next one is read.
    """

    def __init__(
        self,
        read: Reader,
        shape: tuple[int, int, int],
        dtype: torch.dtype,
        *,
        granule: int = 1,
        max_block: int | None = None,
        workspace: Workspace | None = None,
    ) -> None:
        self.read = read
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.granule = granule
        self.max_block = max_block
        self.workspace = workspace

    @classmethod
    def of(cls, latent: Tensor, workspace: Workspace | None = None) -> LatentKeys:
        """Keys held in a tensor `[B, S, C + R]`: blocks are views, or copies in `COPIED_BLOCK` rows
        (built in `workspace` when given) when read in another dtype."""

        def read(start: int, stop: int, workspace: Workspace | None, dtype: torch.dtype | None) -> Tensor:
            rows = latent[:, start:stop]
            if dtype in (None, latent.dtype):
                return rows
            if workspace is None:
                return rows.to(dtype)
            return workspace.take(tuple(rows.shape), dtype, rows.device).copy_(rows)

        return cls(read, tuple(latent.shape), latent.dtype, workspace=workspace)

    def full(self) -> Tensor:
        """All S rows, `[B, S, C + R]` in the compute dtype (a tensor of its own, or a view of the cache)."""
        return self.read(0, self.shape[1], None, None)

    def blocks(self, size: int, dtype: torch.dtype | None = None) -> Iterator[Tensor]:
        """Consecutive rows in blocks of about `size` (the last one shorter), `[B, s, C + R]` each, in
        `dtype` (None: the compute dtype `self.dtype`; another one copies, in `COPIED_BLOCK` rows)."""
        converts = dtype not in (None, self.dtype)
        size = min(size, self.max_block or (COPIED_BLOCK if converts else size))
        size = max(self.granule, size - size % self.granule)
        workspace = None if torch.is_grad_enabled() else self.workspace
        n_keys = self.shape[1]
        for start in range(0, n_keys, size):
            yield self.read(start, min(start + size, n_keys), workspace, dtype)


class LatentCache(_PreallocatedCache):
    """MLA's cache: one `[RMSNorm(c_KV) | RoPE(k_pe)]` row of width C + R per token, shared by all heads."""

    def __init__(
        self,
        config: MLAConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        entries = {"latent": ((config.cache_width,), None)}
        super().__init__(entries, batch_size, max_len, device=device, dtype=dtype)
        self.kv_lora_rank = config.kv_lora_rank
        self.workspace = Workspace()
        """Where attention converts blocks of a bf16 cache to fp32 on CPU (outside `nbytes`)."""

    @property
    def latent(self) -> Tensor:
        """The whole buffer `[B, L, C + R]`."""
        return self.buffers["latent"]

    def update(self, latent: Tensor, n_new: Tensor | None = None) -> tuple[LatentKeys, Tensor | None]:
        """Append `latent: [B, T, C + R]`; returns the keys to read `[B, S, C + R]` (views of the
        buffer) and the mask `[B, T, S]` (None: causal, last token sees all)."""
        (cached,), mask = self._update({"latent": latent}, n_new)
        return LatentKeys.of(cached, self.workspace), mask


class KVCache(_PreallocatedCache):
    """The MHA/GQA/MQA cache: RoPE'd keys and values, `[B, L, G, D]` each, stored head-major
    (`[B, G, L, D]`) so that SDPA reads each head's keys contiguously (measured 1.5x faster decode)."""

    def __init__(
        self,
        config: GQAConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (config.n_kv_heads, config.head_dim)
        super().__init__(
            {"k": (shape, None), "v": (shape, None)},
            batch_size,
            max_len,
            device=device,
            dtype=dtype,
            head_major=True,
        )

    def update(
        self, k: Tensor, v: Tensor, n_new: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append `k, v: [B, T, G, D]`; returns keys and values `[B, S, G, D]` and the mask `[B, T, S]`
        (None: causal, last token sees all)."""
        (keys, values), mask = self._update({"k": k, "v": v}, n_new)
        return keys, values, mask


Cache = LatentCache | KVCache
