"""Whole language models to and from Hugging Face configs and state dicts.

Architectures read: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases) and
DeepseekV3ForCausalLM with every layer dense; written: LlamaForCausalLM (Qwen2ForCausalLM with q/k/v
biases) and DeepseekV3ForCausalLM. Weight names (attention names: `latentattn.hf`):

    latentattn                          HF
    embed.weight                        model.embed_tokens.weight
    blocks.i.attn_norm.weight           model.layers.i.input_layernorm.weight
    blocks.i.attn.<name>                model.layers.i.self_attn.<HF name>
    blocks.i.mlp_norm.weight            model.layers.i.post_attention_layernorm.weight
    blocks.i.mlp.w_gate | w_up | w_down model.layers.i.mlp.gate_proj | up_proj | down_proj
    norm.weight                         model.norm.weight
    lm_head.weight                      lm_head.weight (HF may omit it when tie_word_embeddings)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from latentattn.config import MLAConfig
from latentattn.hf import GQA_TO_HF, MLA_TO_HF, gqa_config_from_hf, mla_config_from_hf
from latentattn.model import LanguageModel, ModelConfig

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ARCHITECTURES = (*LLAMA_FAMILY, "DeepseekV3ForCausalLM")
HF_MLA_NORM_EPS = 1e-6
"""The eps of transformers' DeepSeek-V3 `q_a_layernorm` / `kv_a_layernorm`, whatever `rms_norm_eps` says."""
_BLOCK_TO_HF = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "mlp.w_gate": "mlp.gate_proj",
    "mlp.w_up": "mlp.up_proj",
    "mlp.w_down": "mlp.down_proj",
}
_TOP_TO_HF = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers some older checkpoints store; recomputed from the config."""


def architecture_of(config: Mapping[str, Any]) -> str:
    """The one supported entry of the config's `architectures`, else a ValueError naming it."""
    architectures = config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architectures {architectures}: latentattn reads {', '.join(ARCHITECTURES)}"
        )
    return architectures[0]


def _require_field(config: Mapping[str, Any], name: str) -> Any:
    if config.get(name) is None:
        raise ValueError(f"HF config lacks the field '{name}'")
    return config[name]


def _reject_unsupported(config: Mapping[str, Any], architecture: str) -> None:
    """One-line ValueError naming the first field the model cannot express."""
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}: latentattn's MLP is SwiGLU")
    if config.get("mlp_bias"):
        raise ValueError("unsupported mlp_bias=True: latentattn's MLP has no biases")
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", architecture != "Qwen2ForCausalLM")
    if uses_window and window is not None and window < _require_field(config, "max_position_embeddings"):
        raise ValueError(f"unsupported sliding_window={window}: latentattn attends to the whole context")
    layer_types = set(config.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"unsupported layer_types {sorted(layer_types)}: latentattn has full attention only")
    for name in ("qk_norm", "use_qk_norm"):
        if config.get(name):
            raise ValueError(f"unsupported {name}=True: latentattn has no QK-norm")
    if architecture == "DeepseekV3ForCausalLM":
        dense = config.get("first_k_dense_replace")
        layers = _require_field(config, "num_hidden_layers")
        if dense is None or dense < layers:
            raise ValueError(
                f"unsupported MoE layers: first_k_dense_replace={dense} < num_hidden_layers={layers} "
                "(latentattn reads all-dense DeepSeek-V3 models)"
            )


def model_config_from_hf(config: Mapping[str, Any]) -> ModelConfig:
    """`ModelConfig` of an HF `config.json` dict of a supported architecture."""
    config = dict(config)
    architecture = architecture_of(config)
    _reject_unsupported(config, architecture)
    if architecture == "DeepseekV3ForCausalLM":
        attention = replace(mla_config_from_hf(config), norm_eps=HF_MLA_NORM_EPS)
    elif architecture == "Qwen2ForCausalLM":  # q/k/v biases always, no attention_bias field
        attention = replace(gqa_config_from_hf({**config, "attention_bias": False}), qkv_bias=True)
    else:
        attention = gqa_config_from_hf(config)
    return ModelConfig(
        vocab_size=_require_field(config, "vocab_size"),
        n_layers=_require_field(config, "num_hidden_layers"),
        d_model=_require_field(config, "hidden_size"),
        d_ff=_require_field(config, "intermediate_size"),
        attention=attention,
        max_seq_len=_require_field(config, "max_position_embeddings"),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        norm_eps=_require_field(config, "rms_norm_eps"),
    )


def hf_name(name: str, config: ModelConfig) -> str:
    """The HF name of the latentattn weight `name` (e.g. `blocks.0.attn.w_dkv.weight`)."""
    module, _, param = name.rpartition(".")
    if module in _TOP_TO_HF:
        return f"{_TOP_TO_HF[module]}.{param}"
    _, layer, rest = module.split(".", 2)
    if rest.startswith("attn."):
        to_hf = MLA_TO_HF if isinstance(config.attention, MLAConfig) else GQA_TO_HF
        return f"model.layers.{layer}.self_attn.{to_hf[rest.removeprefix('attn.')]}.{param}"
    return f"model.layers.{layer}.{_BLOCK_TO_HF[rest]}.{param}"


def _expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    return {name: t.shape for name, t in LanguageModel(config, device="meta").state_dict().items()}


def model_state_dict_to_hf(state_dict: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """`state_dict` under HF names, with an explicit `lm_head.weight` (a copy of the embedding when tied)."""
    hf = {hf_name(name, config): tensor for name, tensor in state_dict.items()}
    if config.tie_embeddings:
        hf["lm_head.weight"] = state_dict["embed.weight"].clone()
    return hf


def model_state_dict_from_hf(hf_state: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Inverse of `model_state_dict_to_hf`: missing, unexpected or misshapen HF weights raise ValueError
    naming them; a tied model's `lm_head.weight`, if present, must equal the embedding."""
    expected = _expected_shapes(config)
    to_ours = {hf_name(name, config): name for name in expected}
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith(_IGNORED_HF_SUFFIXES)}
    if config.tie_embeddings and "lm_head.weight" in hf_state:
        head = hf_state.pop("lm_head.weight")
        embed = hf_state.get("model.embed_tokens.weight")
        if embed is not None and not torch.equal(head, embed):
            raise ValueError("tie_word_embeddings is true but lm_head.weight differs from embed_tokens")
    missing = sorted(set(to_ours) - set(hf_state))
    unexpected = sorted(set(hf_state) - set(to_ours))
    if missing or unexpected:
        problems = [
            f"{label} {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected))
            if names
        ]
        raise ValueError(f"HF weights do not match the config: {'; '.join(problems)}")
    state = {}
    for hf, name in to_ours.items():
        tensor = hf_state[hf]
        if tensor.shape != expected[name]:
            raise ValueError(
                f"shape mismatch for '{hf}': {tuple(tensor.shape)}, the config implies "
                f"{tuple(expected[name])}"
            )
        state[name] = tensor
    return state


def model_from_hf(
    config: Mapping[str, Any], tensors: Mapping[str, Tensor], *, dtype: torch.dtype = torch.float32
) -> LanguageModel:
    """A `LanguageModel` (eval mode, in `dtype`) holding the HF weights `tensors` of `config`."""
    model_config = model_config_from_hf(config)
    state = model_state_dict_from_hf(tensors, model_config)
    model = LanguageModel(model_config, device="meta")
    model.load_state_dict({name: t.to(dtype) for name, t in state.items()}, assign=True)
    return model.eval()
