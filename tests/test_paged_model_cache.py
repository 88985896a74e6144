"""The model-wide paged cache: one allocator and block table per sequence for every layer and attention kind.

Oracles: the model's full causal forward over each sequence's whole token list, without a cache
(fp64, 1e-10 relative); the contiguous `ModelCache` for 8-bit latents (same stored values, 1e-12);
the block tables and retained references for the reference counts (never a leaked block).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentattn import attention
from latentattn.caches import ContiguousSequences, PagedModelCache, PagedSequences
from latentattn.metrics import relative_error
from latentattn.model import LanguageModel, get_preset
from latentattn.rope import RotaryEmbedding
from test_paged_cache import check_invariants

BLOCK = 4


def debug_model(kind: str, dtype: torch.dtype = torch.float64) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(get_preset("debug").model(kind), dtype=dtype).eval()


MODELS = {kind: debug_model(kind) for kind in ("mla", "gqa", "mha", "mqa")}


def expected_logits(model: LanguageModel, tokens: list[int], n_last: int) -> torch.Tensor:
    """Logits `[n_last, V]` of the last `n_last` tokens from one causal forward over all of them."""
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0, len(tokens) - n_last :]


def run_step(
    model: LanguageModel,
    cache: PagedModelCache,
    tokens: dict[int, list[int]],
    batch: list[int],
    new: list[list[int]],
) -> None:
    """One ragged step: sequence `batch[b]` gets tokens `new[b]` (right-padded); every real output is
    checked against the full forward, and `tokens` is updated."""
    width = max(len(chunk) for chunk in new)
    padded = torch.zeros(len(batch), width, dtype=torch.long)
    for b, chunk in enumerate(new):
        padded[b, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
    with torch.no_grad():
        logits = model(padded, cache.select(batch), n_new=torch.tensor([len(chunk) for chunk in new]))
    for b, (seq, chunk) in enumerate(zip(batch, new, strict=True)):
        tokens[seq] += chunk
        if chunk:
            expected = expected_logits(model, tokens[seq], len(chunk))
            assert relative_error(logits[b, : len(chunk)], expected) <= 1e-10


@pytest.mark.parametrize("kind", ["mla", "mha", "gqa", "mqa"])
def test_ragged_prefill_decode_and_fork_equal_full_forwards(kind):
    model = MODELS[kind]
    cache = model.new_paged_cache(num_blocks=40, block_size=BLOCK)
    tokens = {seq: [] for seq in cache.new_batch(3)}
    a, b, c = list(tokens)
    run_step(model, cache, tokens, [a, b, c], [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], list(range(20, 30))])
    for step in range(3):  # decode: one token each
        run_step(model, cache, tokens, [a, b, c], [[40 + step], [50 + step], [60 + step]])
    child = cache.fork(a)  # 10 tokens: two full blocks shared, the partial third copied
    tokens[child] = list(tokens[a])
    assert cache.tables[child][:2] == cache.tables[a][:2] and cache.tables[child][2] != cache.tables[a][2]
    run_step(model, cache, tokens, [child, a], [[70, 71], [80]])  # chunked after a fork, ragged
    assert cache.lengths.tolist() == [12, 11]
    check_invariants(cache)
    cache.reset()
    assert cache.num_free_blocks == 40


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["mla", "gqa"]),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "attach", "fork", "step", "step", "step", "truncate", "free", "retain"]),
            st.integers(0, 99),
            st.integers(0, 99),
        ),
        min_size=4,
        max_size=20,
    ),
)
def test_random_operations_equal_full_forwards_and_never_leak_blocks(kind, ops):
    """Random adds, prefix attaches, forks, ragged steps (several sequences, 0-9 tokens each), rewinds,
    frees and retained blocks: every output equals the full forward of its sequence, a refused step
    changes nothing, and no block is ever leaked."""
    model = MODELS[kind]
    cache = model.new_paged_cache(num_blocks=8, block_size=BLOCK)
    tokens: dict[int, list[int]] = {seq: [] for seq in cache.new_batch(2)}
    for op, a, b in ops:
        live = sorted(tokens)
        seq = live[a % len(live)] if live else None
        if op == "add" or seq is None:
            tokens[cache.add_sequence()] = []
        elif op == "attach":  # a new sequence over the first k full blocks of `seq` (prefix sharing)
            shared = cache.full_blocks(seq)[: b % (len(cache.full_blocks(seq)) + 1)]
            tokens[cache.add_sequence(prefix_blocks=shared)] = tokens[seq][: len(shared) * BLOCK]
        elif op == "fork":
            with contextlib.suppress(ValueError):  # out of blocks: nothing changes
                tokens[cache.fork(seq)] = list(tokens[seq])
        elif op == "step":
            batch = [s for i, s in enumerate(live) if (a >> i) & 1][:3] or [seq]
            new = [[(b * 7 + 3 * i + j) % 384 for j in range((b + i) % 10)] for i in range(len(batch))]
            if not any(new):
                new[0] = [b % 384]
            needed = sum(cache.blocks_needed(s, len(chunk)) for s, chunk in zip(batch, new, strict=True))
            too_long = max(len(tokens[s]) for s in batch) + max(map(len, new)) > model.config.max_seq_len
            if too_long or needed > cache.num_free_blocks:  # refused before any change
                before = (cache.select(batch).host_lengths, cache.num_free_blocks)
                with pytest.raises(ValueError, match="max_seq_len" if too_long else "paged cache overflow"):
                    run_step(model, cache, tokens, batch, new)
                assert (cache.select(batch).host_lengths, cache.num_free_blocks) == before
            else:
                run_step(model, cache, tokens, batch, new)
        elif op == "truncate":
            keep = b % (len(tokens[seq]) + 1)
            with contextlib.suppress(ValueError):  # a rewind into a shared block needs a free block
                cache.select([seq]).truncate([keep])
                tokens[seq] = tokens[seq][:keep]
        elif op == "free":
            cache.free(seq)
            del tokens[seq]
        else:  # retain a sequence's full blocks (a prefix cache), or release what is retained
            retained = list(cache.retained.elements())
            if retained and b % 2:
                cache.release(retained)
            else:
                cache.retain(cache.full_blocks(seq))
        check_invariants(cache)
        assert {s: cache.seq_lengths[s] for s in tokens} == {s: len(t) for s, t in tokens.items()}
    cache.reset()
    assert cache.num_free_blocks == cache.num_blocks and not cache.retained


def test_8bit_paged_latents_equal_the_contiguous_8bit_cache():
    """Oracle: `ModelCache` with int8 latents fed the same ragged prefill and decode (same stored values)."""
    model = MODELS["mla"]
    paged = model.new_paged_cache(num_blocks=16, block_size=BLOCK, latent_format="int8")
    contiguous = model.new_cache(2, 16, latent_format="int8")
    paged.new_batch(2)
    prompts, lengths = torch.randint(0, 384, (2, 9)), torch.tensor([9, 4])
    with torch.no_grad():
        got, expected = model(prompts, paged, n_new=lengths), model(prompts, contiguous, n_new=lengths)
        for b, n in enumerate(lengths.tolist()):
            assert relative_error(got[b, :n], expected[b, :n]) <= 1e-12
        for _ in range(3):
            token = torch.randint(0, 384, (2, 1))
            assert relative_error(model(token, paged), model(token, contiguous)) <= 1e-12
    assert paged.bytes_per_token == contiguous.bytes_per_token


def test_a_budget_holds_the_same_bytes_for_every_attention_kind():
    budget = 200_000
    blocks = {}
    for kind, model in MODELS.items():
        cache = model.new_paged_cache(budget_bytes=budget, block_size=16)
        per_block = 16 * cache.bytes_per_token
        assert cache.nbytes == cache.num_blocks * per_block <= budget < (cache.num_blocks + 1) * per_block
        blocks[kind] = cache.num_blocks
    width = {kind: model.config.attention.cache_width for kind, model in MODELS.items()}
    assert blocks == {kind: budget // (16 * 2 * width[kind] * 8) for kind in MODELS}  # 2 layers, fp64
    assert blocks["mla"] > blocks["gqa"] > blocks["mha"]
    int8 = MODELS["mla"].new_paged_cache(budget_bytes=budget, block_size=16, latent_format="int8")
    assert int8.num_blocks > blocks["mla"]


def test_paged_cache_settings_are_checked():
    model = MODELS["mla"]
    with pytest.raises(ValueError, match="num_blocks or as budget_bytes"):
        model.new_paged_cache()
    with pytest.raises(ValueError, match="num_blocks or as budget_bytes"):
        model.new_paged_cache(num_blocks=4, budget_bytes=10**6)
    with pytest.raises(ValueError, match="a budget of 100 B holds no block of 64 tokens"):
        model.new_paged_cache(budget_bytes=100)
    with pytest.raises(ValueError, match="8-bit latent caches need an MLA model, this one is gqa"):
        MODELS["gqa"].new_paged_cache(num_blocks=4, latent_format="int8")
    with pytest.raises(ValueError, match="unknown latent cache format 'int4'"):
        model.new_paged_cache(num_blocks=4, latent_format="int4")
    with pytest.raises(ValueError, match="block_size must be positive"):
        model.new_paged_cache(num_blocks=4, block_size=0)


def test_prefix_blocks_attached_by_id_are_shared_and_survive_their_sequences_when_retained():
    model = MODELS["gqa"]
    cache = model.new_paged_cache(num_blocks=12, block_size=BLOCK)
    tokens = {cache.new_batch(1)[0]: []}
    (first,) = tokens
    run_step(model, cache, tokens, [first], [list(range(1, 11))])  # 10 tokens: 2 full blocks
    prefix = cache.full_blocks(first)
    assert len(prefix) == 2 and cache.blocks_needed(first, 2) == 0 and cache.blocks_needed(first, 3) == 1
    cache.retain(prefix)  # a prefix cache keeps them
    cache.free(first)
    assert cache.num_used_blocks == 2
    second = cache.add_sequence(prefix_blocks=prefix)
    tokens[second] = list(range(1, 9))
    assert cache.seq_lengths[second] == 8 and [cache.allocator.refcount[b] for b in prefix] == [2, 2]
    run_step(model, cache, tokens, [second], [[99, 98, 97]])  # writes a new block, never the shared ones
    check_invariants(cache)
    cache.release(prefix)
    cache.free(second)
    assert cache.num_free_blocks == 12
    with pytest.raises(ValueError, match="block 3 is not in use"):
        cache.add_sequence(prefix_blocks=[3])
    with pytest.raises(ValueError, match="block 0 is retained 0 times"):
        cache.release([0])


def test_rewinding_into_a_shared_block_copies_it_first():
    """A fork shares both full blocks of 8 tokens; the child rewound to 6 tokens gets its own copy of
    the second block before writing, and the parent's tokens stay intact (oracle: full forwards)."""
    model = MODELS["mla"]
    cache = model.new_paged_cache(num_blocks=8, block_size=BLOCK)
    tokens = {cache.new_batch(1)[0]: []}
    (parent,) = tokens
    run_step(model, cache, tokens, [parent], [list(range(1, 9))])
    child = cache.fork(parent)
    tokens[child] = list(tokens[parent])
    assert cache.tables[child] == cache.tables[parent]
    cache.select([child]).truncate([6])
    tokens[child] = tokens[child][:6]
    assert (
        cache.tables[child][0] == cache.tables[parent][0] != cache.tables[child][1] != cache.tables[parent][1]
    )
    run_step(model, cache, tokens, [child, parent], [[50, 51, 52], [60]])
    check_invariants(cache)


