"""The caches: per-sequence lengths and positions, masks, byte accounting, and clear errors."""

from __future__ import annotations

import pytest
import torch

from latentattn import (
    MLA,
    GQAAttention,
    GQAConfig,
    KVCache,
    LatentCache,
    MLAConfig,
    PagedLatentCache,
    PagedModelCache,
    QuantizedLatentCache,
)
from latentattn.attention import latent_attention
from latentattn.caches import COPIED_BLOCK, Storage

V2 = MLAConfig(d_model=5120, n_heads=128, kv_lora_rank=512, q_lora_rank=1536)
TINY_MLA = MLAConfig(
    d_model=16, n_heads=2, kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4
)
TINY_GQA = GQAConfig(d_model=16, n_heads=4, n_kv_heads=2, head_dim=4)


def test_latent_cache_stores_576_numbers_per_token_for_deepseek_v2():
    cache = LatentCache(V2, batch_size=2, max_len=10, dtype=torch.bfloat16)
    assert cache.latent.shape == (2, 10, 576)
    assert cache.bytes_per_token == 576 * 2
    assert cache.nbytes == 2 * 10 * 576 * 2
    assert cache.used_bytes == 0


def test_kv_cache_bytes():
    cache = KVCache(TINY_GQA, batch_size=3, max_len=5, dtype=torch.float32)
    assert cache.bytes_per_token == 2 * 2 * 4 * 4
    assert cache.nbytes == 3 * 5 * cache.bytes_per_token


def test_update_writes_at_per_sequence_offsets_and_masks_causally():
    cache = LatentCache(TINY_MLA, batch_size=2, max_len=6)
    first = torch.randn(2, 3, 8)
    cache.update(first, n_new=torch.tensor([3, 1]))  # sequence 1 holds one token, two of padding
    assert cache.lengths.tolist() == [3, 1]
    assert cache.positions(2).tolist() == [[3, 4], [1, 2]]
    second = torch.randn(2, 2, 8)
    keys, mask = cache.update(second)
    cached = keys.full()
    assert cache.lengths.tolist() == [5, 3]
    assert cached.shape == (2, 5, 8)  # keys read: up to the longest sequence
    torch.testing.assert_close(cached[0, :3], first[0])
    torch.testing.assert_close(cached[0, 3:5], second[0])
    torch.testing.assert_close(cached[1, 0], first[1, 0])  # padding was never written
    torch.testing.assert_close(cached[1, 1:3], second[1])
    assert mask.tolist() == [
        [[True, True, True, True, False], [True, True, True, True, True]],
        [[True, True, False, False, False], [True, True, True, False, False]],
    ]
    assert cache.used_bytes == 8 * cache.bytes_per_token


def test_kv_cache_update_returns_keys_and_values():
    cache = KVCache(TINY_GQA, batch_size=1, max_len=4)
    k, v = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    rows, mask = cache.update(k, v)
    keys, values = rows.full()
    torch.testing.assert_close(keys, k)
    torch.testing.assert_close(values, v)
    assert mask is None  # one length for all sequences: attention uses the aligned causal mask
    _, mask = cache.update(k[:, :1], v[:, :1], n_new=torch.tensor([0]))  # padding only: explicit mask
    assert mask.tolist() == [[[True, True, True]]]


def test_reset_forgets_all_sequences():
    cache = LatentCache(TINY_MLA, batch_size=2, max_len=4)
    cache.update(torch.randn(2, 4, 8))
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]
    cache.update(torch.randn(2, 4, 8))  # the full length is available again


def test_overflow_names_the_sequence_and_lengths():
    cache = LatentCache(TINY_MLA, batch_size=2, max_len=4)
    cache.update(torch.randn(2, 3, 8), n_new=torch.tensor([1, 3]))
    with pytest.raises(
        ValueError, match="cache overflow: sequence 1 holds 3 tokens and gets 2 more, past max_len=4"
    ):
        cache.update(torch.randn(2, 2, 8))
    assert cache.lengths.tolist() == [1, 3]  # a refused update changes nothing
    cache.update(torch.randn(2, 2, 8), n_new=torch.tensor([2, 1]))  # padding past the end is fine
    assert cache.lengths.tolist() == [3, 4]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (torch.randn(2, 3, 7), r"'latent' has shape \(2, 3, 7\), expected \[batch=2, new_tokens, 8\]"),
        (torch.randn(3, 3, 8), r"'latent' has shape \(3, 3, 8\), expected \[batch=2"),
        (torch.randn(2, 8), r"'latent' has shape \(2, 8\)"),
        (torch.randn(8), r"'latent' has shape \(8,\)"),
        (
            torch.randn(2, 3, 8, dtype=torch.float64),
            "entries are torch.float64 but the cache holds torch.float32",
        ),
        (torch.empty(2, 3, 8, device="meta"), "entries are on meta but the cache is on cpu"),
    ],
)
def test_mismatched_entries_raise_value_errors(entry, message):
    cache = LatentCache(TINY_MLA, batch_size=2, max_len=4)
    with pytest.raises(ValueError, match=message):
        cache.update(entry)


