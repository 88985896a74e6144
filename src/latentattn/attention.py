"""MLA (naive | absorbed) and the MHA/GQA/MQA family behind one call signature.

    layer(x, cache=None, *, n_new=None, mode="auto") -> y

x, y: [B, T, d]. Without a cache the T tokens sit at positions 0..T-1 under a causal mask (training,
a fresh prompt). With a cache, sequence b's tokens sit at `cache.lengths[b] + t`, are appended to the
cache, and attend to everything cached before them (decode, chunked prefill, ragged batches);
`n_new[b]` marks how many of the T tokens of sequence b are real (right padding after them).

Notation: B batch, T new tokens, S keys (cached + new), H heads, C kv_lora_rank (d_c),
R qk_rope_head_dim (d_h^R), N qk_nope_head_dim (d_h), V v_head_dim, G kv heads, D head_dim.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from latentattn.cache import KVCache, LatentCache, LatentKeys, Workspace
from latentattn.config import AttentionConfig, GQAConfig, MLAConfig
from latentattn.layers import RMSNorm, fp32_or_wider
from latentattn.paged_cache import PagedLatentCache
from latentattn.quantized_cache import QuantizedLatentCache
from latentattn.rope import RotaryEmbedding

LATENT_CACHES = (LatentCache, QuantizedLatentCache, PagedLatentCache)
"""Caches MLA can read: contiguous, 8-bit (FlashMLA's layout) and paged."""
Mode = Literal["auto", "naive", "absorbed"]
MODES: tuple[Mode, ...] = ("auto", "naive", "absorbed")


def mla_path_flops(config: MLAConfig, n_queries: int, n_keys: int) -> dict[str, int]:
    """Multiply-add FLOPs of each MLA path for T queries over S keys (per layer, projections excluded).

    naive:    2·H·(N + R + V) per query·key pair, plus decompressing every key: 2·C·H·(N + V) per key.
    absorbed: 2·H·(2C + R) per pair, plus folding W_UK into each query and W_UV into each output:
              2·C·H·(N + V) per query.
    """
    h, c, r = config.n_heads, config.kv_lora_rank, config.qk_rope_head_dim
    n, v = config.qk_nope_head_dim, config.v_head_dim
    pairs = n_queries * n_keys
    fold = 2 * c * h * (n + v)
    return {
        "naive": 2 * h * (n + r + v) * pairs + fold * n_keys,
        "absorbed": 2 * h * (2 * c + r) * pairs + fold * n_queries,
    }


def choose_mla_path(config: MLAConfig, mode: Mode, n_queries: int, n_keys: int, cached: bool) -> str:
    """The path `mode` asks for; `auto` takes naive without a cache, else whichever costs fewer FLOPs.

    Decode (T = 1 over a long prefix) and short chunks go absorbed; fresh prompts go naive. The
    crossover is near T ≈ 170 new tokens for DeepSeek-V2/V3's shapes over a long prefix.
    """
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if not cached:
        return "naive"
    flops = mla_path_flops(config, n_queries, n_keys)
    return "absorbed" if flops["absorbed"] < flops["naive"] else "naive"


def _check_input(x: Tensor, d_model: int, weight: Tensor, cache: object | None, name: str) -> None:
    """Raise a ValueError naming the problem unless `x` is `[B, T > 0, d]` on the layer's device, in its
    dtype (any float dtype under autocast), and `cache` lives on the same device."""
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(
            f"{name} expects x of shape [batch, tokens, d_model={d_model}], got {tuple(x.shape)}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"{name} got zero tokens (x has shape {tuple(x.shape)})")
    if x.device != weight.device:
        raise ValueError(f"{name}: x is on {x.device} but the layer's weights are on {weight.device}")
    if x.dtype != weight.dtype and not (
        x.dtype.is_floating_point and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
    ):
        raise ValueError(f"{name}: x is {x.dtype} but the layer's weights are {weight.dtype}")
    if cache is not None and cache.device != weight.device:
        raise ValueError(
            f"{name}: the cache is on {cache.device} but the layer's weights are on {weight.device}"
        )


def _positions(x: Tensor, cache: object | None, n_new: Tensor | None) -> Tensor:
    """Token positions `[B, T]`: from the cache's per-sequence lengths, else 0..T-1."""
    batch, n_tokens = x.shape[:2]
    if cache is None:
        if n_new is not None:
            raise ValueError(
                "n_new (right padding per sequence) needs a cache; without one the mask is causal"
            )
        return torch.arange(n_tokens, device=x.device).expand(batch, n_tokens)
    if cache.batch_size != batch:
        raise ValueError(f"x holds {batch} sequences but the cache holds {cache.batch_size}")
    return cache.positions(n_tokens)


def causal_mask(n_queries: int, n_keys: int, device: torch.device) -> Tensor:
    """`[1, T, S]` causal mask aligned so the last query sees all keys (query t sees keys <= S - T + t)."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(n_keys - n_queries)[None]


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, enable_gqa: bool = False
) -> Tensor:
    """SDPA over q `[B, H, T, *]`, k/v `[B, G, S, *]`; mask `[B, T, S]`, or None: the aligned causal one."""
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    is_causal = mask is None and n_queries == n_keys
    if mask is None and 1 < n_queries < n_keys:
        mask = causal_mask(n_queries, n_keys, q.device)
    attn_mask = None if mask is None else mask[:, None]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


SCORE_BLOCK_ELEMENTS = 2**22
"""Upper bound on the scores `[B, s, T·H]` of one key block (16 MiB in fp32). Decode at batch 1 with 16
heads reads up to 262K keys of a contiguous cache as one block: one plain softmax, measured faster on
CPU than blocks of 2K-8K keys kept in cache between the two GEMMs."""
MIN_KEY_BLOCK = 64
"""Keys per block at least, however many query rows a long chunk brings."""


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the absorbed path's GEMMs: fp32 (or wider) on every CPU, since bf16/fp16 GEMMs
    ran ~2.5x slower than fp32 on this project's AVX2 machine (no native bf16 units; CPUs with AMX
    may differ, unmeasured); the input dtype elsewhere. bf16 products are exact in fp32, so this
    changes only the summation order and rounding."""
    return fp32_or_wider(dtype) if device.type == "cpu" else dtype


def latent_attention(
    q: Tensor,
    kv: Tensor | LatentKeys,
    mask: Tensor | None,
    scale: float,
    value_width: int,
    block_size: int | None = None,
) -> Tensor:
    """`softmax(q · kvᵀ · scale) · kv[..., :value_width]`: attention with one shared key/value "head".

    q: [B, T, H, W]; kv: [B, S, W] (W = C + R, the value is the first C columns); mask: [B, T, S]
    or None (aligned causal) → [B, T, H, value_width].

    Key-major, so both GEMMs read the cache where it lies: scores are the tall product `keys · qᵀ`
    ([s, W]·[W, T·H], one column per query row), the softmax reduces over keys (dim 1) and the output
    is `valuesᵀ · probs` ([C, s]·[s, T·H]). Keys that fit in one block (`block_size`, default: as
    many as keep the scores under `SCORE_BLOCK_ELEMENTS`, at most `kv.max_block` for caches that
    gather or dequantize) take one softmax; more go block by block with an online softmax whose
    running max carries no gradient (the softmax does not depend on the shift). Scale, softmax and
    accumulation in fp32 (fp64 for fp64 inputs).
    """
    keys = kv if isinstance(kv, LatentKeys) else LatentKeys.of(kv)
    batch, n_tokens, heads, width = q.shape
    n_rows, n_keys = n_tokens * heads, keys.shape[1]
    if mask is None and n_tokens > 1:
        mask = causal_mask(n_tokens, n_keys, q.device)
    acc, gemm = fp32_or_wider(q.dtype), gemm_dtype(q.dtype, q.device)
    rows_t = q.reshape(batch, n_rows, width).transpose(1, 2).to(gemm)  # [B, W, T·H]

    def scores_of(block: Tensor, start: int) -> Tensor:
        """Scaled scores `[B, s, T·H]` of the keys `block: [B, s, W]` from key `start` on; masked: -inf."""
        scores = torch.matmul(block, rows_t).to(acc).mul_(scale)
        if mask is not None:
            keep = mask[:, :, start : start + block.shape[1]].transpose(1, 2)  # [B, s, T]
            scores.view(batch, -1, n_tokens, heads).masked_fill_(~keep[..., None], float("-inf"))
        return scores

    def weighted_values(block: Tensor, probs: Tensor) -> Tensor:
        """`valuesᵀ · probs`: [B, C, s]·[B, s, T·H] → [B, C, T·H]."""
        return torch.matmul(block[..., :value_width].transpose(1, 2), probs.to(gemm)).to(acc)

    blocks = keys.blocks(block_size or max(MIN_KEY_BLOCK, SCORE_BLOCK_ELEMENTS // (batch * n_rows)), gemm)
    first = next(blocks)  # [B, s, W]
    if first.shape[1] == n_keys:  # every query row sees key 0, so no row is fully masked
        out = weighted_values(first, torch.softmax(scores_of(first, 0), dim=1))  # [B, C, T·H]
    else:
        running_max = torch.full((batch, 1, n_rows), float("-inf"), dtype=acc, device=q.device)
        denominator = torch.zeros(batch, 1, n_rows, dtype=acc, device=q.device)
        out = torch.zeros(batch, value_width, n_rows, dtype=acc, device=q.device)
        start = 0
        for block in itertools.chain([first], blocks):
            scores = scores_of(block, start)
            new_max = torch.maximum(running_max, scores.detach().max(dim=1, keepdim=True).values)
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # rows with no key yet stay at 0
            probs = scores.sub_(shift).exp_()
            correction = running_max.sub_(shift).exp_()
            denominator.mul_(correction).add_(probs.sum(dim=1, keepdim=True))
            out.mul_(correction).add_(weighted_values(block, probs))
            running_max, start = new_max, start + block.shape[1]
        out = out / denominator
    return out.transpose(1, 2).reshape(batch, n_tokens, heads, value_width).to(q.dtype)


class MLA(nn.Module):
    """Multi-head Latent Attention, DeepSeek-V2/V3 numerics.

    Weights, named after the paper (HF names in `latentattn.hf`); `config.bias` adds biases to w_q/w_uq,
    w_dkv and w_o:
        w_q  [H·(N+R), d]            W_Q, when q_lora_rank is None; else
        w_dq [d'_c, d], q_norm, w_uq [H·(N+R), d'_c]   W_DQ, RMSNorm on c_Q, W_UQ
        w_dkv [C + R, d]             W_DKV stacked with W_KR (the decoupled RoPE key, shared by all heads)
        kv_norm                      RMSNorm on c_KV only
        w_ukv [H·(N+V), C]           W_UK and W_UV, per head laid out as [k_nope | v]
        w_o  [d, H·V]                W_O
    """

    def __init__(
        self,
        config: MLAConfig,
        *,
        recompute_kv: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = c = config
        self.recompute_kv = recompute_kv
        """Training: keep only the latent for backward and recompute per-head K/V (naive path)."""
        factory = {"device": device, "dtype": dtype, "bias": False}
        biased = {**factory, "bias": c.bias}
        q_width = c.n_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.w_q = nn.Linear(c.d_model, q_width, **biased)
        else:
            self.w_dq = nn.Linear(c.d_model, c.q_lora_rank, **factory)
            self.q_norm = RMSNorm(c.q_lora_rank, c.norm_eps, device=device, dtype=dtype)
            self.w_uq = nn.Linear(c.q_lora_rank, q_width, **biased)
        self.w_dkv = nn.Linear(c.d_model, c.cache_width, **biased)
        self.kv_norm = RMSNorm(c.kv_lora_rank, c.norm_eps, device=device, dtype=dtype)
        self.w_ukv = nn.Linear(c.kv_lora_rank, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), **factory)
        self.w_o = nn.Linear(c.n_heads * c.v_head_dim, c.d_model, **biased)
        self.rope = RotaryEmbedding(c.qk_rope_head_dim, c.rope)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        latent_format: str | None = None,
        workspace: Workspace | None = None,
    ) -> LatentCache | QuantizedLatentCache:
        """An empty latent cache on this layer's device, in its dtype; `latent_format` ("int8", "fp8")
        stores it in FlashMLA's 8-bit layout instead (dequantizing into `workspace`, which a model's
        layers may share)."""
        factory = {"device": self.w_dkv.weight.device, "dtype": self.w_dkv.weight.dtype}
        if latent_format is None:
            return LatentCache(self.config, batch_size, max_len, **factory)
        return QuantizedLatentCache(
            self.config, batch_size, max_len, format=latent_format, workspace=workspace, **factory
        )

    def forward(
        self,
        x: Tensor,
        cache: LatentCache | QuantizedLatentCache | PagedLatentCache | None = None,
        *,
        n_new: Tensor | None = None,
        mode: Mode = "auto",
    ) -> Tensor:
        """x: [B, T, d] → [B, T, d]; see the module docstring for the cache protocol."""
        if cache is not None and not isinstance(cache, LATENT_CACHES):
            names = ", ".join(kind.__name__ for kind in LATENT_CACHES)
            raise ValueError(f"MLA needs a latent cache ({names}), got {type(cache).__name__}")
        _check_input(x, self.config.d_model, self.w_o.weight, cache, "MLA")
        positions = _positions(x, cache, n_new)
        q_nope, q_pe = self.queries(x, positions)
        latent = self.latent(x, positions)
        keys, mask = (LatentKeys.of(latent), None) if cache is None else cache.update(latent, n_new)
        path = choose_mla_path(self.config, mode, x.shape[1], keys.shape[1], cached=cache is not None)
        if path == "absorbed":
            o = self.attend_absorbed(q_nope, q_pe, keys, mask)  # [B, T, H, V]
        elif self.recompute_kv and torch.is_grad_enabled():
            o = checkpoint(self.attend_naive, q_nope, q_pe, keys.full(), mask, use_reentrant=False)
        else:
            o = self.attend_naive(q_nope, q_pe, keys.full(), mask)
        return self.w_o(o.flatten(2))

    def queries(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """`q_nope: [B, T, H, N]` and RoPE'd `q_pe: [B, T, H, R]`."""
        c = self.config
        q = self.w_q(x) if c.q_lora_rank is None else self.w_uq(self.q_norm(self.w_dq(x)))
        q = q.view(*x.shape[:2], c.n_heads, c.qk_head_dim)  # [B, T, H, N + R]
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        return q_nope, self.rope(q_pe, positions)

    def latent(self, x: Tensor, positions: Tensor) -> Tensor:
        """What the cache stores: `[RMSNorm(c_KV) | RoPE(k_pe)]`, shape [B, T, C + R]."""
        c_kv, k_pe = self.w_dkv(x).split([self.config.kv_lora_rank, self.config.qk_rope_head_dim], dim=-1)
        k_pe = self.rope(k_pe[:, :, None, :], positions)[:, :, 0, :]  # one RoPE key for all heads
        return torch.cat([self.kv_norm(c_kv), k_pe], dim=-1)

    def attend_naive(self, q_nope: Tensor, q_pe: Tensor, kv: Tensor, mask: Tensor | None) -> Tensor:
        """Decompress per-head K/V from the latent `kv: [B, S, C + R]` and run SDPA → [B, T, H, V]."""
        c = self.config
        batch, n_keys = kv.shape[:2]
        c_kv, k_pe = kv.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        kv_up = self.w_ukv(c_kv).view(batch, n_keys, c.n_heads, -1)  # [B, S, H, N + V]
        k_nope, v = kv_up.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k_pe = k_pe[:, :, None, :].expand(-1, -1, c.n_heads, -1)  # [B, S, H, R]
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, N + R]
        k = torch.cat([k_nope, k_pe], dim=-1).transpose(1, 2)  # [B, H, S, N + R]
        o = _sdpa(q, k, v.transpose(1, 2), mask, c.softmax_scale)  # [B, H, T, V]
        return o.transpose(1, 2)  # [B, T, H, V]

    def attend_absorbed(
        self, q_nope: Tensor, q_pe: Tensor, kv: Tensor | LatentKeys, mask: Tensor | None
    ) -> Tensor:
        """Attend in latent space: MQA with one (C + R)-wide key per token whose value is c_KV.

        `q_lat = q_nope · W_UK` per head; scores are `[q_lat | q_pe] · [c_KV | k_pe]` for all T·H query
        rows at once against the cache rows (`latent_attention`, blocked for paged and 8-bit caches);
        `o = (softmax · c_KV) · W_UV` per head.
        """
        c = self.config
        heads = c.n_heads
        w_ukv = self.w_ukv.weight.view(heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w_ukv.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)  # [H, N, C], [H, V, C]
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # [B, T, H, C]
        q = torch.cat([q_lat, q_pe], dim=-1)  # [B, T, H, C + R]
        o_lat = latent_attention(q, kv, mask, c.softmax_scale, c.kv_lora_rank)  # [B, T, H, C]
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # [B, T, H, V]


class GQAAttention(nn.Module):
    """Grouped-query attention with RoPE: MHA (G = H), GQA (1 < G < H) or MQA (G = 1).

    Weights: w_q [H·D, d], w_k [G·D, d], w_v [G·D, d] (each with a bias when `qkv_bias`), w_o [d, H·D].
    The cache holds RoPE'd K and V.
    """

    def __init__(
        self,
        config: GQAConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = c = config
        factory = {"device": device, "dtype": dtype}
        self.w_q = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=c.qkv_bias, **factory)
        self.w_k = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias, **factory)
        self.w_v = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias, **factory)
        self.w_o = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False, **factory)
        self.rope = RotaryEmbedding(c.head_dim, c.rope)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty K/V cache on this layer's device, in its dtype."""
        weight = self.w_k.weight
        return KVCache(self.config, batch_size, max_len, device=weight.device, dtype=weight.dtype)

    def forward(
        self,
        x: Tensor,
        cache: KVCache | None = None,
        *,
        n_new: Tensor | None = None,
        mode: Mode = "auto",
    ) -> Tensor:
        """x: [B, T, d] → [B, T, d]. One execution path: `mode` may be "auto" or "naive"."""
        c = self.config
        if mode not in ("auto", "naive"):
            raise ValueError(
                f"{c.kind.upper()} has one execution path; mode must be 'auto' or 'naive', not {mode!r}"
            )
        if cache is not None and not isinstance(cache, KVCache):
            raise ValueError(f"{c.kind.upper()} needs a KVCache, got {type(cache).__name__}")
        _check_input(x, c.d_model, self.w_o.weight, cache, c.kind.upper())
        batch, n_tokens = x.shape[:2]
        positions = _positions(x, cache, n_new)
        q = self.rope(self.w_q(x).view(batch, n_tokens, c.n_heads, c.head_dim), positions)  # [B, T, H, D]
        k = self.rope(self.w_k(x).view(batch, n_tokens, c.n_kv_heads, c.head_dim), positions)  # [B, T, G, D]
        v = self.w_v(x).view(batch, n_tokens, c.n_kv_heads, c.head_dim)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(k, v, n_new)  # [B, S, G, D] each, mask [B, T, S]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, G, S, D]
        if n_tokens == 1 and c.n_kv_heads != c.n_heads:
            # Decode: each group's H/G query heads become its query rows, [B, G, H/G, D], so SDPA reads
            # every K/V head once instead of repeating it per query head (MQA 3x faster at 16K on CPU).
            o = F.scaled_dot_product_attention(
                q.view(batch, c.n_kv_heads, -1, c.head_dim),
                k,
                v,
                attn_mask=None if mask is None else mask[:, None],  # [B, 1, 1, S]
                scale=c.softmax_scale,
            )
        else:
            o = _sdpa(
                q.transpose(1, 2), k, v, mask, c.softmax_scale, c.n_kv_heads != c.n_heads
            )  # [B, H, T, D]
        return self.w_o(o.reshape(batch, c.n_heads, n_tokens, c.head_dim).transpose(1, 2).flatten(2))


def build_attention(
    config: AttentionConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MLA | GQAAttention:
    """The layer for `config`: `MLA` for an `MLAConfig`, `GQAAttention` for a `GQAConfig`."""
    if isinstance(config, MLAConfig):
        return MLA(config, device=device, dtype=dtype)
    if isinstance(config, GQAConfig):
        return GQAAttention(config, device=device, dtype=dtype)
    raise TypeError(f"build_attention takes an MLAConfig or a GQAConfig, got {type(config).__name__}")
