"""The attention refit of conversion (`refit="attention"`): the source's attention moments, the fitted
latent and up-projections.

Oracles: the source layer's own outputs (the attended moments must reproduce what its heads return), a
direct double loop over queries and keys (the key weights), least squares on explicit data (the
up-projections), the objective's value before and after refining, and the source layer itself (full
rank is exact; at low rank the refit loses less of the layer's output than the factorisation alone).
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import replace

import pytest
import torch

from latentattn import GQAAttention, GQAConfig, RopeConfig
from latentattn.convert import AttentionMoments, ConversionConfig, attention_moments, gqa_to_mla, model_to_mla
from latentattn.convert import refit as refit_module
from latentattn.convert.refit import (
    GroupTerms,
    fit_output_projection,
    fit_up_projections,
    refine_down_projection,
)
from latentattn.metrics import relative_error
from latentattn.model import LanguageModel, ModelConfig
from latentattn.rope import RotaryEmbedding


def peaked_layer(n_kv_heads: int = 2, seed: int = 0, bias: bool = False) -> GQAAttention:
    """A fp64 layer whose attention is far from uniform (weights larger than the default init)."""
    torch.manual_seed(seed)
    config = GQAConfig(d_model=48, n_heads=4, n_kv_heads=n_kv_heads, head_dim=16, qkv_bias=bias)
    layer = GQAAttention(config, dtype=torch.float64).eval()
    for weight in (layer.w_q.weight, layer.w_k.weight):
        weight.data.mul_(3)
    return layer


def windows(batch: int = 4, tokens: int = 24, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, tokens, 48, dtype=torch.float64)


def test_attended_moments_reproduce_what_each_head_returns():
    """Head h returns W̃_V,g x̄_i, so Σ_i o_i o_iᵀ = W̃_V,g (Σ_i x̄_i x̄_iᵀ) W̃_V,gᵀ."""
    layer, x = peaked_layer(bias=True), windows()
    seen = []
    layer.w_o.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        layer(x)
    heads = seen[0].reshape(-1, 4, 16)  # [B·T, H, D]
    moments = AttentionMoments.of(layer, [x])
    w_v = torch.cat([layer.w_v.weight, layer.w_v.bias[:, None]], dim=1).view(2, 16, 49)
    for head in range(4):
        expected = heads[:, head].T @ heads[:, head]
        got = w_v[head // 2] @ moments.attended[head] @ w_v[head // 2].T
        assert relative_error(got, expected) <= 1e-10
    assert moments.count == 4 * 24


def test_moments_do_not_depend_on_how_windows_are_batched(monkeypatch):
    layer, x = peaked_layer(), windows(batch=6)
    whole = AttentionMoments.of(layer, [x])
    monkeypatch.setattr(attention_moments, "WORK_ELEMENTS", 1)  # one window at a time
    split = AttentionMoments.of(layer, [x[:4], x[4:]])
    for name in ("attended", "keys", "queries", "key_weight"):
        assert relative_error(getattr(split, name), getattr(whole, name)) <= 1e-12
    assert split.count == whole.count == 6 * 24


def test_key_weights_equal_a_direct_double_loop():
    """w_ij = p_ij² ‖u_j − ū_i‖² summed into the keys' and the queries' moments, query by query."""
    layer, x = peaked_layer(), windows(batch=2, tokens=6)
    moments = AttentionMoments.of(layer, [x[:1], x[1:]])
    c = layer.config
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        q = layer.rope(layer.w_q(x).view(2, 6, 4, 16), positions)
        k = layer.rope(layer.w_k(x).view(2, 6, 2, 16), positions)
        v = layer.w_v(x).view(2, 6, 2, 16)
    x_aug = torch.cat([x, torch.ones(2, 6, 1, dtype=torch.float64)], dim=2)
    for head in range(4):
        group = head // 2
        w_o = layer.w_o.weight.detach()[:, head * 16 : (head + 1) * 16]
        keys = torch.zeros(49, 49, dtype=torch.float64)
        queries, total = torch.zeros_like(keys), 0.0
        for b, i in itertools.product(range(2), range(6)):
            scores = [float(q[b, i, head] @ k[b, j, group]) * c.softmax_scale for j in range(i + 1)]
            top = max(scores)
            p = [math.exp(s - top) for s in scores]
            p = [value / sum(p) for value in p]
            u = [w_o @ v[b, j, group] for j in range(i + 1)]
            u_bar = sum(pj * uj for pj, uj in zip(p, u, strict=True))
            for j in range(i + 1):
                w = p[j] ** 2 * (u[j] - u_bar).square().sum().item()
                keys += w * torch.outer(x_aug[b, j], x_aug[b, j])
                queries += w * torch.outer(x_aug[b, i], x_aug[b, i])
                total += w
        assert relative_error(moments.keys[head], keys) <= 1e-10
        assert relative_error(moments.queries[head], queries) <= 1e-10
        assert moments.key_weight[head].item() == pytest.approx(total, rel=1e-10)


def test_up_projections_are_least_squares_fits_on_the_data():
    """With S = Xᵀ X / n, Y S Wᵀ (W S Wᵀ)⁻¹ is the least-squares map from the latents X Wᵀ to X Yᵀ."""
    torch.manual_seed(0)
    data = torch.randn(3, 200, 10, dtype=torch.float64)  # [H, n, d]
    w_down, target = torch.randn(4, 10, dtype=torch.float64), torch.randn(3, 5, 10, dtype=torch.float64)
    moments = data.mT @ data / 200
    no_keys = torch.zeros(3, 0, 10, dtype=torch.float64)  # N = 0: an empty block stays empty
    fitted = fit_up_projections(w_down, [no_keys, target], [moments, moments])  # [H, 5, 4]
    assert fitted.shape == (3, 5, 4)
    for head in range(3):
        latents, outputs = data[head] @ w_down.T, data[head] @ target[head].T
        expected = torch.linalg.lstsq(latents, outputs).solution.T
        assert relative_error(fitted[head], expected) <= 1e-6


def test_wide_latents_fit_with_two_threads():
    """C = 192 and a batch of heads, on two threads: torch 2.13's batched CPU LU fails there (pivot error
    from MKL); the per-matrix solve fits, and the refine's objective evaluates."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data = torch.randn(3, 400, 200, dtype=torch.float64)
        w_down, target = (
            torch.randn(192, 200, dtype=torch.float64),
            torch.randn(3, 5, 200, dtype=torch.float64),
        )
        moments = data.mT @ data / 400
        fitted = fit_up_projections(w_down, [target], [moments])
        kept = GroupTerms.of(
            [target], [torch.eye(5, dtype=torch.float64).expand(3, 5, 5)], [moments], 1
        ).kept(w_down)
    finally:
        torch.set_num_threads(threads)
    latents, outputs = data[2] @ w_down.T, data[2] @ target[2].T
    assert relative_error(fitted[2], torch.linalg.lstsq(latents, outputs).solution.T) <= 1e-6
    assert 0 < kept.item() < 1


