"""A decoder-only language model whose attention is MLA or any of the MHA/GQA/MQA family.

Architecture only (no training code). Blocks are pre-norm, Llama / DeepSeek-V3 (dense layers) style:

    h = x + attn(RMSNorm(x));  out = h + mlp(RMSNorm(h));  logits = lm_head(RMSNorm(out))

with a SwiGLU MLP and no biases, so a block maps onto an HF Llama or DeepSeek-V3 dense layer.

Notation: B batch, T new tokens, vocab vocabulary size, d d_model, F d_ff (V is the value width
d_v, as in attention.py).

With a cache (`new_cache`: contiguous; `new_paged_cache`: paged, every attention kind), each forward
step is planned once by the cache (positions, mask, write slots: `latentattn.caches.Step`) and every
layer reads that plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentattn.attention import MODES, Mode, build_attention, check_mode, linear_rows, project
from latentattn.caches import AttentionCache, ModelCache, PagedModelCache, Step, Workspace
from latentattn.config import (
    AttentionConfig,
    check_positive_ints,
    check_positive_numbers,
)
from latentattn.layers import RMSNorm
from latentattn.registry import ATTENTION_KINDS, AttentionKind, lookup, resolve

Device = torch.device | str | None


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the language model; `attention.d_model` must equal `d_model`."""

    vocab_size: int
    n_layers: int
    d_model: int
    d_ff: int
    attention: AttentionConfig
    max_seq_len: int
    tie_embeddings: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        names = ("vocab_size", "n_layers", "d_model", "d_ff", "max_seq_len")
        check_positive_ints("ModelConfig", **{name: getattr(self, name) for name in names})
        check_positive_numbers("ModelConfig", norm_eps=self.norm_eps)
        if getattr(self.attention, "kind", None) not in ATTENTION_KINDS:
            raise ValueError(
                "ModelConfig.attention must be the config of an attention kind (MLAConfig, GQAConfig, "
                f"... see registry.ATTENTION_KINDS), got {type(self.attention).__name__}"
            )
        if self.attention.d_model != self.d_model:
            raise ValueError(
                f"ModelConfig.attention.d_model ({self.attention.d_model}) must equal "
                f"d_model ({self.d_model})"
            )


@dataclass(frozen=True)
class Preset:
    """One width for every attention kind, so `mha`, `gqa`, `mqa` and `mla` variants compare fairly.

    All kinds share d_model, n_heads and the per-head width `head_dim`. GQA uses `n_kv_heads` groups
    (MQA one, MHA `n_heads`). MLA uses `qk_nope_head_dim = v_head_dim = head_dim`, a decoupled RoPE key
    of `qk_rope_head_dim` and a latent of `kv_lora_rank` (DeepSeek-V2 ratios: 128 / 64 / 512).
    """

    vocab_size: int
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    head_dim: int
    n_kv_heads: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    max_seq_len: int
    q_lora_rank: int | None = None

    def attention(self, kind: AttentionKind) -> AttentionConfig:
        """The attention config of `kind` at this preset's width (its config class's `at_width`)."""
        return resolve(lookup(ATTENTION_KINDS, kind, "attention kind").config).at_width(kind, self)

    def model(
        self, kind: AttentionKind, *, vocab_size: int | None = None, max_seq_len: int | None = None
    ) -> ModelConfig:
        """The model config with attention `kind`; `vocab_size` (the trained tokenizer's) and
        `max_seq_len` (the training context) override the preset's."""
        return ModelConfig(
            vocab_size=vocab_size or self.vocab_size,
            n_layers=self.n_layers,
            d_model=self.d_model,
            d_ff=self.d_ff,
            attention=self.attention(kind),
            max_seq_len=max_seq_len or self.max_seq_len,
        )


PRESETS: MappingProxyType[str, Preset] = MappingProxyType(
    {
        # Tiny, for tests: a forward/backward pass takes milliseconds.
        "debug": Preset(
            vocab_size=384,
            n_layers=2,
            d_model=64,
            d_ff=128,
            n_heads=4,
            head_dim=16,
            n_kv_heads=2,
            kv_lora_rank=32,
            qk_rope_head_dim=8,
            max_seq_len=64,
        ),
        # The `latentattn demo` model (~2.6M parameters): learns Python-looking text from the standard
        # library on a CPU (measured times and losses: README, docs/training.md).
        "small": Preset(
            vocab_size=4096,
            n_layers=4,
            d_model=192,
            d_ff=512,
            n_heads=4,
            head_dim=48,
            n_kv_heads=2,
            kv_lora_rank=96,
            qk_rope_head_dim=24,
            max_seq_len=256,
        ),
    }
)


