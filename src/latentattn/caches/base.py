"""What every cache kind shares: per-sequence lengths, the per-step plan, latent reads, byte figures.

Notation: B batch (the selected sequences), T new tokens, L allocated length, S keys read this step,
K real new tokens (at most B·T), W = C + R latent width (C kv_lora_rank, R qk_rope_head_dim),
G kv heads, D head_dim.

A cache has two halves:
- `Sequences`: how many tokens each sequence holds. Every forward step opens a `Step` (`begin`):
  positions, the mask, where each new token is written — computed once, read by every layer — and
  closes it (`advance`, or `cancel` when the forward failed). A model's layers share one `Sequences`.
- Layer storage (`LayerCache`): one layer's buffers; `update` writes a step's new entries and returns
  what attention reads. A layer used alone with its own cache opens and closes its own steps.

Token t of sequence b sits at position `lengths[b] + t` and may attend to every cached or new key at a
position `<= lengths[b] + t` (a causal mask with a per-sequence offset). `n_new[b]` of the T tokens are
real; the rest are right padding, never written.

Kernels that read a cache in place (no copies) get its raw layout from `storage()` (`Storage`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import torch
from torch import Tensor

Family = Literal["latent", "kv"]
"""The attention a cache serves: "latent" (MLA's `[c_KV | k_pe]` rows) or "kv" (MHA/GQA/MQA's K and V)."""

EntrySpec = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""Stored entries: name → (per-token shape, storage dtype)."""

COPIED_BLOCK = 4096
"""Rows per block of latents a cache copies out for attention (gathered pages, dequantized or
converted rows): 9 MiB at W = 576 in fp32."""


