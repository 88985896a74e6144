"""RoPE and YaRN: rotation properties, the two pair layouts, and YaRN's frequency blend."""

from __future__ import annotations

import math

import pytest
import torch

from latentattn import RopeConfig, RotaryEmbedding, YarnConfig
from latentattn.config import Llama3RopeConfig
from latentattn.rope import rope_frequencies, rope_inv_freq


def rotate(config: RopeConfig, x: torch.Tensor, position: int) -> torch.Tensor:
    rope = RotaryEmbedding(x.shape[-1], config)
    return rope(x[None, None, None], torch.tensor([[position]]))[0, 0, 0]


@pytest.mark.parametrize("interleave", [True, False])
def test_scores_depend_only_on_relative_position(interleave):
    config = RopeConfig(interleave=interleave)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    near = rotate(config, q, 10) @ rotate(config, k, 7)
    far = rotate(config, q, 1003) @ rotate(config, k, 1000)
    assert near.item() == pytest.approx(far.item(), rel=1e-9)
    assert rotate(config, q, 5).norm().item() == pytest.approx(q.norm().item(), rel=1e-12)


def test_interleaved_equals_half_split_on_permuted_dims():
    """DeepSeek's adjacent pairs (x0,x1),(x2,x3)… are the half-split rotation of (x0,x2,…,x1,x3,…)."""
    x = torch.randn(8, dtype=torch.float64)
    to_half = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])
    interleaved = rotate(RopeConfig(interleave=True), x, 3)
    half = rotate(RopeConfig(interleave=False), x[to_half], 3)
    torch.testing.assert_close(interleaved[to_half], half)


def test_position_zero_is_identity_and_dtype_is_kept():
    x = torch.randn(8, dtype=torch.bfloat16)
    assert torch.equal(rotate(RopeConfig(), x, 0), x)


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
    yarn = YarnConfig(factor=40.0, original_max_position_embeddings=4096)
    plain, scaled = rope_inv_freq(64, 10000.0), rope_inv_freq(64, 10000.0, yarn)
    assert torch.equal(scaled[:4], plain[:4])  # wavelength << 4096: kept (extrapolated)
    torch.testing.assert_close(scaled[-4:], plain[-4:] / 40.0)  # wavelength >> 4096: divided by factor
    assert ((scaled <= plain) & (scaled >= plain / 40.0 * (1 - 1e-6))).all()


def test_yarn_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    }
    config = transformers.DeepseekV3Config(qk_rope_head_dim=64, rope_parameters=params)
    expected, amplitude = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    yarn = YarnConfig(factor=40.0, mscale=0.707, mscale_all_dim=0.707)
    torch.testing.assert_close(rope_inv_freq(64, 10000.0, yarn).float(), expected, rtol=1e-6, atol=0)
    assert yarn.rope_amplitude == pytest.approx(amplitude)


def test_yarn_scales():
    deepseek = YarnConfig(factor=40.0, mscale=1.0, mscale_all_dim=1.0)
    assert deepseek.rope_amplitude == 1.0
    assert deepseek.softmax_factor == pytest.approx((0.1 * math.log(40.0) + 1) ** 2)
    plain = YarnConfig(factor=4.0, mscale=0.0, mscale_all_dim=0.0)  # Llama-style YaRN: scale cos/sin only
    assert plain.softmax_factor == 1.0
    assert plain.rope_amplitude == pytest.approx(0.1 * math.log(4.0) + 1)
    assert YarnConfig(factor=1.0).softmax_factor == 1.0


def test_frequencies_survive_module_dtype_casts():
    rope = RotaryEmbedding(16, RopeConfig()).to(torch.bfloat16)
    x = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    exact = RotaryEmbedding(16, RopeConfig())
    assert torch.equal(rope(x, torch.tensor([[5000]])), exact(x, torch.tensor([[5000]])))


@pytest.mark.parametrize(
    ("params", "rope"),
    [
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            RopeConfig(theta=500000.0, llama3=Llama3RopeConfig(factor=8.0)),
        ),
        ({"rope_type": "linear", "factor": 4.0}, RopeConfig(theta=500000.0, linear_factor=4.0)),
    ],
    ids=["llama3", "linear"],
)
def test_llama3_and_linear_scaling_match_transformers(params, rope):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=2048, num_attention_heads=16, rope_parameters={**params, "rope_theta": 500000.0}
    )
    expected, amplitude = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    torch.testing.assert_close(rope_frequencies(128, rope).float(), expected, rtol=1e-6, atol=0)
    assert amplitude == 1.0


def test_a_list_of_frequencies_rotates_like_the_theta_it_lists():
    listed = RotaryEmbedding(8, RopeConfig(frequencies=tuple(rope_inv_freq(8, 500.0).tolist())))
    x, positions = torch.randn(2, 5, 3, 8, dtype=torch.float64), torch.arange(5).expand(2, 5)
    assert torch.equal(listed(x, positions), RotaryEmbedding(8, RopeConfig(theta=500.0))(x, positions))
    with pytest.raises(ValueError, match="RopeConfig.frequencies lists 3 pairs, the rotary width 8 has 4"):
        RotaryEmbedding(8, RopeConfig(frequencies=(1.0, 0.5, 0.25)))
