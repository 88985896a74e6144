"""The caches attention reads: one protocol (`base`), one file per kind.

- `base`: per-sequence lengths and the per-step plan (`Sequences`, `Step`), one layer's storage
  (`LayerCache`), reads in blocks (`LatentKeys`, `KVRows`: `iter_blocks`), the raw layout for kernels
  (`Storage`).
- `contiguous`: `LatentCache`, `KVCache` (`[B, L, ...]` per layer) and `ModelCache` (a model's layers
  over one set of lengths).
- `quantized`: 8-bit latents (`EightBitLatent`, FlashMLA's 656 bytes) and `QuantizedLatentCache`.
- `paged`: block tables over one allocator (`PagedSequences`), `PagedModelCache` (every attention kind),
  `PagedLatentCache` (one MLA layer).
"""

from latentattn.caches.base import (
    COPIED_BLOCK,
    AttentionCache,
    ContiguousKeys,
    ContiguousKV,
    KVRows,
    LatentKeys,
    LayerCache,
    Sequences,
    Step,
    Storage,
    Workspace,
)
from latentattn.caches.contiguous import ContiguousSequences, KVCache, LatentCache, ModelCache
from latentattn.caches.paged import BlockAllocator, PagedLatentCache, PagedModelCache, PagedSequences
from latentattn.caches.quantized import EightBitLatent, QuantizedLatentCache

__all__ = [
    "COPIED_BLOCK",
    "AttentionCache",
    "BlockAllocator",
    "ContiguousKV",
    "ContiguousKeys",
    "ContiguousSequences",
    "EightBitLatent",
    "KVCache",
    "KVRows",
    "LatentCache",
    "LatentKeys",
    "LayerCache",
    "ModelCache",
    "PagedLatentCache",
    "PagedModelCache",
    "PagedSequences",
    "QuantizedLatentCache",
    "Sequences",
    "Step",
    "Storage",
    "Workspace",
]