def get_preset(name: str) -> Preset:
    """The preset called exactly `name`."""
    return lookup(PRESETS, name, "preset")


class SwiGLU(nn.Module):
    """`W_down(silu(W_gate x) · W_up x)`; HF names gate_proj, up_proj, down_proj."""

    def __init__(
        self, d_model: int, d_ff: int, *, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype, "bias": False}
        self.w_gate = nn.Linear(d_model, d_ff, **factory)
        self.w_up = nn.Linear(d_model, d_ff, **factory)
        self.w_down = nn.Linear(d_ff, d_model, **factory)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, d] → [B, T, d]; a decode step's few rows by the head-product kernel (`project`)."""
        return project(self.w_down, F.silu(project(self.w_gate, x)) * project(self.w_up, x))


class Block(nn.Module):
    """Pre-norm residual block: attention then SwiGLU MLP."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        recompute_kv: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, device=device, dtype=dtype)
        self.attn = build_attention(config.attention, recompute_kv=recompute_kv, device=device, dtype=dtype)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, device=device, dtype=dtype)
        self.mlp = SwiGLU(config.d_model, config.d_ff, device=device, dtype=dtype)

    def forward(self, x: Tensor, cache: AttentionCache | None, step: Step | None, mode: Mode) -> Tensor:
        """x: [B, T, d] → [B, T, d]; `cache`: this layer's, over the model cache's `step`."""
        x = x + self.attn(self.attn_norm(x), cache, mode=mode, step=step)
        return x + self.mlp(self.mlp_norm(x))


class LanguageModel(nn.Module):
    """Token ids `[B, T]` → next-token logits `[B, T, vocab]`.

    Weights (HF Llama / DeepSeek-V3 names in parentheses): embed (embed_tokens), blocks[i].attn_norm
    (input_layernorm), blocks[i].attn (self_attn), blocks[i].mlp_norm (post_attention_layernorm),
    blocks[i].mlp (mlp), norm (norm), lm_head (lm_head; absent when tied to embed).

    `recompute_kv` (training, MLA): keep only the latent for backward and recompute per-head K/V.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        recompute_kv: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model, device=device, dtype=dtype)
        self.blocks = nn.ModuleList(
            Block(config, recompute_kv=recompute_kv, device=device, dtype=dtype)
            for _ in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps, device=device, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.d_model, config.vocab_size, bias=False, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, output projections of residual branches scaled by 1/√(2·layers)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                is_residual_out = name.endswith(("attn.w_o", "mlp.w_down"))
                nn.init.normal_(module.weight, std=residual_std if is_residual_out else 0.02)

    def new_cache(
        self, batch_size: int, max_len: int, *, latent_format: str | None = None, static: bool = False
    ) -> ModelCache:
        """Empty contiguous caches, one per layer over one set of lengths, for `batch_size` sequences of
        up to `max_len` tokens; MLA models may store the latents in an 8-bit `latent_format` ("int8",
        "fp8"); `static` reads all `max_len` rows every step (shapes that do not grow, for
        `torch.compile`)."""
        if max_len > self.config.max_seq_len:
            raise ValueError(
                f"cache max_len {max_len} exceeds the model's max_seq_len {self.config.max_seq_len}"
            )
        self._check_latent_format(latent_format)
        weight = self.embed.weight
        cache = ModelCache(batch_size, max_len, device=weight.device, static=static)
        shared = {"workspace": Workspace(), "latent_format": latent_format} if latent_format else {}
        cache.layers = [
            block.attn.new_cache(batch_size, max_len, static=static, sequences=cache, **shared)
            for block in self.blocks
        ]
        return cache

    def new_paged_cache(
        self,
        *,
        budget_bytes: int | None = None,
        num_blocks: int | None = None,
        block_size: int = 64,
        latent_format: str | None = None,
    ) -> PagedModelCache:
        """An empty paged cache for every layer: one block allocator and block table per sequence, one
        pool per layer, sized by `budget_bytes` (the most blocks that fit, over all layers) or
        `num_blocks`. MLA models may store the latents in 8 bits (`latent_format` "int8", "fp8")."""
        self._check_latent_format(latent_format)
        weight = self.embed.weight
        return PagedModelCache(
            [block.attn.config for block in self.blocks],
            budget_bytes=budget_bytes,
            num_blocks=num_blocks,
            block_size=block_size,
            latent_format=latent_format,
            device=weight.device,
            dtype=weight.dtype,
        )

    @property
    def cache_family(self) -> str:
        """The cache its attention kind writes: "latent" or "kv" (`registry.ATTENTION_KINDS`)."""
        return ATTENTION_KINDS[self.config.attention.kind].family

    def _check_latent_format(self, latent_format: str | None) -> None:
        if latent_format is not None and self.cache_family != "latent":
            raise ValueError(
                f"8-bit latent caches need an MLA model, this one is {self.config.attention.kind}"
            )

    def forward(
        self,
        tokens: Tensor,
        cache: ModelCache | PagedModelCache | None = None,
        *,
        n_new: Tensor | None = None,
        mode: Mode = "auto",
    ) -> Tensor:
        """tokens: [B, T] → logits [B, T, vocab]. With a cache: one step over its batch (token t of sequence
        b at position `lengths[b] + t`, `n_new[b]` of the T real), planned once for all layers."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, tokens], got shape {tuple(tokens.shape)}")
        attention = self.config.attention
        modes = MODES if self.cache_family == "latent" else ("auto", "naive")
        check_mode(mode, modes, f"{attention.kind.upper()} model")
        if cache is not None:
            self._check_cache(cache, tokens)
        start = 0 if cache is None else max(cache.host_lengths, default=0)
        if start + tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"{start + tokens.shape[1]} positions exceed the model's "
                f"max_seq_len {self.config.max_seq_len}"
            )
        if cache is None:
            if n_new is not None:
                raise ValueError("n_new (right padding per sequence) needs a cache")
            return self.forward_step(tokens, None, None, mode)
        with cache.stepping(tokens.shape[1], n_new) as step:
            return self.forward_step(tokens, cache, step, mode)

    def forward_step(
        self,
        tokens: Tensor,
        cache: ModelCache | PagedModelCache | None,
        step: Step | None,
        mode: Mode = "auto",
    ) -> Tensor:
        """The forward over a step the cache already planned (`cache.stepping(T, n_new)`), with no host
        work: what `torch.compile` should compile for decoding over a `static` cache."""
        x = self.embed(tokens)  # [B, T, d]
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i], step, mode)
        x = self.norm(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return linear_rows(x, weight)  # [B, T, vocab]

    def _check_cache(self, cache: ModelCache | PagedModelCache, tokens: Tensor) -> None:
        """What a layer would refuse, checked before the step is planned: one cache layer per block, of
        the layers' attention family, on the tokens' device, for this batch."""
        if not isinstance(cache, ModelCache | PagedModelCache) or len(cache.layers) != len(self.blocks):
            raise ValueError(
                f"cache must be the model cache of {len(self.blocks)} layers "
                "from new_cache() or new_paged_cache()"
            )
        family = self.cache_family
        for i, layer in enumerate(cache.layers):
            if layer.family != family or layer.device != tokens.device:
                raise ValueError(
                    f"cache layer {i} is a {type(layer).__name__} on {layer.device}; this model needs "
                    f"a {family} cache layer on {tokens.device}"
                )
        if cache.batch_size != tokens.shape[0]:
            raise ValueError(
                f"tokens hold {tokens.shape[0]} sequences but the cache holds {cache.batch_size}"
            )

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component: embeddings (with an untied LM head), attention, mlp, norms, total."""
        counts = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0}
        for name, parameter in self.named_parameters():
            if name.startswith(("embed.", "lm_head.")):
                component = "embeddings"
            elif ".attn." in name:
                component = "attention"  # including MLA's internal q/kv norms
            elif ".mlp." in name:
                component = "mlp"
            else:
                component = "norms"
            counts[component] += parameter.numel()
        counts["total"] = sum(counts.values())
        return counts