def test_bad_n_new_and_sizes():
    cache = KVCache(TINY_GQA, batch_size=2, max_len=4)
    k = torch.randn(2, 2, 2, 4)
    with pytest.raises(ValueError, match=r"n_new must lie in \[0, 2\]"):
        cache.update(k, k, n_new=torch.tensor([3, 1]))
    with pytest.raises(ValueError, match=r"n_new must be an integer tensor of shape \[batch=2\]"):
        cache.update(k, k, n_new=torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match=r"n_new must be an integer tensor .* got torch.bool"):
        cache.update(k, k, n_new=torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"'v' has shape"):
        cache.update(k, k[:, :, :1])
    with pytest.raises(ValueError, match="entries disagree on the number of new tokens"):
        cache.update(k, k[:, :1])
    with pytest.raises(ValueError, match="batch_size > 0 and max_len > 0"):
        KVCache(TINY_GQA, batch_size=0, max_len=4)


def _latent_caches() -> dict[str, object]:
    paged = PagedLatentCache(TINY_MLA, num_blocks=16, block_size=4, dtype=torch.float64)
    paged.new_batch(2)
    return {
        "contiguous": LatentCache(TINY_MLA, 2, 40, dtype=torch.float64),
        "paged": paged,
        "int8": QuantizedLatentCache(TINY_MLA, 2, 40, format="int8", dtype=torch.float64),
    }


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("kind", ["contiguous", "paged", "int8"])
def test_keys_read_in_blocks_equal_the_whole_read(kind, grad):
    """Oracles: what was written (exact, int8 within its rounding) for `full()`; `full()` for blocks of
    any size (paged: whole pages), which tile the S rows in order; one softmax over all keys for the
    absorbed attention over the blocks, outputs and gradients (fp64). Without autograd, copied blocks
    share one workspace buffer (each valid until the next is read)."""
    with torch.set_grad_enabled(grad):
        _check_blocks(kind, grad)


