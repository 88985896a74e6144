"""Preallocated per-layer decode caches with per-sequence lengths.

Notation: B batch, T new tokens, L allocated length (`max_len`), S keys read this step
(cached + new, at most L), C kv_lora_rank, R qk_rope_head_dim, G kv heads, D head_dim.

Every buffer is `[B, L, ...]` and every sequence b has its own length `lengths[b]`, so a batch may
hold prompts of different lengths (ragged) and take chunks of new tokens at any offset. A step that
writes T tokens gives token t of sequence b the position `lengths[b] + t`, and it may attend to every
cached or new key at a position `<= lengths[b] + t` (a causal mask with a per-sequence offset).
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentattn.config import GQAConfig, MLAConfig


class _PreallocatedCache:
    """Static-shaped buffers `[B, L, *entry_shape]` plus the per-sequence lengths `[B]`."""

    def __init__(
        self,
        entry_shapes: dict[str, tuple[int, ...]],
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None,
        dtype: torch.dtype,
    ) -> None:
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"cache needs batch_size > 0 and max_len > 0, got {batch_size} and {max_len}")
        self.max_len = max_len
        self.buffers = {
            name: torch.zeros(batch_size, max_len, *shape, device=device, dtype=dtype)
            for name, shape in entry_shapes.items()
        }
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.buffers.values())).dtype

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
        written. Returns the buffers `[B, S, ...]` and the boolean mask `[B, T, S]` (True = attend), or
        None when all sequences had the same length and get all T tokens: then the mask is the causal one
        aligned so that the last new token sees all S keys, which attention builds cheaply (or skips,
        for T = 1).
        """
        first = next(iter(entries.values()))
        n_tokens = first.shape[1] if first.dim() >= 2 else 0
        for name, value in entries.items():
            self._check_entry(name, value, n_tokens)
        n_new = self._check_n_new(n_new, n_tokens)
        ends = self.lengths + n_new
        if bool((ends > self.max_len).any()):
            b = int((ends > self.max_len).nonzero()[0, 0])
            raise ValueError(
                f"cache overflow: sequence {b} holds {int(self.lengths[b])} tokens and gets "
                f"{int(n_new[b])} more, past max_len={self.max_len}"
            )
        positions = self.positions(n_tokens)  # [B, T]
        if n_tokens:
            real = torch.arange(n_tokens, device=self.device)[None, :] < n_new[:, None]  # [B, T]
            if bool(real.all()):
                for name, value in entries.items():
                    self.buffers[name].scatter_(1, _expand_index(positions, value), value)
            else:
                rows, cols = real.nonzero(as_tuple=True)
                for name, value in entries.items():
                    self.buffers[name][rows, positions[rows, cols]] = value[rows, cols]
        keys = max(int(ends.max()), 1)
        mask = None
        if bool((ends != keys).any() or (n_new != n_tokens).any()):
            mask = torch.arange(keys, device=self.device)[None, None, :] <= positions[:, :, None]  # [B, T, S]
        self.lengths = ends
        return [self.buffers[name][:, :keys] for name in entries], mask

    def _check_entry(self, name: str, value: Tensor, n_tokens: int) -> None:
        buffer = self.buffers[name]
        expected = (self.batch_size, n_tokens, *buffer.shape[2:])
        if tuple(value.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}: '{name}' has shape {tuple(value.shape)}, expected "
                f"[batch={expected[0]}, new_tokens, {', '.join(map(str, expected[2:]))}]"
            )
        if value.dtype != buffer.dtype:
            raise ValueError(
                f"{type(self).__name__}: new '{name}' entries are {value.dtype} but the cache holds "
                f"{buffer.dtype} (build it with the layer's new_cache())"
            )
        if value.device != buffer.device:
            raise ValueError(
                f"{type(self).__name__}: new '{name}' entries are on {value.device} but the cache is on "
                f"{buffer.device}"
            )

    def _check_n_new(self, n_new: Tensor | None, n_tokens: int) -> Tensor:
        if n_new is None:
            return torch.full_like(self.lengths, n_tokens)
        n_new = torch.as_tensor(n_new, device=self.device)
        if n_new.shape != self.lengths.shape or n_new.dtype.is_floating_point:
            raise ValueError(
                f"n_new must be an integer tensor of shape [batch={self.batch_size}], "
                f"got {n_new.dtype} {tuple(n_new.shape)}"
            )
        if bool(((n_new < 0) | (n_new > n_tokens)).any()):
            raise ValueError(f"n_new must lie in [0, {n_tokens}] (the chunk length), got {n_new.tolist()}")
        return n_new.long()


def _expand_index(positions: Tensor, value: Tensor) -> Tensor:
    """Positions `[B, T]` broadcast to `value`'s shape `[B, T, ...]` for `scatter_` along dim 1."""
    index = positions.reshape(*positions.shape, *([1] * (value.dim() - 2)))
    return index.expand_as(value)


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
        super().__init__({"latent": (config.cache_width,)}, batch_size, max_len, device=device, dtype=dtype)
        self.kv_lora_rank = config.kv_lora_rank

    @property
    def latent(self) -> Tensor:
        """The whole buffer `[B, L, C + R]`."""
        return self.buffers["latent"]

    def update(self, latent: Tensor, n_new: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Append `latent: [B, T, C + R]`; returns the cache `[B, S, C + R]` and the mask `[B, T, S]`
        (None: causal, last token sees all)."""
        (cached,), mask = self._update({"latent": latent}, n_new)
        return cached, mask


class KVCache(_PreallocatedCache):
    """The MHA/GQA/MQA cache: RoPE'd keys and values, `[B, L, G, D]` each."""

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
        super().__init__({"k": shape, "v": shape}, batch_size, max_len, device=device, dtype=dtype)

    def update(
        self, k: Tensor, v: Tensor, n_new: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append `k, v: [B, T, G, D]`; returns keys and values `[B, S, G, D]` and the mask `[B, T, S]`
        (None: causal, last token sees all)."""
        (keys, values), mask = self._update({"k": k, "v": v}, n_new)
        return keys, values, mask


Cache = LatentCache | KVCache
