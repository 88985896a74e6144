"""Every name list has one source (`latentattn.registry`) and every user of a list agrees with it.
Oracles: the registry's own entries; torch's dtype names; the CLI's parsed choices."""

from __future__ import annotations

import argparse
import typing

import pytest
import torch

from latentattn import bench, evaluate
from latentattn.attention import build_attention
from latentattn.caches.quantized import latent_encoding
from latentattn.cli import build_parser
from latentattn.config import MLAConfig
from latentattn.model import get_preset
from latentattn.registry import (
    ATTENTION_KINDS,
    DTYPES,
    LATENT_FORMATS,
    AttentionKind,
    canonical_dtype,
    dtype_spellings,
    lookup,
    resolve,
    torch_dtype,
)


def _choices(verb: str, option: str) -> tuple[str, ...]:
    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return tuple(next(a for a in verbs.choices[verb]._actions if option in a.option_strings).choices)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_each_attention_kind_builds_its_layer_and_cache_family(kind):
    spec = ATTENTION_KINDS[kind]
    layer = build_attention(get_preset("debug").attention(kind))
    assert type(layer) is resolve(spec.layer) and layer.config.kind == kind
    assert layer.new_cache(1, 4).family == spec.family
    assert (spec.kv_heads is None) == (spec.family == "latent")


def test_attention_kind_lists_are_the_registry():
    kinds = tuple(ATTENTION_KINDS)
    assert kinds == typing.get_args(AttentionKind)
    assert _choices("train", "--attn") == _choices("cache", "--attn") == kinds
    assert tuple(k for k in kinds if ATTENTION_KINDS[k].family == "kv") == bench.KV_IMPLS


def test_latent_format_lists_are_the_registry():
    formats = tuple(LATENT_FORMATS)
    assert _choices("cache", "--latent-format") == _choices("generate", "--latent-format") == formats
    assert ("none", "full", *formats) == evaluate.FORMATS
    assert {f"mla-{name}" for name in formats} <= set(bench.IMPLS)
    config = MLAConfig(d_model=64, n_heads=2, kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8)
    for name, spec in LATENT_FORMATS.items():
        assert latent_encoding(config, torch.float32, name).entries["c_kv"][1] == getattr(torch, spec.storage)


def test_dtype_spellings_map_to_one_canonical_name():
    for name, aliases in DTYPES.items():
        assert isinstance(getattr(torch, name), torch.dtype)
        assert {canonical_dtype(spelling) for spelling in (name, *aliases)} == {name}
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("float64") is torch.float64
    assert _choices("train", "--dtype") == dtype_spellings(("float32", "bfloat16"))
    assert _choices("bench", "--dtype") == dtype_spellings(bench.DTYPES)
    assert bench.BenchConfig(dtypes=("fp32", "bf16")).dtypes == ("float32", "bfloat16")
    with pytest.raises(ValueError, match=r"dtype must be one of float32, fp32, .*, got 'fp12'"):
        canonical_dtype("fp12")


def test_lookup_names_the_table_and_its_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'tiny'; choose one of debug, small"):
        lookup({"debug": 1, "small": 2}, "tiny", "preset")
