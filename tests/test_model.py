"""The language model: presets, config validation, parameter counts, cached vs uncached forward."""

from __future__ import annotations

import pytest
import torch

from latentattn import GQAConfig, MLAConfig
from latentattn.model import PRESETS, LanguageModel, ModelConfig, get_preset
from latentattn.registry import ATTENTION_KINDS


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


@pytest.mark.parametrize(("kind", "backend"), [("mla", "inductor"), ("gqa", "aot_eager")])
def test_compiled_static_decode_equals_eager_and_does_not_recompile(kind, backend):
    """A `static` cache reads all L rows every step (keys past each length masked), so the compiled
    step (`forward_step`, the host-side plan made outside it) keeps one graph as the context grows.
    Oracle: the eager model over an ordinary cache (fp32, 1e-5); dynamo's recompile guard."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = LanguageModel(get_preset("debug").model(kind)).eval()
    dynamic, static = model.new_cache(2, 12), model.new_cache(2, 12, static=True)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    compiled = torch.compile(model.forward_step, backend=backend)
    mode = "absorbed" if kind == "mla" else "auto"
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        model(prompt, dynamic, n_new=torch.tensor([5, 3]))
        model(prompt, static, n_new=torch.tensor([5, 3]))
        for _ in range(4):
            token = torch.randint(0, model.config.vocab_size, (2, 1))
            expected = model(token, dynamic, mode=mode)
            with static.stepping(1) as step:
                assert step.n_keys == 12 and step.mask.shape == (2, 1, 12)
                got = compiled(token, static, step, mode)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert static.lengths.tolist() == [9, 7]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_a_step_over_caches_on_meta_reads_no_device_values(kind):
    """Planning a step reads only host lengths: a model and its caches on `meta` (tensors without
    values) run ragged steps, so no layer syncs with the device."""
    model = LanguageModel(get_preset("debug").model(kind), device="meta")
    caches = [model.new_cache(2, 16), model.new_paged_cache(num_blocks=8, block_size=4)]
    caches[1].new_batch(2)
    for cache in caches:
        logits = model(torch.zeros(2, 3, dtype=torch.long, device="meta"), cache, n_new=[3, 1])
        assert logits.device.type == "meta" and cache.host_lengths == [3, 1]
        model(torch.zeros(2, 1, dtype=torch.long, device="meta"), cache)
        assert cache.host_lengths == [4, 2]


def test_bad_mode_or_batch_changes_no_cache():
    model = LanguageModel(get_preset("debug").model("mla"))
    cache = model.new_cache(2, 16)
    model(torch.zeros(2, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="unknown attention mode 'bogus'"):
        model(torch.zeros(2, 1, dtype=torch.long), cache, mode="bogus")
    with pytest.raises(ValueError, match="tokens hold 3 sequences but the cache holds 2"):
        model(torch.zeros(3, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="n_new must be an integer tensor"):
        model(torch.zeros(2, 1, dtype=torch.long), cache, n_new=torch.tensor([True, True]))
    assert cache.lengths.tolist() == [3, 3]


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_recompute_kv_is_a_constructor_argument(kind):
    """MLA layers take it (keep only the latent for backward); the K/V family has nothing to recompute."""
    model = LanguageModel(get_preset("debug").model(kind), recompute_kv=True)
    assert all(getattr(block.attn, "recompute_kv", kind != "mla") for block in model.blocks)
