"""KV-cache calculator: how many numbers and bytes each token leaves in the cache, and what fits.

Per token, summed over l layers (DeepSeek-V2 paper, §2.1 and Table 1), in elements:

    MHA  2·n_h·d_h·l     K and V for every head
    GQA  2·n_g·d_h·l     K and V for each of n_g groups of heads
    MQA  2·d_h·l         one K and one V shared by all heads
    MLA  (d_c + d_R)·l   the latent c_KV plus the decoupled RoPE key, shared by all heads

An element stored at `bits` bits takes `bits / 8` bytes (payload only: quantization scales are not
counted), except in an MLA latent format (`latent_format`), which counts its scales: FlashMLA's 8-bit
layout stores c_KV in int8 or fp8 with one fp32 scale per 128 values and k_pe in bf16, 656 bytes per
token per layer for d_c = 512, d_R = 64. A cache for B sequences of T tokens holds `B·T` tokens; all
layers cache every token (no sliding windows). Importing this module needs neither torch nor matplotlib.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

from rich.console import Console
from rich.table import Table

from latentattn.config import AttentionConfig, MLAConfig
from latentattn.registry import ATTENTION_KINDS, LATENT_FORMATS, AttentionKind, kv_heads, kv_kind, lookup

DEFAULT_CONTEXT = 128 * 1024
"""128K tokens, DeepSeek-V2's context length: long enough that the cache, not the weights, binds."""
DEFAULT_BASELINE = "mha-deepseek-v2-heads"
"""Plain MHA with DeepSeek-V2's heads and layers: the paper's own yardstick (32,768 vs 576 per layer)."""
MAX_BITS = 64
LATENT_GROUP_SIZE = 128


def latent_group_size(kv_lora_rank: int, group_size: int | None = None) -> int:
    """Values of c_KV per fp32 scale in an 8-bit latent: `group_size`, by default FlashMLA's 128 (or
    d_c when smaller). Groups tile d_c exactly, so the default needs d_c <= 128 or a multiple of 128;
    the one rule for `QuantizedLatentCache` and the calculator."""
    if group_size is None:
        group_size = min(LATENT_GROUP_SIZE, kv_lora_rank)
        if kv_lora_rank % group_size:
            raise ValueError(
                f"an 8-bit latent keeps one fp32 scale per {LATENT_GROUP_SIZE} values of c_KV: kv_lora_rank "
                f"(d_c) must be at most {LATENT_GROUP_SIZE} or a multiple of it, got {kv_lora_rank}"
            )
    if group_size <= 0 or kv_lora_rank % group_size:
        raise ValueError(
            f"group_size ({group_size}) must be positive and divide kv_lora_rank ({kv_lora_rank})"
        )
    return group_size


def latent_format_bytes(kv_lora_rank: int, qk_rope_head_dim: int, group_size: int | None = None) -> int:
    """Bytes per token per layer of an 8-bit latent: d_c bytes, 4 per group scale (`latent_group_size`),
    2 per RoPE value (bf16)."""
    return (
        kv_lora_rank
        + 4 * (kv_lora_rank // latent_group_size(kv_lora_rank, group_size))
        + 2 * qk_rope_head_dim
    )


# Each spec field: paper symbol and the `latentattn cache` flag that sets it.
_FIELDS = MappingProxyType(
    {
        "n_layers": ("l", "--layers"),
        "n_heads": ("n_h", "--heads"),
        "n_kv_heads": ("n_g", "--kv-heads"),
        "head_dim": ("d_h", "--head-dim"),
        "kv_lora_rank": ("d_c", "--kv-lora-rank"),
        "qk_rope_head_dim": ("d_R", "--rope-dim"),
    }
)
_SIZE_UNITS = MappingProxyType(
    {
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
    }
)


def _unused_fields(kind: AttentionKind) -> list[str]:
    """Shape fields only the other cache families size their caches by (`n_heads` is informative)."""
    family = ATTENTION_KINDS[kind].family
    others = {
        name for spec in ATTENTION_KINDS.values() if spec.family != family for name in spec.cache_fields
    }
    return [name for name in _FIELDS if name in others - {"n_heads"}]


def _field_label(name: str) -> str:
    symbol, flag = _FIELDS[name]
    return f"{name} ({symbol}, {flag})"


@dataclass(frozen=True)
class ModelSpec:
    """The attention shapes that size a model's KV cache (all l layers alike).

    `n_heads` is informative except for MHA, where it sets the cache; `n_kv_heads` is n_g (GQA only;
    MHA implies n_h, MQA 1); MLA uses `kv_lora_rank` d_c and `qk_rope_head_dim` d_R instead of heads.
    """

    name: str
    kind: AttentionKind
    n_layers: int
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        owner = f"model '{self.name}'"
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(
                f"{owner}: attention kind must be one of {', '.join(ATTENTION_KINDS)}, got {self.kind!r}"
            )
        spec = ATTENTION_KINDS[self.kind]
        for name in spec.cache_fields:
            if getattr(self, name) is None:
                raise ValueError(f"{owner}: {self.kind} needs {_field_label(name)}")
        for name in _unused_fields(self.kind):
            if getattr(self, name) is not None:
                raise ValueError(f"{owner}: {self.kind} has no use for {_field_label(name)}")
        for name in _FIELDS:
            value = getattr(self, name)
            minimum = 0 if name == "qk_rope_head_dim" else 1
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < minimum
            ):
                bound = "a non-negative" if minimum == 0 else "a positive"
                raise ValueError(f"{owner}: {_field_label(name)} must be {bound} integer, got {value!r}")
        implied = None
        if spec.family == "kv" and "n_kv_heads" not in spec.cache_fields:  # mha: n_h, mqa: 1
            implied = self.kv_heads
        if implied is not None and self.n_kv_heads not in (None, implied):
            raise ValueError(
                f"{owner}: {self.kind} caches {implied} kv heads, got n_kv_heads={self.n_kv_heads} (see gqa)"
            )
        if self.kind == "gqa" and self.n_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"{owner}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )

    @classmethod
    def from_attention(cls, config: AttentionConfig, n_layers: int, name: str = "custom") -> ModelSpec:
        """The spec of `n_layers` layers of `config` (an `MLAConfig` or `GQAConfig`)."""
        if isinstance(config, MLAConfig):
            return cls(
                name,
                "mla",
                n_layers,
                n_heads=config.n_heads,
                kv_lora_rank=config.kv_lora_rank,
                qk_rope_head_dim=config.qk_rope_head_dim,
            )
        return cls(
            name,
            config.kind,
            n_layers,
            n_heads=config.n_heads,
            n_kv_heads=config.n_kv_heads,
            head_dim=config.head_dim,
        )

    @property
    def kv_heads(self) -> int | None:
        """K/V heads cached per layer: n_h (MHA), n_g (GQA), 1 (MQA); None for MLA (no per-head K/V)."""
        if ATTENTION_KINDS[self.kind].family != "kv":
            return None
        return kv_heads(self.kind, self.n_heads, self.n_kv_heads)

    @property
    def elements_per_token_per_layer(self) -> int:
        """Cached numbers per token per layer: 2·kv_heads·d_h, or d_c + d_R for MLA."""
        if ATTENTION_KINDS[self.kind].family == "latent":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.kv_heads * self.head_dim

    @property
    def elements_per_token(self) -> int:
        """Cached numbers per token over all layers."""
        return self.elements_per_token_per_layer * self.n_layers

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "attn": self.kind,
            "layers": self.n_layers,
            "heads": self.n_heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "source": self.source,
        }


_PAPER = "DeepSeek-V2 paper (arXiv:2405.04434)"
PRESETS: MappingProxyType[str, ModelSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ModelSpec(
                "deepseek-v2",
                "mla",
                60,
                n_heads=128,
                kv_lora_rank=512,
                qk_rope_head_dim=64,
                source="https://huggingface.co/deepseek-ai/DeepSeek-V2/blob/main/config.json",
            ),
            ModelSpec(
                "deepseek-v2-lite",
                "mla",
                27,
                n_heads=16,
                kv_lora_rank=512,
                qk_rope_head_dim=64,
                source="https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json",
            ),
            # 61 main layers; the multi-token-prediction module (num_nextn_predict_layers) is not counted.
            ModelSpec(
                "deepseek-v3",
                "mla",
                61,
                n_heads=128,
                kv_lora_rank=512,
                qk_rope_head_dim=64,
                source="https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json",
            ),
            # The dense baseline of DeepSeek-V2's 93.3% KV-cache reduction (DeepSeek LLM, arXiv:2401.02954).
            ModelSpec(
                "deepseek-67b",
                "gqa",
                95,
                n_heads=64,
                n_kv_heads=8,
                head_dim=128,
                source="https://huggingface.co/deepseek-ai/deepseek-llm-67b-base/blob/main/config.json",
            ),
            ModelSpec(
                "llama-2-7b",
                "mha",
                32,
                n_heads=32,
                head_dim=128,
                source="https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json",
            ),
            ModelSpec(
                "llama-3-8b",
                "gqa",
                32,
                n_heads=32,
                n_kv_heads=8,
                head_dim=128,
                source="https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json",
            ),
            ModelSpec(
                "llama-3-70b",
                "gqa",
                80,
                n_heads=64,
                n_kv_heads=8,
                head_dim=128,
                source="https://huggingface.co/meta-llama/Meta-Llama-3-70B/blob/main/config.json",
            ),
            # v0.1 attends through a 4096-token sliding window; the calculator assumes full attention.
            ModelSpec(
                "mistral-7b",
                "gqa",
                32,
                n_heads=32,
                n_kv_heads=8,
                head_dim=128,
                source="https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json",
            ),
            # multi_query=true: 71 query heads of width 4544/71 = 64 share one K/V head.
            ModelSpec(
                "falcon-7b",
                "mqa",
                32,
                n_heads=71,
                head_dim=64,
                source="https://huggingface.co/tiiuae/falcon-7b/blob/main/config.json",
            ),
            # Counterfactual: DeepSeek-V2's 60 layers with plain MHA over its 128 heads of d_h = 128.
            ModelSpec(
                "mha-deepseek-v2-heads",
                "mha",
                60,
                n_heads=128,
                head_dim=128,
                source=f"{_PAPER} §2.1.1: MHA caches 2·n_h·d_h·l elements per token",
            ),
        )
    }
)


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.endswith(".json") or text.startswith(".")


def resolve_model(name_or_path: str) -> ModelSpec:
    """A preset by exact name, else an HF `config.json` (or a folder holding one) at that path."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    if Path(name_or_path).exists() or _looks_like_path(name_or_path):
        return load_hf_config(name_or_path)
    raise ValueError(
        f"unknown model {name_or_path!r}: not a preset ({', '.join(PRESETS)}) nor a config.json path"
    )


def _hf_int(config: dict[str, Any], key: str, file: Path) -> int:
    value = config.get(key)
    if value is None:
        raise ValueError(f"{file}: config lacks the field '{key}'")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{file}: field '{key}' must be a positive integer, got {value!r}")
    return value


def load_hf_config(path: str | Path) -> ModelSpec:
    """The cache shape of a Hugging Face `config.json` (or a folder holding one).

    MLA when `kv_lora_rank` is set (`num_hidden_layers`, `kv_lora_rank`, `qk_rope_head_dim`); else the
    MHA/GQA/MQA family from `num_attention_heads`, `num_key_value_heads` (absent: one per head, or one
    in all with Falcon's `multi_query`) and `head_dim` (absent: `hidden_size / num_attention_heads`).
    Multimodal configs are read from their `text_config`. Only these fields are read, so any RoPE
    scaling or bias setting is accepted (unlike `latentattn.hf`, which builds the layers).
    """
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {file}")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not a JSON config ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    name = file.resolve().parent.name if file.name == "config.json" else file.stem
    common = {"name": name, "n_layers": _hf_int(config, "num_hidden_layers", file), "source": str(file)}
    if config.get("kv_lora_rank") is not None:
        has_heads = config.get("num_attention_heads") is not None
        return ModelSpec(
            kind="mla",
            n_heads=_hf_int(config, "num_attention_heads", file) if has_heads else None,
            kv_lora_rank=_hf_int(config, "kv_lora_rank", file),
            qk_rope_head_dim=_hf_int(config, "qk_rope_head_dim", file),
            **common,
        )
    n_heads = _hf_int(config, "num_attention_heads", file)
    if config.get("num_key_value_heads") is not None:
        n_kv_heads = _hf_int(config, "num_key_value_heads", file)
    else:
        n_kv_heads = 1 if config.get("multi_query") else n_heads
    if config.get("head_dim") is not None:
        head_dim = _hf_int(config, "head_dim", file)
    else:
        hidden = _hf_int(config, "hidden_size", file)
        if hidden % n_heads:
            raise ValueError(
                f"{file}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({n_heads})"
            )
        head_dim = hidden // n_heads
    return ModelSpec(
        kind=kv_kind(n_heads, n_kv_heads), n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, **common
    )


def spec_from_flags(
    attn: str | None,
    *,
    layers: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    kv_lora_rank: int | None = None,
    qk_rope_head_dim: int | None = None,
) -> ModelSpec | None:
    """The custom model `--attn … --layers …` describes; None when no such flag is given."""
    shape = {
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "head_dim": head_dim,
        "kv_lora_rank": kv_lora_rank,
        "qk_rope_head_dim": qk_rope_head_dim,
    }
    if attn is None:
        given = [
            _FIELDS[name][1] for name, value in {"n_layers": layers, **shape}.items() if value is not None
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)}: custom-model flags need --attn ({', '.join(ATTENTION_KINDS)})"
            )
        return None
    if attn not in ATTENTION_KINDS:
        raise ValueError(f"--attn must be one of {', '.join(ATTENTION_KINDS)}, got {attn!r}")
    if layers is None:
        raise ValueError(f"a custom {attn} model needs {_field_label('n_layers')}")
    return ModelSpec(f"custom-{attn}", attn, layers, **shape)


def parse_size(text: str) -> int:
    """Bytes in `text` like '80GiB', '1.5 TB' or '512MB': B, KB/MB/GB/TB (powers of 1000) and
    KiB/MiB/GiB/TiB (powers of 1024), any letter case; fractions are floored to whole bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(
            f"cannot read the size {text!r}: give a number and a unit, e.g. 80GiB or 40GB "
            f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    size = int(Decimal(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"the size {text!r} must be at least 1 byte")
    return size


def parse_context(text: str) -> int:
    """Tokens in `text` like '4096', '128K' (= 131,072) or '1M' (= 1,048,576): K and M are binary."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match:
        raise ValueError(f"cannot read the context length {text!r}: give tokens, e.g. 4096, 128K or 1M")
    tokens = int(match.group(1)) * {"": 1, "k": 2**10, "m": 2**20}[match.group(2).lower()]
    if tokens <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {text!r}")
    return tokens


def _whole_or_fraction(bits: int) -> int | float:
    """`bits / 8` bytes, as an int when whole."""
    return bits // 8 if bits % 8 == 0 else bits / 8


@dataclass(frozen=True)
class CacheEstimate:
    """`model`'s cache at `bits` per element, for `batch` sequences of `context` tokens each.

    With `budget_bytes`, `max_context` is the longest context per sequence whose cache fits the budget
    (cache only: weights and activations are not counted).
    """

    model: ModelSpec
    bits: int = 16
    context: int = DEFAULT_CONTEXT
    batch: int = 1
    budget_bytes: int | None = None
    latent_format: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer from 1 to {MAX_BITS}, got {self.bits!r}")
        if self.latent_format is not None:
            lookup(LATENT_FORMATS, self.latent_format, "latent format")
            if self.model.kind != "mla":
                raise ValueError(f"latent format {self.latent_format} applies to MLA, not {self.model.name}")
            try:
                latent_format_bytes(self.model.kv_lora_rank, self.model.qk_rope_head_dim)
            except ValueError as error:
                raise ValueError(
                    f"model '{self.model.name}', latent format {self.latent_format}: {error}"
                ) from None
        for name in ("context", "batch", "budget_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def elements_per_token_per_layer(self) -> int:
        return self.model.elements_per_token_per_layer

    @property
    def elements_per_token(self) -> int:
        return self.model.elements_per_token

    @property
    def storage(self) -> str:
        """How an element is stored: '16' (bits), or a latent format such as 'fp8'."""
        return self.latent_format or str(self.bits)

    @property
    def _bits_per_token_per_layer(self) -> int:
        if self.latent_format is not None:
            return 8 * latent_format_bytes(self.model.kv_lora_rank, self.model.qk_rope_head_dim)
        return self.elements_per_token_per_layer * self.bits

    @property
    def bytes_per_token_per_layer(self) -> int | float:
        return _whole_or_fraction(self._bits_per_token_per_layer)

    @property
    def bytes_per_token(self) -> int | float:
        """Bytes per token over all layers."""
        return _whole_or_fraction(self._bits_per_token_per_layer * self.model.n_layers)

    @property
    def cache_bytes(self) -> int | float:
        """Bytes of the whole cache: batch · context · bytes_per_token."""
        return _whole_or_fraction(
            self.batch * self.context * self._bits_per_token_per_layer * self.model.n_layers
        )

    @property
    def max_context(self) -> int | None:
        """Tokens per sequence that fit `budget_bytes` for the whole batch (None without a budget)."""
        if self.budget_bytes is None:
            return None
        return 8 * self.budget_bytes // (self.batch * self._bits_per_token_per_layer * self.model.n_layers)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.model.as_dict(),
            "bits": self.bits,
            "latent_format": self.latent_format,
            "elements_per_token_per_layer": self.elements_per_token_per_layer,
            "elements_per_token": self.elements_per_token,
            "bytes_per_token_per_layer": self.bytes_per_token_per_layer,
            "bytes_per_token": self.bytes_per_token,
            "cache_bytes": self.cache_bytes,
            "max_context": self.max_context,
        }


@dataclass(frozen=True)
class Comparison:
    """Estimates for several models at one context, batch and budget, each against one baseline."""

    rows: tuple[CacheEstimate, ...]
    baseline: CacheEstimate

    def reduction(self, row: CacheEstimate) -> float:
        """`1 − bytes/token ÷ baseline bytes/token` (negative when `row` caches more)."""
        return 1 - row.bytes_per_token / self.baseline.bytes_per_token

    def factor(self, row: CacheEstimate) -> float:
        """How many times smaller than the baseline `row`'s cache is."""
        return self.baseline.bytes_per_token / row.bytes_per_token

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: context, batch, budget_bytes, baseline (an estimate) and one entry per model."""
        return {
            "context": self.baseline.context,
            "batch": self.baseline.batch,
            "budget_bytes": self.baseline.budget_bytes,
            "baseline": self.baseline.as_dict(),
            "models": [
                {
                    **row.as_dict(),
                    "reduction_vs_baseline": self.reduction(row),
                    "factor_vs_baseline": self.factor(row),
                }
                for row in self.rows
            ],
        }


def compare(
    models: Iterable[ModelSpec],
    *,
    baseline: ModelSpec | None = None,
    bits: int = 16,
    baseline_bits: int = 16,
    latent_format: str | None = None,
    context: int = DEFAULT_CONTEXT,
    batch: int = 1,
    budget_bytes: int | None = None,
) -> Comparison:
    """Each model's cache at `bits`, against `baseline` (default: MHA with DeepSeek-V2's heads) at
    `baseline_bits`, for `batch` sequences of `context` tokens and an optional memory budget.
    `latent_format` (int8, fp8) stores the MLA models' latents in FlashMLA's 8-bit layout instead (the
    others keep `bits`; a ValueError when no model is MLA)."""
    if not isinstance(baseline_bits, int) or not 1 <= baseline_bits <= MAX_BITS:
        raise ValueError(f"baseline_bits must be an integer from 1 to {MAX_BITS}, got {baseline_bits!r}")
    models = tuple(models)
    if latent_format is not None and not any(model.kind == "mla" for model in models):
        names = ", ".join(model.name for model in models)
        raise ValueError(
            f"latent format {latent_format} stores MLA latents and no model here is MLA ({names}); "
            "--bits 8 counts an 8-bit K/V cache"
        )
    template = CacheEstimate(
        baseline or PRESETS[DEFAULT_BASELINE],
        bits=baseline_bits,
        context=context,
        batch=batch,
        budget_bytes=budget_bytes,
    )
    rows = tuple(
        replace(
            template, model=model, bits=bits, latent_format=latent_format if model.kind == "mla" else None
        )
        for model in models
    )
    return Comparison(rows=rows, baseline=template)


def format_bytes(size: float) -> str:
    """`size` bytes in binary units, three significant digits: '25.3 KiB', '8.44 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    if unit == "B":
        return f"{size:,.4g} B"
    return f"{size:.3g} {unit}" if size < 1000 else f"{size:,.0f} {unit}"


def _number(value: int | float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.3f}".rstrip("0")


def comparison_table(comparison: Comparison) -> Table:
    """A rich table: one row per model, then the baseline unless it is already one of them."""
    base = comparison.baseline
    title = f"KV cache for batch {base.batch} × context {base.context:,} tokens"
    if base.budget_bytes is not None:
        title += f"; budget {format_bytes(base.budget_bytes)}"
    caption = f"reduction, factor: bytes/token vs the baseline {base.model.name} at {base.storage} bits"
    table = Table(title=title, caption=caption)
    table.add_column("model", no_wrap=True)
    table.add_column("attn")
    headers = ["layers", "elem/tok/layer", "elem/tok", "bits", "B/tok/layer", "B/tok", "cache", "reduction"]
    headers += ["factor"] if base.budget_bytes is None else ["factor", "max context"]
    for header in headers:
        table.add_column(header, justify="right")

    def cells(row: CacheEstimate) -> list[str]:
        values = [
            row.model.name,
            row.model.kind,
            str(row.model.n_layers),
            _number(row.elements_per_token_per_layer),
            _number(row.elements_per_token),
            row.storage,
            _number(row.bytes_per_token_per_layer),
            _number(row.bytes_per_token),
            format_bytes(row.cache_bytes),
            f"{comparison.reduction(row):.1%}",
            f"{comparison.factor(row):.2f}×",
        ]
        return values if row.budget_bytes is None else [*values, _number(row.max_context)]

    for row in comparison.rows:
        table.add_row(*cells(row))
    if base not in comparison.rows:
        table.add_section()
        table.add_row(*cells(base), style="dim")
    return table


def presets_table() -> Table:
    """A rich table of the presets, their cache shapes and sources."""
    table = Table(title="KV-cache presets")
    for header in ("name", "attn", "layers", "heads", "kv heads", "d_h", "d_c", "d_R", "elem/tok/layer"):
        table.add_column(header, justify="left" if header in ("name", "attn") else "right")
    table.add_column("source", overflow="fold")
    for spec in PRESETS.values():
        shape = (spec.n_heads, spec.kv_heads, spec.head_dim, spec.kv_lora_rank, spec.qk_rope_head_dim)
        table.add_row(
            spec.name,
            spec.kind,
            str(spec.n_layers),
            *map(_number, shape),
            _number(spec.elements_per_token_per_layer),
            spec.source,
        )
    return table


def print_table(table: Table) -> None:
    """Print `table` at its natural width, so a narrow terminal or a pipe (80 columns) never cuts numbers."""
    natural = Console(width=10_000).measure(table).maximum
    Console(width=max(natural, len(table.title or ""))).print(table)
