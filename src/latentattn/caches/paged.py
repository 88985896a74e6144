"""Paged caches: fixed-size blocks of tokens in a pool, one block table per sequence (FlashMLA's layout).

Notation as in `latentattn.caches.base`; N blocks in the pool, `block_size` tokens per block.

`PagedSequences` is the bookkeeping: one allocator (a free list and reference counts) and one block
table and length per sequence, shared by every layer of a model, so sequences of any lengths share a
memory budget without padding, take a block at a time as they grow and return them when freed. `fork`
shares a sequence's full blocks by reference count (the partly filled last block is copied), and
`add_sequence(prefix_blocks=...)` attaches existing full blocks to a new sequence (prefix sharing),
so a block shared by several sequences is never written again. `select` chooses the batch: the
sequences that are the rows of the next steps.

`PagedModelCache` adds one pool per layer: latent pages `[N, block_size, W]` for MLA (or its 8-bit
entries), K/V pages for MHA/GQA/MQA; a byte budget means the same for every attention kind.
`PagedLatentCache` is one MLA layer's paged cache, usable directly as that layer's cache.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from latentattn.caches.base import (
    COPIED_BLOCK,
    ContiguousKeys,
    ContiguousKV,
    EntrySpec,
    KVRows,
    LatentEncoding,
    LatentKeys,
    LayerCache,
    LayerSums,
    Sequences,
    Step,
    Storage,
    Workspace,
    as_bytes,
    entry_bytes,
    real_tokens,
)
from latentattn.caches.contiguous import kv_entries
from latentattn.caches.quantized import latent_encoding
from latentattn.config import AttentionConfig, GQAConfig, MLAConfig


class BlockAllocator:
    """A free list and reference counts over `num_blocks` blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.refcount = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first

    @property
    def num_blocks(self) -> int:
        return len(self.refcount)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise ValueError(f"paged cache is out of blocks (all {self.num_blocks} in use): free sequences")
        block = self._free.pop()
        self.refcount[block] = 1
        return block

    def share(self, block: int) -> None:
        self.refcount[block] += 1

    def release(self, block: int) -> None:
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._free.append(block)


