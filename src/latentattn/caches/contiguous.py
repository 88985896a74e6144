"""Preallocated contiguous caches: buffers `[B, L, ...]` per layer, per-sequence lengths.

Notation as in `latentattn.caches.base`. Every sequence b of the batch owns rows `0 .. L - 1` of each
buffer and holds its first `lengths[b]`; a step reads the first S rows (the longest sequence after the
step), or all L rows of a `static` cache (keys past a sequence's length masked), whose shapes then
stay the same as the context grows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentattn.caches.base import (
    ContiguousKeys,
    ContiguousKV,
    EntrySpec,
    FullPrecision,
    LatentEncoding,
    LayerCache,
    LayerSums,
    Sequences,
    Step,
    Storage,
    Workspace,
    as_bytes,
    real_tokens,
)
from latentattn.config import GQAConfig, MLAConfig


class ContiguousSequences(Sequences):
    """Lengths of B sequences of at most `max_len` tokens each, in rows `0 .. max_len - 1` of every buffer."""

    def __init__(
        self, batch_size: int, max_len: int, *, device: torch.device | str | None = None, static: bool = False
    ) -> None:
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"cache needs batch_size > 0 and max_len > 0, got {batch_size} and {max_len}")
        super().__init__(device)
        self.max_len = max_len
        self.static = static
        self._lengths = [0] * batch_size

    @property
    def host_lengths(self) -> list[int]:
        return list(self._lengths)

    def _set_lengths(self, lengths: list[int]) -> None:
        self._lengths = list(lengths)

    def _reserve(self, lengths: list[int], ends: list[int]) -> None:
        for b, (length, end) in enumerate(zip(lengths, ends, strict=True)):
            if end > self.max_len:
                raise ValueError(
                    f"cache overflow: sequence {b} holds {length} tokens and gets {end - length} more, "
                    f"past max_len={self.max_len}"
                )

    def _plan(self, step: Step) -> None:
        step.n_keys = self.max_len if self.static else max(*step.host_ends, 1)
        step.mask = self.causal_mask(step)
        lengths, n_tokens = step.host_lengths, step.n_tokens
        if not self.static and len(set(lengths)) == 1 and all(n == n_tokens for n in step.host_n_new):
            step.start = lengths[0]  # every sequence writes rows start .. start + T - 1: slice copies
        else:
            step.rows, step.cols = real_tokens(step.host_n_new, self.device)
            step.slots = step.lengths[step.rows] + step.cols


class ContiguousCache(LayerCache):
    """Buffers `[B, L, *shape]` per stored entry (`stored`), over `sequences` (shared or its own).

    `head_major` stores per-token shapes `[G, D]` as `[B, G, L, D]` (each head's rows contiguous, as
    attention kernels read them); buffers are always seen token-major, `[B, L, *shape]`.
    """

    def __init__(
        self,
        stored: EntrySpec,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None,
        dtype: torch.dtype,
        static: bool,
        sequences: ContiguousSequences | None,
        head_major: bool = False,
    ) -> None:
        if sequences is not None and (sequences.batch_size, sequences.max_len) != (batch_size, max_len):
            raise ValueError(
                f"shared sequences hold {sequences.batch_size} × {sequences.max_len}, "
                f"not batch_size={batch_size} × max_len={max_len}"
            )
        self.shared = sequences is not None
        if sequences is None:
            sequences = ContiguousSequences(batch_size, max_len, device=device, static=static)
        self.sequences = sequences
        self.dtype = dtype
        self.buffers: dict[str, Tensor] = {}
        for name, (shape, storage) in stored.items():
            factory = {"device": self.sequences.device, "dtype": storage}
            if head_major:
                heads, *rest = shape
                buffer = torch.zeros(batch_size, heads, max_len, *rest, **factory).transpose(1, 2)
            else:
                buffer = torch.zeros(batch_size, max_len, *shape, **factory)
            self.buffers[name] = buffer

    def store(self, step: Step, entries: dict[str, Tensor]) -> dict[str, Tensor]:
        """Write the step's real new `entries` `[B, T, ...]`; returns the rows read, `[B, S, ...]` each."""
        for name, value in entries.items():
            buffer = self.buffers[name]
            if step.start is not None:
                buffer[:, step.start : step.start + step.n_tokens] = value
            else:
                as_bytes(buffer).index_put_((step.rows, step.slots), as_bytes(value)[step.rows, step.cols])
        return {name: buffer[:, : step.n_keys] for name, buffer in self.buffers.items()}

    @property
    def stored(self) -> dict[str, Tensor]:
        return self.buffers

    @property
    def used_bytes(self) -> int:
        """`sum(lengths) · bytes_per_token`."""
        return sum(self.sequences.host_lengths) * self.bytes_per_token

    def storage(self, step: Step | None = None) -> Storage:
        lengths = self.lengths if step is None else step.ends
        return Storage(dict(self.stored), lengths, group_size=self.group_size)

    @property
    def group_size(self) -> int | None:
        """Values per scale of 8-bit entries (None: none)."""
        return None


