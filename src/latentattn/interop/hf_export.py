"""`latentattn export`: a checkpoint → a Hugging Face model directory that transformers, vLLM, SGLang
and llama.cpp's converter load.

MLA models become `DeepseekV3ForCausalLM` with every layer dense; MHA/GQA/MQA models
`LlamaForCausalLM` (`Qwen2ForCausalLM` when they have q/k/v biases). RoPE is written in the layout the
engines assume — DeepSeek's adjacent pairs for MLA (`rope_interleave: true`, the only layout vLLM
runs), half-split for Llama — by permuting the rotated rows of the query/key projections, which leaves
every score unchanged. The directory holds config.json (RoPE fields as the installed transformers
major version names them), model.safetensors (sharded with an index above `max_shard_size`, always
with an explicit `lm_head.weight`), generation_config.json and the tokenizer (tokenizer.json,
tokenizer_config.json, special_tokens_map.json).

Notation: H heads, G kv heads, D head dim, N qk_nope_head_dim, R qk_rope_head_dim, C kv_lora_rank.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, processors
from torch import Tensor

from latentattn.checkpoint import Checkpoint, load_checkpoint
from latentattn.config import GQAConfig, MLAConfig, RopeConfig
from latentattn.hf import mla_config_to_hf, rope_config_to_hf
from latentattn.interop.hf_model import HF_MLA_NORM_EPS, model_state_dict_to_hf
from latentattn.interop.output_dir import check_output_dir, write_directory
from latentattn.model import ModelConfig
from latentattn.tokens import SpecialTokens

ConfigFormat = Literal[4, 5]
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
"""Bytes per safetensors file before the weights are split into shards (as `save_pretrained`)."""
DENSE_MOE_FIELDS = {
    "n_routed_experts": 2,
    "n_shared_experts": 1,
    "num_experts_per_tok": 1,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 0,
}
"""DeepSeek-V3's MoE fields for a model whose layers are all dense (`first_k_dense_replace` = layers):
unused by the layers, but engines read them — vLLM adds to `n_routed_experts` (an integer),
llama.cpp asserts `n_group < n_routed_experts` — so they hold small consistent values."""


def installed_config_format() -> ConfigFormat:
    """5 when transformers ≥ 5 is installed (`rope_parameters`), else 4 (`rope_theta` + `rope_scaling`,
    which transformers 5 reads too)."""
    try:
        major = int(importlib.metadata.version("transformers").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 4
    return 5 if major >= 5 else 4


def export_refusal(config: ModelConfig) -> str | None:
    """Why the HF format cannot express the model, with what to do; None when it can."""
    attention = config.attention
    if not isinstance(attention, MLAConfig | GQAConfig):
        return (
            f"{attention.kind} attention has no Hugging Face format here: export writes MLA as "
            "DeepseekV3ForCausalLM and MHA/GQA/MQA as LlamaForCausalLM"
        )
    if isinstance(attention, MLAConfig) and attention.norm_eps != HF_MLA_NORM_EPS:
        return (
            f"the MLA norms (q_a_layernorm, kv_a_layernorm) use eps {attention.norm_eps:g}, but "
            f"transformers' DeepSeek-V3 fixes them at {HF_MLA_NORM_EPS:g} (a post-hoc converted model "
            f"runs kv_norm in its linear regime): heal it with norm_eps {HF_MLA_NORM_EPS:g} first"
        )
    if isinstance(attention, MLAConfig) and config.norm_eps != HF_MLA_NORM_EPS:
        return (
            f"rms_norm_eps is {config.norm_eps:g}: vLLM and SGLang use it for q_a_layernorm and "
            f"kv_a_layernorm too, transformers {HF_MLA_NORM_EPS:g}, so the engines would disagree; "
            f"export needs norm_eps {HF_MLA_NORM_EPS:g} in the model's blocks"
        )
    if attention.rope.frequencies is not None:
        return (
            "its RoPE frequencies are a list (a converted model's k_pe, `latentattn convert`), which no "
            "rope_theta expresses: convert with --rope-frequencies highest and --rope-dim at most the "
            "source's head_dim, from a source without RoPE scaling"
        )
    if isinstance(attention, MLAConfig) and attention.bias:
        return (
            "its MLA projections have biases (converted from q/k/v biases), which DeepSeek-V3's q_proj "
            "cannot hold: heal it without them first"
        )
    yarn = attention.rope.yarn
    if isinstance(attention, GQAConfig) and yarn is not None and yarn.mscale_all_dim:
        return (
            "YaRN with mscale_all_dim scales the softmax, which Llama's attention does not: "
            "set mscale_all_dim=0 (and retrain) to export this model"
        )
    if (
        isinstance(attention, GQAConfig)
        and attention.qkv_bias
        and attention.head_dim * attention.n_heads != config.d_model
    ):
        return (
            f"a model with q/k/v biases goes out as Qwen2, whose heads span hidden_size; here "
            f"{attention.n_heads} x {attention.head_dim} != {config.d_model}"
        )
    return None


def _rope_fields(rope: RopeConfig, config_format: ConfigFormat) -> dict[str, Any]:
    params = rope_config_to_hf(rope)
    if config_format == 5:
        return {"rope_parameters": params}
    if not params.pop("truncate", True):
        raise ValueError(
            "YaRN with truncate=False needs transformers 5's config fields: export with format 5"
        )
    theta = params.pop("rope_theta")
    return {"rope_theta": theta, "rope_scaling": None if params["rope_type"] == "default" else params}


def _single_or_list(ids: tuple[int, ...]) -> int | list[int] | None:
    return None if not ids else ids[0] if len(ids) == 1 else list(ids)


def hf_config(config: ModelConfig, tokens: SpecialTokens, config_format: ConfigFormat) -> dict[str, Any]:
    """The HF `config.json` of `config` (RoPE always in the layout `export_state_dict` writes)."""
    attention = config.attention
    common = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": attention.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": tokens.bos_id,
        "eos_token_id": _single_or_list(tokens.eos_ids),
        "dtype" if config_format == 5 else "torch_dtype": "float32",
    }
    if isinstance(attention, MLAConfig):
        specific = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **mla_config_to_hf(attention),
            "rope_interleave": True,
            "rms_norm_eps": config.norm_eps,
            "first_k_dense_replace": config.n_layers,
            "moe_intermediate_size": config.d_ff,
            **DENSE_MOE_FIELDS,
        }
        del specific["rope_parameters"]
    else:
        llama = not attention.qkv_bias
        specific = {
            "architectures": ["LlamaForCausalLM" if llama else "Qwen2ForCausalLM"],
            "model_type": "llama" if llama else "qwen2",
            "num_key_value_heads": attention.n_kv_heads,
            "head_dim": attention.head_dim,
            **({"mlp_bias": False} if llama else {"use_sliding_window": False, "sliding_window": None}),
        }
    return {**common, **specific, **_rope_fields(attention.rope, config_format)}


def _reorder_rope_rows(weight: Tensor, heads: int, width: int, start: int, order: Tensor) -> Tensor:
    """`weight: [heads·width, ...]` with rows `start : start + len(order)` of every head reordered."""
    rows = weight.reshape(heads, width, *weight.shape[1:]).clone()
    rows[:, start : start + len(order)] = rows[:, start : start + len(order)][:, order]
    return rows.reshape(weight.shape)


def _half_split_order(dim: int) -> Tensor:
    """Interleaved → half-split: new row i takes old row 2i, new row i + dim/2 old row 2i + 1."""
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])


def _interleaved_order(dim: int) -> Tensor:
    """Half-split → interleaved: new row 2i takes old row i, new row 2i + 1 old row i + dim/2."""
    return torch.arange(dim).view(2, dim // 2).T.flatten()


def export_state_dict(state_dict: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """HF-named weights with RoPE rows in the target layout: MLA interleaved, Llama half-split."""
    attention = config.attention
    state = dict(state_dict)
    if isinstance(attention, MLAConfig) and not attention.rope.interleave:
        order = _interleaved_order(attention.qk_rope_head_dim)
        q_name = "w_q" if attention.q_lora_rank is None else "w_uq"
        for i in range(config.n_layers):
            q, kv = f"blocks.{i}.attn.{q_name}.weight", f"blocks.{i}.attn.w_dkv.weight"
            state[q] = _reorder_rope_rows(
                state[q], attention.n_heads, attention.qk_head_dim, attention.qk_nope_head_dim, order
            )
            state[kv] = _reorder_rope_rows(state[kv], 1, attention.cache_width, attention.kv_lora_rank, order)
    elif isinstance(attention, GQAConfig) and attention.rope.interleave:
        order = _half_split_order(attention.head_dim)
        for i in range(config.n_layers):
            for name, heads in (("w_q", attention.n_heads), ("w_k", attention.n_kv_heads)):
                for param in ("weight", "bias") if attention.qkv_bias else ("weight",):
                    key = f"blocks.{i}.attn.{name}.{param}"
                    state[key] = _reorder_rope_rows(state[key], heads, attention.head_dim, 0, order)
    return model_state_dict_to_hf(state, config)


def save_safetensors(tensors: Mapping[str, Tensor], directory: Path, max_shard_size: int) -> list[str]:
    """`model.safetensors`, or shards `model-0000i-of-0000n.safetensors` of at most `max_shard_size`
    bytes each (a larger tensor alone in its shard) plus `model.safetensors.index.json`. Returns the
    file names written."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata=metadata)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, directory / name, metadata=metadata)
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {tensor: name for name, shard in zip(names, shards, strict=True) for tensor in shard},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


