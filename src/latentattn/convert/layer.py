"""One MHA/GQA/MQA attention layer → MLA.

Notation: d model width, H query heads, G kv heads (g(h) = h // (H/G)), D head dim, R = d_R shared RoPE
width, N NoPE width, C = d_c latent width. Weights are handled augmented (`[..., d + 1]`, the last
column the bias) and in fp64.

1. RoPE: `rope_split` keeps R/2 slots of the kv heads' rotated key pairs in the shared key k_pe.
2. NoPE keys and values: stacked per kv head, `[W_K,nope; W_V]` (G·(N + D) rows) is factorised
   jointly at rank C: `≈ W_UKV · W_DKV`, c_KV = W_DKV x. "svd": truncated SVD of the weights. "pca":
   principal directions on the calibration inputs. `kv_objective` "activations": of the K/V
   activations (optimal for reconstructing them); "attention": of the K/V activations under the
   metric of `weighting` (key errors priced by the queries that read them, value errors by W_O).
   "activations" with `balance_kv`: the NoPE keys are first divided by β = RMS(k_nope) / RMS(v)
   (activation RMS on the calibration inputs; weight norms without calibration, where E[x xᵀ] = I
   makes them equal) and W_UK multiplied by β after, so neither half dominates the factorisation
   (TransMLA's K/V balancing).
3. MLA normalises c_KV with RMSNorm, which no linear map reproduces. The converted layer runs kv_norm
   in its linear regime: eps = `norm_linearity` · E[mean(c_KV²)] and weight √eps, so
   RMSNorm(c) ≈ c up to a relative 1 / (2 · norm_linearity); fine-tuning then starts from there.
4. Scores: the source's softmax scale and RoPE amplitude (YaRN) are folded into W_Q, since MLA's scale
   is (N + R)^-½ and its k_pe rotation has amplitude 1.
5. `refit="attention"` (see refit): W_DKV, each head's W_UK and W_UV, and W_O fitted to the source's
   attention on the calibration windows.
6. Biases (Qwen2's q/k/v): the query bias stays on w_q; the k_pe part of the key bias goes to w_dkv;
   the NoPE part of the key bias is dropped (it adds the same score to every key of a query, which
   softmax ignores); the value bias moves to w_o's bias (softmax weights sum to 1): exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from latentattn.attention import MLA, GQAAttention
from latentattn.config import GQAConfig, MLAConfig, RopeConfig
from latentattn.convert.attention_moments import AttentionMoments
from latentattn.convert.moments import Moments, augmented
from latentattn.convert.refit import fit_output_projection, fit_to_attention
from latentattn.convert.rope_split import (
    RESIDUALS,
    SLOT_RULES,
    Residual,
    RopeSplit,
    RotaryKeys,
    Slot,
    SlotRule,
    choose_slots,
    nope_dims,
    split_rope,
)
from latentattn.convert.weighting import VALUE_METRICS, ValueMetric, attention_metric, group_index
from latentattn.rope import rope_inv_freq

Method = Literal["svd", "pca", "merge"]
METHODS: tuple[Method, ...] = ("svd", "pca", "merge")
KvObjective = Literal["activations", "attention"]
KV_OBJECTIVES: tuple[KvObjective, ...] = ("activations", "attention")
Refit = Literal["none", "attention"]
REFITS: tuple[Refit, ...] = ("none", "attention")


@dataclass(frozen=True)
class ConversionConfig:
    """What `latentattn convert` builds. "svd" and "pca" give MLA with a latent of `kv_lora_rank` and a
    shared RoPE key of `qk_rope_head_dim`; "merge" (the baseline) gives GQA with `kv_heads` kv heads, each the
    average of the source's heads it replaces. The defaults lost least in docs/convert/options.md."""

    method: Method = "pca"
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    kv_heads: int | None = None
    rope_frequencies: SlotRule = "score"
    """Which rotated key slots keep RoPE: "highest" frequency first, or by "score" (see rope_split)."""
    rope_residual: Residual = "nope"
    """What becomes of a kept frequency's components outside k_pe: "drop", or "nope" dims."""
    balance_kv: bool = True
    """Scale the NoPE keys to the values' RMS before the joint factorisation ("activations" only)."""
    kv_objective: KvObjective = "attention"
    """What the joint K/V factorisation keeps: the K/V "activations", or what they do in "attention"
    (scores weighted by the queries, values by the output projection; see weighting)."""
    key_weight: float = 1.0
    """The attention objective and the refit: the score errors' weight against the value errors, times
    their estimate (weighting, attention_moments)."""
    value_metric: ValueMetric = "group"
    """The attention objective and the refit: value errors seen by each head apart ("heads"), or by the
    heads of a group together ("group": their output projections summed; see weighting)."""
    refit: Refit = "attention"
    """svd/pca: fit the layer to what the source's attention does on the calibration windows
    ("attention", see refit: W_DKV refined from the factorisation's, each query head's W_UK and W_UV,
    then W_O by least squares against the source's output), or keep the factorisation's weights and
    the source's W_O ("none")."""
    norm_linearity: float = 1e6
    """kv_norm's eps over the latent's mean power (its linear regime)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown conversion method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.rope_frequencies not in SLOT_RULES:
            raise ValueError(
                f"unknown rope_frequencies {self.rope_frequencies!r}; choose one of {', '.join(SLOT_RULES)}"
            )
        if self.rope_residual not in RESIDUALS:
            raise ValueError(
                f"unknown rope_residual {self.rope_residual!r}; choose one of {', '.join(RESIDUALS)}"
            )
        if self.kv_objective not in KV_OBJECTIVES:
            raise ValueError(
                f"unknown kv_objective {self.kv_objective!r}; choose one of {', '.join(KV_OBJECTIVES)}"
            )
        if self.value_metric not in VALUE_METRICS:
            raise ValueError(
                f"unknown value_metric {self.value_metric!r}; choose one of {', '.join(VALUE_METRICS)}"
            )
        if self.refit not in REFITS:
            raise ValueError(f"unknown refit {self.refit!r}; choose one of {', '.join(REFITS)}")
        if not (self.key_weight > 0 and math.isfinite(self.key_weight)):
            raise ValueError(f"key_weight must be positive and finite, got {self.key_weight}")
        if self.norm_linearity <= 0:
            raise ValueError(f"norm_linearity must be positive, got {self.norm_linearity}")
        if self.method == "merge":
            if self.kv_heads is None or self.kv_lora_rank is not None or self.qk_rope_head_dim is not None:
                raise ValueError("method 'merge' takes kv_heads only (not kv_lora_rank or qk_rope_head_dim)")
            if self.kv_heads <= 0:
                raise ValueError(f"kv_heads must be positive, got {self.kv_heads}")
            return
        if self.kv_lora_rank is None or self.qk_rope_head_dim is None or self.kv_heads is not None:
            raise ValueError(f"method {self.method!r} takes kv_lora_rank and qk_rope_head_dim (not kv_heads)")
        if self.kv_lora_rank <= 0:
            raise ValueError(f"kv_lora_rank must be positive, got {self.kv_lora_rank}")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even and positive, got {self.qk_rope_head_dim}")


def check_widths(config: ConversionConfig, source: GQAConfig, nope: int) -> None:
    """Raise ValueError unless the source allows R, and C with N NoPE dims."""
    groups, head_dim, d_model = source.n_kv_heads, source.head_dim, source.d_model
    if config.qk_rope_head_dim > groups * head_dim:
        raise ValueError(
            f"qk_rope_head_dim must be at most n_kv_heads·head_dim = {groups}·{head_dim} = "
            f"{groups * head_dim} (every key dim of the source), got {config.qk_rope_head_dim}"
        )
    bound = min(groups * (nope + head_dim), d_model)
    if config.kv_lora_rank > bound:
        raise ValueError(
            f"kv_lora_rank must be at most {bound}, the rank of the stacked NoPE keys and values "
            f"({groups} kv heads x ({nope} + {head_dim}) rows of width {d_model}), got {config.kv_lora_rank}"
        )


def factorise_kv(
    w_k_nope: Tensor,
    w_v: Tensor,
    second_moment: Tensor,
    config: ConversionConfig,
    metric: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`[W_K,nope; W_V] ≈ W_up · W_down` at rank C, minimising E‖A (y − ŷ)‖² for y = [k_nope; v] per
    group: `w_k_nope: [G, N, d]`, `w_v: [G, D, d]`, E[x xᵀ] `[d, d]` → W_up `[G, N + D, C]`, W_down
    `[C, d]`. A = `metric`^½ (`[G, N + D, N + D]`, positive definite), or without one the K/V balance:
    the NoPE key rows divided by β (`balance_kv`). "pca": the top C eigenvectors U of E[A y (A y)ᵀ],
    W_up = A⁻¹ U, W_down = Uᵀ A W; "svd": A W's truncated SVD U S Vᵀ (E[x xᵀ] = I), W_up = A⁻¹ U S,
    W_down = Vᵀ."""
    groups, _, d_model = w_k_nope.shape
    rank = config.kv_lora_rank
    w_kv = torch.cat([w_k_nope, w_v], dim=1)  # per group: [k_nope; v]
    if metric is None:
        divisor = _balance_divisors(w_k_nope, w_v, second_moment, config)[..., None]  # [G, N + D, 1]
        target = w_kv / divisor
    else:
        eigenvalues, basis = torch.linalg.eigh(metric)  # [G, n], [G, n, n]
        target = basis @ torch.diag_embed(eigenvalues.sqrt()) @ basis.mT @ w_kv  # A W
    rows = target.reshape(-1, d_model)
    if config.method == "svd":
        u, singular, v_t = torch.linalg.svd(rows, full_matrices=False)
        w_up, w_down = u[:, :rank] * singular[:rank], v_t[:rank]
    else:
        weighted_cov = rows @ second_moment @ rows.T  # E[A y (A y)ᵀ]
        directions = torch.linalg.eigh(weighted_cov).eigenvectors[:, -rank:].flip(-1)
        w_up, w_down = directions, directions.T @ rows  # [rows, C], [C, d]
    w_up = w_up.reshape(groups, -1, rank)
    if metric is None:
        return w_up * divisor, w_down
    return basis @ torch.diag_embed(eigenvalues.rsqrt()) @ basis.mT @ w_up, w_down  # A⁻¹ W_up


