"""Prefix caching: full blocks of the paged cache found again by what they hold.

A full block is named by a hash of its tokens and of the hash of the block before it, so one name
stands for the whole prefix up to the block's end. The prefix cache holds one reference to each block
it names (`PagedModelCache.retain`), so a finished request's blocks stay for the next request with the
same prefix; a block only the prefix cache holds is evictable, least recently used first, when the
engine needs blocks.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from latentattn.caches import PagedModelCache

ROOT = b""
"""The hash before a sequence's first block."""


def block_hash(previous: bytes, tokens: Sequence[int]) -> bytes:
    """The name of a full block holding `tokens` after the prefix named `previous` (128-bit BLAKE2b:
    a collision, which would serve another prefix's keys, is not a practical concern)."""
    return hashlib.blake2b(previous + array("q", tokens).tobytes(), digest_size=16).digest()


def extend_hashes(hashes: list[bytes], tokens: Sequence[int], block_size: int) -> list[bytes]:
    """`hashes` (of the first full blocks of `tokens`) extended to every full block of `tokens`."""
    for i in range(len(hashes), len(tokens) // block_size):
        previous = hashes[-1] if hashes else ROOT
        hashes.append(block_hash(previous, tokens[i * block_size : (i + 1) * block_size]))
    return hashes


class PrefixCache:
    """Block names → block ids of `cache`, each block retained once; LRU order for eviction."""

    def __init__(self, cache: PagedModelCache) -> None:
        self.cache = cache
        self.blocks: OrderedDict[bytes, int] = OrderedDict()
        self.query_tokens = 0
        self.hit_tokens = 0

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest cached prefix named by `hashes`."""
        found = []
        for name in hashes:
            block = self.blocks.get(name)
            if block is None:
                break
            self.blocks.move_to_end(name)
            found.append(block)
        return found

    def count(self, query_tokens: int, hit_blocks: int) -> None:
        """Count an admitted request in the hit rate: `query_tokens` asked for, `hit_blocks` found."""
        self.query_tokens += query_tokens
        self.hit_tokens += hit_blocks * self.cache.block_size

    def insert(self, hashes: Sequence[bytes], blocks: Sequence[int]) -> None:
        """Name each full block `blocks[i]` by `hashes[i]`, unless that name is cached already."""
        for name, block in zip(hashes, blocks, strict=False):
            if name not in self.blocks:
                self.cache.retain([block])
                self.blocks[name] = block

    @property
    def evictable(self) -> int:
        """Blocks that only the prefix cache holds."""
        refcount = self.cache.allocator.refcount
        return sum(1 for block in self.blocks.values() if refcount[block] == 1)

    def evict(self, n_blocks: int) -> int:
        """Free up to `n_blocks` blocks only the prefix cache holds, least recently used first; returns
        how many were freed."""
        refcount = self.cache.allocator.refcount
        victims = [name for name, block in self.blocks.items() if refcount[block] == 1][:n_blocks]
        self.cache.release([self.blocks.pop(name) for name in victims])
        return len(victims)

    def clear(self) -> None:
        self.cache.release(list(self.blocks.values()))
        self.blocks.clear()

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