def export_tokenizer(tokenizer: Tokenizer, tokens: SpecialTokens) -> Tokenizer:
    """`tokenizer` that prepends BOS by itself when the model's prompts start with it, so HF
    tokenizers (and the engines' servers) encode a prompt to the ids `latentattn generate` feeds."""
    if not tokens.add_bos or tokenizer.encode("a").ids[:1] == [tokens.bos_id]:
        return tokenizer
    exported = Tokenizer.from_str(tokenizer.to_str())
    bos = exported.id_to_token(tokens.bos_id)
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tokens.bos_id)]
    )
    existing = exported.post_processor
    exported.post_processor = template if existing is None else processors.Sequence([existing, template])
    return exported


def tokenizer_files(tokenizer: Tokenizer, tokens: SpecialTokens, max_len: int) -> dict[str, Any]:
    """tokenizer_config.json and special_tokens_map.json for `AutoTokenizer`."""
    special = {
        "bos_token": None if tokens.bos_id is None else tokenizer.id_to_token(tokens.bos_id),
        "eos_token": tokenizer.id_to_token(tokens.eos_ids[0]) if tokens.eos_ids else None,
    }
    special = {key: value for key, value in special.items() if value is not None}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    if tokens.chat_template is not None:
        tokenizer_config["chat_template"] = tokens.chat_template
    return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special}


