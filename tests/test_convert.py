"""MHA/GQA/MQA → MLA conversion (RoRoPE + joint low-rank K/V), layer by layer and whole models.

Oracles: the source model or layer itself. With a shared RoPE key of R = G·D (every kv head's every
key dim) and a latent of C = G·D (every value) the converted model must reproduce the source's logits
(fp32: relative 1e-4, the error budget of fp32 GEMMs plus kv_norm's linear regime at 1e6); smaller
latents must lose more. Calibration statistics gathered block by block must equal those of forward
hooks on one whole forward pass.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from latentattn import GQAAttention, GQAConfig, RopeConfig, YarnConfig
from latentattn.checkpoint import model_config_from_dict, model_config_to_dict
from latentattn.config import Llama3RopeConfig
from latentattn.convert import ConversionConfig, Moments, gqa_to_mla, layer_input_moments, model_to_mla
from latentattn.convert.layer import factorise_kv
from latentattn.convert.rope_split import RotaryKeys, choose_slots, largest_nope_width, nope_dims
from latentattn.convert.weighting import attention_metric
from latentattn.hf import mla_config_to_hf
from latentattn.metrics import relative_error, relative_l2
from latentattn.model import LanguageModel, ModelConfig, get_preset
from latentattn.rope import rope_inv_freq

HEAD_DIM = 8
LLAMA3 = Llama3RopeConfig(factor=8.0, original_max_position_embeddings=32)
LEGACY = {
    "rope_frequencies": "highest",
    "rope_residual": "drop",
    "balance_kv": False,
    "kv_objective": "activations",
    "refit": "none",
}
"""The study's conversion (`study.study_conversion`)."""


def source_model(n_kv_heads: int, rope: RopeConfig | None = None, seed: int = 0) -> LanguageModel:
    """A 2-layer model with weights large enough that attention is far from uniform."""
    torch.manual_seed(seed)
    attention = GQAConfig(
        d_model=48,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        head_dim=HEAD_DIM,
        rope=rope or RopeConfig(interleave=False),
    )
    config = ModelConfig(vocab_size=64, n_layers=2, d_model=48, d_ff=64, attention=attention, max_seq_len=64)
    model = LanguageModel(config).eval()
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.25)
    return model


def source_layer(n_kv_heads: int, interleave: bool = False, seed: int = 0) -> GQAAttention:
    torch.manual_seed(seed)
    config = GQAConfig(
        d_model=48, n_heads=4, n_kv_heads=n_kv_heads, head_dim=16, rope=RopeConfig(interleave=interleave)
    )
    return GQAAttention(config, dtype=torch.float64).eval()


def full(n_kv_heads: int, **options) -> ConversionConfig:
    """R = C = G·D: room for every kv head's keys and values."""
    width = n_kv_heads * HEAD_DIM
    return ConversionConfig(kv_lora_rank=width, qk_rope_head_dim=width, **options)


@pytest.mark.parametrize("kv_objective", ["activations", "attention"])
@pytest.mark.parametrize("method", ["svd", "pca"])
@pytest.mark.parametrize(("kind", "n_kv_heads"), [("mha", 4), ("gqa", 2), ("mqa", 1)])
def test_enough_rank_and_rope_width_reproduce_the_source_logits(kind, n_kv_heads, method, kv_objective):
    model = source_model(n_kv_heads)
    calibration = torch.randint(0, 64, (4, 32))
    tokens = torch.randint(0, 64, (2, 40))
    config = full(n_kv_heads, method=method, kv_objective=kv_objective)
    converted = model_to_mla(model, config, calibration).eval()
    attention = converted.config.attention
    assert (attention.kv_lora_rank, attention.qk_rope_head_dim, attention.qk_nope_head_dim) == (
        n_kv_heads * HEAD_DIM,
        n_kv_heads * HEAD_DIM,
        0,
    )
    with torch.no_grad():
        expected = model(tokens)
        for mode in ("naive", "absorbed"):
            assert relative_error(converted(tokens, mode=mode), expected) <= 1e-4