def _check_blocks(kind: str, grad: bool) -> None:
    cache = _latent_caches()[kind]
    first, second = torch.randn(2, 23, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    cache.update(first, n_new=torch.tensor([23, 17]))
    keys, mask = cache.update(second)
    whole = keys.full()
    written = torch.cat([first[:, :23], second], dim=1)  # [2, 26, 8]; sequence 1 holds 17 + 3 rows
    tolerance = 2e-2 if kind == "int8" else 0.0
    torch.testing.assert_close(whole[0], written[0], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(
        whole[1, :20], torch.cat([first[1, :17], second[1]]), rtol=tolerance, atol=tolerance
    )
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=grad)
    expected = latent_attention(q, whole, mask, 0.3, 6, max_rows=26)
    expected_grad = torch.autograd.grad(expected.sum(), q)[0] if grad else None
    for size in (1, 3, 4, 7, 26, 100):
        blocks, buffers = [], set()
        for block in keys.iter_blocks(max_rows=size):
            blocks.append(block.clone())
            buffers.add(block.untyped_storage().data_ptr())
        page = cache.block_size if kind == "paged" else 1
        assert all(block.shape[1] % page == 0 for block in blocks[:-1])
        torch.testing.assert_close(torch.cat(blocks, dim=1), whole, rtol=0, atol=0)
        if kind != "contiguous" and not grad:
            assert len(buffers) == 1, "copied blocks should reuse the workspace"
        got = latent_attention(q, keys, mask, 0.3, 6, max_rows=size)
        assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-12
        if grad:
            torch.testing.assert_close(
                torch.autograd.grad(got.sum(), q)[0], expected_grad, rtol=1e-10, atol=1e-12
            )


def test_workspace_from_inference_mode_is_rebuilt_outside_it():
    """A workspace first filled under `torch.inference_mode()` holds an inference tensor, which no
    write outside that mode may touch; the next take outside it gets a fresh buffer."""
    cache = _latent_caches()["paged"]
    cache.update(torch.randn(2, 9, 8, dtype=torch.float64))
    with torch.inference_mode():
        keys, _ = cache.update(torch.randn(2, 1, 8, dtype=torch.float64))
        inside = [block.clone() for block in keys.iter_blocks(max_rows=4)]
    with torch.no_grad():
        keys, _ = cache.update(torch.randn(2, 1, 8, dtype=torch.float64))
        outside = [block.clone() for block in keys.iter_blocks(max_rows=4)]
    torch.testing.assert_close(torch.cat(outside, 1)[:, :10], torch.cat(inside, 1), rtol=0, atol=0)


def test_kv_cache_stores_each_head_contiguously():
    cache = KVCache(TINY_GQA, batch_size=2, max_len=5)
    for buffer in cache.buffers.values():  # seen [B, L, G, D], stored [B, G, L, D]
        assert buffer.shape == (2, 5, 2, 4) and buffer.transpose(1, 2).is_contiguous()


def test_views_read_in_another_dtype_are_copied_in_capped_blocks():
    """A bf16 cache read for fp32 GEMMs (CPU): blocks are fp32 copies of at most `COPIED_BLOCK` rows,
    built in the cache's workspace outside autograd; same values as the whole read, upcast."""
    cache = LatentCache(TINY_MLA, 1, COPIED_BLOCK + 5, dtype=torch.bfloat16)
    keys, _ = cache.update(torch.randn(1, COPIED_BLOCK + 5, 8, dtype=torch.bfloat16))
    with torch.no_grad():
        blocks = []
        for block in keys.iter_blocks(max_rows=10**6, dtype=torch.float32):
            assert block.dtype == torch.float32
            workspace = cache.workspace.buffers["rows"]
            assert block.untyped_storage().data_ptr() == workspace.untyped_storage().data_ptr()
            blocks.append(block.clone())
    assert [block.shape[1] for block in blocks] == [COPIED_BLOCK, 5]
    torch.testing.assert_close(torch.cat(blocks, 1), keys.full().float(), rtol=0, atol=0)
    assert [block.shape[1] for block in keys.iter_blocks(max_rows=10**6)] == [
        COPIED_BLOCK + 5
    ]  # same dtype: one view


def rows_from_storage(storage: Storage, b: int) -> dict[str, torch.Tensor]:
    """Sequence b's cached rows read from the raw layout exactly as `Storage` documents it (what a
    kernel does): contiguous `[B, L, ...]` rows, or paged rows through the block table; 8-bit c_KV
    dequantized with its per-group scales."""
    length = int(storage.lengths[b])
    if storage.block_table is None:
        rows = {name: entry[b, :length] for name, entry in storage.entries.items()}
    else:
        blocks = storage.block_table[b, : -(-length // storage.block_size)]
        rows = {name: entry[blocks].flatten(0, 1)[:length] for name, entry in storage.entries.items()}
    if "c_kv" in rows:
        groups = rows["c_kv"].double().unflatten(-1, (-1, storage.group_size)) * rows["scale"][..., None]
        return {"latent": torch.cat([groups.flatten(-2), rows["k_pe"].double()], dim=-1)}
    return rows


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("kind", ["latent", "int8", "fp8", "kv"])
def test_storage_describes_the_rows_attention_reads(kind, paged):
    """Oracle: what attention reads this step (keys, or k and v). The descriptor (`Storage`) of the
    layer cache and of the step's keys gives the same rows with no copy of the cache (paged: a
    fragmented pool, so the block table matters)."""
    config = TINY_GQA if kind == "kv" else TINY_MLA
    latent_format = None if kind in ("latent", "kv") else kind
    if paged:
        cache = PagedModelCache(
            [config], num_blocks=20, block_size=4, latent_format=latent_format, dtype=torch.float64
        )
        first, spacer = cache.new_batch(2), cache.add_sequence()
        for _ in range(3):  # interleave a third sequence's blocks with the batch's
            cache.select([spacer]).layers[0].update(*_entries(config, 1, 4))
            cache.select(first).layers[0].update(*_entries(config, 2, 4), n_new=torch.tensor([4, 2]))
        layer = cache.layers[0]
    else:
        shared = {"dtype": torch.float64}
        if kind == "kv":
            layer = KVCache(config, 2, 20, **shared)
        elif latent_format:
            layer = QuantizedLatentCache(config, 2, 20, format=latent_format, **shared)
        else:
            layer = LatentCache(config, 2, 20, **shared)
        layer.update(*_entries(config, 2, 12), n_new=torch.tensor([12, 6]))
    with layer.stepping(3, torch.tensor([3, 1])) as step:
        reads, _ = layer.update(*_entries(config, 2, 3), step=step)
        storage = layer.storage(step)
        descriptors = [storage, reads.storage()]
    assert storage.lengths.tolist() == [15, 7]
    read = dict(zip("kv", reads.full(), strict=True)) if kind == "kv" else {"latent": reads.full()}
    buffers = {
        entry.untyped_storage().data_ptr() for entry in (layer.pools if paged else layer.buffers).values()
    }
    for descriptor in descriptors:
        assert {entry.untyped_storage().data_ptr() for entry in descriptor.entries.values()} <= buffers
        for b, length in enumerate(storage.lengths.tolist()):
            got = rows_from_storage(descriptor, b)
            for name, rows in read.items():
                torch.testing.assert_close(got[name], rows[b, :length].to(got[name].dtype), rtol=0, atol=0)


def _entries(config, batch: int, tokens: int) -> list[torch.Tensor]:
    if isinstance(config, GQAConfig):
        shape = (batch, tokens, config.n_kv_heads, config.head_dim)
        return [torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)]
    return [torch.randn(batch, tokens, config.cache_width, dtype=torch.float64)]


def test_truncate_rewinds_and_refuses_to_grow():
    cache = LatentCache(TINY_MLA, batch_size=2, max_len=6)
    first = torch.randn(2, 4, 8)
    cache.update(first)
    cache.truncate([2, 4])
    assert cache.lengths.tolist() == [2, 4]
    keys, _ = cache.update(torch.randn(2, 1, 8), n_new=torch.tensor([1, 0]))
    torch.testing.assert_close(keys.full()[:, :2], first[:, :2], rtol=0, atol=0)
    assert cache.lengths.tolist() == [3, 4]
    with pytest.raises(ValueError, match=r"within its current length \[3, 4\], got \[4, 4\]"):
        cache.truncate([4, 4])
    with pytest.raises(ValueError, match="one length per sequence"):
        cache.truncate([1])


@pytest.mark.parametrize("kind", ["latent", "kv"])
def test_static_cache_reads_every_row_and_equals_the_growing_one(kind):
    """Oracle: the ordinary cache (growing reads); fp64 exact up to rounding. The static one reads all
    L rows every step, masked past each sequence's length."""
    config = TINY_GQA if kind == "kv" else TINY_MLA
    layer = (GQAAttention if kind == "kv" else MLA)(config, dtype=torch.float64)
    growing, static = layer.new_cache(2, 9), layer.new_cache(2, 9, static=True)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    lengths = torch.tensor([5, 2])
    torch.testing.assert_close(
        layer(x[:, :5], static, n_new=lengths), layer(x[:, :5], growing, n_new=lengths)
    )
    for t in range(5, 9):
        with static.stepping(1) as step:
            assert step.n_keys == 9 and step.mask.shape == (2, 1, 9)
            expected = layer(x[:, t : t + 1], growing)
            torch.testing.assert_close(layer(x[:, t : t + 1], static, step=step), expected)


def test_one_step_open_at_a_time_and_step_or_n_new():
    cache = KVCache(TINY_GQA, batch_size=1, max_len=4)
    k = torch.randn(1, 1, 2, 4)
    step = cache.sequences.begin(1)
    with pytest.raises(ValueError, match="a step is already open on this cache"):
        cache.sequences.begin(1)
    with pytest.raises(ValueError, match="pass n_new or a step, not both"):
        cache.update(k, k, n_new=torch.tensor([1]), step=step)
    cache.update(k, k, step=step)
    cache.sequences.cancel(step)  # a failed forward: the written row is not kept
    assert cache.lengths.tolist() == [0]
    with pytest.raises(ValueError, match="this step is not the one open"):
        cache.sequences.advance(step)
    with pytest.raises(RuntimeError, match="boom"), cache.stepping(1):
        raise RuntimeError("boom")
    assert cache.lengths.tolist() == [0]
    cache.update(k, k)
    assert cache.lengths.tolist() == [1]
