"""The baseline that needs no new idea: fewer kv heads, each the mean of the heads it replaces.

GQA with G kv heads → G' heads (G' dividing G): kv head g' takes the mean of the keys and values (weights
and biases) of the source heads g'·G/G' … (g' + 1)·G/G' − 1, and query head h keeps its place, so it
reads the merged head that holds its old one (the GQA paper's mean-pooling of kv heads, without its
uptraining). The cache shrinks by G/G', as a GQA model's does.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from latentattn.attention import GQAAttention
from latentattn.config import GQAConfig
from latentattn.convert.model import assemble, require_unconverted
from latentattn.model import LanguageModel


def merge_layer_kv_heads(layer: GQAAttention, config: GQAConfig) -> GQAAttention:
    """`layer` with its kv heads averaged down to `config.n_kv_heads`."""
    source = layer.config
    weight = layer.w_q.weight
    merged = GQAAttention(config, device=weight.device, dtype=weight.dtype)
    state = layer.state_dict()
    for name, value in state.items():
        if name.startswith(("w_k.", "w_v.")):  # [G·D, ...] → [G'·D, ...]
            grouped = value.view(config.n_kv_heads, -1, source.head_dim, *value.shape[1:])
            state[name] = grouped.mean(dim=1).flatten(0, 1)
    merged.load_state_dict(state)
    return merged


@torch.no_grad()
def merge_kv_heads(model: LanguageModel, kv_heads: int) -> LanguageModel:
    """A copy of `model` whose every attention layer has `kv_heads` kv heads (fewer than, and dividing,
    the source's)."""
    require_unconverted(model)
    source = model.config.attention
    if not (0 < kv_heads < source.n_kv_heads and source.n_kv_heads % kv_heads == 0):
        raise ValueError(
            f"kv_heads must be fewer than the source's {source.n_kv_heads} kv heads and divide them, "
            f"got {kv_heads}"
        )
    attention = replace(source, n_kv_heads=kv_heads)
    return assemble(model, [merge_layer_kv_heads(block.attn, attention) for block in model.blocks], attention)