@pytest.mark.parametrize(
    "rope",
    [
        RopeConfig(interleave=True),
        RopeConfig(theta=500.0, yarn=YarnConfig(factor=4, original_max_position_embeddings=16)),
        RopeConfig(
            theta=5e5, interleave=False, llama3=Llama3RopeConfig(8, original_max_position_embeddings=32)
        ),
        RopeConfig(interleave=False, linear_factor=4.0),
        RopeConfig(interleave=False, frequencies=(1.0, 0.3, 0.02, 0.001)),
    ],
    ids=["interleaved", "yarn", "llama3", "linear", "frequency-list"],
)
@pytest.mark.parametrize("rule", ["highest", "score"])
def test_every_rope_layout_converts_exactly(rope, rule):
    model = source_model(2, rope)
    tokens = torch.randint(0, 64, (2, 40))
    converted = model_to_mla(model, full(2, rope_frequencies=rule), torch.randint(0, 64, (4, 32))).eval()
    with torch.no_grad():
        assert relative_error(converted(tokens), model(tokens)) <= 1e-4


def test_k_pe_frequencies_repeat_per_kv_head_or_reduce_to_a_theta():
    """The config marks what DeepSeek-V3's format cannot hold: a list of frequencies (here each of the
    source's, once per kv head); the R highest frequencies of one kv head are a theta, as before."""
    gqa = model_to_mla(source_model(2), full(2, method="svd", refit="none")).config.attention.rope
    source = rope_inv_freq(HEAD_DIM, 10000.0)
    assert gqa.frequencies == tuple(source.repeat_interleave(2).tolist())
    mqa = model_to_mla(
        source_model(1),
        ConversionConfig(
            method="svd", kv_lora_rank=8, qk_rope_head_dim=4, rope_frequencies="highest", refit="none"
        ),
    )
    mqa = mqa.config.attention.rope
    assert mqa.frequencies is None and mqa.theta == pytest.approx(10000.0**0.5)


def test_a_converted_config_survives_the_checkpoint_json():
    converted = model_to_mla(source_model(2), full(2, method="svd", refit="none")).config
    converted = replace(converted, attention=replace(converted.attention, bias=True))
    assert model_config_from_dict(json.loads(json.dumps(model_config_to_dict(converted)))) == converted


def test_the_hf_mapping_refuses_what_deepseek_v3_cannot_hold():
    frequency_list = model_to_mla(source_model(2), full(2, method="svd", refit="none")).config.attention
    with pytest.raises(ValueError, match="list of frequencies .* has no HF form"):
        mla_config_to_hf(frequency_list)
    with pytest.raises(ValueError, match="MLA with biases .* has no DeepSeek-V3 form"):
        mla_config_to_hf(replace(frequency_list, rope=RopeConfig(), bias=True))


@pytest.mark.parametrize("method", ["svd", "pca"])
def test_error_grows_as_the_rank_shrinks(method):
    model = source_model(2, seed=1)
    calibration = torch.randint(0, 64, (8, 32))
    tokens = torch.randint(0, 64, (4, 40))
    with torch.no_grad():
        expected = model(tokens).double()
        errors = [
            relative_l2(
                model_to_mla(
                    model,
                    ConversionConfig(method=method, kv_lora_rank=rank, qk_rope_head_dim=16),
                    calibration,
                )(tokens),
                expected,
            )
            for rank in (16, 10, 4, 1)
        ]
    assert errors[0] <= 1e-4
    assert all(later >= earlier - 1e-6 for earlier, later in itertools.pairwise(errors)), errors
    assert errors[-1] > 100 * max(errors[0], 1e-6)


