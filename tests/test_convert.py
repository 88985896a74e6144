"""MHA/GQA/MQA → MLA conversion (RoRoPE + joint low-rank K/V).

Oracles: the source layer itself. MQA at full latent rank converts exactly (one kv head: RoRoPE loses
nothing), so the converted MLA must reproduce it to fp64 precision; with several kv heads the error
must shrink as the latent widens; PCA must reconstruct the calibration K/V activations at least as
well as SVD at equal rank (Eckart–Young on the calibration set).
"""

from __future__ import annotations

import pytest
import torch

from conftest import relative_error, relative_l2
from latentattn import GQAAttention, GQAConfig, RopeConfig, YarnConfig
from latentattn.convert import attention_inputs, gqa_to_mla, model_to_mla
from latentattn.model import LanguageModel, get_preset


def source_layer(n_kv_heads: int, interleave: bool = False, seed: int = 0) -> GQAAttention:
    torch.manual_seed(seed)
    config = GQAConfig(
        d_model=48, n_heads=4, n_kv_heads=n_kv_heads, head_dim=16, rope=RopeConfig(interleave=interleave)
    )
    return GQAAttention(config, dtype=torch.float64).eval()


@pytest.mark.parametrize("method", ["svd", "pca"])
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("rope_dim", [2, 8])
def test_mqa_converts_exactly_where_no_rope_is_dropped(method, interleave, rope_dim):
    """Exact cases of an MQA source at full latent rank: (a) single tokens at position 0, where RoPE is
    the identity (checks the factorisation, layouts and kv_norm); (b) any positions when the queries
    ignore the NoPE dims, whose rotation conversion drops (checks RoRoPE and the frequency mapping)."""
    layer = source_layer(n_kv_heads=1, interleave=interleave)
    calibration = torch.randn(256, 48, dtype=torch.float64)
    full_rank = min(2 * 16 - rope_dim, 48)

    def convert():
        return gqa_to_mla(
            layer,
            kv_lora_rank=full_rank,
            rope_dim=rope_dim,
            method=method,
            calibration=calibration,
            norm_linearity=1e14,
        )

    tokens = torch.randn(20, 1, 48, dtype=torch.float64)
    sequence = torch.randn(2, 20, 48, dtype=torch.float64)
    with torch.no_grad():
        mla = convert()
        assert mla.config.cache_width == full_rank + rope_dim
        for mode in ("naive", "absorbed"):
            assert relative_error(mla(tokens, mode=mode), layer(tokens)) <= 1e-9
        kept = [
            dim
            for pair in range(rope_dim // 2)
            for dim in ((2 * pair, 2 * pair + 1) if interleave else (pair, pair + 8))
        ]
        nope = torch.ones(16, dtype=torch.bool)
        nope[kept] = False
        layer.w_q.weight.view(4, 16, 48)[:, nope] = 0
        mla = convert()
        for mode in ("naive", "absorbed"):
            assert relative_error(mla(sequence, mode=mode), layer(sequence)) <= 1e-9


@pytest.mark.parametrize("method", ["svd", "pca"])
def test_error_shrinks_as_the_latent_widens(method):
    layer = source_layer(n_kv_heads=4)
    calibration = torch.randn(512, 48, dtype=torch.float64)
    x = torch.randn(2, 24, 48, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        errors = [
            relative_l2(
                gqa_to_mla(layer, kv_lora_rank=rank, rope_dim=4, method=method, calibration=calibration)(x),
                expected,
            )
            for rank in (8, 24, 48)
        ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.5  # full rank: only the RoPE residual of the kept frequencies is lost


def test_pca_reconstructs_calibration_kv_better_than_svd():
    """On anisotropic inputs, PCA of the activations beats SVD of the weights at equal rank."""
    layer = source_layer(n_kv_heads=2)
    torch.manual_seed(1)
    calibration = torch.randn(1024, 48, dtype=torch.float64) * torch.logspace(-1, 1, 48, dtype=torch.float64)

    def latent_reconstruction_error(method: str) -> float:
        mla = gqa_to_mla(layer, kv_lora_rank=12, rope_dim=4, method=method, calibration=calibration)
        c = mla.config
        rows = mla.w_ukv.weight.view(c.n_heads, -1, c.kv_lora_rank)[::2].reshape(-1, c.kv_lora_rank)
        reconstructed = calibration @ mla.w_dkv.weight[: c.kv_lora_rank].T.double() @ rows.T.double()
        nope = [d for d in range(16) if d not in (0, 1, 8, 9)]
        w_k = layer.w_k.weight.view(2, 16, 48)[:, nope]
        w_v = layer.w_v.weight.view(2, 16, 48)
        target = calibration @ torch.cat([w_k, w_v], dim=1).reshape(-1, 48).T
        return relative_l2(reconstructed, target)

    assert latent_reconstruction_error("pca") < latent_reconstruction_error("svd")


def test_bad_requests_are_named():
    layer = source_layer(n_kv_heads=2)
    with pytest.raises(ValueError, match="method 'pca' needs calibration"):
        gqa_to_mla(layer, kv_lora_rank=8, rope_dim=4, method="pca")
    with pytest.raises(ValueError, match=r"rope_dim must be even and in \(0, head_dim=16\), got 3"):
        gqa_to_mla(layer, kv_lora_rank=8, rope_dim=3, method="svd")
    with pytest.raises(ValueError, match=r"kv_lora_rank must be in \[1, 48\]"):
        gqa_to_mla(layer, kv_lora_rank=49, rope_dim=4, method="svd")
    with pytest.raises(ValueError, match=r"calibration must be \[n, d_model=48\]"):
        gqa_to_mla(layer, kv_lora_rank=8, rope_dim=4, method="pca", calibration=torch.zeros(4, 47))
    yarn = GQAAttention(
        GQAConfig(
            d_model=48, n_heads=4, n_kv_heads=2, head_dim=16, rope=RopeConfig(yarn=YarnConfig(factor=4))
        )
    )
    with pytest.raises(ValueError, match="not YaRN"):
        gqa_to_mla(yarn, kv_lora_rank=8, rope_dim=4, method="svd")


def test_model_conversion_at_full_rank_of_mqa_reproduces_position_zero():
    """MQA at full latent rank converts exactly except for RoPE on the dropped NoPE dims; with one token
    per sequence (position 0, RoPE = identity) the converted model's logits equal the source's."""
    preset = get_preset("debug")
    torch.manual_seed(0)
    model = LanguageModel(preset.model("mqa"), dtype=torch.float64).eval()
    calibration = torch.randint(0, preset.vocab_size, (4, 32))
    head_dim = preset.head_dim
    converted = model_to_mla(
        model, calibration, kv_lora_rank=2 * head_dim - 4, rope_dim=4, method="pca", norm_linearity=1e12
    )
    tokens = torch.randint(0, preset.vocab_size, (16, 1))
    assert relative_error(converted(tokens), model(tokens)) < 1e-5
    assert len(attention_inputs(model, calibration)) == preset.n_layers
    assert converted.config.attention.norm_eps >= max(
        block.attn.kv_norm.weight[0].item() ** 2 * 0.999 for block in converted.blocks
    )
    with pytest.raises(ValueError, match="already uses MLA"):
        model_to_mla(converted, calibration, kv_lora_rank=4, rope_dim=4)
