"""The language model: presets, config validation, parameter counts, cached vs uncached forward."""

from __future__ import annotations

import pytest
import torch

from latentattn import GQAConfig, MLAConfig
from latentattn.model import ATTENTION_KINDS, PRESETS, LanguageModel, ModelConfig, get_preset


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match="unknown preset 'tiny'; choose one of debug, small"):
        get_preset("tiny")


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_give_every_kind_the_same_width(name):
    preset = get_preset(name)
    configs = {kind: preset.attention(kind) for kind in ATTENTION_KINDS}
    assert {kind: config.kind for kind, config in configs.items()} == {kind: kind for kind in ATTENTION_KINDS}
    assert {(c.d_model, c.n_heads) for c in configs.values()} == {(preset.d_model, preset.n_heads)}
    assert isinstance(configs["mla"], MLAConfig)
    assert configs["mla"].qk_nope_head_dim == configs["mha"].head_dim == preset.head_dim
    assert configs["mla"].cache_width < configs["gqa"].cache_width < configs["mha"].cache_width


def test_unknown_attention_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown attention kind 'mqa2'"):
        get_preset("debug").attention("mqa2")


def test_model_config_validation_names_field_and_value():
    attention = GQAConfig(d_model=32, n_heads=4, n_kv_heads=4, head_dim=8)
    with pytest.raises(ValueError, match=r"ModelConfig.n_layers must be positive, got 0"):
        ModelConfig(vocab_size=10, n_layers=0, d_model=32, d_ff=64, attention=attention, max_seq_len=8)
    with pytest.raises(ValueError, match=r"attention.d_model \(32\) must equal d_model \(64\)"):
        ModelConfig(vocab_size=10, n_layers=1, d_model=64, d_ff=64, attention=attention, max_seq_len=8)


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_counts_cover_every_parameter(tie):
    config = get_preset("debug").model("mla")
    model = LanguageModel(ModelConfig(**{**config.__dict__, "tie_embeddings": tie}))
    counts = model.parameter_counts()
    d, v, layers = config.d_model, config.vocab_size, config.n_layers
    assert counts["embeddings"] == v * d * (1 if tie else 2)
    assert counts["mlp"] == layers * 3 * d * config.d_ff
    assert counts["norms"] == (2 * layers + 1) * d
    assert counts["attention"] == sum(p.numel() for b in model.blocks for p in b.attn.parameters())
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert ("lm_head.weight" in model.state_dict()) == (not tie)


def test_forward_shape_and_context_limit():
    model = LanguageModel(get_preset("debug").model("gqa"))
    logits = model(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, model.config.vocab_size)
    with pytest.raises(ValueError, match="exceed the model's max_seq_len 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_chunked_cached_forward_matches_the_full_forward(kind):
    """Oracle: one uncached causal forward over the whole sequence; fp64, tolerance 1e-10."""
    torch.manual_seed(0)
    model = LanguageModel(get_preset("debug").model(kind), dtype=torch.float64)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    expected = model(tokens)
    cache = model.new_cache(2, 16)
    chunks = [model(chunk, cache) for chunk in tokens.split([5, 1, 6], dim=1)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, rtol=1e-10, atol=1e-10)
    width = model.config.attention.cache_width
    assert cache.bytes_per_token == model.config.n_layers * width * 8
    assert cache.used_bytes == 2 * 12 * cache.bytes_per_token
    cache.reset()
    assert int(cache.lengths.sum()) == 0


def test_cache_longer_than_the_context_is_rejected():
    model = LanguageModel(get_preset("debug").model("mla"))
    with pytest.raises(ValueError, match="max_len 65 exceeds the model's max_seq_len 64"):
        model.new_cache(1, 65)
