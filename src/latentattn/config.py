"""Typed, frozen configs for the attention layers.

Paper symbols (DeepSeek-V2 §2.1) next to the field names used here and in HF configs:

    d      d_model            hidden_size
    n_h    n_heads            num_attention_heads
    d'_c   q_lora_rank        q_lora_rank (None: plain query projection W_Q)
    d_c    kv_lora_rank       kv_lora_rank
    d_h    qk_nope_head_dim   qk_nope_head_dim   (content part of q/k)
    d_h^R  qk_rope_head_dim   qk_rope_head_dim   (decoupled RoPE part, one key shared by all heads)
    d_v    v_head_dim         v_head_dim
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from latentattn.registry import AttentionKind, kv_heads, kv_kind


class ModelWidth(Protocol):
    """The shape every attention kind of a model is built at (`model.Preset` is one); each config
    class's `at_width(kind, width)` reads the fields its kind needs."""

    d_model: int
    n_heads: int
    head_dim: int
    n_kv_heads: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    q_lora_rank: int | None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_ints(owner: str, **fields: object) -> None:
    """Raise a ValueError naming `owner.field` and its value unless every value is an `int` (not a bool,
    a float or a string)."""
    for name, value in fields.items():
        _require(
            isinstance(value, int) and not isinstance(value, bool),
            f"{owner}.{name} must be an integer, got {value!r} ({type(value).__name__})",
        )


def check_numbers(owner: str, **fields: object) -> None:
    """Raise a ValueError naming `owner.field` and its value unless every value is a finite int or float
    (not a bool or a string)."""
    for name, value in fields.items():
        _require(
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
            f"{owner}.{name} must be a finite number, got {value!r} ({type(value).__name__})",
        )


def _check_bools(owner: str, **fields: object) -> None:
    for name, value in fields.items():
        _require(isinstance(value, bool), f"{owner}.{name} must be True or False, got {value!r}")


def check_positive_ints(owner: str, **fields: object) -> None:
    """`check_ints`, and every value > 0."""
    check_ints(owner, **fields)
    for name, value in fields.items():
        _require(value > 0, f"{owner}.{name} must be positive, got {value!r}")


def check_positive_numbers(owner: str, **fields: object) -> None:
    """`check_numbers`, and every value > 0."""
    check_numbers(owner, **fields)
    for name, value in fields.items():
        _require(value > 0, f"{owner}.{name} must be positive, got {value!r}")


def yarn_mscale(factor: float, m: float) -> float:
    """YaRN's attention temperature `0.1·m·ln(factor) + 1` (1 when not extending)."""
    return 1.0 if factor <= 1.0 else 0.1 * m * math.log(factor) + 1.0


@dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension (Peng et al. 2023) as DeepSeek-V2/V3 configure it.

    The softmax scale is multiplied by `yarn_mscale(factor, mscale_all_dim)²` (by 1 when
    `mscale_all_dim` is 0). cos/sin are multiplied by `yarn_mscale(factor, mscale) /
    yarn_mscale(factor, mscale_all_dim)` when both are set (1 for DeepSeek, where they are equal),
    else by plain YaRN's `yarn_mscale(factor, 1)` — the rules of DeepSeek's and HF's code.
    """

    factor: float
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    truncate: bool = True

    def __post_init__(self) -> None:
        check_positive_numbers(
            "YarnConfig", factor=self.factor, beta_fast=self.beta_fast, beta_slow=self.beta_slow
        )
        check_positive_ints(
            "YarnConfig", original_max_position_embeddings=self.original_max_position_embeddings
        )
        check_numbers("YarnConfig", mscale=self.mscale, mscale_all_dim=self.mscale_all_dim)
        _check_bools("YarnConfig", truncate=self.truncate)
        _require(
            self.beta_fast > self.beta_slow,
            f"YarnConfig.beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow})",
        )

    @property
    def softmax_factor(self) -> float:
        """Multiplier of the softmax scale: `mscale(factor, mscale_all_dim)²`, or 1."""
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

    @property
    def rope_amplitude(self) -> float:
        """Multiplier of cos/sin (HF's `attention_factor`)."""
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor, 1.0)


@dataclass(frozen=True)
class Llama3RopeConfig:
    """Llama 3.1's RoPE scaling (HF `rope_type: llama3`): frequencies whose wavelength exceeds
    `original_max_position_embeddings / low_freq_factor` are divided by `factor`, those below
    `original_max_position_embeddings / high_freq_factor` kept, the ones between blended smoothly."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        check_positive_numbers(
            "Llama3RopeConfig",
            factor=self.factor,
            low_freq_factor=self.low_freq_factor,
            high_freq_factor=self.high_freq_factor,
        )
        check_positive_ints(
            "Llama3RopeConfig", original_max_position_embeddings=self.original_max_position_embeddings
        )
        _require(
            self.high_freq_factor > self.low_freq_factor,
            f"Llama3RopeConfig.high_freq_factor ({self.high_freq_factor}) must exceed "
            f"low_freq_factor ({self.low_freq_factor})",
        )


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding, with at most one context-extension scheme: `yarn`, `llama3`, or
    linear position interpolation (`linear_factor` > 1 divides every frequency, HF `rope_type: linear`).

    `interleave=True` rotates adjacent pairs (x0, x1), (x2, x3), … as DeepSeek's reference does;
    `False` rotates the two halves (x_i, x_{i+d/2}) as Llama/HF `rotate_half` does. Queries and cached
    keys always share one convention, so scores match either reference on the same weights.

    `frequencies`, when given, lists the inverse frequency of each rotary pair in place of
    `theta^(-2i/dim)` (theta unused, no other scheme): a model converted to MLA keeps its source's
    frequencies (`latentattn.convert`), possibly repeated once per source kv head, which no theta can
    express and DeepSeek-V3's checkpoint format cannot hold.
    """

    theta: float = 10000.0
    interleave: bool = True
    yarn: YarnConfig | None = None
    llama3: Llama3RopeConfig | None = None
    linear_factor: float = 1.0
    frequencies: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_positive_numbers("RopeConfig", theta=self.theta, linear_factor=self.linear_factor)
        _check_bools("RopeConfig", interleave=self.interleave)
        for name, kind in (("yarn", YarnConfig), ("llama3", Llama3RopeConfig)):
            value = getattr(self, name)
            _require(
                value is None or isinstance(value, kind),
                f"RopeConfig.{name} must be a {kind.__name__} or None, got {type(value).__name__}",
            )
        schemes = [name for name in ("yarn", "llama3", "frequencies") if getattr(self, name) is not None]
        schemes += ["linear_factor"] if self.linear_factor != 1.0 else []
        _require(len(schemes) <= 1, f"RopeConfig takes one scaling scheme, got {' and '.join(schemes)}")
        if self.frequencies is not None:
            object.__setattr__(self, "frequencies", tuple(float(f) for f in self.frequencies))  # JSON lists
            _require(
                len(self.frequencies) > 0 and all(f > 0 for f in self.frequencies),
                "RopeConfig.frequencies must be a non-empty list of positive inverse frequencies",
            )


def _check_rope(owner: str, rope: object) -> None:
    _require(isinstance(rope, RopeConfig), f"{owner}.rope must be a RopeConfig, got {type(rope).__name__}")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2 §2.1.2-2.1.3). Defaults: DeepSeek-V2-Lite's layer."""

    d_model: int = 2048
    n_heads: int = 16
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope: RopeConfig = field(default_factory=RopeConfig)
    norm_eps: float = 1e-6
    bias: bool = False
    """Biases on the query projection (w_q, or w_uq with q-LoRA), w_dkv and w_o: how a model converted
    from a source with q/k/v biases (Qwen2) keeps them (`latentattn.convert`). DeepSeek-V3 has none."""

    def __post_init__(self) -> None:
        check_positive_ints(
            "MLAConfig",
            d_model=self.d_model,
            n_heads=self.n_heads,
            kv_lora_rank=self.kv_lora_rank,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
        )
        check_positive_numbers("MLAConfig", norm_eps=self.norm_eps)
        _check_bools("MLAConfig", bias=self.bias)
        check_ints("MLAConfig", qk_nope_head_dim=self.qk_nope_head_dim)
        _require(
            self.qk_nope_head_dim >= 0,
            f"MLAConfig.qk_nope_head_dim must be >= 0 (0: every key dim rotary), got {self.qk_nope_head_dim}",
        )
        if self.q_lora_rank is not None:
            check_positive_ints("MLAConfig", q_lora_rank=self.q_lora_rank)
        _check_rope("MLAConfig", self.rope)
        _require(
            self.qk_rope_head_dim % 2 == 0,
            f"MLAConfig.qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}",
        )

    @classmethod
    def at_width(cls, kind: AttentionKind, width: ModelWidth) -> MLAConfig:
        """MLA at a shared width (`model.Preset`): nope and value heads of `head_dim`, a RoPE key of
        `qk_rope_head_dim`, a latent of `kv_lora_rank` (DeepSeek-V2's ratios 128 / 64 / 512)."""
        return cls(
            d_model=width.d_model,
            n_heads=width.n_heads,
            kv_lora_rank=width.kv_lora_rank,
            q_lora_rank=width.q_lora_rank,
            qk_nope_head_dim=width.head_dim,
            qk_rope_head_dim=width.qk_rope_head_dim,
            v_head_dim=width.head_dim,
        )

    @property
    def kind(self) -> AttentionKind:
        return "mla"

    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head in the naive path: d_h + d_h^R (192 in DeepSeek-V2)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Cached numbers per token per layer: d_c + d_h^R (576 in DeepSeek-V2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """`(d_h + d_h^R)^-0.5`, times YaRN's `mscale²` when context extension is on."""
        factor = self.rope.yarn.softmax_factor if self.rope.yarn else 1.0
        return self.qk_head_dim**-0.5 * factor


@dataclass(frozen=True)
class GQAConfig:
    """Grouped-query attention: MHA when `n_kv_heads == n_heads`, MQA when `n_kv_heads == 1`."""

    d_model: int = 2048
    n_heads: int = 16
    n_kv_heads: int = 16
    head_dim: int = 128
    rope: RopeConfig = field(default_factory=lambda: RopeConfig(interleave=False))
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2); the output projection has none."""

    def __post_init__(self) -> None:
        check_positive_ints(
            "GQAConfig",
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
        )
        _check_rope("GQAConfig", self.rope)
        _check_bools("GQAConfig", qkv_bias=self.qkv_bias)
        _require(
            self.n_heads % self.n_kv_heads == 0,
            f"GQAConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
        )
        _require(self.head_dim % 2 == 0, f"GQAConfig.head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def at_width(cls, kind: AttentionKind, width: ModelWidth) -> GQAConfig:
        """`kind` (mha, gqa, mqa) at a shared width (`model.Preset`): heads of `head_dim`, and the K/V
        heads the kind caches (`n_kv_heads` groups for gqa)."""
        return cls(
            d_model=width.d_model,
            n_heads=width.n_heads,
            n_kv_heads=kv_heads(kind, width.n_heads, width.n_kv_heads),
            head_dim=width.head_dim,
        )

    @property
    def kind(self) -> AttentionKind:
        return kv_kind(self.n_heads, self.n_kv_heads)

    @property
    def cache_width(self) -> int:
        """Cached numbers per token per layer: 2·n_kv_heads·head_dim (K and V)."""
        return 2 * self.n_kv_heads * self.head_dim

    @property
    def softmax_scale(self) -> float:
        factor = self.rope.yarn.softmax_factor if self.rope.yarn else 1.0
        return self.head_dim**-0.5 * factor


AttentionConfig = MLAConfig | GQAConfig


def mha_counterpart(config: AttentionConfig) -> GQAConfig:
    """MHA of the same shape: the yardstick of every "N× smaller cache" figure here (DeepSeek-V2 §2.1.1,
    2·n_h·d_h per token and layer). The same d_model and n_h query heads, each with its own K and V of
    the per-head width d_h: `head_dim` for the GQA family, `v_head_dim` for MLA (DeepSeek-V2's d_h = 128,
    as the calculator's `mha-deepseek-v2-heads`)."""
    head_dim = config.v_head_dim if isinstance(config, MLAConfig) else config.head_dim
    return GQAConfig(
        d_model=config.d_model,
        n_heads=config.n_heads,
        n_kv_heads=config.n_heads,
        head_dim=head_dim,
        rope=config.rope if isinstance(config, GQAConfig) else RopeConfig(interleave=False),
    )