def test_each_step_is_planned_once_for_all_layers(monkeypatch):
    """Positions, mask and write slots (`_plan`) and RoPE's cos/sin (`_frequencies`, reached only when
    the step's memo misses) are computed once per model step, not once per layer."""
    calls = {"plan": 0, "rope": 0}

    def counting(name, original):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for owner in (PagedSequences, ContiguousSequences):
        monkeypatch.setattr(owner, "_plan", counting("plan", owner._plan))
    monkeypatch.setattr(RotaryEmbedding, "_frequencies", counting("rope", RotaryEmbedding._frequencies))
    for kind in ("mla", "gqa"):
        model = MODELS[kind]
        for cache in (model.new_cache(2, 8), model.new_paged_cache(num_blocks=8, block_size=BLOCK)):
            if isinstance(cache, PagedModelCache):
                cache.new_batch(2)
            calls.update(plan=0, rope=0)
            with torch.no_grad():
                model(torch.zeros(2, 3, dtype=torch.long), cache)
            assert calls == {"plan": 1, "rope": 1}, (kind, type(cache).__name__)


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
def test_kv_decode_in_cache_sized_blocks_equals_the_contiguous_cache(kind, monkeypatch):
    """Decode over gathered K/V pages runs block by block, merged by log-sum-exp; with one page per
    block, ragged sequences have blocks where they see no key. Oracle: the contiguous cache (fp64)."""
    monkeypatch.setattr(attention, "KV_BLOCK_BYTES", 1)  # one page per block
    model = MODELS[kind]
    paged, contiguous = model.new_paged_cache(num_blocks=24, block_size=BLOCK), model.new_cache(3, 24)
    paged.new_batch(3)
    prompts, lengths = torch.randint(0, 384, (3, 17)), torch.tensor([3, 17, 9])
    with torch.no_grad():
        model(prompts, paged, n_new=lengths)
        model(prompts, contiguous, n_new=lengths)
        for _ in range(3):
            token = torch.randint(0, 384, (3, 1))
            assert relative_error(model(token, paged), model(token, contiguous)) <= 1e-10
