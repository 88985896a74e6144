"""MLA's two paths against each other, caches against full forwards, and errors.

Oracles: the naive path (decompressed K/V, torch SDPA) for the absorbed one; one full causal forward
without a cache for every cached schedule. Tolerances: fp64 1e-10 and fp32 1e-5, max error relative to
the output's max; bf16 2e-2 relative L2.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import SMALL_MLA, attention_configs, mla_configs
from latentattn import (
    MLA,
    GQAAttention,
    GQAConfig,
    LatentCache,
    MLAConfig,
    RopeConfig,
    YarnConfig,
    build_attention,
    choose_mla_path,
)
from latentattn.attention import causal_mask, latent_attention
from latentattn.metrics import relative_error, relative_l2

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
SMALL = {
    "mla": SMALL_MLA,
    "mla-yarn": MLAConfig(
        d_model=32,
        n_heads=2,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        rope=RopeConfig(yarn=YarnConfig(factor=8.0, original_max_position_embeddings=8)),
    ),
    "mha": GQAConfig(d_model=32, n_heads=4, n_kv_heads=4, head_dim=8),
    "gqa": GQAConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8),
    "mqa": GQAConfig(d_model=32, n_heads=4, n_kv_heads=1, head_dim=8),
}
PATHS = {"mla": ["naive", "absorbed", "auto"], "mla-yarn": ["naive", "absorbed", "auto"]}


def make_layer(config, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = build_attention(config, dtype=dtype)
    with torch.no_grad():  # norms start at 1: randomise so RMSNorm weights are exercised
        for name, param in layer.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return layer


def layer_modes(name):
    return PATHS.get(name, ["auto"])


@settings(max_examples=40, deadline=None)
@given(config=mla_configs, batch=st.integers(1, 3), tokens=st.integers(1, 12), data=st.data())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_naive_equals_absorbed_fresh_and_decode(dtype, config, batch, tokens, data):
    """fp32 needs H·V >= 4 values per token: with one value (H = V = 1) every output is a single
    scalar times W_O, and a cancellation in that scalar (fp32 rounding, either path) shows as a
    relative error of the whole output (hypothesis found 2e-5 at d_c 2)."""
    assume(dtype == torch.float64 or config.n_heads * config.v_head_dim >= 4)
    layer = make_layer(config, dtype)
    x = torch.randn(batch, tokens, config.d_model, dtype=dtype)
    with torch.no_grad():
        naive, absorbed = layer(x, mode="naive"), layer(x, mode="absorbed")
        assert relative_error(absorbed, naive) <= TOLERANCE[dtype]
        # The same on a decode step over a cached prefix: both paths read one latent cache.
        prefix = data.draw(st.integers(1, tokens)) if tokens > 1 else 1
        cache_naive, cache_absorbed = layer.new_cache(batch, tokens + 1), layer.new_cache(batch, tokens + 1)
        layer(x[:, :prefix], cache_naive, mode="naive")
        layer(x[:, :prefix], cache_absorbed, mode="naive")
        step = torch.randn(batch, 1, config.d_model, dtype=dtype)
        naive, absorbed = layer(step, cache_naive, mode="naive"), layer(step, cache_absorbed, mode="absorbed")
        assert relative_error(absorbed, naive) <= TOLERANCE[dtype]


@pytest.mark.parametrize("q_lora_rank", [None, 48])
@pytest.mark.parametrize(
    "yarn",
    [None, YarnConfig(factor=40.0, original_max_position_embeddings=32, mscale=0.707, mscale_all_dim=0.707)],
)
def test_bf16_paths_close_to_fp64_truth(q_lora_rank, yarn):
    """bf16 is ~1e-2 from the truth per path; compare by relative L2, each path against fp64."""
    config = MLAConfig(
        d_model=128,
        n_heads=4,
        kv_lora_rank=64,
        q_lora_rank=q_lora_rank,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        rope=RopeConfig(yarn=yarn),
    )
    truth_layer = make_layer(config, torch.float64)
    layer = make_layer(config, torch.bfloat16)
    layer.load_state_dict(truth_layer.state_dict())
    x = torch.randn(2, 96, 128, dtype=torch.float64)
    with torch.no_grad():
        truth = truth_layer(x)
        for mode in ("naive", "absorbed"):
            out = layer(x.bfloat16(), mode=mode)
            assert out.dtype == torch.bfloat16
            assert relative_l2(out, truth) <= 2e-2, mode
        assert relative_l2(layer(x.bfloat16(), mode="absorbed"), layer(x.bfloat16(), mode="naive")) <= 2e-2


@settings(max_examples=6, deadline=None)
@given(data=st.data(), batch=st.integers(1, 2), prefix=st.integers(1, 12), steps=st.integers(1, 3))
@pytest.mark.parametrize("q_lora", [False, True])
@pytest.mark.parametrize("yarn", [False, True])
def test_bf16_naive_and_absorbed_over_a_cache_close_to_fp64_truth(q_lora, yarn, data, batch, prefix, steps):
    """Each path prefills `prefix` tokens into a bf16 latent cache, then decodes `steps` tokens one by
    one; all outputs against one fp64 causal forward with the same bf16-rounded weights and inputs,
    and against each other: relative L2 <= 2e-2. H·V >= 4 values per token, because with one value
    (H = V = 1) every output is a single bf16 scalar times W_O and L2 averages nothing."""
    config = data.draw(
        mla_configs.filter(
            lambda c: (
                (c.q_lora_rank is not None) == q_lora
                and (c.rope.yarn is not None) == yarn
                and c.n_heads * c.v_head_dim >= 4
            )
        )
    )
    layer = make_layer(config, torch.bfloat16)
    truth_layer = make_layer(config, torch.float64)
    truth_layer.load_state_dict(layer.state_dict())
    x = torch.randn(batch, prefix + steps, config.d_model, dtype=torch.bfloat16)
    with torch.no_grad():
        truth = truth_layer(x.double())
        outs = {}
        for mode in ("naive", "absorbed"):
            cache = layer.new_cache(batch, prefix + steps)
            chunks = [layer(x[:, :prefix], cache, mode=mode)]
            chunks += [layer(x[:, t : t + 1], cache, mode=mode) for t in range(prefix, prefix + steps)]
            outs[mode] = torch.cat(chunks, dim=1)
            assert outs[mode].dtype == torch.bfloat16
            assert relative_l2(outs[mode], truth) <= 2e-2, mode
        assert relative_l2(outs["absorbed"], outs["naive"]) <= 2e-2


@pytest.mark.parametrize("name", SMALL)
def test_prefill_then_token_by_token_decode_equals_full_forward(name):
    config = SMALL[name]
    layer = make_layer(config)
    x = torch.randn(2, 17, config.d_model, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        for mode in layer_modes(name):
            cache = layer.new_cache(batch_size=2, max_len=20)
            steps = [layer(x[:, :5], cache, mode=mode)]
            steps += [layer(x[:, t : t + 1], cache, mode=mode) for t in range(5, 17)]
            assert relative_error(torch.cat(steps, dim=1), full) <= 1e-10, mode
            assert cache.lengths.tolist() == [17, 17]


@settings(max_examples=25, deadline=None)
@given(
    config=attention_configs,
    chunks=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    batch=st.integers(1, 3),
)
def test_uneven_chunked_prefill_equals_full_forward(config, chunks, batch):
    layer = make_layer(config)
    total = sum(chunks)
    x = torch.randn(batch, total, config.d_model, dtype=torch.float64)
    modes = ["naive", "absorbed", "auto"] if isinstance(layer, MLA) else ["auto"]
    with torch.no_grad():
        full = layer(x)
        for mode in modes:
            cache = layer.new_cache(batch, total)
            bounds = torch.tensor([0, *chunks]).cumsum(0).tolist()
            outs = [layer(x[:, a:b], cache, mode=mode) for a, b in itertools.pairwise(bounds)]
            out = torch.cat(outs, dim=1)
            assert relative_error(out, full) <= 1e-10


@pytest.mark.parametrize("name", SMALL)
def test_ragged_batch_equals_each_sequence_alone(name):
    """Prompts of lengths 7, 3, 5 prefilled together (right padding, `n_new`), then decoded together:
    every real output equals that sequence run alone without a cache."""
    config = SMALL[name]
    layer = make_layer(config)
    lengths = [7, 3, 5]
    sequences = [torch.randn(1, n + 4, config.d_model, dtype=torch.float64) for n in lengths]
    prompts = torch.zeros(3, max(lengths), config.d_model, dtype=torch.float64)
    for b, (seq, n) in enumerate(zip(sequences, lengths, strict=True)):
        prompts[b, :n] = seq[0, :n]
    with torch.no_grad():
        alone = [layer(seq) for seq in sequences]
        for mode in layer_modes(name):
            cache = layer.new_cache(batch_size=3, max_len=12)
            prefill = layer(prompts, cache, n_new=torch.tensor(lengths), mode=mode)
            assert cache.lengths.tolist() == lengths
            for b, n in enumerate(lengths):
                assert relative_error(prefill[b, :n], alone[b][0, :n]) <= 1e-10
            for step in range(4):
                tokens = [seq[0, n + step] for seq, n in zip(sequences, lengths, strict=True)]
                token = torch.stack(tokens)[:, None]
                out = layer(token, cache, mode=mode)
                for b, n in enumerate(lengths):
                    assert relative_error(out[b, 0], alone[b][0, n + step]) <= 1e-10, (mode, step, b)


def test_auto_routes_decode_to_absorbed_and_prefill_to_naive():
    v3 = MLAConfig(d_model=7168, n_heads=128, kv_lora_rank=512, q_lora_rank=1536)
    assert choose_mla_path(v3, "auto", n_queries=4096, n_keys=4096, cached=False) == "naive"
    assert choose_mla_path(v3, "auto", n_queries=1, n_keys=4096, cached=True) == "absorbed"
    assert choose_mla_path(v3, "auto", n_queries=4096, n_keys=4096, cached=True) == "naive"
    # A chunk over a long cached prefix: absorbed below the crossover (~170 new tokens), naive above.
    assert choose_mla_path(v3, "auto", n_queries=128, n_keys=65536, cached=True) == "absorbed"
    assert choose_mla_path(v3, "auto", n_queries=256, n_keys=65536, cached=True) == "naive"
    assert choose_mla_path(v3, "naive", n_queries=1, n_keys=4096, cached=True) == "naive"
    with pytest.raises(ValueError, match="unknown attention mode 'fast'"):
        choose_mla_path(v3, "fast", 1, 1, cached=True)


def test_auto_mode_really_takes_the_absorbed_path_for_decode(monkeypatch):
    layer = make_layer(SMALL_MLA)
    cache = layer.new_cache(1, 40)
    layer(torch.randn(1, 30, 32, dtype=torch.float64), cache)
    taken = []

    def absorbed(self, q_nope, q_pe, keys, mask, **_cache):
        taken.append("absorbed")
        return MLA.attend_naive(self, q_nope, q_pe, keys.full(), mask)

    monkeypatch.setattr(MLA, "attend_absorbed", absorbed)
    layer(torch.randn(1, 1, 32, dtype=torch.float64), cache)
    assert taken == ["absorbed"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", SMALL)
def test_any_dtype_and_meta_device(name, dtype):
    layer = build_attention(SMALL[name], dtype=dtype)
    cache = layer.new_cache(2, 8)
    out = layer(torch.randn(2, 3, 32, dtype=dtype), cache)
    assert out.dtype == dtype and cache.dtype == dtype and torch.isfinite(out).all()
    meta = build_attention(SMALL[name], device="meta", dtype=dtype)  # device-agnostic: no CPU-only ops
    assert meta(torch.empty(2, 3, 32, device="meta", dtype=dtype)).device.type == "meta"


def test_training_gradients_flow_through_both_paths():
    layer = make_layer(SMALL_MLA, torch.float64)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    grads = {}
    for mode in ("naive", "absorbed"):
        layer.zero_grad()
        layer(x, mode=mode).square().sum().backward()
        grads[mode] = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for name, grad in grads["naive"].items():
        assert grad.abs().sum() > 0, name
        assert relative_error(grads["absorbed"][name], grad) <= 1e-10, name


def test_bad_inputs_raise_clear_errors():
    mla = make_layer(SMALL_MLA)
    gqa = make_layer(SMALL["gqa"])
    with pytest.raises(
        ValueError, match=r"expects x of shape \[batch, tokens, d_model=32\], got \(2, 3, 31\)"
    ):
        mla(torch.randn(2, 3, 31, dtype=torch.float64))
    with pytest.raises(ValueError, match="got zero tokens"):
        mla(torch.randn(2, 0, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="MLA needs a latent cache .*, got KVCache"):
        mla(torch.randn(2, 3, 32, dtype=torch.float64), gqa.new_cache(2, 8))
    with pytest.raises(ValueError, match="GQA needs a K/V cache .*, got LatentCache"):
        gqa(torch.randn(2, 3, 32, dtype=torch.float64), mla.new_cache(2, 8))
    with pytest.raises(ValueError, match="one execution path"):
        gqa(torch.randn(2, 3, 32, dtype=torch.float64), mode="absorbed")
    with pytest.raises(ValueError, match="n_new .* needs a cache"):
        mla(torch.randn(2, 3, 32, dtype=torch.float64), n_new=torch.tensor([3, 2]))
    with pytest.raises(ValueError, match="entries are torch.float64 but the cache holds torch.float32"):
        mla(torch.randn(2, 3, 32, dtype=torch.float64), LatentCache(SMALL_MLA, 2, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match="MLA: x is torch.float32 but the layer's weights are torch.float64"):
        mla(torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="GQA: x is on meta but the layer's weights are on cpu"):
        gqa(torch.randn(2, 3, 32, dtype=torch.float64, device="meta"))
    for layer in (mla, gqa):
        on_meta = layer.to("meta").new_cache(2, 8)
        layer.to_empty(device="cpu")
        with pytest.raises(ValueError, match="the cache is on meta but the layer's weights are on cpu"):
            layer(torch.randn(2, 3, 32, dtype=torch.float64), on_meta)
    with pytest.raises(TypeError, match=r"takes an attention config \(MLAConfig, GQAConfig ...\), got dict"):
        build_attention({"kind": "mla"})
    assert isinstance(build_attention(SMALL["mqa"]), GQAAttention)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    tokens=st.integers(1, 5),
    prefix=st.integers(0, 9),
    block=st.integers(1, 6),
    ragged=st.booleans(),
)
def test_blocked_latent_attention_equals_one_softmax(batch, tokens, prefix, block, ragged):
    """Oracle: one softmax over all keys, outputs and gradients. Blocks smaller than the key count
    exercise the online softmax, including rows whose first blocks are fully masked."""
    heads, width, value_width = 3, 7, 5
    n_keys = prefix + tokens
    q = torch.randn(batch, tokens, heads, width, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(batch, n_keys, width, dtype=torch.float64, requires_grad=True)
    mask = causal_mask(tokens, n_keys, kv.device).expand(batch, -1, -1).clone()
    if ragged:  # later sequences see only a suffix of the keys
        for b in range(batch):
            mask[b, :, : b * 2] = False
            mask[b, :, -1] = True
    scores = torch.einsum("bthw,bsw->bths", q, kv) * 0.3
    scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    expected = torch.einsum("bths,bsv->bthv", scores.softmax(-1), kv[..., :value_width])
    got = latent_attention(q, kv, mask if ragged else None, 0.3, value_width, max_rows=block)
    assert relative_error(got, expected) <= 1e-12
    weights = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, kv))
    got_grads = torch.autograd.grad((got * weights).sum(), (q, kv))
    for grad, expected_grad in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_recompute_kv_keeps_only_the_latent_for_backward():
    """Same outputs and gradients (fp64, exact up to rounding); fewer bytes saved for backward."""
    from latentattn.profiling import saved_activation_bytes

    config = MLAConfig(
        d_model=64, n_heads=8, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16
    )
    x = torch.randn(2, 32, 64, dtype=torch.float64)
    results = {}
    for recompute in (False, True):
        layer = make_layer(config)
        layer.recompute_kv = recompute
        out, saved = saved_activation_bytes(lambda layer=layer: layer(x, mode="naive"), layer.parameters())
        out.square().sum().backward()
        results[recompute] = (out, saved, {n: p.grad for n, p in layer.named_parameters()})
    (out, saved, grads), (out_re, saved_re, grads_re) = results[False], results[True]
    assert relative_error(out_re, out) <= 1e-12
    for name, grad in grads.items():
        assert relative_error(grads_re[name], grad) <= 1e-10, name
    assert saved_re < saved


@settings(max_examples=30, deadline=None)
@given(
    config=mla_configs,
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    tokens=st.integers(1, 4),
    data=st.data(),
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_absorbed_path_equals_the_paper_form(dtype, config, lengths, tokens, data):
    """Oracle: `attend_absorbed_paper`, the ~10 einsums the paper (and DeepSeek-V3's inference code)
    writes over `[c_KV | k_pe]`; a ragged chunk after ragged prefixes, every real row."""
    layer = make_layer(config, dtype)
    batch = len(lengths)
    cache = layer.new_cache(batch, max(lengths) + tokens + 1)
    with torch.no_grad():
        if max(lengths):
            layer(
                torch.randn(batch, max(lengths), config.d_model, dtype=dtype),
                cache,
                n_new=torch.tensor(lengths),
            )
        n_new = [data.draw(st.integers(1, tokens)) for _ in range(batch)]
        x = torch.randn(batch, tokens, config.d_model, dtype=dtype)
        with cache.stepping(tokens, torch.tensor(n_new)) as step:
            q_nope, q_pe = layer.queries(x, step.positions)
            keys, mask = cache.update(layer.latent(x, step.positions), step=step)
            fast = layer.attend_absorbed(q_nope, q_pe, keys, mask)
            paper = layer.attend_absorbed_paper(q_nope, q_pe, keys.full(), mask)
    for b, n in enumerate(n_new):
        assert relative_error(fast[b, :n], paper[b, :n]) <= TOLERANCE[dtype]


@pytest.mark.parametrize("name", SMALL)
def test_a_refused_call_changes_no_cache(name):
    layer = make_layer(SMALL[name])
    cache = layer.new_cache(2, 8)
    layer(torch.randn(2, 3, 32, dtype=torch.float64), cache)
    with pytest.raises(ValueError, match="mode"):
        layer(torch.randn(2, 1, 32, dtype=torch.float64), cache, mode="bogus")
    with pytest.raises(ValueError, match="x holds 3 sequences but the cache holds 2"):
        layer(torch.randn(3, 1, 32, dtype=torch.float64), cache)
    with pytest.raises(ValueError, match="cache overflow"):
        layer(torch.randn(2, 6, 32, dtype=torch.float64), cache)
    assert cache.lengths.tolist() == [3, 3]
