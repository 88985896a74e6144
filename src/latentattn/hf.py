"""The one place that maps Hugging Face transformers' attention names and configs to latentattn's.

    latentattn   DeepseekV3Attention (MLA)      LlamaAttention (MHA/GQA/MQA)
    w_q          q_proj                         q_proj
    w_dq         q_a_proj
    q_norm       q_a_layernorm
    w_uq         q_b_proj
    w_dkv        kv_a_proj_with_mqa
    kv_norm      kv_a_layernorm
    w_ukv        kv_b_proj
    w_k, w_v                                    k_proj, v_proj
    w_o          o_proj                         o_proj

Weights need no reshuffling: HF's `rope_interleave=True` means DeepSeek's adjacent-pair RoPE
(`RopeConfig(interleave=True)`), `False` the half-split rotation. Configs may be a `config.json`
dict or a transformers `PretrainedConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from latentattn.attention import MLA, GQAAttention, build_attention
from latentattn.config import (
    AttentionConfig,
    GQAConfig,
    Llama3RopeConfig,
    MLAConfig,
    RopeConfig,
    YarnConfig,
)

MLA_TO_HF = {
    "w_q": "q_proj",
    "w_dq": "q_a_proj",
    "q_norm": "q_a_layernorm",
    "w_uq": "q_b_proj",
    "w_dkv": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm",
    "w_ukv": "kv_b_proj",
    "w_o": "o_proj",
}
GQA_TO_HF = {"w_q": "q_proj", "w_k": "k_proj", "w_v": "v_proj", "w_o": "o_proj"}
_MISSING = object()


def _as_dict(hf_config: Mapping[str, Any] | Any) -> dict[str, Any]:
    return dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()


def _field(config: dict[str, Any], name: str, default: Any = _MISSING) -> Any:
    value = config.get(name)
    if value is None:
        if default is _MISSING:
            raise ValueError(f"HF config lacks the field '{name}'")
        return default
    return value


def rope_config_from_hf(hf_config: Mapping[str, Any] | Any, *, interleave: bool) -> RopeConfig:
    """RoPE settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x):
    default, `linear`, `llama3` or `yarn`; other types and a partial rotary factor raise ValueError."""
    config = _as_dict(hf_config)
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor")) or 1.0
    if partial != 1.0:
        raise ValueError(f"unsupported partial_rotary_factor {partial}: latentattn rotates whole heads")
    if rope_type == "default":
        return RopeConfig(theta=theta, interleave=interleave)
    if rope_type == "linear":
        return RopeConfig(theta=theta, interleave=interleave, linear_factor=_field(params, "factor"))
    if rope_type not in ("llama3", "yarn"):
        raise ValueError(
            f"unsupported rope_type {rope_type!r}: latentattn implements default, linear, llama3 and yarn"
        )
    original = params.get("original_max_position_embeddings") or _field(config, "max_position_embeddings")
    if rope_type == "llama3":
        llama3 = Llama3RopeConfig(
            factor=_field(params, "factor"),
            low_freq_factor=_field(params, "low_freq_factor"),
            high_freq_factor=_field(params, "high_freq_factor"),
            original_max_position_embeddings=original,
        )
        return RopeConfig(theta=theta, interleave=interleave, llama3=llama3)
    if params.get("attention_factor") is not None:
        raise ValueError("YaRN's explicit 'attention_factor' is not supported; give mscale/mscale_all_dim")
    factor = params.get("factor") or _field(config, "max_position_embeddings") / original
    yarn = YarnConfig(
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=params.get("beta_fast") or 32.0,
        beta_slow=params.get("beta_slow") or 1.0,
        mscale=params.get("mscale") or 0.0,
        mscale_all_dim=params.get("mscale_all_dim") or 0.0,
        truncate=params.get("truncate", True),
    )
    return RopeConfig(theta=theta, interleave=interleave, yarn=yarn)


def _reject_biases(config: dict[str, Any]) -> None:
    if config.get("attention_bias"):
        raise ValueError(
            "unsupported attention_bias=True (biases on q/k/v/o_proj): latentattn has q/k/v biases only "
            "(Qwen2) and none in MLA"
        )


def mla_config_from_hf(hf_config: Mapping[str, Any] | Any) -> MLAConfig:
    """`MLAConfig` from a DeepSeek-V2/V3 config (the MLA fields: kv_lora_rank, qk_*_head_dim, …)."""
    config = _as_dict(hf_config)
    _reject_biases(config)
    return MLAConfig(
        d_model=_field(config, "hidden_size"),
        n_heads=_field(config, "num_attention_heads"),
        kv_lora_rank=_field(config, "kv_lora_rank"),
        q_lora_rank=config.get("q_lora_rank") or None,
        qk_nope_head_dim=_field(config, "qk_nope_head_dim"),
        qk_rope_head_dim=_field(config, "qk_rope_head_dim"),
        v_head_dim=_field(config, "v_head_dim"),
        rope=rope_config_from_hf(config, interleave=config.get("rope_interleave", True)),
        norm_eps=_field(config, "rms_norm_eps", 1e-6),
    )


def gqa_config_from_hf(hf_config: Mapping[str, Any] | Any) -> GQAConfig:
    """`GQAConfig` from a Llama/Mistral-style config (half-split RoPE)."""
    config = _as_dict(hf_config)
    _reject_biases(config)
    n_heads = _field(config, "num_attention_heads")
    d_model = _field(config, "hidden_size")
    rope = rope_config_from_hf(config, interleave=False)
    if rope.yarn is not None and rope.yarn.mscale_all_dim:
        raise ValueError(
            "unsupported YaRN mscale_all_dim for a Llama-family model: its attention does not scale the "
            "softmax (only DeepSeek's does)"
        )
    return GQAConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=_field(config, "num_key_value_heads", n_heads),
        head_dim=_field(config, "head_dim", d_model // n_heads),
        rope=rope,
    )


def attention_config_from_hf(hf_config: Mapping[str, Any] | Any) -> AttentionConfig:
    """MLA when the config has `kv_lora_rank`, else the GQA family."""
    config = _as_dict(hf_config)
    return mla_config_from_hf(config) if config.get("kv_lora_rank") else gqa_config_from_hf(config)


def rope_config_to_hf(rope: RopeConfig) -> dict[str, Any]:
    """HF 5.x `rope_parameters` for `rope` (inverse of `rope_config_from_hf`)."""
    if rope.frequencies is not None:
        raise ValueError("RoPE with a list of frequencies (a converted model's k_pe) has no HF form")
    if rope.llama3 is not None:
        return {"rope_type": "llama3", "rope_theta": rope.theta, **asdict(rope.llama3)}
    if rope.linear_factor != 1.0:
        return {"rope_type": "linear", "rope_theta": rope.theta, "factor": rope.linear_factor}
    if rope.yarn is None:
        return {"rope_type": "default", "rope_theta": rope.theta}
    yarn = rope.yarn
    return {
        "rope_type": "yarn",
        "rope_theta": rope.theta,
        "factor": yarn.factor,
        "original_max_position_embeddings": yarn.original_max_position_embeddings,
        "beta_fast": yarn.beta_fast,
        "beta_slow": yarn.beta_slow,
        "mscale": yarn.mscale,
        "mscale_all_dim": yarn.mscale_all_dim,
        "truncate": yarn.truncate,
    }


def mla_config_to_hf(config: MLAConfig) -> dict[str, Any]:
    """The attention fields of an HF `DeepseekV3Config` for `config` (inverse of `mla_config_from_hf`)."""
    if config.bias:
        raise ValueError("MLA with biases (a model converted from q/k/v biases) has no DeepSeek-V3 form")
    return {
        "hidden_size": config.d_model,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_heads,
        "kv_lora_rank": config.kv_lora_rank,
        "q_lora_rank": config.q_lora_rank,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim,
        "rope_parameters": rope_config_to_hf(config.rope),
        "rope_interleave": config.rope.interleave,
        "rms_norm_eps": config.norm_eps,
        "attention_bias": False,
    }


def _names(config: AttentionConfig) -> dict[str, str]:
    return MLA_TO_HF if isinstance(config, MLAConfig) else GQA_TO_HF


def attention_state_dict_from_hf(
    hf_state_dict: Mapping[str, Tensor], config: AttentionConfig
) -> dict[str, Tensor]:
    """Rename one HF attention module's state dict (keys like `kv_b_proj.weight`) to latentattn's."""
    to_ours = {hf: ours for ours, hf in _names(config).items()}
    renamed = {}
    for key, tensor in hf_state_dict.items():
        module, _, param = key.partition(".")
        if module not in to_ours:
            raise ValueError(f"unexpected HF attention weight '{key}' (known modules: {', '.join(to_ours)})")
        renamed[f"{to_ours[module]}.{param}"] = tensor
    return renamed


def attention_state_dict_to_hf(
    state_dict: Mapping[str, Tensor], config: AttentionConfig
) -> dict[str, Tensor]:
    """Rename a latentattn attention state dict to HF's names (inverse of `attention_state_dict_from_hf`)."""
    to_hf = _names(config)
    return {f"{to_hf[key.partition('.')[0]]}.{key.partition('.')[2]}": t for key, t in state_dict.items()}


def attention_from_hf(
    hf_state_dict: Mapping[str, Tensor],
    hf_config: Mapping[str, Any] | Any,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MLA | GQAAttention:
    """A latentattn layer holding the weights of one HF attention module (`DeepseekV3Attention`,
    `LlamaAttention`, …), e.g. `attention_from_hf(hf_layer.self_attn.state_dict(), hf_model.config)`.

    Missing or surplus weights and shape mismatches raise ValueError naming them.
    """
    config = attention_config_from_hf(hf_config)
    layer = build_attention(config, device=device, dtype=dtype)
    state = attention_state_dict_from_hf(hf_state_dict, config)
    expected = layer.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        hf_missing = attention_state_dict_to_hf(dict.fromkeys(missing), config)
        raise ValueError(f"HF state dict lacks {', '.join(hf_missing)}")
    for key, tensor in state.items():
        if key not in expected:
            raise ValueError(f"unexpected HF attention weight for latentattn '{key}'")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"shape mismatch for '{key}': HF has {tuple(tensor.shape)}, the config implies "
                f"{tuple(expected[key].shape)}"
            )
    layer.load_state_dict(state)
    return layer
