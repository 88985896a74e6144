"""Config validation names the field and the value; derived sizes follow the paper."""

from __future__ import annotations

import pytest

from latentattn import GQAConfig, MLAConfig, RopeConfig, YarnConfig
from latentattn.config import Llama3RopeConfig


def test_deepseek_v2_derived_sizes():
    config = MLAConfig(d_model=5120, n_heads=128, kv_lora_rank=512, q_lora_rank=1536)
    assert config.qk_head_dim == 192
    assert config.cache_width == 576
    assert config.softmax_scale == pytest.approx(192**-0.5)
    assert config.kind == "mla"


@pytest.mark.parametrize(("n_kv_heads", "kind"), [(8, "mha"), (2, "gqa"), (1, "mqa")])
def test_gqa_family_kind_and_cache_width(n_kv_heads, kind):
    config = GQAConfig(d_model=64, n_heads=8, n_kv_heads=n_kv_heads, head_dim=16)
    assert config.kind == kind
    assert config.cache_width == 2 * n_kv_heads * 16


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MLAConfig(kv_lora_rank=0), "MLAConfig.kv_lora_rank must be positive, got 0"),
        (lambda: MLAConfig(q_lora_rank=-3), "MLAConfig.q_lora_rank must be positive, got -3"),
        (lambda: MLAConfig(qk_rope_head_dim=7), "qk_rope_head_dim must be even for RoPE, got 7"),
        (lambda: GQAConfig(n_heads=6, n_kv_heads=4), r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"),
        (lambda: GQAConfig(head_dim=5), "head_dim must be even"),
        (lambda: RopeConfig(theta=0), "RopeConfig.theta must be positive"),
        (lambda: RopeConfig(linear_factor=0), "RopeConfig.linear_factor must be positive"),
        (
            lambda: RopeConfig(yarn=YarnConfig(factor=4), linear_factor=2),
            "RopeConfig takes one scaling scheme, got yarn and linear_factor",
        ),
        (
            lambda: Llama3RopeConfig(factor=8, low_freq_factor=4, high_freq_factor=1),
            r"high_freq_factor \(1\) must exceed low_freq_factor \(4\)",
        ),
        (
            lambda: RopeConfig(frequencies=(1.0, 0.0)),
            "RopeConfig.frequencies must be a non-empty list of positive",
        ),
        (
            lambda: RopeConfig(frequencies=(1.0,), yarn=YarnConfig(factor=2)),
            "RopeConfig takes one scaling scheme, got yarn and frequencies",
        ),
        (lambda: MLAConfig(qk_nope_head_dim=-1), "MLAConfig.qk_nope_head_dim must be >= 0"),
        (
            lambda: YarnConfig(factor=4, beta_fast=1, beta_slow=2),
            r"beta_fast \(1\) must exceed beta_slow \(2\)",
        ),
    ],
)
def test_invalid_configs_name_the_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()