def test_refining_keeps_more_of_the_cost_than_the_start():
    """Two blocks whose moments differ: the L-BFGS W_DKV keeps more than the top eigenvectors of the
    first block's gain."""
    torch.manual_seed(0)
    d, rank = 12, 3
    scales = [torch.logspace(-1, 1, d, dtype=torch.float64), torch.logspace(1, -1, d, dtype=torch.float64)]
    moments = [torch.diag(s)[None].repeat(2, 1, 1) for s in scales]  # [H = 2, d, d]
    targets = [torch.randn(1, 6, d, dtype=torch.float64).repeat(2, 1, 1) for _ in scales]
    metrics = [torch.eye(6, dtype=torch.float64)[None].repeat(2, 1, 1) for _ in scales]
    terms = GroupTerms.of(targets, metrics, moments, groups=1)
    start = torch.linalg.eigh(terms.gains[0][0]).eigenvectors[:, -rank:].T
    refined = refine_down_projection(start, terms)
    assert terms.kept(refined) > terms.kept(start) + 0.01
    assert terms.kept(refined) <= 1 + 1e-9
    assert terms.kept(torch.eye(d, dtype=torch.float64)).item() == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_full_rank_with_the_refit_reproduces_the_layer(bias):
    layer = peaked_layer(bias=bias)
    config = ConversionConfig(kv_lora_rank=32, qk_rope_head_dim=32, norm_linearity=1e14)
    mla = gqa_to_mla(layer, config, windows())
    x = windows(batch=2, tokens=20, seed=5)
    with torch.no_grad():
        for mode in ("naive", "absorbed"):
            assert relative_error(mla(x, mode=mode), layer(x)) <= 1e-9


def test_the_refit_loses_less_of_the_layer_output():
    """At low rank, on held-out windows from the calibration's distribution, on average over layers (it
    can lose on one: a fit to calibration, first order in the score errors). RoPE turns by ~0 here, so
    the latent, not k_pe, carries the error."""
    errors: dict[str, list[float]] = {"none": [], "attention": []}
    for seed in range(4):
        layer = peaked_layer(seed=seed)
        layer.config = replace(layer.config, rope=RopeConfig(frequencies=(1e-12,) * 8))
        layer.rope = RotaryEmbedding(16, layer.config.rope)
        calibration, held_out = windows(batch=128, seed=seed), windows(batch=4, seed=seed + 100)
        for refit in errors:
            config = ConversionConfig(kv_lora_rank=24, qk_rope_head_dim=2, rope_residual="nope", refit=refit)
            with torch.no_grad():
                output = gqa_to_mla(layer, config, calibration)(held_out)
                errors[refit].append(relative_error(output, layer(held_out)))
    assert statistics.fmean(errors["attention"]) < 0.95 * statistics.fmean(errors["none"])


