"""The 8-bit latent cache: FlashMLA's 656 bytes per token, bounded quantization error, MLA decoding.

Oracles: the full-precision latent (per-value error bounds of each format) and `LatentCache` decode
outputs (relative L2 bounds).
"""

from __future__ import annotations

import pytest
import torch

from latentattn import MLA, MLAConfig
from latentattn.caches import QuantizedLatentCache
from latentattn.metrics import relative_l2

V2 = MLAConfig(d_model=5120, n_heads=128, kv_lora_rank=512, q_lora_rank=1536)
SMALL = MLAConfig(
    d_model=64, n_heads=4, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16
)


@pytest.mark.parametrize("format", ["int8", "fp8"])
def test_656_bytes_per_token_for_deepseek_v2(format):
    cache = QuantizedLatentCache(V2, batch_size=2, max_len=8, format=format)
    assert cache.bytes_per_token == 512 + 4 * 4 + 64 * 2
    assert cache.nbytes == 2 * 8 * 656


@pytest.mark.parametrize(("format", "bound"), [("int8", 0.5 / 127), ("fp8", 2**-4)])
def test_round_trip_error_is_within_the_format_bound(format, bound):
    cache = QuantizedLatentCache(SMALL, batch_size=2, max_len=16, format=format, group_size=32)
    latent = torch.randn(2, 16, SMALL.cache_width) * torch.logspace(-2, 2, 16)[None, :, None]
    keys, _ = cache.update(latent)
    stored = keys.full()
    c_kv, k_pe = latent[..., :64], latent[..., 64:]
    groups = c_kv.unflatten(-1, (2, 32))
    error = (stored[..., :64] - c_kv).unflatten(-1, (2, 32)).abs()
    if format == "int8":  # absolute error: half a step of absmax / 127
        assert (error <= bound * groups.abs().amax(-1, keepdim=True) * (1 + 1e-5)).all()
    else:  # relative error of a 3-bit mantissa (normal range)
        assert (error <= bound * groups.abs() + 1e-6 * groups.abs().amax(-1, keepdim=True)).all()
    assert ((stored[..., 64:] - k_pe).abs() <= 2**-8 * k_pe.abs()).all()  # bf16 RoPE key
    assert stored.dtype == torch.float32


@pytest.mark.parametrize(("format", "tolerance"), [("int8", 1e-2), ("fp8", 6e-2)])
def test_decode_through_the_quantized_cache_stays_close(format, tolerance):
    torch.manual_seed(0)
    layer = MLA(SMALL).eval()
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        exact, quantized = (
            layer.new_cache(2, 40),
            QuantizedLatentCache(SMALL, 2, 40, format=format, group_size=32),
        )
        layer(x[:, :32], exact)
        layer(x[:, :32], quantized)
        for t in range(32, 40):
            expected = layer(x[:, t : t + 1], exact)
            got = layer(x[:, t : t + 1], quantized)
            assert 0 < relative_l2(got, expected) <= tolerance


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown latent cache format 'int4'"):
        QuantizedLatentCache(SMALL, 1, 4, format="int4")
    with pytest.raises(
        ValueError, match=r"group_size \(48\) must be positive and divide kv_lora_rank \(64\)"
    ):
        QuantizedLatentCache(SMALL, 1, 4, group_size=48)
    with pytest.raises(ValueError, match="entries are torch.float64 but the cache holds torch.float32"):
        QuantizedLatentCache(SMALL, 1, 4, group_size=32).update(torch.zeros(1, 1, 72, dtype=torch.float64))