def _balance_divisors(
    w_k_nope: Tensor, w_v: Tensor, second_moment: Tensor, config: ConversionConfig
) -> Tensor:
    """`[G, N + D]`: β = RMS(k_nope) / RMS(v) on the NoPE key rows with `balance_kv` (else 1), 1 on the
    value rows."""

    def rms(w: Tensor) -> float:
        return math.sqrt(torch.einsum("gnd,de,gne->", w, second_moment, w).item() / max(w[..., 0].numel(), 1))

    nope = w_k_nope.shape[1]
    divisors = torch.ones(w_v.shape[0], nope + w_v.shape[1], dtype=w_v.dtype, device=w_v.device)
    if config.balance_kv and nope and rms(w_k_nope) > 0 and rms(w_v) > 0:
        divisors[:, :nope] = rms(w_k_nope) / rms(w_v)
    return divisors


def _rope_config(
    pairs: list[int], source_inv_freq: Tensor, source: GQAConfig, qk_rope_head_dim: int
) -> RopeConfig:
    """MLA's RoPE over the kept pairs: a theta when one reproduces their frequencies (the R/2 highest of
    a plain-theta source: theta^(R/D)), else the frequencies themselves."""
    frequencies = source_inv_freq[pairs]
    theta = source.rope.theta ** (qk_rope_head_dim / source.head_dim)
    if torch.allclose(frequencies, rope_inv_freq(qk_rope_head_dim, theta), rtol=1e-12, atol=0):
        return RopeConfig(theta=theta, interleave=source.rope.interleave)
    return RopeConfig(interleave=source.rope.interleave, frequencies=tuple(frequencies.tolist()))