class LatentCache(ContiguousCache):
    """MLA's cache: one `[RMSNorm(c_KV) | RoPE(k_pe)]` row of width W = C + R per token, shared by all
    heads, stored by `encoding` (default: as computed, `latent` `[B, L, W]`)."""

    family = "latent"

    def __init__(
        self,
        config: MLAConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        static: bool = False,
        sequences: ContiguousSequences | None = None,
        encoding: LatentEncoding | None = None,
        workspace: Workspace | None = None,
    ) -> None:
        self.encoding = encoding or FullPrecision(config.cache_width, dtype)
        self.inputs = {"latent": (config.cache_width,)}
        super().__init__(
            self.encoding.entries,
            batch_size,
            max_len,
            device=device,
            dtype=dtype,
            static=static,
            sequences=sequences,
        )
        self.workspace = workspace or Workspace()
        """Where attention's copied blocks are built (converted or dequantized rows, outside `nbytes`);
        the layers of one model share one, since they attend one after another."""

    @property
    def group_size(self) -> int | None:
        return self.encoding.group_size

    @property
    def latent(self) -> Tensor:
        """The whole buffer `[B, L, W]` (full precision)."""
        return self.buffers["latent"]

    def write(self, step: Step, values: dict[str, Tensor]) -> ContiguousKeys:
        """Returns the keys `[B, S, W]` (views of the buffers, decoded on demand)."""
        stored = self.store(step, self.encoding.encode(values["latent"]))
        return ContiguousKeys(stored, self.encoding, self.dtype, self.workspace, step.ends)


class KVCache(ContiguousCache):
    """The MHA/GQA/MQA cache: RoPE'd keys and values, `[B, L, G, D]` each, stored head-major
    (`[B, G, L, D]`) so that SDPA reads each head's keys contiguously (faster decode: README, bench)."""

    family = "kv"

    def __init__(
        self,
        config: GQAConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        static: bool = False,
        sequences: ContiguousSequences | None = None,
    ) -> None:
        shape = (config.n_kv_heads, config.head_dim)
        self.inputs = {"k": shape, "v": shape}
        super().__init__(
            kv_entries(config, dtype),
            batch_size,
            max_len,
            device=device,
            dtype=dtype,
            static=static,
            sequences=sequences,
            head_major=True,
        )

    def write(self, step: Step, values: dict[str, Tensor]) -> ContiguousKV:
        """Returns keys and values `[B, S, G, D]` (views of the buffers)."""
        stored = self.store(step, values)
        return ContiguousKV(stored["k"], stored["v"], step.ends)


def kv_entries(config: GQAConfig, dtype: torch.dtype) -> EntrySpec:
    """What a K/V cache stores per token: `k` and `v`, `[G, D]` each."""
    shape = (config.n_kv_heads, config.head_dim)
    return {"k": (shape, dtype), "v": (shape, dtype)}


class ModelCache(ContiguousSequences, LayerSums):
    """The contiguous caches of a model's layers, over one set of lengths: each forward step is planned
    once (`begin`/`stepping`) and every layer reads it. Byte figures sum over the layers; `layers` is
    filled by whoever builds it (`LanguageModel.new_cache`), each layer built with `sequences=self`."""

    def __init__(
        self, batch_size: int, max_len: int, *, device: torch.device | str | None = None, static: bool = False
    ) -> None:
        super().__init__(batch_size, max_len, device=device, static=static)
        self.layers: list[LayerCache] = []

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype
