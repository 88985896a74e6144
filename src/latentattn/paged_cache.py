"""MLA's latent cache in fixed-size pages, FlashMLA's layout: blocks of 64 tokens × (d_c + d_R).

A pool of `num_blocks` blocks is shared by all sequences; each sequence owns a block table (the list
of its blocks in order), so sequences of any lengths share one pool without padding, memory is taken
a block at a time as they grow and returned when they are freed. `fork` shares a sequence's prefix by
reference counting (its full blocks; the partly filled last block is copied, so a shared block is
never written again). `select` chooses which sequences the rows of the next `update` are.

Notation: B selected sequences, T new tokens, S keys read, W = C + R values per token.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from latentattn.cache import COPIED_BLOCK, LatentKeys, Workspace, attention_mask, check_entry, check_n_new
from latentattn.config import MLAConfig


class BlockAllocator:
    """A free list and reference counts over `num_blocks` blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.refcount = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise ValueError(
                f"paged cache is out of blocks (all {len(self.refcount)} in use): free sequences"
            )
        block = self._free.pop()
        self.refcount[block] = 1
        return block

    def share(self, block: int) -> None:
        self.refcount[block] += 1

    def release(self, block: int) -> None:
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._free.append(block)


class PagedLatentCache:
    """Paged `[RMSNorm(c_KV) | RoPE(k_pe)]` rows: a pool `[num_blocks, block_size, C + R]`."""

    def __init__(
        self,
        config: MLAConfig,
        num_blocks: int,
        *,
        block_size: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.dtype = dtype
        self.pool = torch.zeros(num_blocks, block_size, config.cache_width, device=device, dtype=dtype)
        self.allocator = BlockAllocator(num_blocks)
        self.workspace = Workspace()
        """Where attention's gathered pages are built (≤ `COPIED_BLOCK` rows, outside `nbytes`)."""
        self.tables: dict[int, list[int]] = {}
        self.seq_lengths: dict[int, int] = {}
        self.batch: list[int] = []
        self._next_id = 0

    # Sequences -----------------------------------------------------------------------------------

    def add_sequence(self) -> int:
        """A new empty sequence; returns its id (blocks are taken as it grows)."""
        seq = self._next_id
        self._next_id += 1
        self.tables[seq], self.seq_lengths[seq] = [], 0
        return seq

    def fork(self, parent: int) -> int:
        """A new sequence with `parent`'s tokens: full blocks shared, the partial last block copied."""
        self._check_known(parent)
        table, length = self.tables[parent], self.seq_lengths[parent]
        partial = length % self.block_size != 0
        shared = table[:-1] if partial else table
        copy = self.allocator.allocate() if partial else None  # may raise: nothing changed yet
        for block in shared:
            self.allocator.share(block)
        child = self.add_sequence()
        self.tables[child] = [*shared, copy] if partial else list(shared)
        self.seq_lengths[child] = length
        if partial:
            self.pool[copy] = self.pool[table[-1]]
        return child

    def free(self, seq: int) -> None:
        """Return `seq`'s blocks (those no other sequence shares go back to the free list)."""
        self._check_known(seq)
        for block in self.tables.pop(seq):
            self.allocator.release(block)
        del self.seq_lengths[seq]
        self.batch = [s for s in self.batch if s != seq]

    def select(self, seqs: list[int]) -> PagedLatentCache:
        """Make `seqs` the rows of the next updates (in order); returns the cache."""
        for seq in seqs:
            self._check_known(seq)
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"a sequence appears twice in the batch {seqs}")
        self.batch = list(seqs)
        return self

    def new_batch(self, batch_size: int) -> list[int]:
        """Add `batch_size` empty sequences and select them; returns their ids."""
        self.select([self.add_sequence() for _ in range(batch_size)])
        return self.batch

    def reset(self) -> None:
        """Free every sequence."""
        for seq in list(self.tables):
            self.free(seq)

    def _check_known(self, seq: int) -> None:
        if seq not in self.tables:
            raise ValueError(f"unknown sequence id {seq} (live: {sorted(self.tables)})")

    # The attention protocol ----------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return len(self.batch)

    @property
    def device(self) -> torch.device:
        return self.pool.device

    @property
    def lengths(self) -> Tensor:
        """Tokens held by each selected sequence, `[B]`."""
        return torch.tensor(
            [self.seq_lengths[seq] for seq in self.batch], dtype=torch.long, device=self.device
        )

    def positions(self, n_tokens: int) -> Tensor:
        """Positions `[B, T]` that the next `n_tokens` new tokens take: `lengths[b] + t`."""
        return self.lengths[:, None] + torch.arange(n_tokens, device=self.device)

    def update(self, latent: Tensor, n_new: Tensor | None = None) -> tuple[LatentKeys, Tensor | None]:
        """Append `latent: [B, T, C + R]` to the selected sequences (taking blocks as needed); returns
        their keys `[B, S, C + R]`, gathered page by page as attention reads them, and the mask
        `[B, T, S]` (None: causal, last sees all)."""
        if not self.batch:
            raise ValueError("no sequences selected: call select(ids) or new_batch(n) before attention")
        width = self.pool.shape[-1]
        check_entry(type(self).__name__, "latent", latent, (width,), self.batch_size, self.dtype, self.device)
        n_tokens = latent.shape[1]
        n_new = check_n_new(n_new, self.batch_size, n_tokens, self.device)
        lengths = self.lengths
        self._reserve((lengths + n_new).tolist())
        mask, n_keys = attention_mask(lengths, n_new, n_tokens)
        tables = self._tables(math.ceil(n_keys / self.block_size))  # [B, blocks]
        rows, cols = (torch.arange(n_tokens, device=self.device)[None, :] < n_new[:, None]).nonzero(
            as_tuple=True
        )
        positions = lengths[rows] + cols
        slots = tables[rows, positions // self.block_size] * self.block_size + positions % self.block_size
        self.pool.view(-1, width).index_copy_(0, slots, latent[rows, cols])
        for seq, count in zip(self.batch, n_new.tolist(), strict=True):
            self.seq_lengths[seq] += count
        return self._keys(tables, n_keys), mask

    def _keys(self, tables: Tensor, n_keys: int) -> LatentKeys:
        """The first `n_keys` rows of the sequences with block tables `tables: [B, blocks]`: one
        sequence whose blocks follow each other in the pool is read in place (a view, one block of
        keys); otherwise pages are gathered `COPIED_BLOCK` rows at a time."""
        n_blocks = tables.shape[1]
        if len(self.batch) == 1:
            table = self.tables[self.batch[0]][:n_blocks]
            if table and table == list(range(table[0], table[0] + n_blocks)):  # empty: padding
                return LatentKeys.of(self.pool[table[0] : table[0] + n_blocks].flatten(0, 1)[None, :n_keys])
        shape = (len(tables), n_keys, self.pool.shape[-1])
        return LatentKeys(
            partial(self._gather, tables),
            shape,
            self.dtype,
            granule=self.block_size,
            max_block=COPIED_BLOCK,
            workspace=self.workspace,
        )

    def _gather(
        self, tables: Tensor, start: int, stop: int, workspace: Workspace | None, dtype: torch.dtype | None
    ) -> Tensor:
        """Rows `start:stop`, `[B, stop - start, W]` in `dtype` (None: the pool's), of the sequences
        with block tables `[B, blocks]` (gathered into `workspace` when given)."""
        first = start // self.block_size
        ids = tables[:, first : math.ceil(stop / self.block_size)]  # [B, pages]
        if workspace is None:
            pages = self.pool[ids]  # [B, pages, block_size, W]
        else:
            pages = workspace.take((*ids.shape, *self.pool.shape[1:]), self.pool.dtype, self.device)
            torch.index_select(self.pool, 0, ids.flatten(), out=pages.flatten(0, 1))
        offset = start - first * self.block_size
        return pages.flatten(1, 2)[:, offset : offset + stop - start].to(dtype or self.dtype)

    def _reserve(self, needed_lengths: list[int]) -> None:
        """Give each selected sequence blocks for `needed_lengths` tokens, or raise before taking any."""
        missing = [
            math.ceil(length / self.block_size) - len(self.tables[seq])
            for seq, length in zip(self.batch, needed_lengths, strict=True)
        ]
        if sum(missing) > self.allocator.num_free:
            raise ValueError(
                f"paged cache overflow: the batch needs {sum(missing)} more blocks of {self.block_size} "
                f"tokens, {self.allocator.num_free} are free"
            )
        for seq, count in zip(self.batch, missing, strict=True):
            self.tables[seq] += [self.allocator.allocate() for _ in range(count)]

    def _tables(self, n_blocks: int) -> Tensor:
        """The selected sequences' block tables `[B, n_blocks]`, padded with block 0 (masked junk)."""
        table = [(self.tables[seq] + [0] * n_blocks)[:n_blocks] for seq in self.batch]
        return torch.tensor(table, dtype=torch.long, device=self.device)

    # Accounting ----------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the pool."""
        return self.pool.nbytes

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies (per layer)."""
        return self.pool[0, 0].nbytes

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks in use (a block shared by several sequences counts once)."""
        in_use = len(self.allocator.refcount) - self.allocator.num_free
        return in_use * self.block_size * self.bytes_per_token