def gqa_to_mla(
    layer: GQAAttention,
    config: ConversionConfig,
    calibration: Tensor | Moments | None = None,
    *,
    slots: list[Slot] | None = None,
    windows: list[Tensor] | None = None,
) -> MLA:
    """An `MLA` layer approximating `layer` (exactly when R = G·D and C = G·D).

    `calibration`: the inputs the layer sees (`[..., d]`, or their `Moments`), required for "pca"; it
    also sets the RoRoPE bases, the K/V balance and kv_norm's scale (without it, unit-variance inputs
    are assumed). `refit="attention"` also needs them as windows, sequences the layer attends over:
    `windows` (`[b, T, d]` each), by default `calibration` if it is `[B, T, d]`. `slots` imposes k_pe's
    slots (a model converts all layers alike); default: the layer's own by `config.rope_frequencies`.
    """
    source = layer.config
    heads, groups, head_dim, d_model = source.n_heads, source.n_kv_heads, source.head_dim, source.d_model
    moments = _input_moments(config, calibration, d_model)
    with torch.no_grad():
        sigma = moments.second_moment.to(layer.w_q.weight.device)  # E[x̃ x̃ᵀ], [d+1, d+1]
        w_q = augmented(layer.w_q).view(heads, head_dim, d_model + 1)
        w_k = augmented(layer.w_k).view(groups, head_dim, d_model + 1)
        w_v = augmented(layer.w_v).view(groups, head_dim, d_model + 1)

        # 1. RoPE slots.
        keys = RotaryKeys.analyse(w_q, w_k, sigma, source.rope.interleave)
        if slots is None:
            slots = choose_slots(
                config.rope_frequencies, config.qk_rope_head_dim, head_dim // 2, groups, keys.scores
            )
        nope = len(nope_dims(slots, head_dim, groups, config.rope_residual, source.rope.interleave))
        check_widths(config, source, nope)
        windows = _refit_windows(config, calibration, windows, d_model)
        attention = None if windows is None else AttentionMoments.of(layer, windows)
        split = split_rope(keys, w_q, w_k, slots, config.rope_residual, source.rope.interleave)

        # 2. Joint low-rank NoPE keys and values (their biases: see the module docstring).
        metric = None
        score_scale = source.softmax_scale * layer.rope.amplitude**2
        w_o = layer.w_o.weight.double()
        if config.kv_objective == "attention":
            metric = attention_metric(
                split.q_nope, w_v, w_o, sigma, score_scale, config.key_weight, config.value_metric
            )
        w_up, w_down = factorise_kv(split.k_nope[..., :-1], w_v[..., :-1], sigma[:-1, :-1], config, metric)
        w_up = w_up[group_index(heads, groups, w_up.device)]  # each query head's [W_UK; W_UV]: [H, N + D, C]
        if attention is not None:
            w_up, w_down = fit_to_attention(
                w_down,
                split.k_nope[..., :-1],
                split.q_nope,
                w_v[..., :-1],
                w_o,
                attention,
                score_scale,
                config.key_weight,
                config.value_metric,
            )

        # 3. kv_norm in its linear regime.
        latent_power = (
            torch.einsum("cd,de,ce->", w_down, sigma[:-1, :-1], w_down).item() / config.kv_lora_rank
        )
        eps = config.norm_linearity * max(latent_power, torch.finfo(torch.float32).tiny)

        biased = any(m.bias is not None for m in (layer.w_q, layer.w_k, layer.w_v, layer.w_o))
        mla_config = MLAConfig(
            d_model=d_model,
            n_heads=heads,
            kv_lora_rank=config.kv_lora_rank,
            q_lora_rank=None,
            qk_nope_head_dim=nope,
            qk_rope_head_dim=config.qk_rope_head_dim,
            v_head_dim=head_dim,
            rope=_rope_config(split.pairs, layer.rope.inv_freq, source, config.qk_rope_head_dim),
            norm_eps=eps,
            bias=biased,
        )
        weight = layer.w_q.weight
        mla = MLA(mla_config, device=weight.device, dtype=weight.dtype)
        _set_weights(mla, layer, split, w_up, w_down, w_v)
    if windows is not None:
        fit_output_projection(mla, layer, windows)
    return mla