@pytest.mark.parametrize("output_bias", [False, True])
@pytest.mark.parametrize("kv_objective", ["activations", "attention"])
def test_biases_are_carried_exactly(output_bias, kv_objective):
    """Qwen2's q/k/v biases (`GQAConfig.qkv_bias`; an output bias too, on a hand-made layer): the query
    bias on w_q, the k_pe part of the key bias on w_dkv, the value bias through w_o's bias."""
    torch.manual_seed(0)
    layer = GQAAttention(
        GQAConfig(d_model=48, n_heads=4, n_kv_heads=2, head_dim=16, qkv_bias=True), dtype=torch.float64
    ).eval()
    if output_bias:
        linear = layer.w_o
        layer.w_o = nn.Linear(linear.in_features, linear.out_features, dtype=torch.float64)
        layer.w_o.weight.data.copy_(linear.weight)
    x = torch.randn(2, 24, 48, dtype=torch.float64)
    calibration = torch.randn(8, 32, 48, dtype=torch.float64)
    config = ConversionConfig(
        kv_lora_rank=32, qk_rope_head_dim=32, norm_linearity=1e14, kv_objective=kv_objective
    )
    mla = gqa_to_mla(layer, config, calibration)
    assert mla.config.bias and mla.w_dkv.bias is not None
    with torch.no_grad():
        assert relative_error(mla(x), layer(x)) <= 1e-9


@pytest.mark.parametrize("residual", ["nope", "drop"])
def test_residual_nope_keeps_what_a_slow_rotation_leaves(residual):
    """A kept frequency's components outside k_pe lose their rotation: as NoPE dims they are exact when
    the rotation is negligible (here every frequency is 1e-12); dropped, they are lost."""
    torch.manual_seed(0)
    source = GQAConfig(
        d_model=48, n_heads=4, n_kv_heads=2, head_dim=16, rope=RopeConfig(frequencies=(1e-12,) * 8)
    )
    layer = GQAAttention(source, dtype=torch.float64).eval()
    calibration = torch.randn(8, 32, 48, dtype=torch.float64)
    rank = 48 if residual == "nope" else 32  # the full rank of the stacked NoPE keys and values
    config = ConversionConfig(
        kv_lora_rank=rank,
        qk_rope_head_dim=16,
        rope_frequencies="highest",
        rope_residual=residual,
        norm_linearity=1e14,
    )
    mla = gqa_to_mla(layer, config, calibration)
    x = torch.randn(2, 20, 48, dtype=torch.float64)
    with torch.no_grad():
        error = relative_error(mla(x), layer(x))
    assert mla.config.qk_nope_head_dim == (16 if residual == "nope" else 0)
    assert error <= 1e-9 if residual == "nope" else error > 1e-3


