"""The project's name lists, one registry each: attention kinds, 8-bit latent formats and dtype
spellings, plus the one lookup of a name in a table. Configs, the library, the calculator and every CLI
option (`choices`, help) read them from here, so a new name is one entry. Importing this module needs
no torch (the calculator imports it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, TypeVar

_T = TypeVar("_T")

AttentionKind = Literal["mha", "gqa", "mqa", "mla"]
CacheFamily = Literal["kv", "latent"]


_GQA, _MLA = "latentattn.attention:GQAAttention", "latentattn.attention:MLA"
_GQA_CONFIG, _MLA_CONFIG = "latentattn.config:GQAConfig", "latentattn.config:MLAConfig"


@dataclass(frozen=True)
class KindSpec:
    """One attention kind: what it caches per token and layer.

    `layer` is the attention module (`"module:Class"`, built by `attention.build_attention` from a
    config whose `kind` is this one) and `config` that config's class (checkpoints rebuild it from its
    fields); `family` names the cache it writes ("kv": K and V rows, "latent":
    `[c_KV | k_pe]`); `cache_fields` are the shape fields (`calculator.ModelSpec`) that size its cache;
    `kv_heads`, for the kv family, gives the K/V heads cached from (n_h query heads, n_g groups).
    """

    summary: str
    layer: str
    config: str
    family: CacheFamily
    cache_fields: tuple[str, ...]
    kv_heads: Callable[[int, int], int] | None = None


ATTENTION_KINDS: Mapping[AttentionKind, KindSpec] = MappingProxyType(
    {
        "mha": KindSpec(
            "K and V for every query head", _GQA, _GQA_CONFIG, "kv", ("n_heads", "head_dim"), lambda h, g: h
        ),
        "gqa": KindSpec(
            "K and V for each group of heads",
            _GQA,
            _GQA_CONFIG,
            "kv",
            ("n_kv_heads", "head_dim"),
            lambda h, g: g,
        ),
        "mqa": KindSpec(
            "one K and one V shared by all heads", _GQA, _GQA_CONFIG, "kv", ("head_dim",), lambda h, g: 1
        ),
        "mla": KindSpec(
            "the latent c_KV and one RoPE key",
            _MLA,
            _MLA_CONFIG,
            "latent",
            ("kv_lora_rank", "qk_rope_head_dim"),
        ),
    }
)
"""Keyed in the order of `AttentionKind`."""


def kv_heads(kind: AttentionKind, n_heads: int, n_groups: int) -> int:
    """K/V heads a kv-family `kind` caches with `n_heads` query heads and `n_groups` groups (gqa)."""
    spec = lookup(ATTENTION_KINDS, kind, "attention kind")
    if spec.kv_heads is None:
        raise ValueError(f"{kind} caches a latent, not K/V heads")
    return spec.kv_heads(n_heads, n_groups)


def kv_kind(n_heads: int, n_kv_heads: int) -> AttentionKind:
    """The kind of a K/V layer: mha when every query head has its own K/V head, mqa when one serves all,
    gqa between."""
    if n_kv_heads == n_heads:
        return "mha"
    return "mqa" if n_kv_heads == 1 else "gqa"


@dataclass(frozen=True)
class LatentFormat:
    """A stored MLA latent layout: its `encoding` (`"module:Class"`, a `caches.base.LatentEncoding`
    taking `(config, format_name)`) and the `storage` dtype it keeps c_KV in (a torch dtype's name).
    FlashMLA's 8-bit layout (`EightBitLatent`): c_KV in one byte with one fp32 scale per group of
    values, k_pe in bf16."""

    storage: str
    summary: str
    encoding: str = "latentattn.caches.quantized:EightBitLatent"


LATENT_FORMATS: Mapping[str, LatentFormat] = MappingProxyType(
    {
        "int8": LatentFormat("int8", "c_KV rounded to int8"),
        "fp8": LatentFormat("float8_e4m3fn", "c_KV in fp8 e4m3"),
    }
)
"""8-bit latent formats (`caches.quantized`); None (or "full" where a name is needed) keeps the latent
in the compute dtype."""


DTYPES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "float32": ("fp32",),
        "bfloat16": ("bf16",),
        "float16": ("fp16",),
        "float64": ("fp64",),
    }
)
"""Canonical dtype names (torch's) and the short spellings accepted for them."""


def dtype_spellings(names: tuple[str, ...] = tuple(DTYPES)) -> tuple[str, ...]:
    """Every accepted spelling of the canonical dtypes `names`, each name before its aliases: an
    argparse `choices`."""
    return tuple(spelling for name in names for spelling in (name, *DTYPES[name]))


def canonical_dtype(text: str, allowed: tuple[str, ...] = tuple(DTYPES), owner: str = "dtype") -> str:
    """The canonical name of the dtype spelled `text` ("fp32" → "float32"), one of `allowed`."""
    for name in allowed:
        if text == name or text in DTYPES[name]:
            return name
    raise ValueError(f"{owner} must be one of {', '.join(dtype_spellings(allowed))}, got {text!r}")


def torch_dtype(text: str):  # -> torch.dtype; torch is imported only here
    """The torch dtype spelled `text` (any spelling in `DTYPES`)."""
    import torch

    return getattr(torch, canonical_dtype(text))


def resolve(path: str) -> Any:
    """The object a registry entry names as `"module:attribute"`, imported on first use."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def lookup(table: Mapping[str, _T], name: str, what: str) -> _T:
    """`table[name]`, exact names only; else a ValueError naming `what` and the choices."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return table[name]