def export_checkpoint(
    checkpoint: str | Path,
    *,
    out: str | Path,
    force: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    config_format: ConfigFormat | None = None,
) -> Path:
    """`latentattn export CKPT --out DIR`: write the checkpoint as an HF model directory.

    `config_format` 5 writes `rope_parameters`, 4 `rope_theta` + `rope_scaling`; None: as the
    installed transformers (4 without it). Models the format cannot express raise ValueError saying
    why and what to do; `out` is written completely or not at all (`force` replaces a non-empty one).
    """
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    loaded: Checkpoint = load_checkpoint(checkpoint)
    check_output_dir(out, force=force, keep=loaded.directory)
    refusal = export_refusal(loaded.config)
    if refusal:
        raise ValueError(f"cannot export {str(checkpoint)!r}: {refusal}")
    config_format = config_format or installed_config_format()
    config = hf_config(loaded.config, loaded.tokens, config_format)
    tensors = export_state_dict(loaded.model.state_dict(), loaded.config)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    json_files = {
        "config.json": config,
        "generation_config.json": generation,
        **tokenizer_files(loaded.tokenizer, loaded.tokens, loaded.config.max_seq_len),
    }

    def write(directory: Path) -> None:
        save_safetensors(tensors, directory, max_shard_size)
        export_tokenizer(loaded.tokenizer, loaded.tokens).save(str(directory / "tokenizer.json"))
        for name, content in json_files.items():
            (directory / name).write_text(json.dumps(content, indent=2) + "\n")

    return write_directory(out, write, force=force, keep=loaded.directory)
