"""Post-hoc conversion of a trained MHA/GQA/MQA layer to MLA (TransMLA / MHA2MLA style).

Notation: d model width, H query heads, G kv heads (group of head h: g(h) = h // (H/G)), D head dim,
R = d_R kept RoPE width, N = D − R NoPE width, C = d_c latent width, X calibration inputs [n, d].

1. Decoupled RoPE (RoRoPE). RoPE turns each frequency pair of every head by the same angle, so an
   orthogonal mix of the kv heads commutes with it. For the R/2 highest frequencies, the kv heads' key
   pairs are rotated onto their principal direction u (PCA over heads); the top component becomes the
   one RoPE key k_pe shared by all heads, and each query pair is scaled by `u[g(h)]`. The other
   components are dropped (exact for MQA). The kept frequencies are theta^(-2i/D), i < R/2, which
   MLA's RoPE over R dims reproduces with base theta^(R/D).
2. NoPE keys and values. The remaining N dims of every key head lose RoPE (the cost MHA2MLA heals
   by fine-tuning) and, stacked with the values, are factorised jointly at rank C:
   `[W_K,nope; W_V] ≈ A · B`, c_KV = B x, W_UKV = A. "svd": truncated SVD of the weights.
   "pca": principal directions of the K/V activations on X (optimal for reconstructing them).
3. MLA normalises c_KV with RMSNorm, which no linear factorisation reproduces. The converted layer
   runs kv_norm in its linear regime: eps = `norm_linearity` · E[mean(c_KV²)] and weight √eps, so
   RMSNorm(c) ≈ c up to a relative 1 / (2 · norm_linearity); fine-tuning then starts from there.

Whole models (`model_to_mla`): every block's attention is converted from its own inputs (the post-norm
hidden states of the source model on calibration tokens, captured by forward pre-hooks, all from the
unconverted model). `ModelConfig` holds one attention config for all layers, so all layers share one
kv_norm eps: the largest of the per-layer eps (the layer with the most powerful latent), with weight
√eps in every layer. A larger eps only deepens the linear regime, so every layer stays within its own
1 / (2 · norm_linearity) bound.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from latentattn.attention import MLA, GQAAttention
from latentattn.config import MLAConfig, RopeConfig
from latentattn.model import LanguageModel

Method = Literal["svd", "pca"]


def _rope_pairs(head_dim: int, interleave: bool) -> list[tuple[int, int]]:
    """Source dims of each RoPE frequency pair i (highest frequency first)."""
    half = head_dim // 2
    return [(2 * i, 2 * i + 1) if interleave else (i, i + half) for i in range(half)]


def _pair_layout(n_pairs: int, interleave: bool) -> list[int]:
    """Order in which kept pairs' (first, second) components sit in a RoPE vector of 2·n_pairs dims."""
    if interleave:
        return list(range(2 * n_pairs))
    return [2 * i for i in range(n_pairs)] + [2 * i + 1 for i in range(n_pairs)]