def test_a_model_refits_every_layer_from_its_own_windows():
    """model_to_mla's block-by-block attention moments give what each layer's own conversion gives."""
    torch.manual_seed(0)
    attention = GQAConfig(d_model=48, n_heads=4, n_kv_heads=2, head_dim=8, rope=RopeConfig(interleave=False))
    config = ModelConfig(vocab_size=64, n_layers=2, d_model=48, d_ff=64, attention=attention, max_seq_len=64)
    model = LanguageModel(config).eval()
    tokens = torch.randint(0, 64, (4, 32))
    conversion = ConversionConfig(kv_lora_rank=6, qk_rope_head_dim=4, rope_frequencies="highest")
    converted = model_to_mla(model, conversion, tokens)
    with torch.no_grad():
        hidden = model.embed(tokens)
        for block, mla in zip(model.blocks, converted.blocks, strict=True):
            inputs = block.attn_norm(hidden)
            alone = gqa_to_mla(block.attn, conversion, inputs)
            for name in ("w_dkv", "w_ukv", "w_o"):
                assert relative_error(getattr(mla.attn, name).weight, getattr(alone, name).weight) <= 1e-5
            hidden = block(hidden, None, None, "auto")


@pytest.mark.parametrize("bias", [False, True])
def test_the_output_projection_is_the_least_squares_fit_of_the_source_output(bias, monkeypatch):
    """Unregularised, w_o (with its bias) is torch's lstsq of the source's outputs on the converted heads'
    outputs (C 24 ≥ V: the heads' outputs have full rank); regularised, the fit on the windows is still
    no worse than the W_O it started from."""
    layer, calibration = peaked_layer(bias=bias), windows(batch=8)
    config = ConversionConfig(kv_lora_rank=24, qk_rope_head_dim=8, refit="none")
    mla = gqa_to_mla(layer, config, calibration)
    seen = []
    mla.w_o.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        before = relative_error(mla(calibration), layer(calibration))
        heads = seen[-1].reshape(-1, mla.w_o.in_features)
        if bias:
            heads = torch.cat([heads, torch.ones(len(heads), 1, dtype=heads.dtype)], dim=1)
        expected = torch.linalg.lstsq(heads, layer(calibration).reshape(len(heads), -1)).solution.T
    regularised = gqa_to_mla(layer, config, calibration)
    fit_output_projection(regularised, layer, [calibration])
    with torch.no_grad():
        assert relative_error(regularised(calibration), layer(calibration)) < before
    monkeypatch.setattr(refit_module, "OUTPUT_RIDGE", 0.0)
    fit_output_projection(mla, layer, [calibration])
    assert relative_error(mla.w_o.weight, expected[:, : mla.w_o.in_features]) <= 1e-8
    if bias:
        assert relative_error(mla.w_o.bias, expected[:, -1]) <= 1e-8


def test_short_windows_and_a_bf16_layer_refit_too():
    """Windows of a few tokens (the decode-sized projections take the CPU kernel) and bf16 weights
    (attention moments in fp32) convert; in bf16 the conversion loses about what it loses in fp64."""
    layer, calibration = peaked_layer(), windows(batch=6, tokens=2)
    config = ConversionConfig(kv_lora_rank=8, qk_rope_head_dim=8)
    x = windows(batch=2, tokens=5, seed=9)
    with torch.no_grad():
        exact = relative_error(gqa_to_mla(layer, config, calibration)(x), layer(x))
        layer = layer.to(torch.bfloat16)
        halved = gqa_to_mla(layer, config, calibration.to(torch.bfloat16))
        assert relative_error(halved(x.bfloat16()).double(), layer(x.bfloat16()).double()) <= 1.5 * exact


def test_key_weight_and_value_metric_reach_the_refit():
    layer, calibration = peaked_layer(), windows(batch=8)
    base = ConversionConfig(kv_lora_rank=8, qk_rope_head_dim=2)
    reference = gqa_to_mla(layer, base, calibration).w_ukv.weight
    for changed in (replace(base, key_weight=4.0), replace(base, value_metric="heads")):
        assert relative_error(gqa_to_mla(layer, changed, calibration).w_ukv.weight, reference) > 1e-3


def test_the_refit_needs_windows():
    layer = peaked_layer()
    with pytest.raises(ValueError, match="refit 'attention' needs calibration windows"):
        gqa_to_mla(layer, ConversionConfig(kv_lora_rank=8, qk_rope_head_dim=8), torch.randn(64, 48))
    with pytest.raises(
        ValueError, match=r"calibration windows must be \[batch, tokens, 48\], got \(2, 5, 47\)"
    ):
        gqa_to_mla(
            layer,
            ConversionConfig(kv_lora_rank=8, qk_rope_head_dim=8),
            windows(),
            windows=[torch.zeros(2, 5, 47)],
        )
    with pytest.raises(ValueError, match="unknown refit 'lstsq'"):
        ConversionConfig(kv_lora_rank=8, qk_rope_head_dim=8, refit="lstsq")
    config = ModelConfig(
        vocab_size=64, n_layers=1, d_model=48, d_ff=64, attention=layer.config, max_seq_len=64
    )
    model = LanguageModel(config)
    with pytest.raises(ValueError, match="their moments as `moments=`"):
        model_to_mla(model, ConversionConfig(kv_lora_rank=8, qk_rope_head_dim=8), [torch.zeros(1)])
    with pytest.raises(ValueError, match="needs calibration tokens"):
        model_to_mla(
            LanguageModel(config), ConversionConfig(method="svd", kv_lora_rank=8, qk_rope_head_dim=8)
        )
