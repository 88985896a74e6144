"""The paged latent cache: same attention outputs as the contiguous cache, prefix sharing, no leaks.

Oracle: `LatentCache` on the same layer and inputs (identical values, so fp64 agreement to 1e-12).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SMALL_MLA
from latentattn import MLA, MLAConfig
from latentattn.caches import PagedLatentCache, PagedSequences
from latentattn.metrics import relative_error

CONFIG = SMALL_MLA


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return MLA(CONFIG, dtype=torch.float64).eval()


def paged(num_blocks=32, block_size=4):
    return PagedLatentCache(CONFIG, num_blocks, block_size=block_size, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_ragged_prefill_and_decode_equal_the_contiguous_cache(layer, mode):
    lengths = torch.tensor([7, 3, 10])  # across block boundaries (block_size 4)
    prompts = torch.randn(3, 10, 32, dtype=torch.float64)
    steps = torch.randn(3, 6, 32, dtype=torch.float64)
    contiguous, pages = layer.new_cache(3, 16), paged()
    pages.new_batch(3)
    with torch.no_grad():
        expected = layer(prompts, contiguous, n_new=lengths, mode=mode)
        got = layer(prompts, pages, n_new=lengths, mode=mode)
        for b, n in enumerate(lengths.tolist()):
            assert relative_error(got[b, :n], expected[b, :n]) <= 1e-12
        for t in range(6):
            step = steps[:, t : t + 1]
            assert relative_error(layer(step, pages, mode=mode), layer(step, contiguous, mode=mode)) <= 1e-12
    assert pages.lengths.tolist() == [13, 9, 16]
    assert pages.allocator.num_free == 32 - (4 + 3 + 4)


def test_fork_shares_the_prefix_and_decodes_like_two_separate_caches(layer):
    prompt = torch.randn(1, 10, 32, dtype=torch.float64)
    tails = torch.randn(2, 3, 32, dtype=torch.float64)
    pages = paged()
    parent = pages.new_batch(1)[0]
    with torch.no_grad():
        layer(prompt, pages)
        child = pages.fork(parent)
        assert pages.tables[child][:2] == pages.tables[parent][:2]  # two full blocks shared
        assert pages.tables[child][2] != pages.tables[parent][2]  # the partial block was copied
        assert pages.allocator.num_free == 32 - 4
        pages.select([parent, child])
        got = layer(tails, pages)
        for b in range(2):
            alone = layer.new_cache(1, 13)
            layer(prompt, alone)
            assert relative_error(got[b], layer(tails[b : b + 1], alone)[0]) <= 1e-12
        pages.free(parent)
        assert pages.allocator.refcount[pages.tables[child][0]] == 1
        pages.free(child)
    assert pages.allocator.num_free == 32


def check_invariants(pages: PagedSequences) -> None:
    """Reference counts = uses by block tables + retained references; the free list holds exactly the
    unused blocks, once each; every table holds exactly the blocks its length needs."""
    counts = [pages.retained[block] for block in range(pages.num_blocks)]
    for seq, table in pages.tables.items():
        assert len(table) == -(-pages.seq_lengths[seq] // pages.block_size)  # ceil: no spare blocks held
        for block in table:
            counts[block] += 1
    assert counts == pages.allocator.refcount
    assert pages.allocator.num_free == counts.count(0)
    assert len(set(pages.allocator._free)) == pages.allocator.num_free  # never freed twice


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "fork", "append", "free"]), st.integers(0, 9)), max_size=30
    )
)
def test_free_list_never_leaks_blocks(ops):
    pages = paged(num_blocks=12, block_size=3)
    for op, arg in ops:
        live = sorted(pages.tables)
        if op == "add" or not live:
            pages.add_sequence()
        elif op == "fork":
            with contextlib.suppress(ValueError):  # out of blocks: nothing may change
                pages.fork(live[arg % len(live)])
        elif op == "append":
            pages.select([live[arg % len(live)]])
            with contextlib.suppress(ValueError):
                pages.update(torch.randn(1, arg, CONFIG.cache_width, dtype=torch.float64))
        else:
            pages.free(live[arg % len(live)])
        check_invariants(pages)
    pages.reset()
    assert pages.allocator.num_free == 12


def test_out_of_blocks_is_a_clear_error_and_changes_nothing():
    pages = paged(num_blocks=3, block_size=4)
    pages.new_batch(2)
    pages.update(torch.randn(2, 4, CONFIG.cache_width, dtype=torch.float64))
    with pytest.raises(
        ValueError, match="paged cache overflow: the batch needs 2 more blocks of 4 tokens, 1 are free"
    ):
        pages.update(torch.randn(2, 1, CONFIG.cache_width, dtype=torch.float64))
    assert pages.lengths.tolist() == [4, 4]
    assert pages.allocator.num_free == 1
    with pytest.raises(ValueError, match="unknown sequence id 7"):
        pages.select([7])
    with pytest.raises(ValueError, match="no sequences selected"):
        paged().update(torch.randn(1, 1, CONFIG.cache_width, dtype=torch.float64))


def test_bytes_follow_flashmla_layout():
    v2 = MLAConfig(d_model=5120, n_heads=128, kv_lora_rank=512, q_lora_rank=1536)
    pages = PagedLatentCache(v2, num_blocks=10, dtype=torch.bfloat16)
    assert pages.pool.shape == (10, 64, 576)
    assert pages.bytes_per_token == 1152
    pages.new_batch(1)
    pages.update(torch.zeros(1, 65, 576, dtype=torch.bfloat16))
    assert pages.used_bytes == 2 * 64 * 1152  # two blocks taken


def test_one_sequence_in_consecutive_blocks_is_read_in_place():
    """Oracle: the pool itself. A lone sequence whose blocks follow each other is a view of the pool;
    after a fork the child's blocks do not, and its keys are gathered (equal values either way)."""
    pages = paged()
    parent = pages.new_batch(1)[0]
    keys, _ = pages.update(torch.randn(1, 10, CONFIG.cache_width, dtype=torch.float64))
    assert keys.full().untyped_storage().data_ptr() == pages.pool.untyped_storage().data_ptr()
    torch.testing.assert_close(keys.full()[0], pages.pool[:3].flatten(0, 1)[:10], rtol=0, atol=0)
    child = pages.fork(parent)  # shares blocks 0, 1; its third block is a copy elsewhere
    pages.select([child])
    keys, _ = pages.update(torch.randn(1, 1, CONFIG.cache_width, dtype=torch.float64))
    assert keys.full().untyped_storage().data_ptr() != pages.pool.untyped_storage().data_ptr()
    torch.testing.assert_close(keys.full()[0, :10], pages.pool[:3].flatten(0, 1)[:10], rtol=0, atol=0)