def gqa_to_mla(
    layer: GQAAttention,
    *,
    kv_lora_rank: int,
    rope_dim: int,
    method: Method = "pca",
    calibration: Tensor | None = None,
    norm_linearity: float = 1e6,
) -> MLA:
    """An `MLA` layer approximating `layer` with a latent of `kv_lora_rank` and a shared RoPE key of
    `rope_dim`. `calibration: [n, d]` (inputs the layer sees) is required for "pca" and sets kv_norm's
    scale for both methods (without it, unit-variance inputs are assumed)."""
    source = layer.config
    heads, groups, head_dim, d_model = source.n_heads, source.n_kv_heads, source.head_dim, source.d_model
    if source.rope.yarn is not None:
        raise ValueError("conversion supports plain RoPE sources, not YaRN")
    if rope_dim <= 0 or rope_dim % 2 or rope_dim >= head_dim:
        raise ValueError(f"rope_dim must be even and in (0, head_dim={head_dim}), got {rope_dim}")
    if method not in ("svd", "pca"):
        raise ValueError(f"unknown conversion method {method!r}; choose svd or pca")
    if method == "pca" and calibration is None:
        raise ValueError("method 'pca' needs calibration inputs [n, d_model]")
    if calibration is not None and (calibration.dim() != 2 or calibration.shape[1] != d_model):
        raise ValueError(f"calibration must be [n, d_model={d_model}], got {tuple(calibration.shape)}")
    nope_dim = head_dim - rope_dim
    stacked_rows = groups * (nope_dim + head_dim)
    if not 0 < kv_lora_rank <= min(stacked_rows, d_model):
        raise ValueError(
            f"kv_lora_rank must be in [1, {min(stacked_rows, d_model)}] (the rank of the K/V weights), "
            f"got {kv_lora_rank}"
        )

    with torch.no_grad():
        dtype = torch.float64
        w_q = layer.w_q.weight.to(dtype).view(heads, head_dim, d_model)
        w_k = layer.w_k.weight.to(dtype).view(groups, head_dim, d_model)
        w_v = layer.w_v.weight.to(dtype).view(groups, head_dim, d_model)
        x = None if calibration is None else calibration.to(dtype)
        second_moment = torch.eye(d_model, dtype=dtype) if x is None else x.T @ x / x.shape[0]  # E[x xᵀ]
        group_of = torch.arange(heads) // (heads // groups)

        # 1. RoRoPE: the shared RoPE key from each kept frequency pair's principal kv-head direction.
        pairs = _rope_pairs(head_dim, source.rope.interleave)
        kept = pairs[: rope_dim // 2]
        k_pe_rows, q_pe_rows = [], []
        for first, second in kept:
            pair_k = w_k[:, [first, second]]  # [G, 2, d]
            head_cov = torch.einsum("gpd,de,hpe->gh", pair_k, second_moment, pair_k)  # [G, G]
            u = torch.linalg.eigh(head_cov).eigenvectors[:, -1]  # top direction over kv heads
            k_pe_rows.append(torch.einsum("g,gpd->pd", u, pair_k))  # [2, d]
            q_pe_rows.append(u[group_of, None, None] * w_q[:, [first, second]])  # [H, 2, d]
        layout = _pair_layout(len(kept), source.rope.interleave)
        w_kr = torch.cat(k_pe_rows)[layout]  # [R, d]
        w_q_pe = torch.cat(q_pe_rows, dim=1)[:, layout]  # [H, R, d]

        # 2. Joint low-rank factorisation of the NoPE keys and the values of the G kv heads.
        nope = sorted(set(range(head_dim)) - {dim for pair in kept for dim in pair})
        w_kv = torch.cat([w_k[:, nope], w_v], dim=1).reshape(stacked_rows, d_model)  # per group: [k_nope; v]
        if method == "svd":
            u_svd, singular, v_t = torch.linalg.svd(w_kv, full_matrices=False)
            w_up, w_down = u_svd[:, :kv_lora_rank] * singular[:kv_lora_rank], v_t[:kv_lora_rank]
        else:
            activation_cov = w_kv @ second_moment @ w_kv.T  # E[y yᵀ] of the K/V activations y = W x
            directions = torch.linalg.eigh(activation_cov).eigenvectors[:, -kv_lora_rank:].flip(-1)
            w_up, w_down = directions, directions.T @ w_kv  # [rows, C], [C, d]

        # 3. kv_norm in its linear regime.
        latent_power = torch.einsum("cd,de,ce->", w_down, second_moment, w_down).item() / kv_lora_rank
        eps = norm_linearity * max(latent_power, torch.finfo(torch.float32).tiny)

        interleave = source.rope.interleave
        config = MLAConfig(
            d_model=d_model,
            n_heads=heads,
            kv_lora_rank=kv_lora_rank,
            q_lora_rank=None,
            qk_nope_head_dim=nope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=head_dim,
            rope=RopeConfig(theta=source.rope.theta ** (rope_dim / head_dim), interleave=interleave),
            norm_eps=eps,
        )
        weight = layer.w_q.weight
        mla = MLA(config, device=weight.device, dtype=weight.dtype)
        w_up = w_up.view(groups, nope_dim + head_dim, kv_lora_rank)[group_of]  # [H, N + V, C]
        mla.w_q.weight.copy_(torch.cat([w_q[:, nope], w_q_pe], dim=1).reshape(-1, d_model))
        mla.w_dkv.weight.copy_(torch.cat([w_down, w_kr]))
        mla.kv_norm.weight.fill_(math.sqrt(eps))
        mla.w_ukv.weight.copy_(w_up.reshape(-1, kv_lora_rank))
        mla.w_o.weight.copy_(layer.w_o.weight)
    return mla


@torch.no_grad()
def attention_inputs(model: LanguageModel, tokens: Tensor) -> list[Tensor]:
    """What each block's attention sees on `tokens: [B, T]`: the post-norm hidden states, `[B·T, d]`
    per layer."""
    captured: list[Tensor] = []
    hooks = [
        block.attn.register_forward_pre_hook(lambda _module, args: captured.append(args[0].flatten(0, 1)))
        for block in model.blocks
    ]
    try:
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def model_to_mla(
    model: LanguageModel,
    calibration: Tensor,
    *,
    kv_lora_rank: int,
    rope_dim: int,
    method: Method = "pca",
    norm_linearity: float = 1e6,
) -> LanguageModel:
    """`model` (MHA/GQA/MQA attention) with every block's attention converted by `gqa_to_mla`, from the
    block's inputs on the calibration tokens `[B, T]`; all other weights are copied."""
    if isinstance(model.config.attention, MLAConfig):
        raise ValueError("model_to_mla converts MHA/GQA/MQA models; this one already uses MLA")
    layers = [
        gqa_to_mla(
            block.attn,
            kv_lora_rank=kv_lora_rank,
            rope_dim=rope_dim,
            method=method,
            calibration=inputs,
            norm_linearity=norm_linearity,
        )
        for block, inputs in zip(model.blocks, attention_inputs(model, calibration), strict=True)
    ]
    eps = max(layer.config.norm_eps for layer in layers)
    config = replace(model.config, attention=replace(layers[0].config, norm_eps=eps))
    weight = model.embed.weight
    converted = LanguageModel(config, device=weight.device, dtype=weight.dtype)
    state = {name: value for name, value in model.state_dict().items() if ".attn." not in name}
    for i, layer in enumerate(layers):
        layer.kv_norm.weight.data.fill_(math.sqrt(eps))
        state.update({f"blocks.{i}.attn.{name}": value for name, value in layer.state_dict().items()})
    converted.load_state_dict(state)
    return converted.train(model.training)
