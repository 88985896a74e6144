"""Library validation: bad values raise a ValueError naming the field and the value, and a refused
call changes no state (every cache keeps its lengths, in every layer).

Oracles: the message names the field/value; `cache.lengths` before and after the refused call.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import SMALL_MLA
from latentattn import (
    MLA,
    GQAAttention,
    GQAConfig,
    KVCache,
    LatentCache,
    MLAConfig,
    PagedLatentCache,
    QuantizedLatentCache,
    RopeConfig,
    YarnConfig,
)
from latentattn.calculator import CacheEstimate, ModelSpec, latent_format_bytes
from latentattn.generate import MIN_TEMPERATURE, SamplingConfig, sample_next
from latentattn.model import LanguageModel, ModelCache, ModelConfig, get_preset

SMALL_GQA = GQAConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MLAConfig(d_model="64"), "MLAConfig.d_model must be an integer, got '64' (str)"),
        (lambda: MLAConfig(d_model=64.0), "MLAConfig.d_model must be an integer, got 64.0 (float)"),
        (lambda: MLAConfig(q_lora_rank=True), "MLAConfig.q_lora_rank must be an integer, got True (bool)"),
        (lambda: MLAConfig(norm_eps=math.nan), "MLAConfig.norm_eps must be a finite number, got nan"),
        (lambda: MLAConfig(rope={}), "MLAConfig.rope must be a RopeConfig, got dict"),
        (lambda: GQAConfig(n_heads=True), "GQAConfig.n_heads must be an integer, got True (bool)"),
        (lambda: RopeConfig(theta="1e4"), "RopeConfig.theta must be a finite number, got '1e4' (str)"),
        (lambda: RopeConfig(interleave=1), "RopeConfig.interleave must be True or False, got 1"),
        (lambda: YarnConfig(factor=True), "YarnConfig.factor must be a finite number, got True (bool)"),
        (lambda: YarnConfig(factor=4, mscale=None), "YarnConfig.mscale must be a finite number, got None"),
        (
            lambda: ModelConfig(
                vocab_size=10.0, n_layers=1, d_model=32, d_ff=8, attention=SMALL_GQA, max_seq_len=8
            ),
            "ModelConfig.vocab_size must be an integer, got 10.0 (float)",
        ),
    ],
)
def test_config_types_are_checked_by_field(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_float_fields_take_ints():
    assert MLAConfig(norm_eps=1).norm_eps == 1
    assert RopeConfig(theta=10000, yarn=YarnConfig(factor=4)).yarn.factor == 4


def _layer_and_caches(kind: str) -> tuple[MLA | GQAAttention, list]:
    if kind == "gqa":
        layer = GQAAttention(SMALL_GQA, dtype=torch.float64)
        return layer, [layer.new_cache(2, 8)]
    layer = MLA(SMALL_MLA, dtype=torch.float64)
    paged = PagedLatentCache(SMALL_MLA, 4, block_size=4, dtype=torch.float64)
    paged.new_batch(2)
    return layer, [layer.new_cache(2, 8), layer.new_cache(2, 8, latent_format="int8"), paged]


@pytest.mark.parametrize("kind", ["mla", "gqa"])
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda layer, x, cache: layer(x, cache, mode="bogus"), "'bogus'"),
        (
            lambda layer, x, cache: layer(x, cache, n_new=torch.tensor([True, False])),
            "n_new must be an integer",
        ),
        (lambda layer, x, cache: layer(x, cache, n_new=torch.tensor([1.0, 2.0])), "n_new must be an integer"),
        (lambda layer, x, cache: layer(x[:1], cache), "x holds 1 sequences but the cache holds 2"),
    ],
    ids=["mode", "bool n_new", "float n_new", "batch"],
)
def test_a_refused_call_leaves_the_cache_as_it_was(kind, call, message):
    layer, caches = _layer_and_caches(kind)
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    for cache in caches:
        layer(x, cache)
        with pytest.raises(ValueError, match=message):
            call(layer, x, cache)
        assert cache.lengths.tolist() == [3, 3], type(cache).__name__
        layer(x, cache)  # still aligned: the next step appends at 3
        assert cache.lengths.tolist() == [6, 6]


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_a_batch_of_zero_sequences_is_refused(kind):
    layer, _ = _layer_and_caches(kind)
    with pytest.raises(ValueError, match=r"got a batch of zero sequences \(x has shape \(0, 3, 32\)\)"):
        layer(torch.randn(0, 3, 32, dtype=torch.float64))
    model = LanguageModel(get_preset("debug").model(kind))
    with pytest.raises(ValueError, match="got a batch of zero sequences"):
        model(torch.zeros(0, 3, dtype=torch.long))


def test_a_layer_runs_on_meta_with_its_cache():
    """Caches keep their lengths on the host, so a step reads no device value (README: meta works)."""
    layer = MLA(SMALL_MLA, device="meta")
    x = torch.empty(2, 3, 32, device="meta")
    assert layer(x).shape == (2, 3, 32)
    cache = LatentCache(SMALL_MLA, 2, 8, device="meta")
    assert layer(x, cache, n_new=[3, 1]).device.type == "meta"
    assert cache.sequences.host_lengths == [3, 1]


@pytest.fixture
def model() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(get_preset("debug").model("mla")).eval()


def _other_layers(cache: ModelCache) -> None:
    cache.layers = cache.layers[:1]


def _a_kv_layer(cache: ModelCache) -> None:
    cache.layers[1] = KVCache(SMALL_GQA, 2, 5, sequences=cache)


@pytest.mark.parametrize(
    ("break_cache", "n_tokens", "kwargs", "message"),
    [
        (None, 3, {}, "cache overflow: sequence 0 holds 3 tokens and gets 3 more, past max_len=5"),
        (None, 1, {"mode": "bogus"}, "MLA model: unknown attention mode 'bogus'"),
        (None, 1, {"n_new": torch.tensor([True, True])}, "n_new must be an integer"),
        (_other_layers, 1, {}, "the model cache of 2 layers"),
        (_a_kv_layer, 1, {}, "cache layer 1 is a KVCache"),
    ],
    ids=["full", "mode", "bool n_new", "layers missing", "wrong kind"],
)
def test_a_model_step_is_checked_before_any_layer_writes(model, break_cache, n_tokens, kwargs, message):
    cache = model.new_cache(2, 5)
    with torch.no_grad():
        model(torch.randint(0, 100, (2, 3)), cache)
        if break_cache is not None:
            break_cache(cache)
        with pytest.raises(ValueError, match=message):
            model(torch.randint(0, 100, (2, n_tokens)), cache, **kwargs)
    assert cache.lengths.tolist() == [3, 3]


def test_a_model_cache_layer_runs_no_step_alone(model):
    """All layers of a model cache share one set of lengths: one layer stepping alone would advance the
    others' too, so it is refused."""
    cache = model.new_cache(2, 16)
    with torch.no_grad(), pytest.raises(ValueError, match="one layer of a model cache"):
        model.blocks[0].attn(torch.randn(2, 1, 64), cache.layers[0])
    assert cache.lengths.tolist() == [0, 0]