class PagedSequences(Sequences):
    """Block tables, lengths and the selected batch of any number of sequences over one allocator.

    Sequences are named by integer ids. `tables[seq]` lists its blocks in order (exactly
    `ceil(length / block_size)` of them between steps); `retained` counts references held outside any
    sequence (`retain`/`release`, for a prefix cache that keeps blocks alive).
    """

    def __init__(self, num_blocks: int, block_size: int, *, device: torch.device | str | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        super().__init__(device)
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.tables: dict[int, list[int]] = {}
        self.seq_lengths: dict[int, int] = {}
        self.batch: list[int] = []
        self.retained: Counter[int] = Counter()
        self._next_id = 0
        self._taken: list[int] = []  # blocks each batch row took in the open step

    def copy_block(self, source: int, target: int) -> None:
        """Copy block `source`'s rows to block `target` in every pool (none here: bookkeeping only)."""

    # Sequences -----------------------------------------------------------------------------------

    def add_sequence(self, prefix_blocks: Sequence[int] = ()) -> int:
        """A new sequence; returns its id. It starts empty, or holding the tokens of `prefix_blocks`
        (full blocks in use by other sequences or retained, shared by reference: prefix caching)."""
        for block in prefix_blocks:
            if not 0 <= block < self.allocator.num_blocks or self.allocator.refcount[block] == 0:
                raise ValueError(f"block {block} is not in use, so it holds no tokens to share")
        for block in prefix_blocks:
            self.allocator.share(block)
        seq = self._next_id
        self._next_id += 1
        self.tables[seq] = list(prefix_blocks)
        self.seq_lengths[seq] = len(prefix_blocks) * self.block_size
        return seq

    def fork(self, parent: int) -> int:
        """A new sequence with `parent`'s tokens: full blocks shared, the partial last block copied."""
        self._check_known(parent)
        table, length = self.tables[parent], self.seq_lengths[parent]
        shares_last = length % self.block_size == 0  # else the last block is part-filled: copied
        copy = None if shares_last else self.allocator.allocate()  # may raise: nothing changed yet
        child = self.add_sequence(table if shares_last else table[:-1])
        if not shares_last:
            self.copy_block(table[-1], copy)
            self.tables[child].append(copy)
            self.seq_lengths[child] = length
        return child

    def free(self, seq: int) -> None:
        """Return `seq`'s blocks (those no other sequence shares or retains go back to the free list)."""
        self._check_known(seq)
        for block in self.tables.pop(seq):
            self.allocator.release(block)
        del self.seq_lengths[seq]
        self.batch = [s for s in self.batch if s != seq]

    def select(self, seqs: Sequence[int]) -> PagedSequences:
        """Make `seqs` the rows of the next steps (in order); returns the cache."""
        if self._open is not None:
            raise ValueError("cannot change the batch while a step is open")
        for seq in seqs:
            self._check_known(seq)
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"a sequence appears twice in the batch {list(seqs)}")
        self.batch = list(seqs)
        return self

    def new_batch(self, batch_size: int) -> list[int]:
        """Add `batch_size` empty sequences and select them; returns their ids."""
        self.select([self.add_sequence() for _ in range(batch_size)])
        return self.batch

    def reset(self) -> None:
        """Free every sequence and every retained block."""
        self._open = None
        for seq in list(self.tables):
            self.free(seq)
        self.release(list(self.retained.elements()))

    def _check_known(self, seq: int) -> None:
        if seq not in self.tables:
            raise ValueError(f"unknown sequence id {seq} (live: {sorted(self.tables)})")

    # What a scheduler or a prefix cache needs ------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_blocks - self.allocator.num_free

    def blocks_needed(self, seq: int, n_tokens: int) -> int:
        """Blocks sequence `seq` must take to hold `n_tokens` more tokens."""
        self._check_known(seq)
        return math.ceil((self.seq_lengths[seq] + n_tokens) / self.block_size) - len(self.tables[seq])

    def full_blocks(self, seq: int) -> list[int]:
        """The blocks of `seq` that are full (shareable with `add_sequence(prefix_blocks=...)`)."""
        self._check_known(seq)
        return self.tables[seq][: self.seq_lengths[seq] // self.block_size]

    def retain(self, blocks: Sequence[int]) -> None:
        """Hold one more reference to each of `blocks` (in use), so freeing its sequences keeps it."""
        for block in blocks:
            if not 0 <= block < self.allocator.num_blocks or self.allocator.refcount[block] == 0:
                raise ValueError(f"block {block} is not in use, so it cannot be retained")
        for block in blocks:
            self.allocator.share(block)
            self.retained[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop references taken with `retain`."""
        counts = Counter(blocks)
        for block, count in counts.items():
            if self.retained[block] < count:
                raise ValueError(
                    f"block {block} is retained {self.retained[block]} times, cannot release {count}"
                )
        for block in blocks:
            self.retained[block] -= 1
            self.allocator.release(block)
        self.retained = +self.retained  # drop zero counts

    # Steps ---------------------------------------------------------------------------------------

    @property
    def host_lengths(self) -> list[int]:
        return [self.seq_lengths[seq] for seq in self.batch]

    def _reserve(self, lengths: list[int], ends: list[int]) -> None:
        if not self.batch:
            raise ValueError("no sequences selected: call select(ids) or new_batch(n) before a step")
        missing = [
            math.ceil(end / self.block_size) - len(self.tables[seq])
            for seq, end in zip(self.batch, ends, strict=True)
        ]
        if sum(missing) > self.allocator.num_free:
            raise ValueError(
                f"paged cache overflow: the batch needs {sum(missing)} more blocks of {self.block_size} "
                f"tokens, {self.allocator.num_free} are free"
            )
        for seq, count in zip(self.batch, missing, strict=True):
            self.tables[seq] += [self.allocator.allocate() for _ in range(count)]
        self._taken = missing

    def _plan(self, step: Step) -> None:
        block = self.block_size
        step.n_keys = max([*step.host_ends, 1])
        n_blocks = math.ceil(step.n_keys / block)
        tables = [self.tables[seq][:n_blocks] for seq in self.batch]
        step.tables = torch.tensor(
            [table + [0] * (n_blocks - len(table)) for table in tables], dtype=torch.long, device=self.device
        )
        if len(tables) == 1 and tables[0] == list(range(tables[0][0], tables[0][0] + n_blocks)):
            step.first_block = tables[0][0]
        step.mask = self.causal_mask(step)
        step.rows, step.cols = real_tokens(step.host_n_new, self.device)
        positions = step.lengths[step.rows] + step.cols
        step.slots = step.tables[step.rows, positions // block] * block + positions % block

    def cancel(self, step: Step) -> None:
        """Close `step` without its tokens, returning the blocks it took."""
        super().cancel(step)
        for seq, count in zip(self.batch, self._taken, strict=True):
            for _ in range(count):
                self.allocator.release(self.tables[seq].pop())

    def _set_lengths(self, lengths: list[int]) -> None:
        """New lengths for the batch: blocks past them are released, and a shared block that becomes the
        partial last block is copied first (shared blocks are never written)."""
        block = self.block_size
        copies = [
            seq
            for seq, length in zip(self.batch, lengths, strict=True)
            if length % block and self.allocator.refcount[self.tables[seq][length // block]] > 1
        ]
        if len(copies) > self.allocator.num_free:
            raise ValueError(
                f"paged cache is out of blocks: rewinding into shared blocks needs {len(copies)} copies, "
                f"{self.allocator.num_free} blocks are free"
            )
        for seq, length in zip(self.batch, lengths, strict=True):
            table, keep = self.tables[seq], math.ceil(length / block)
            for dropped in table[keep:]:
                self.allocator.release(dropped)
            del table[keep:]
            if seq in copies:
                copy = self.allocator.allocate()
                self.copy_block(table[-1], copy)
                self.allocator.release(table[-1])
                table[-1] = copy
            self.seq_lengths[seq] = length


class PagedLayerCache(LayerCache):
    """One layer's pools `[N, block_size, *shape]` per stored entry, over shared `PagedSequences`.

    `head_major` stores per-token shapes `[G, D]` as `[G, N, block_size, D]`, so that the pages of
    one sequence, gathered, give each head's rows contiguously; pools are always seen token-major.
    """

    def __init__(
        self,
        stored: EntrySpec,
        sequences: PagedSequences,
        *,
        dtype: torch.dtype,
        workspace: Workspace,
        shared: bool,
        head_major: bool = False,
    ) -> None:
        self.sequences = sequences
        self.shared = shared
        self.dtype = dtype
        self.workspace = workspace
        """Where gathered pages (and dequantized rows) are built outside autograd (outside `nbytes`);
        shared by a model's layers, which attend one after another."""
        self.head_major = head_major
        self.pools: dict[str, Tensor] = {}
        n_blocks, block = sequences.num_blocks, sequences.block_size
        for name, (shape, storage) in stored.items():
            factory = {"device": sequences.device, "dtype": storage}
            if head_major:
                heads, *rest = shape
                self.pools[name] = torch.zeros(heads, n_blocks, block, *rest, **factory).permute(1, 2, 0, 3)
            else:
                self.pools[name] = torch.zeros(n_blocks, block, *shape, **factory)

    @property
    def block_size(self) -> int:
        return self.sequences.block_size

    def store(self, step: Step, entries: dict[str, Tensor]) -> None:
        """Write the step's real new `entries` `[B, T, ...]` at their slots."""
        for name, value in entries.items():
            flat = as_bytes(self.pools[name]).flatten(0, 1)  # [N · block_size, ...]
            flat.index_put_((step.slots,), as_bytes(value)[step.rows, step.cols])

    def copy_block(self, source: int, target: int) -> None:
        for pool in self.pools.values():
            pool[target] = pool[source]

    def in_place(self, step: Step) -> dict[str, Tensor] | None:
        """The S rows of each entry as views `[1, S, ...]` when one sequence's blocks follow each other."""
        if step.first_block is None:
            return None
        first, n_blocks = step.first_block, step.tables.shape[1]
        return {
            name: pool[first : first + n_blocks].flatten(0, 1)[None, : step.n_keys]
            for name, pool in self.pools.items()
        }

    def gather(self, name: str, ids: Tensor, workspace: Workspace | None) -> Tensor:
        """Pages `ids: [B, p]` of entry `name` as rows `[B, p · block_size, ...]` (a copy, in `workspace`
        when given)."""
        pool = self.pools[name]
        if self.head_major:  # physical [G, N, block, D]
            physical = pool.permute(2, 0, 1, 3)
            shape = (physical.shape[0], ids.numel(), *physical.shape[2:])
            out = None if workspace is None else workspace.take(name, shape, pool.dtype, pool.device)
            pages = torch.index_select(physical, 1, ids.flatten(), out=out)  # [G, B·p, block, D]
            rows = pages.view(shape[0], ids.shape[0], -1, shape[-1])  # [G, B, p·block, D]
            return rows.permute(1, 2, 0, 3)  # [B, p·block, G, D]
        source = as_bytes(pool)
        shape = (ids.numel(), *source.shape[1:])
        out = None if workspace is None else workspace.take(name, shape, source.dtype, source.device)
        pages = torch.index_select(source, 0, ids.flatten(), out=out).view(pool.dtype)  # [B·p, block, ...]
        return pages.view(*ids.shape, *pages.shape[1:]).flatten(1, 2)

    @property
    def stored(self) -> dict[str, Tensor]:
        return self.pools

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks in use (a block shared by several sequences counts once)."""
        return self.sequences.num_used_blocks * self.block_size * self.bytes_per_token

    def storage(self, step: Step | None = None) -> Storage:
        sequences = self.sequences
        if step is None:
            n_blocks = max([len(sequences.tables[seq]) for seq in sequences.batch] + [1])
            tables = [(sequences.tables[seq] + [0] * n_blocks)[:n_blocks] for seq in sequences.batch]
            block_table = torch.tensor(tables, dtype=torch.long, device=self.device)
            lengths = self.lengths
        else:
            block_table, lengths = step.tables, step.ends
        return Storage(dict(self.stored), lengths, block_table, self.block_size, self.group_size)

    @property
    def group_size(self) -> int | None:
        """Values per scale of 8-bit entries (None: none)."""
        return None


class PagedLatentLayer(PagedLayerCache):
    """MLA's pages: the latent as `encoding` stores it (full precision or 8 bits)."""

    family = "latent"

    def __init__(
        self,
        config: MLAConfig,
        sequences: PagedSequences,
        encoding: LatentEncoding,
        *,
        dtype: torch.dtype,
        workspace: Workspace,
        shared: bool,
    ) -> None:
        self.encoding = encoding
        self.inputs = {"latent": (config.cache_width,)}
        super().__init__(encoding.entries, sequences, dtype=dtype, workspace=workspace, shared=shared)

    @property
    def group_size(self) -> int | None:
        return self.encoding.group_size

    def write(self, step: Step, values: dict[str, Tensor]) -> LatentKeys:
        """Returns the keys `[B, S, W]`: views of the pool for one sequence in consecutive blocks, else
        gathered page by page as attention reads them."""
        self.store(step, self.encoding.encode(values["latent"]))
        rows = self.in_place(step)
        if rows is not None:
            return ContiguousKeys(rows, self.encoding, self.dtype, self.workspace, step.ends)
        return PagedKeys(self, step)


class PagedKeys(LatentKeys):
    """The S latent rows of a step's sequences, gathered from the pages of their block tables (whole
    pages, at most `COPIED_BLOCK` rows per block), then decoded."""

    def __init__(self, layer: PagedLatentLayer, step: Step) -> None:
        shape = (step.tables.shape[0], step.n_keys, layer.encoding.width)
        super().__init__(shape, layer.dtype, layer.encoding, layer.workspace)
        self.layer = layer
        self.tables = step.tables
        self.ends = step.ends

    def block_rows(self, max_rows: int, dtype: torch.dtype) -> int:
        block = self.layer.block_size
        return max(block, min(max_rows, COPIED_BLOCK) // block * block)

    def read(self, start: int, stop: int, dtype: torch.dtype, workspace: Workspace | None) -> Tensor:
        block = self.layer.block_size
        first = start // block
        ids = self.tables[:, first : math.ceil(stop / block)]  # [B, pages]
        offset = start - first * block
        stored = {
            name: self.layer.gather(name, ids, workspace)[:, offset : offset + stop - start]
            for name in self.layer.pools
        }
        return self.encoding.decode(stored, dtype, workspace)

    def storage(self) -> Storage:
        layer = self.layer
        return Storage(dict(layer.pools), self.ends, self.tables, layer.block_size, self.encoding.group_size)


class PagedKVLayer(PagedLayerCache):
    """MHA/GQA/MQA's pages: RoPE'd keys and values, `[G, D]` per token each, stored head-major."""

    family = "kv"

    def __init__(
        self,
        config: GQAConfig,
        sequences: PagedSequences,
        *,
        dtype: torch.dtype,
        workspace: Workspace,
        shared: bool,
    ) -> None:
        shape = (config.n_kv_heads, config.head_dim)
        self.inputs = {"k": shape, "v": shape}
        factory = {"dtype": dtype, "workspace": workspace, "shared": shared}
        super().__init__(kv_entries(config, dtype), sequences, head_major=True, **factory)

    def write(self, step: Step, values: dict[str, Tensor]) -> KVRows:
        """Returns keys and values `[B, S, G, D]`: views of the pools for one sequence in consecutive
        blocks, else gathered page by page as attention reads them."""
        self.store(step, values)
        rows = self.in_place(step)
        if rows is not None:
            return ContiguousKV(rows["k"], rows["v"], step.ends)
        return PagedKV(self, step)


class PagedKV(KVRows):
    """The S keys and values of a step's sequences, gathered from the pages of their block tables
    (whole pages per block; each head's rows contiguous)."""

    copies = True

    def __init__(self, layer: PagedKVLayer, step: Step) -> None:
        k = layer.pools["k"]
        super().__init__((step.tables.shape[0], step.n_keys, *k.shape[2:]))
        self.layer = layer
        self.tables = step.tables
        self.ends = step.ends

    def block_rows(self, max_rows: int) -> int:
        block = self.layer.block_size
        return max(block, max_rows // block * block)

    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        block = self.layer.block_size
        first = start // block
        ids = self.tables[:, first : math.ceil(stop / block)]  # [B, pages]
        offset = start - first * block
        workspace = None if torch.is_grad_enabled() else self.layer.workspace
        k, v = (
            self.layer.gather(name, ids, workspace)[:, offset : offset + stop - start] for name in ("k", "v")
        )
        return k, v

    def storage(self) -> Storage:
        layer = self.layer
        return Storage(dict(layer.pools), self.ends, self.tables, layer.block_size)


class PagedModelCache(PagedSequences, LayerSums):
    """A model's paged cache: one allocator and one block table per sequence for all layers, one pool per
    layer (`layers`, in the order of `configs`). Size it by `num_blocks` or by `budget_bytes` (the most
    blocks whose pools, over all layers, fit in it). MLA layers store their latents in `latent_format`
    (None: the compute dtype; "int8" or "fp8": `EightBitLatent`)."""

    def __init__(
        self,
        configs: Sequence[AttentionConfig],
        *,
        num_blocks: int | None = None,
        budget_bytes: int | None = None,
        block_size: int = 64,
        latent_format: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if latent_format is not None and not all(isinstance(config, MLAConfig) for config in configs):
            raise ValueError("8-bit latent formats need MLA layers")
        encodings = [
            latent_encoding(config, dtype, latent_format) if isinstance(config, MLAConfig) else None
            for config in configs
        ]
        token_bytes = sum(
            entry_bytes(encoding.entries if encoding else kv_entries(config, dtype))
            for config, encoding in zip(configs, encodings, strict=True)
        )
        if (num_blocks is None) == (budget_bytes is None):
            raise ValueError("give the paged cache's size as num_blocks or as budget_bytes (exactly one)")
        if budget_bytes is not None:
            num_blocks = int(budget_bytes) // (block_size * token_bytes) if block_size > 0 else 0
            if num_blocks <= 0:
                raise ValueError(
                    f"a budget of {budget_bytes:,} B holds no block of {block_size} tokens "
                    f"({block_size * token_bytes:,} B over {len(configs)} layers)"
                )
        super().__init__(num_blocks, block_size, device=device)
        self.dtype = dtype
        # The layers attend one after another: one gathered block at a time, in one workspace.
        shared = {"dtype": dtype, "workspace": Workspace(), "shared": len(configs) > 1}
        self.layers = [
            PagedLatentLayer(config, self, encoding, **shared)
            if encoding
            else PagedKVLayer(config, self, **shared)
            for config, encoding in zip(configs, encodings, strict=True)
        ]

    def copy_block(self, source: int, target: int) -> None:
        for layer in self.layers:
            layer.copy_block(source, target)


class PagedLatentCache(PagedModelCache):
    """One MLA layer's paged cache — a pool `[N, block_size, W]` (FlashMLA's blocks: 64 × 576) — usable
    directly as that layer's cache: `layer(x, pages, n_new=...)` over the selected sequences."""

    family = "latent"

    def __init__(
        self,
        config: MLAConfig,
        num_blocks: int,
        *,
        block_size: int = 64,
        latent_format: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            [config],
            num_blocks=num_blocks,
            block_size=block_size,
            latent_format=latent_format,
            device=device,
            dtype=dtype,
        )

    @property
    def pool(self) -> Tensor:
        """The full-precision pool `[N, block_size, W]`."""
        return self.layers[0].pools["latent"]

    @property
    def workspace(self) -> Workspace:
        return self.layers[0].workspace

    def update(self, latent: Tensor, n_new: Tensor | None = None, step: Step | None = None) -> tuple:
        """`LayerCache.update` of the one layer: append `latent: [B, T, W]`; returns (keys, mask)."""
        return self.layers[0].update(latent, n_new=n_new, step=step)

    def storage(self, step: Step | None = None) -> Storage:
        return self.layers[0].storage(step)