def _refit_windows(
    config: ConversionConfig, calibration: Tensor | Moments | None, windows: list[Tensor] | None, d_model: int
) -> list[Tensor] | None:
    """The calibration windows `refit="attention"` fits to (`[b, T, d]` each): `windows`, else
    `calibration` if it is `[B, T, d]`; None for `refit="none"`."""
    if config.refit == "none":
        return None
    if windows is None and isinstance(calibration, Tensor) and calibration.dim() == 3:
        windows = [calibration]
    if windows is None:
        raise ValueError(
            "refit 'attention' needs calibration windows [batch, tokens, d_model] to see the source's "
            "attention; pass refit='none' to keep the factorisation's projections"
        )
    for x in windows:
        if x.dim() != 3 or x.shape[-1] != d_model or x.shape[1] == 0:
            raise ValueError(f"calibration windows must be [batch, tokens, {d_model}], got {tuple(x.shape)}")
    return windows


def _input_moments(config: ConversionConfig, calibration: Tensor | Moments | None, d_model: int) -> Moments:
    """The moments of the layer's inputs: of `calibration` (required by "pca"), else unit variance."""
    if config.method not in ("svd", "pca"):
        raise ValueError(f"gqa_to_mla converts with svd or pca, not {config.method!r}")
    if config.method == "pca" and calibration is None:
        raise ValueError("method 'pca' needs calibration inputs [n, d_model]")
    if isinstance(calibration, Tensor):
        calibration = Moments.of(calibration)
    moments = Moments.isotropic(d_model) if calibration is None else calibration
    if moments.d_model != d_model:
        raise ValueError(f"calibration inputs must have width d_model={d_model}, got {moments.d_model}")
    return moments