@pytest.mark.parametrize("kv_lora_rank", [16, 96, 128, 200, 256, 320, 384, 640])
def test_one_8_bit_layout_rule_for_the_calculator_and_the_cache(kv_lora_rank):
    """d_c <= 128 or a multiple of 128 (one fp32 scale per 128 values); the same bytes either way."""
    config = MLAConfig(d_model=32, n_heads=2, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=8)
    spec = ModelSpec("custom", "mla", 1, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=8)
    valid = kv_lora_rank <= 128 or kv_lora_rank % 128 == 0
    if not valid:
        message = f"must be at most 128 or a multiple of it, got {kv_lora_rank}"
        for build in (
            lambda: QuantizedLatentCache(config, 1, 4, format="int8"),
            lambda: latent_format_bytes(kv_lora_rank, 8),
            lambda: CacheEstimate(spec, latent_format="int8"),
        ):
            with pytest.raises(ValueError, match=message):
                build()
        return
    cache = QuantizedLatentCache(config, 1, 4, format="int8")
    estimate = CacheEstimate(spec, latent_format="int8")
    assert cache.bytes_per_token == latent_format_bytes(kv_lora_rank, 8) == estimate.bytes_per_token_per_layer


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0, 1e-310, 1e-40, True, "1"])
def test_sampling_refuses_temperatures_it_cannot_sample_with(temperature):
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or a finite number >= 1.18e-38"):
        SamplingConfig(temperature=temperature)


def test_the_smallest_temperature_samples_the_likeliest_token():
    """Logits divided by a tiny temperature overflow unless shifted by their maximum first."""
    logits = torch.tensor([[10.0, 30.0, 29.0], [-5.0, -7.0, 50.0]])
    sampled = sample_next(
        logits, SamplingConfig(temperature=MIN_TEMPERATURE), torch.Generator().manual_seed(0)
    )
    assert sampled.tolist() == [1, 2]