def entry_bytes(entries: EntrySpec) -> int:
    """Bytes one token occupies in `entries`."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in entries.values())


def as_bytes(tensor: Tensor) -> Tensor:
    """One-byte tensors (int8, fp8) as uint8, since indexed writes do not support fp8 on every device."""
    return tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor


@dataclass
class Step:
    """One forward step of a batch, planned once for every layer by `Sequences.begin`.

    Device tensors: `lengths`, `ends` `[B]` (before and after the step); `positions` `[B, T]`;
    `mask` `[B, T, S]` (True = attend; None: all sequences at one length and all T tokens real, so the
    causal mask aligned to the last key, which attention builds cheaply or skips for T = 1); `rows`,
    `cols`, `slots` `[K]`: each real new token's sequence, index among the T, and where it is written
    (contiguous: row along L; paged: row of the pool flattened to `[num_blocks · block_size]`), None
    when `start` is set: every sequence then writes its T tokens at rows `start:start + T` (one slice
    copy). Paged caches add `tables` `[B, ceil(S / block_size)]` (the sequences' block ids; padding:
    block 0, masked) and `first_block` (one sequence whose blocks follow each other: its keys are a view
    of the pool from that block on). `memo` holds values the layers share within the step (RoPE cos/sin).
    """

    host_lengths: list[int]
    host_n_new: list[int]
    lengths: Tensor
    ends: Tensor
    positions: Tensor
    mask: Tensor | None
    n_keys: int
    start: int | None = None
    rows: Tensor | None = None
    cols: Tensor | None = None
    slots: Tensor | None = None
    tables: Tensor | None = None
    first_block: int | None = None
    memo: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return self.positions.shape[1]

    @property
    def host_ends(self) -> list[int]:
        return [length + new for length, new in zip(self.host_lengths, self.host_n_new, strict=True)]


def check_n_new(n_new: Tensor | Sequence[int] | None, batch_size: int, n_tokens: int) -> list[int]:
    """`n_new` (None: all T tokens are real) as a list of B integers in [0, T]."""
    if n_new is None:
        return [n_tokens] * batch_size
    values = torch.as_tensor(n_new)
    if values.dtype == torch.bool or values.dtype.is_floating_point or values.dtype.is_complex:
        raise ValueError(f"n_new must be an integer tensor of shape [batch={batch_size}], got {values.dtype}")
    if values.shape != (batch_size,):
        raise ValueError(
            f"n_new must be an integer tensor of shape [batch={batch_size}], got shape {tuple(values.shape)}"
        )
    if values.device.type == "meta":
        raise ValueError("n_new on the meta device holds no values: pass it on the CPU")
    host = values.tolist()
    if any(not 0 <= n <= n_tokens for n in host):
        raise ValueError(f"n_new must lie in [0, {n_tokens}] (the chunk length), got {host}")
    return host


def real_tokens(n_new: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """`(rows, cols)` `[K]`: sequence and index among the T of each real new token, sequence-major."""
    counts = torch.tensor(n_new, device=device)
    total = sum(n_new)
    rows = torch.repeat_interleave(torch.arange(len(n_new), device=device), counts, output_size=total)
    firsts = torch.cumsum(counts, 0) - counts  # [B] index of each sequence's first real token
    return rows, torch.arange(total, device=device) - firsts[rows]


class Sequences(ABC):
    """Per-sequence lengths of the batch and the plan of each forward step (`begin` → `Step`).

    The lengths live on the host, so planning a step reads no device tensor (no syncs; works on
    `meta`). One step is open at a time: `begin` → layers write → `advance` (or `cancel`), or the
    `stepping` context manager that closes it either way.
    """

    device: torch.device
    static: bool = False
    """Read every allocated row each step (keys beyond a sequence's length masked), so shapes do not
    grow with the context and a compiled step does not recompile (contiguous caches only)."""

    def __init__(self, device: torch.device | str | None) -> None:
        self.device = torch.device(device) if device is not None else torch.get_default_device()
        self._open: Step | None = None

    @property
    @abstractmethod
    def host_lengths(self) -> list[int]:
        """Tokens held by each sequence of the batch."""

    @abstractmethod
    def _set_lengths(self, lengths: list[int]) -> None:
        """Store new lengths for the batch's sequences (already checked)."""

    @abstractmethod
    def _reserve(self, lengths: list[int], ends: list[int]) -> None:
        """Make room for the step that takes each sequence from `lengths` to `ends`, or raise a
        ValueError naming the problem before changing anything."""

    @abstractmethod
    def _plan(self, step: Step) -> None:
        """Fill the step's write and read fields (`n_keys`, `mask`, `start`/`rows`/`cols`/`slots`, ...)."""

    @property
    def batch_size(self) -> int:
        return len(self.host_lengths)

    @property
    def lengths(self) -> Tensor:
        """Tokens held by each sequence, `[B]` int64 on the cache's device."""
        return torch.tensor(self.host_lengths, dtype=torch.long, device=self.device)

    def positions(self, n_tokens: int) -> Tensor:
        """Positions `[B, T]` that the next `n_tokens` new tokens take: `lengths[b] + t`."""
        return self.lengths[:, None] + torch.arange(n_tokens, device=self.device)

    def begin(self, n_tokens: int, n_new: Tensor | Sequence[int] | None = None) -> Step:
        """Plan a step of `n_tokens` new tokens per sequence, `n_new[b]` of them real (None: all)."""
        if self._open is not None:
            raise ValueError("a step is already open on this cache: advance or cancel it first")
        if n_tokens <= 0:
            raise ValueError(f"a step needs at least one new token per sequence, got {n_tokens}")
        host_n_new = check_n_new(n_new, self.batch_size, n_tokens)
        host_lengths = self.host_lengths
        ends = [length + new for length, new in zip(host_lengths, host_n_new, strict=True)]
        self._reserve(host_lengths, ends)
        device = self.device
        lengths = torch.tensor(host_lengths, dtype=torch.long, device=device)
        step = Step(
            host_lengths=host_lengths,
            host_n_new=host_n_new,
            lengths=lengths,
            ends=torch.tensor(ends, dtype=torch.long, device=device),
            positions=lengths[:, None] + torch.arange(n_tokens, device=device),
            mask=None,
            n_keys=0,
        )
        self._plan(step)
        self._open = step
        return step

    def advance(self, step: Step) -> None:
        """Close `step`: every sequence now holds its new tokens."""
        self._close(step)
        self._set_lengths(step.host_ends)

    def cancel(self, step: Step) -> None:
        """Close `step` without keeping its tokens (a failed forward); lengths are unchanged."""
        self._close(step)

    def _close(self, step: Step) -> None:
        if step is not self._open:
            raise ValueError("this step is not the one open on the cache")
        self._open = None

    @contextmanager
    def stepping(self, n_tokens: int, n_new: Tensor | Sequence[int] | None = None) -> Iterator[Step]:
        """`begin` a step, then `advance` it, or `cancel` it if the body raises."""
        step = self.begin(n_tokens, n_new)
        try:
            yield step
        except BaseException:
            self.cancel(step)
            raise
        self.advance(step)

    def truncate(self, lengths: Tensor | Sequence[int]) -> None:
        """Rewind each sequence of the batch to `lengths[b]` tokens (at most what it holds)."""
        host = torch.as_tensor(lengths).tolist()
        current = self.host_lengths
        if len(host) != len(current) or any(
            not 0 <= new <= old for new, old in zip(host, current, strict=True)
        ):
            raise ValueError(
                f"truncate takes one length per sequence within its current length {current}, got {host}"
            )
        self._set_lengths(host)

    def reset(self) -> None:
        """Forget every token (contiguous: every sequence holds 0; paged: every sequence is freed)."""
        self._open = None
        self._set_lengths([0] * self.batch_size)

    def causal_mask(self, step: Step) -> Tensor | None:
        """`[B, T, S]` for `step` (keys at positions `<= positions[b, t]`), or None when all sequences
        share one length and all T tokens are real (and the cache is not static)."""
        uniform = len(set(step.host_ends)) == 1 and all(n == step.n_tokens for n in step.host_n_new)
        if uniform and step.host_ends[0] == step.n_keys and not self.static:
            return None
        keys = torch.arange(step.n_keys, device=self.device)
        return keys[None, None, :] <= step.positions[:, :, None]


class Workspace:
    """Reusable buffers for the blocks a cache copies out for attention (gathered pages, dequantized
    rows), one per `name`. A fresh multi-MiB tensor per block costs page faults: most of an 8-bit
    decode step's copy time on CPU. What is taken stays valid until the next take of that name."""

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of `shape` on buffer `name` (grown, or rebuilt for another dtype/device)."""
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if (
            buffer is None
            or buffer.numel() < numel
            or buffer.dtype != dtype
            or buffer.device != device
            or (buffer.is_inference() and not torch.is_inference_mode_enabled())  # read-only outside
        ):
            buffer = self.buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def converted(rows: Tensor, dtype: torch.dtype, workspace: Workspace | None) -> Tensor:
    """`rows` in `dtype`: itself when it already is, else a copy (in `workspace` when given)."""
    if rows.dtype == dtype:
        return rows
    if workspace is None:
        return rows.to(dtype)
    return workspace.take("rows", tuple(rows.shape), dtype, rows.device).copy_(rows)


class LatentEncoding(ABC):
    """How one token's latent `[W]` is stored (`entries`) and read back."""

    width: int
    entries: EntrySpec
    group_size: int | None = None
    """Values of c_KV per scale (8-bit encodings)."""

    @abstractmethod
    def encode(self, latent: Tensor) -> dict[str, Tensor]:
        """`latent: [B, T, W]` in the compute dtype → the stored entries `[B, T, ...]`."""

    @abstractmethod
    def decode(self, stored: dict[str, Tensor], dtype: torch.dtype, workspace: Workspace | None) -> Tensor:
        """Stored entries `[B, s, ...]` → latents `[B, s, W]` in `dtype` (built in `workspace` when given)."""

    def reads_in_place(self, dtype: torch.dtype) -> bool:
        """Whether `decode` returns the stored rows themselves (no copy) for `dtype`."""
        return False


class FullPrecision(LatentEncoding):
    """The latent stored as it is computed: one `latent` entry `[W]` in `dtype`."""

    def __init__(self, width: int, dtype: torch.dtype) -> None:
        self.width = width
        self.entries = {"latent": ((width,), dtype)}

    def encode(self, latent: Tensor) -> dict[str, Tensor]:
        return {"latent": latent}

    def decode(self, stored: dict[str, Tensor], dtype: torch.dtype, workspace: Workspace | None) -> Tensor:
        return converted(stored["latent"], dtype, workspace)

    def reads_in_place(self, dtype: torch.dtype) -> bool:
        return self.entries["latent"][1] == dtype


@dataclass(frozen=True)
class Storage:
    """Where one layer's cached rows live, for kernels that read them in place (no copies).

    `entries`, by name: "latent" `[..., W]` in the cache dtype (full precision), or "c_kv" `[..., C]`
    int8 / float8_e4m3fn with "scale" `[..., C / group_size]` fp32 (one per group of c_kv values:
    value = stored · scale) and "k_pe" `[..., R]` bf16 (8-bit latents), or "k", "v" `[..., G, D]`
    (MHA/GQA/MQA). The leading dims are `[B, L]` for a contiguous cache (sequence b's rows
    `0 .. lengths[b] - 1`) and `[num_blocks, block_size]` for a paged one (sequence b's token i in block
    `block_table[b, i // block_size]`, row `i % block_size`). K/V tensors are strided views of
    head-major memory (`[B, G, L, D]`, `[G, num_blocks, block_size, D]`): use their strides.
    `lengths` `[B]` int64: valid rows per sequence (after the step, when taken from one);
    `block_table` `[B, max_blocks]` int64 (entries past a sequence's blocks are 0 and must not be read).
    """

    entries: dict[str, Tensor]
    lengths: Tensor
    block_table: Tensor | None = None
    block_size: int | None = None
    group_size: int | None = None


class LatentKeys(ABC):
    """The S latent rows `[B, S, W]` MLA reads this step, fetched on demand: whole (`full()`, for the
    naive path) or in consecutive blocks (`iter_blocks`, for the absorbed path), so a paged cache is
    gathered, and an 8-bit one dequantized, one block at a time instead of whole.

    `dtype`: the compute dtype. Outside autograd, copied blocks reuse the cache's `workspace`, so each
    block is valid until the next one is read.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        dtype: torch.dtype,
        encoding: LatentEncoding,
        workspace: Workspace | None,
    ) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.encoding = encoding
        self.workspace = workspace

    @abstractmethod
    def block_rows(self, max_rows: int, dtype: torch.dtype) -> int:
        """Rows per block when the caller takes at most `max_rows` in `dtype` (this kind's own limits)."""

    @abstractmethod
    def read(self, start: int, stop: int, dtype: torch.dtype, workspace: Workspace | None) -> Tensor:
        """Rows `start:stop`, `[B, stop - start, W]` in `dtype`."""

    @abstractmethod
    def storage(self) -> Storage:
        """The raw layout these keys are read from (lengths: after this step)."""

    def full(self) -> Tensor:
        """All S rows, `[B, S, W]` in the compute dtype (a tensor of its own, or a view of the cache)."""
        return self.read(0, self.shape[1], self.dtype, None)

    def iter_blocks(self, *, max_rows: int, dtype: torch.dtype | None = None) -> Iterator[Tensor]:
        """Consecutive rows in blocks of at most `max_rows` (fewer when this kind copies: at most
        `COPIED_BLOCK`, whole pages for a paged cache), `[B, s, W]` each, in `dtype` (None: compute)."""
        dtype = dtype or self.dtype
        rows = self.block_rows(max_rows, dtype)
        workspace = None if torch.is_grad_enabled() else self.workspace
        n_keys = self.shape[1]
        for start in range(0, n_keys, rows):
            yield self.read(start, min(start + rows, n_keys), dtype, workspace)


class ContiguousKeys(LatentKeys):
    """Keys held in stored entries `[B, S, ...]` (views of a contiguous cache, or of a paged pool holding
    one sequence in consecutive blocks): blocks are views when stored in the requested dtype, else
    decoded copies of at most `COPIED_BLOCK` rows."""

    def __init__(
        self,
        stored: dict[str, Tensor],
        encoding: LatentEncoding,
        dtype: torch.dtype,
        workspace: Workspace | None = None,
        lengths: Tensor | None = None,
    ) -> None:
        first = next(iter(stored.values()))
        super().__init__((*first.shape[:2], encoding.width), dtype, encoding, workspace)
        self.stored = stored
        self.lengths = lengths

    @classmethod
    def of(cls, latent: Tensor) -> ContiguousKeys:
        """Keys held in one tensor `latent: [B, S, W]`."""
        return cls({"latent": latent}, FullPrecision(latent.shape[-1], latent.dtype), latent.dtype)

    def block_rows(self, max_rows: int, dtype: torch.dtype) -> int:
        return max_rows if self.encoding.reads_in_place(dtype) else min(max_rows, COPIED_BLOCK)

    def read(self, start: int, stop: int, dtype: torch.dtype, workspace: Workspace | None) -> Tensor:
        rows = {name: entry[:, start:stop] for name, entry in self.stored.items()}
        return self.encoding.decode(rows, dtype, workspace)

    def storage(self) -> Storage:
        lengths = self.lengths
        if lengths is None:  # a plain tensor: every row is valid
            lengths = torch.full((self.shape[0],), self.shape[1], dtype=torch.long, device=self.stored_device)
        return Storage(dict(self.stored), lengths, group_size=self.encoding.group_size)

    @property
    def stored_device(self) -> torch.device:
        return next(iter(self.stored.values())).device


class KVRows(ABC):
    """The S keys and values `[B, S, G, D]` a K/V layer reads this step: whole (`full()`) or in
    consecutive blocks (`iter_blocks`), so a paged cache can be gathered a cache-sized block at a time
    instead of whole. `copies`: whether reading copies (a gather); else reads are views."""

    copies: bool

    def __init__(self, shape: tuple[int, int, int, int]) -> None:
        self.shape = torch.Size(shape)

    @abstractmethod
    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Keys and values of rows `start:stop`, `[B, stop - start, G, D]` each."""

    @abstractmethod
    def block_rows(self, max_rows: int) -> int:
        """Rows per block when the caller takes at most `max_rows` (this kind's own limits)."""

    @abstractmethod
    def storage(self) -> Storage:
        """The raw layout these rows are read from (lengths: after this step)."""

    def full(self) -> tuple[Tensor, Tensor]:
        """All S keys and values, `[B, S, G, D]` each."""
        return self.read(0, self.shape[1])

    def iter_blocks(self, *, max_rows: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Keys and values of consecutive rows, at most `max_rows` per block (paged: whole pages)."""
        rows, n_keys = self.block_rows(max_rows), self.shape[1]
        for start in range(0, n_keys, rows):
            yield self.read(start, min(start + rows, n_keys))


class ContiguousKV(KVRows):
    """Keys and values held in tensors `[B, S, G, D]` (views of a cache): blocks are views."""

    copies = False

    def __init__(self, k: Tensor, v: Tensor, lengths: Tensor) -> None:
        super().__init__(tuple(k.shape))
        self.k, self.v, self.lengths = k, v, lengths

    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        return self.k[:, start:stop], self.v[:, start:stop]

    def block_rows(self, max_rows: int) -> int:
        return max_rows

    def storage(self) -> Storage:
        return Storage({"k": self.k, "v": self.v}, self.lengths)


class AttentionCache(Protocol):
    """What attention layers need of a cache (`LayerCache`, or `PagedLatentCache` for one MLA layer)."""

    family: Family
    device: torch.device
    batch_size: int

    def stepping(self, n_tokens: int, n_new: Tensor | Sequence[int] | None = None): ...

    def update(
        self, *entries: Tensor, n_new: Tensor | None = None, step: Step | None = None
    ) -> tuple[LatentKeys | KVRows, Tensor | None]: ...


class LayerCache(ABC):
    """One layer's storage, over the `sequences` it shares with the model's other layers (or owns).

    `update(*entries, step=step)` writes a step's new entries (`inputs` names their per-token shapes,
    in the compute `dtype`) and returns what attention reads and the mask: `(LatentKeys, mask)` for
    the latent family, `(KVRows, mask)` for K/V. Without `step` the cache runs its own step over its
    sequences (`n_new` as in `Sequences.begin`), for a layer used alone.
    """

    family: ClassVar[Family]
    inputs: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    sequences: Sequences
    shared: bool
    """One of a model cache's layers: its steps are the model's, which every layer writes, so it runs
    no step of its own (that would advance the other layers' lengths too)."""

    @abstractmethod
    def write(self, step: Step, values: dict[str, Tensor]) -> LatentKeys | KVRows:
        """Store the step's real new entries; return what attention reads."""

    @property
    @abstractmethod
    def stored(self) -> dict[str, Tensor]:
        """The tensors this layer stores, by entry name; leading dims `[B, L]` (contiguous) or
        `[num_blocks, block_size]` (paged)."""

    @property
    def nbytes(self) -> int:
        """Bytes allocated by this layer."""
        return sum(tensor.nbytes for tensor in self.stored.values())

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies in this layer."""
        return sum(tensor[0, 0].nbytes for tensor in self.stored.values())

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes of this layer holding cached tokens."""

    @abstractmethod
    def storage(self, step: Step | None = None) -> Storage:
        """The raw layout (lengths: after `step` when given, else the current ones)."""

    def update(
        self, *entries: Tensor, n_new: Tensor | None = None, step: Step | None = None
    ) -> tuple[LatentKeys | KVRows, Tensor | None]:
        values = self.check_inputs(entries)
        if step is not None:
            if n_new is not None:
                raise ValueError(
                    "pass n_new or a step, not both (the step already says which tokens are real)"
                )
            return self.write(step, values), step.mask
        with self.stepping(next(iter(values.values())).shape[1], n_new) as step:
            read = self.write(step, values)
        return read, step.mask

    def check_inputs(self, entries: tuple[Tensor, ...]) -> dict[str, Tensor]:
        """`entries` by name, or a ValueError naming the problem unless each is `[B, T, *shape]` (one T),
        in the cache's dtype, on its device."""
        if len(entries) != len(self.inputs):
            raise ValueError(
                f"{type(self).__name__}.update takes {', '.join(self.inputs)}, got {len(entries)} tensors"
            )
        owner, batch = type(self).__name__, self.batch_size
        if batch == 0:
            raise ValueError("no sequences selected: call select(ids) or new_batch(n) before a step")
        for (name, tail), value in zip(self.inputs.items(), entries, strict=True):
            if value.dim() != 2 + len(tail) or value.shape[0] != batch or tuple(value.shape[2:]) != tail:
                raise ValueError(
                    f"{owner}: '{name}' has shape {tuple(value.shape)}, expected "
                    f"[batch={batch}, new_tokens, {', '.join(map(str, tail))}]"
                )
            if value.dtype != self.dtype:
                raise ValueError(
                    f"{owner}: new '{name}' entries are {value.dtype} but the cache holds {self.dtype} "
                    "(build it with the layer's new_cache())"
                )
            if value.device != self.device:
                raise ValueError(
                    f"{owner}: new '{name}' entries are on {value.device} but the cache is on {self.device}"
                )
        if len({value.shape[1] for value in entries}) > 1:
            shapes = {name: tuple(value.shape) for name, value in zip(self.inputs, entries, strict=True)}
            raise ValueError(f"{owner}: entries disagree on the number of new tokens: {shapes}")
        return dict(zip(self.inputs, entries, strict=True))

    # The sequences' protocol, for a layer used alone -----------------------------------------------

    @property
    def lengths(self) -> Tensor:
        return self.sequences.lengths

    @property
    def batch_size(self) -> int:
        return self.sequences.batch_size

    @property
    def device(self) -> torch.device:
        return self.sequences.device

    def positions(self, n_tokens: int) -> Tensor:
        return self.sequences.positions(n_tokens)

    def stepping(self, n_tokens: int, n_new: Tensor | Sequence[int] | None = None):
        if self.shared:
            raise ValueError(
                f"this {type(self).__name__} is one layer of a model cache: run steps over the whole model "
                "(model(tokens, cache), or cache.stepping(...) and every layer with step=)"
            )
        return self.sequences.stepping(n_tokens, n_new)

    def truncate(self, lengths: Tensor | Sequence[int]) -> None:
        self.sequences.truncate(lengths)

    def reset(self) -> None:
        self.sequences.reset()


class LayerSums:
    """Byte figures of a cache made of `layers`, summed over them."""

    layers: list[LayerCache]

    @property
    def nbytes(self) -> int:
        """Bytes allocated by all layers."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies across all layers."""
        return sum(layer.bytes_per_token for layer in self.layers)

    @property
    def used_bytes(self) -> int:
        """Bytes holding cached tokens across all layers."""
        return sum(layer.used_bytes for layer in self.layers)