def _set_weights(
    mla: MLA, layer: GQAAttention, split: RopeSplit, w_up: Tensor, w_down: Tensor, w_v: Tensor
) -> None:
    """Steps 4 and 6 of `gqa_to_mla`: queries carrying the source's score scale, the factorised K/V, kv_norm
    at its linear regime's scale, the output projection; biases as the module docstring describes.
    `w_v`: the source's augmented `[G, D, d + 1]`."""
    source, c = layer.config, mla.config
    heads, groups = source.n_heads, source.n_kv_heads
    score_scale = source.softmax_scale * layer.rope.amplitude**2 / c.softmax_scale
    w_q_mla = torch.cat([split.q_nope, split.q_pe], dim=1).reshape(-1, c.d_model + 1) * score_scale
    group_of = group_index(heads, groups)
    w_o = layer.w_o.weight.double()
    mla.w_q.weight.copy_(w_q_mla[:, :-1])
    mla.w_dkv.weight.copy_(torch.cat([w_down, split.k_pe[:, :-1]]))
    mla.kv_norm.weight.fill_(math.sqrt(c.norm_eps))
    mla.w_ukv.weight.copy_(w_up.reshape(-1, c.kv_lora_rank))
    mla.w_o.weight.copy_(w_o)
    if c.bias:
        mla.w_q.bias.copy_(w_q_mla[:, -1])
        mla.w_dkv.bias.copy_(torch.cat([split.k_pe.new_zeros(c.kv_lora_rank), split.k_pe[:, -1]]))
        value_bias = w_v[group_of, :, -1].reshape(-1)  # [H·D]
        output_bias = 0.0 if layer.w_o.bias is None else layer.w_o.bias.double()
        mla.w_o.bias.copy_(w_o @ value_bias + output_bias)
