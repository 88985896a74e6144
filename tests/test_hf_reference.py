"""Oracle: Hugging Face transformers' `DeepseekV3Attention` / `LlamaAttention` on the same weights.

The HF layers are built from small configs, their weights loaded into latentattn through the public
mapping (`latentattn.hf`), and both run on the same inputs and positions. Tolerance: fp32, 1e-5
relative to the output's scale (different but equivalent reduction orders).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds  # noqa: E402
from transformers.models.llama import modeling_llama as hf_llama  # noqa: E402

from latentattn.hf import (  # noqa: E402
    attention_from_hf,
    attention_state_dict_from_hf,
    attention_state_dict_to_hf,
    mla_config_from_hf,
    mla_config_to_hf,
)

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def deepseek_config(q_lora_rank: int | None, rope_parameters: dict, rope_interleave: bool):
    return transformers.DeepseekV3Config(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        max_position_embeddings=2560,
        rope_parameters=dict(rope_parameters),
        rope_interleave=rope_interleave,
        attn_implementation="eager",
    )


def causal_additive_mask(n_queries: int, n_keys: int, offset: int) -> torch.Tensor:
    keys = torch.arange(n_keys)[None, :]
    queries = torch.arange(n_queries)[:, None] + offset
    return torch.zeros(n_queries, n_keys).masked_fill(keys > queries, float("-inf"))[None, None]


def run_hf(attn, rotary, x, start: int, cache=None):
    positions = torch.arange(start, start + x.shape[1])[None].expand(x.shape[0], -1)
    n_keys = start + x.shape[1]
    # positional: the cache argument is `past_key_values` before transformers 5.2x and `cache` after
    out, _ = attn(x, rotary(x, positions), causal_additive_mask(x.shape[1], n_keys, start), cache)
    return out


def assert_close(actual, expected, rel=1e-5):
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= rel * scale


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("rope", [DEFAULT_ROPE, YARN], ids=["rope", "yarn"])
@pytest.mark.parametrize("rope_interleave", [True, False])
@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_mla_matches_hf_deepseek_v3_full_sequence(q_lora_rank, rope, rope_interleave, mode):
    config = deepseek_config(q_lora_rank, rope, rope_interleave)
    hf_attn = hf_ds.DeepseekV3Attention(config, layer_idx=0).eval()
    for param in hf_attn.parameters():  # HF inits norms to 1; randomise them so the mapping is tested
        torch.nn.init.normal_(param, std=0.3 if param.dim() == 1 else 0.1)
    rotary = hf_ds.DeepseekV3RotaryEmbedding(config)
    ours = attention_from_hf(hf_attn.state_dict(), config).eval()
    assert ours.config.softmax_scale == pytest.approx(hf_attn.scaling)

    x = torch.randn(2, 300, 64)  # longer than YaRN's original length (64): interpolated dims matter
    with torch.no_grad():
        expected = run_hf(hf_attn, rotary, x, start=0)
        assert_close(ours(x, mode=mode), expected)


@pytest.mark.parametrize("rope", [DEFAULT_ROPE, YARN], ids=["rope", "yarn"])
def test_mla_decode_matches_hf_with_its_cache(rope):
    """Prefill 7 tokens, then decode 5 one at a time, both with caches; also compare cache contents."""
    config = deepseek_config(24, rope, rope_interleave=True)
    hf_attn = hf_ds.DeepseekV3Attention(config, layer_idx=0).eval()
    rotary = hf_ds.DeepseekV3RotaryEmbedding(config)
    ours = attention_from_hf(hf_attn.state_dict(), config).eval()
    x = torch.randn(3, 12, 64)
    hf_cache = DynamicCache(config=config)
    cache = ours.new_cache(batch_size=3, max_len=16)
    with torch.no_grad():
        for start, stop in [(0, 7), *((t, t + 1) for t in range(7, 12))]:
            expected = run_hf(hf_attn, rotary, x[:, start:stop], start, hf_cache)
            assert_close(ours(x[:, start:stop], cache), expected)
    # HF caches the same normalised c_KV (its RoPE key is permuted to half-split: compare c_KV only).
    hf_c_kv = hf_cache.layers[0].keys[:, 0]
    assert_close(cache.latent[:, :12, : ours.config.kv_lora_rank], hf_c_kv)


def test_gqa_matches_hf_llama_attention():
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters=dict(DEFAULT_ROPE),
        attn_implementation="eager",
    )
    hf_attn = hf_llama.LlamaAttention(config, layer_idx=0).eval()
    rotary = hf_llama.LlamaRotaryEmbedding(config)
    ours = attention_from_hf(hf_attn.state_dict(), config).eval()
    assert ours.config.kind == "gqa"
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        assert_close(ours(x), run_hf(hf_attn, rotary, x, start=0))


def test_state_dict_names_round_trip():
    config = deepseek_config(24, DEFAULT_ROPE, True)
    hf_state = hf_ds.DeepseekV3Attention(config, layer_idx=0).state_dict()
    ours = attention_state_dict_from_hf(hf_state, mla_config_from_hf(config))
    assert "w_ukv.weight" in ours and "kv_norm.weight" in ours
    assert attention_state_dict_to_hf(ours, mla_config_from_hf(config)).keys() == hf_state.keys()


def test_mismatched_weights_are_named():
    config = deepseek_config(24, DEFAULT_ROPE, True)
    hf_state = hf_ds.DeepseekV3Attention(config, layer_idx=0).state_dict()
    with pytest.raises(ValueError, match="lacks kv_b_proj.weight"):
        attention_from_hf({k: v for k, v in hf_state.items() if k != "kv_b_proj.weight"}, config)
    wrong = dict(hf_state, **{"o_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="shape mismatch for 'w_o.weight'"):
        attention_from_hf(wrong, config)
    with pytest.raises(ValueError, match="unexpected HF attention weight 'rotary.inv_freq'"):
        attention_from_hf(dict(hf_state, **{"rotary.inv_freq": torch.zeros(4)}), config)


def test_deepseek_v2_style_config_json():
    """A 4.x-style config.json dict (rope_theta + rope_scaling with 'type') maps to YaRN as DeepSeek-V2's."""
    config = mla_config_from_hf(
        {
            "hidden_size": 2048,
            "num_attention_heads": 16,
            "kv_lora_rank": 512,
            "q_lora_rank": None,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "rope_theta": 10000,
            "rope_scaling": {
                "type": "yarn",
                "factor": 40,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
        }
    )
    assert config.cache_width == 576 and config.q_lora_rank is None
    mscale = 0.1 * 0.707 * torch.log(torch.tensor(40.0)).item() + 1
    assert config.softmax_scale == pytest.approx(192**-0.5 * mscale**2)
    with pytest.raises(ValueError, match="lacks the field 'kv_lora_rank'"):
        mla_config_from_hf({"hidden_size": 64, "num_attention_heads": 4})


@pytest.mark.parametrize("rope", [DEFAULT_ROPE, YARN], ids=["rope", "yarn"])
def test_mla_config_round_trips_through_hf(rope):
    ours = mla_config_from_hf(deepseek_config(24, rope, rope_interleave=False))
    hf = transformers.DeepseekV3Config(**mla_config_to_hf(ours))
    assert mla_config_from_hf(hf) == ours