@pytest.mark.parametrize("method", ["svd", "pca"])
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("qk_rope_head_dim", [2, 8])
def test_mqa_converts_exactly_where_no_rope_is_dropped(method, interleave, qk_rope_head_dim):
    """The study's conversion of an MQA source at full latent rank is exact (a) for single tokens at
    position 0, where RoPE is the identity (checks the factorisation, layouts and kv_norm); (b) at any
    positions when the queries ignore the NoPE dims, whose rotation conversion drops (checks RoRoPE and
    the frequency mapping)."""
    layer = source_layer(n_kv_heads=1, interleave=interleave)
    calibration = torch.randn(8, 32, 48, dtype=torch.float64)
    full_rank = min(2 * 16 - qk_rope_head_dim, 48)
    config = ConversionConfig(
        method=method,
        kv_lora_rank=full_rank,
        qk_rope_head_dim=qk_rope_head_dim,
        norm_linearity=1e14,
        **LEGACY,
    )
    tokens = torch.randn(20, 1, 48, dtype=torch.float64)
    sequence = torch.randn(2, 20, 48, dtype=torch.float64)
    with torch.no_grad():
        mla = gqa_to_mla(layer, config, calibration)
        assert mla.config.cache_width == full_rank + qk_rope_head_dim
        for mode in ("naive", "absorbed"):
            assert relative_error(mla(tokens, mode=mode), layer(tokens)) <= 1e-9
        kept = [
            dim
            for pair in range(qk_rope_head_dim // 2)
            for dim in ((2 * pair, 2 * pair + 1) if interleave else (pair, pair + 8))
        ]
        nope = torch.ones(16, dtype=torch.bool)
        nope[kept] = False
        layer.w_q.weight.view(4, 16, 48)[:, nope] = 0
        mla = gqa_to_mla(layer, config, calibration)
        for mode in ("naive", "absorbed"):
            assert relative_error(mla(sequence, mode=mode), layer(sequence)) <= 1e-9


def test_pca_reconstructs_calibration_kv_better_than_svd():
    """On anisotropic inputs, PCA of the activations beats SVD of the weights at equal rank."""
    layer = source_layer(n_kv_heads=2)
    torch.manual_seed(1)
    calibration = torch.randn(1024, 48, dtype=torch.float64) * torch.logspace(-1, 1, 48, dtype=torch.float64)

    def latent_reconstruction_error(method: str) -> float:
        config = ConversionConfig(method=method, kv_lora_rank=12, qk_rope_head_dim=4, **LEGACY)
        mla = gqa_to_mla(layer, config, calibration)
        c = mla.config
        rows = mla.w_ukv.weight.view(c.n_heads, -1, c.kv_lora_rank)[::2].reshape(-1, c.kv_lora_rank)
        reconstructed = calibration @ mla.w_dkv.weight[: c.kv_lora_rank].T.double() @ rows.T.double()
        nope = [d for d in range(16) if d not in (0, 1, 8, 9)]
        w_k = layer.w_k.weight.view(2, 16, 48)[:, nope]
        w_v = layer.w_v.weight.view(2, 16, 48)
        target = calibration @ torch.cat([w_k, w_v], dim=1).reshape(-1, 48).T
        return relative_l2(reconstructed, target)

    assert latent_reconstruction_error("pca") < latent_reconstruction_error("svd")


def test_the_attention_metric_prices_errors_as_the_heads_see_them():
    """Oracle from calibration rows: δkᵀ M_K δk = Σ_h λ_h s² mean((q_hᵀ δk)²) with λ_h the variance of
    head h's value outputs W_O,h v, and δvᵀ M_V δv = Σ_h ‖W_O,h δv‖², over the heads of the group."""
    torch.manual_seed(0)
    heads, groups, nope, head_dim, d_model, scale = 4, 2, 6, 8, 12, 0.3
    x = torch.randn(500, d_model, dtype=torch.float64) * torch.linspace(0.2, 2, d_model, dtype=torch.float64)
    x = torch.cat([x + 0.5, torch.ones(500, 1, dtype=torch.float64)], 1)  # augmented, not centred
    q_nope = torch.randn(heads, nope, d_model + 1, dtype=torch.float64)
    w_v = torch.randn(groups, head_dim, d_model + 1, dtype=torch.float64)
    w_o = torch.randn(d_model, heads * head_dim, dtype=torch.float64)
    metric = attention_metric(q_nope, w_v, w_o, Moments.of(x[:, :-1]).second_moment, scale, ridge=0.0)
    delta_k, delta_v = torch.randn(nope, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    for group in range(groups):
        key_cost = value_cost = 0.0
        for head in (2 * group, 2 * group + 1):
            w_o_head = w_o[:, head * head_dim : (head + 1) * head_dim]
            spread = (x @ w_v[group].T @ w_o_head.T).var(0, correction=0).sum()
            key_cost += spread * scale**2 * ((x @ q_nope[head].T @ delta_k) ** 2).mean()
            value_cost += (w_o_head @ delta_v).square().sum()
        block = metric[group]
        torch.testing.assert_close(delta_k @ block[:nope, :nope] @ delta_k, key_cost)
        torch.testing.assert_close(delta_v @ block[nope:, nope:] @ delta_v, value_cost)
        assert block[:nope, nope:].abs().max() == 0


def test_the_group_value_metric_adds_the_heads_errors_before_the_norm():
    """value_metric "group": δvᵀ M_V δv = ‖Σ_h W_O,h δv‖² over the heads of the group (heads attending
    alike); the key block is the same as with "heads"."""
    torch.manual_seed(0)
    heads, groups, nope, head_dim, d_model = 4, 2, 6, 8, 12
    x = torch.randn(200, d_model, dtype=torch.float64)
    q_nope = torch.randn(heads, nope, d_model + 1, dtype=torch.float64)
    w_v = torch.randn(groups, head_dim, d_model + 1, dtype=torch.float64)
    w_o = torch.randn(d_model, heads * head_dim, dtype=torch.float64)
    sigma = Moments.of(x).second_moment
    apart = attention_metric(q_nope, w_v, w_o, sigma, 0.3, ridge=0.0)
    together = attention_metric(q_nope, w_v, w_o, sigma, 0.3, value_metric="group", ridge=0.0)
    delta_v = torch.randn(head_dim, dtype=torch.float64)
    for group in range(groups):
        summed = sum(w_o[:, head * head_dim : (head + 1) * head_dim] for head in (2 * group, 2 * group + 1))
        torch.testing.assert_close(
            delta_v @ together[group, nope:, nope:] @ delta_v, (summed @ delta_v).square().sum()
        )
        torch.testing.assert_close(together[group, :nope, :nope], apart[group, :nope, :nope])


def test_the_group_value_metric_converts_exactly_at_full_rank():
    """GQA with every key and value held (R = C = G·D): the group metric changes no logit."""
    model = source_model(2)
    calibration = torch.randint(0, 64, (4, 32))
    tokens = torch.randint(0, 64, (2, 40))
    config = full(2, kv_objective="attention", value_metric="group")
    converted = model_to_mla(model, config, calibration).eval()
    with torch.no_grad():
        assert relative_error(converted(tokens), model(tokens)) <= 1e-4


def random_layer_and_inputs(n_kv_heads: int, keys: str, seed: int) -> tuple[GQAAttention, Tensor, Tensor]:
    """A GQA layer with weights far from uniform attention, and calibration and held-out inputs `[8, 32,
    48]` from one anisotropic, not centred distribution. `keys` "rope": plain RoPE; "nope": every
    frequency ≈ 0, so keys outside k_pe are exact as NoPE dims."""
    torch.manual_seed(seed)
    frequencies = (1e-9,) * 8 if keys == "nope" else None
    config = GQAConfig(
        d_model=48,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        head_dim=16,
        rope=RopeConfig(interleave=False, frequencies=frequencies),
    )
    layer = GQAAttention(config, dtype=torch.float64).eval()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0, 0.3)
    scale = torch.logspace(-1, 1, 48, dtype=torch.float64)[torch.randperm(48)]
    mean = 2 * torch.randn(48, dtype=torch.float64)
    calibration, held_out = (torch.randn(8, 32, 48, dtype=torch.float64) * scale + mean for _ in range(2))
    return layer, calibration, held_out


@settings(max_examples=10, deadline=None)
@given(
    n_kv_heads=st.sampled_from([1, 2, 4]),
    keys=st.sampled_from(["rope", "nope"]),
    rank_fraction=st.floats(0.55, 0.85),
    seed=st.integers(0, 2**14),
)
def test_the_attention_objective_loses_less_output_than_activation_pca(n_kv_heads, keys, rank_fraction, seed):
    """At a truncated rank, on held-out inputs: weighting keys by their queries and values by W_O gives
    a lower error of the layers' outputs, summed over four random layers. "rope": k_pe holds every key
    with its rotation, the latent holds the values; "nope": k_pe holds one slot, the other keys are NoPE
    dims in the latent with the values. The weights are first-order (and ignore how heads' errors
    add up in the output): single layers lose in about 1% of cases (11 of 1,440 in a sweep of these
    shapes), sums of four never did (worst ratio 0.99 over 360 sums). value_metric "heads", whose
    derivation assumes independent heads, as these random ones are; the default "group" assumes the
    heads of a group attend alike, as a trained model's do, and is chosen by measurement there
    (docs/convert/options.md)."""
    rope_dim = 16 * n_kv_heads if keys == "rope" else 2
    nope = 0 if keys == "rope" else 16
    rank = max(1, int(rank_fraction * min(n_kv_heads * (nope + 16), 48)))
    errors = {"attention": 0.0, "activations": 0.0}
    for index in range(4):
        layer, calibration, held_out = random_layer_and_inputs(n_kv_heads, keys, 4 * seed + index)
        for kv_objective in errors:
            config = ConversionConfig(
                kv_lora_rank=rank,
                qk_rope_head_dim=rope_dim,
                rope_residual="nope",
                kv_objective=kv_objective,
                value_metric="heads",
                refit="none",
            )
            with torch.no_grad():
                mla = gqa_to_mla(layer, config, calibration)
                errors[kv_objective] += relative_l2(mla(held_out), layer(held_out))
    assert errors["attention"] < errors["activations"]


@pytest.mark.parametrize("method", ["svd", "pca"])
def test_balancing_keeps_loud_keys_from_crowding_out_the_values(method):
    """Keys 100x louder than values: unbalanced, the latent holds the keys and little of the values;
    balanced, both lose about equally. At full rank balancing changes nothing."""
    torch.manual_seed(0)
    w_k, w_v = 100 * torch.randn(2, 8, 64, dtype=torch.float64), torch.randn(2, 8, 64, dtype=torch.float64)
    sigma = torch.eye(64, dtype=torch.float64)

    def errors(balance: bool, rank: int) -> tuple[float, float]:
        config = ConversionConfig(method=method, kv_lora_rank=rank, qk_rope_head_dim=2, balance_kv=balance)
        w_up, w_down = factorise_kv(w_k, w_v, sigma, config)
        reconstructed = torch.einsum("grc,cd->grd", w_up, w_down)
        return relative_l2(reconstructed[:, :8], w_k), relative_l2(reconstructed[:, 8:], w_v)

    key_error, value_error = errors(balance=False, rank=16)
    assert key_error < 1e-3 and value_error > 0.8
    key_error, value_error = errors(balance=True, rank=16)
    assert 0.3 < key_error < 0.6 and 0.3 < value_error < 0.6
    assert max(errors(balance=True, rank=32)) < 1e-12


def test_score_rule_keeps_the_slot_that_carries_the_scores():
    """A low-frequency pair with loud queries and keys: "score" keeps it, "highest" cannot."""
    layer = source_layer(n_kv_heads=2)
    with torch.no_grad():
        for weight in (layer.w_q.weight.view(4, 16, 48), layer.w_k.weight.view(2, 16, 48)):
            weight[:, [7, 15]] *= 50  # half-split pair 7, the lowest frequency
    sigma = Moments.isotropic(48).second_moment
    augmented = [
        torch.cat([w.double(), torch.zeros(len(w), 1, dtype=torch.float64)], 1)
        for w in (layer.w_q.weight, layer.w_k.weight)
    ]
    keys = RotaryKeys.analyse(
        augmented[0].view(4, 16, 49), augmented[1].view(2, 16, 49), sigma, interleave=False
    )
    assert (7, 0) in choose_slots("score", 4, 8, 2, keys.scores)
    assert (7, 0) not in choose_slots("highest", 4, 8, 2, keys.scores)


@pytest.mark.parametrize(("head_dim", "n_kv_heads"), [(4, 1), (6, 2), (4, 3)])
@pytest.mark.parametrize("residual", ["drop", "nope"])
def test_the_rank_check_before_calibration_allows_every_slot_choice(head_dim, n_kv_heads, residual):
    """Before calibrating, "score" slots are unknown: the bound used must be the largest N that any
    set of R/2 slots leaves (every set, enumerated)."""
    every = [(i, j) for i in range(head_dim // 2) for j in range(n_kv_heads)]
    for count in range(1, len(every) + 1):
        widths = [
            len(nope_dims(list(slots), head_dim, n_kv_heads, residual, interleave=False))
            for slots in itertools.combinations(every, count)
        ]
        assert max(widths) == largest_nope_width(2 * count, head_dim, n_kv_heads, residual)


def test_calibration_block_by_block_equals_one_forward_pass():
    model = source_model(2)
    tokens = torch.randint(0, 64, (3, 20))
    seen: list[torch.Tensor] = []
    hooks = [b.attn.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for b in model.blocks]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    for moments, inputs in zip(layer_input_moments(model, tokens), seen, strict=True):
        assert moments.count == 60
        torch.testing.assert_close(moments.second_moment, Moments.of(inputs).second_moment)


def test_model_conversion_shares_one_config_and_the_largest_eps():
    model = source_model(2)
    config = ConversionConfig(kv_lora_rank=8, qk_rope_head_dim=4, rope_frequencies="score")
    converted = model_to_mla(model, config, torch.randint(0, 64, (4, 32)))
    eps = converted.config.attention.norm_eps
    assert all(block.attn.kv_norm.weight[0].item() ** 2 == pytest.approx(eps) for block in converted.blocks)
    assert all(block.attn.config == converted.config.attention for block in converted.blocks)


def test_bad_requests_are_named():
    layer = source_layer(n_kv_heads=2)
    model = source_model(2)
    with pytest.raises(ValueError, match="method 'pca' needs calibration"):
        gqa_to_mla(layer, ConversionConfig(kv_lora_rank=8, qk_rope_head_dim=4))
    with pytest.raises(ValueError, match="qk_rope_head_dim must be even and positive, got 3"):
        ConversionConfig(kv_lora_rank=8, qk_rope_head_dim=3)
    with pytest.raises(ValueError, match=r"qk_rope_head_dim must be at most n_kv_heads·head_dim = 2·16 = 32"):
        gqa_to_mla(layer, ConversionConfig(method="svd", kv_lora_rank=8, qk_rope_head_dim=34))
    with pytest.raises(ValueError, match=r"kv_lora_rank must be at most 48"):
        gqa_to_mla(layer, ConversionConfig(method="svd", kv_lora_rank=49, qk_rope_head_dim=4))
    highest = ConversionConfig(
        method="svd", kv_lora_rank=41, qk_rope_head_dim=12, rope_frequencies="highest", rope_residual="drop"
    )
    with pytest.raises(ValueError, match=r"kv_lora_rank must be at most 40, .* \(2 kv heads x \(4 \+ 16\)"):
        gqa_to_mla(layer, highest)
    with pytest.raises(ValueError, match=r"calibration inputs must have width d_model=48, got 47"):
        gqa_to_mla(layer, ConversionConfig(kv_lora_rank=8, qk_rope_head_dim=4), torch.zeros(4, 47))
    with pytest.raises(ValueError, match="unknown conversion method 'lora'; choose one of svd, pca, merge"):
        ConversionConfig(method="lora", kv_lora_rank=8, qk_rope_head_dim=4)
    with pytest.raises(
        ValueError, match="unknown kv_objective 'scores'; choose one of activations, attention"
    ):
        ConversionConfig(kv_lora_rank=8, qk_rope_head_dim=4, kv_objective="scores")
    with pytest.raises(ValueError, match="unknown value_metric 'all'; choose one of heads, group"):
        ConversionConfig(kv_lora_rank=8, qk_rope_head_dim=4, value_metric="all")
    for weight in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"key_weight must be positive and finite, got {weight}"):
            ConversionConfig(kv_lora_rank=8, qk_rope_head_dim=4, kv_objective="attention", key_weight=weight)
    with pytest.raises(ValueError, match="method 'merge' takes kv_heads only"):
        ConversionConfig(method="merge", kv_lora_rank=8, qk_rope_head_dim=4)
    with pytest.raises(ValueError, match="method 'svd' takes kv_lora_rank and qk_rope_head_dim"):
        ConversionConfig(method="svd", kv_heads=1)
    unknown_tokens = torch.full((1, 8), 10**6)  # calibrating on them would raise an IndexError
    with pytest.raises(ValueError, match="kv_lora_rank must be at most 16"):
        model_to_mla(model, ConversionConfig(kv_lora_rank=17, qk_rope_head_dim=16), unknown_tokens)
    mla = LanguageModel(get_preset("debug").model("mla"))
    with pytest.raises(ValueError, match="already uses MLA"):
        model_to_mla(mla, ConversionConfig(method="svd", kv_lora_rank=4, qk_rope_head_dim=4))
