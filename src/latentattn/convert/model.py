"""Whole models: every block's attention converted from its own inputs, block by block.

Calibration runs the source model one block at a time over all calibration windows, keeping only the
current hidden states (`[n, d]` for n calibration tokens) and each layer's input moments
(`[d + 1, d + 1]`), never every layer's activations. Every layer is calibrated on the unconverted
model's hidden states. `refit="attention"` then runs the source block by block once more, converting
each block as it goes from its `AttentionMoments` (one layer's in memory at a time).

`ModelConfig` holds one attention config for all layers, so all layers share k_pe's slots (hence its
frequencies and N; "score" ranks slots by their scores summed over the layers, each layer's scores
normalised to sum 1) and one kv_norm eps: the largest of the per-layer eps (the layer with the most
powerful latent), with weight √eps in every layer; a larger eps only deepens the linear regime.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from torch import Tensor, nn

from latentattn.attention import MLA
from latentattn.config import AttentionConfig, MLAConfig
from latentattn.convert.layer import ConversionConfig, check_widths, gqa_to_mla
from latentattn.convert.moments import Moments, augmented
from latentattn.convert.rope_split import RotaryKeys, Slot, choose_slots, largest_nope_width, nope_dims
from latentattn.model import Block, LanguageModel

CALIBRATION_BATCH_TOKENS = 4096
"""Tokens per forward pass of a block during calibration."""


def require_unconverted(model: LanguageModel) -> None:
    """Raise ValueError unless `model` has MHA/GQA/MQA attention."""
    if isinstance(model.config.attention, MLAConfig):
        raise ValueError("the model already uses MLA; conversion takes MHA/GQA/MQA models")


def check_sizes(model: LanguageModel, config: ConversionConfig) -> None:
    """Raise ValueError, before any calibration, unless `model` is MHA/GQA/MQA and `config` an svd/pca
    conversion whose R and C it allows ("score" slots are known only after calibrating: C is checked
    here against the most NoPE dims R/2 slots can leave, and exactly per layer)."""
    require_unconverted(model)
    if config.method not in ("svd", "pca"):
        raise ValueError(f"model_to_mla converts with svd or pca, not {config.method!r}")
    source = model.config.attention
    pairs, groups = source.head_dim // 2, source.n_kv_heads
    if config.rope_frequencies == "highest":
        slots = choose_slots("highest", config.qk_rope_head_dim, pairs, groups, None)
        nope = len(nope_dims(slots, source.head_dim, groups, config.rope_residual, source.rope.interleave))
    else:
        nope = largest_nope_width(config.qk_rope_head_dim, source.head_dim, groups, config.rope_residual)
    check_widths(config, source, nope)


def _attention_inputs(model: LanguageModel, tokens: Tensor) -> Iterator[tuple[Block, list[Tensor]]]:
    """Each block with what its attention sees on `tokens: [B, T]` (its post-norm hidden states, in
    batches of windows `[b, T, d]`), block by block."""
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(
            f"calibration tokens must be a non-empty [batch, tokens] tensor, got {tuple(tokens.shape)}"
        )
    batch = max(1, CALIBRATION_BATCH_TOKENS // tokens.shape[1])
    with torch.no_grad():
        hidden = [model.embed(chunk.to(model.embed.weight.device)) for chunk in tokens.split(batch)]
    for block in model.blocks:
        with torch.no_grad():
            inputs = [block.attn_norm(states) for states in hidden]
        yield block, inputs
        with torch.no_grad():
            hidden = [block(states, None, None, "auto") for states in hidden]


def layer_input_moments(
    model: LanguageModel, tokens: Tensor, *, progress: Callable[[str], None] | None = None
) -> list[Moments]:
    """The moments of what each block's attention sees (its post-norm hidden states) on `tokens: [B, T]`,
    computed block by block."""
    result = []
    for index, (_, inputs) in enumerate(_attention_inputs(model, tokens)):
        moments = Moments.zeros(model.config.d_model, model.embed.weight.device)
        for x in inputs:
            moments.add(x)
        result.append(moments)
        if progress:
            progress(f"calibrated layer {index + 1}/{len(model.blocks)}")
    return result


def shared_slots(model: LanguageModel, config: ConversionConfig, moments: list[Moments]) -> list[Slot]:
    """k_pe's slots for every layer: by pair for "highest"; for "score", by the layers' normalised
    scores summed."""
    source = model.config.attention
    pairs, groups = source.head_dim // 2, source.n_kv_heads
    if config.rope_frequencies == "highest":
        return choose_slots("highest", config.qk_rope_head_dim, pairs, groups, None)
    total = torch.zeros(pairs, groups, dtype=torch.float64)
    for block, layer_moments in zip(model.blocks, moments, strict=True):
        attn, sigma = block.attn, layer_moments.second_moment
        w_q = augmented(attn.w_q).view(source.n_heads, source.head_dim, -1)
        w_k = augmented(attn.w_k).view(groups, source.head_dim, -1)
        scores = RotaryKeys.analyse(w_q, w_k, sigma.to(w_q.device), source.rope.interleave).scores.cpu()
        total += scores / scores.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return choose_slots("score", config.qk_rope_head_dim, pairs, groups, total)


def assemble(model: LanguageModel, layers: list[nn.Module], attention: AttentionConfig) -> LanguageModel:
    """A copy of `model` whose blocks' attention are `layers` (all with config `attention`); copied, not
    built anew, since initialising a fresh model's weights costs more than copying them."""
    converted = copy.deepcopy(model)
    converted.config = replace(model.config, attention=attention)
    for block, layer in zip(converted.blocks, layers, strict=True):
        block.attn = layer
    return converted.train(model.training)


def model_to_mla(
    model: LanguageModel,
    config: ConversionConfig,
    calibration: Tensor | None = None,
    *,
    moments: list[Moments] | None = None,
    progress: Callable[[str], None] | None = None,
) -> LanguageModel:
    """`model` (MHA/GQA/MQA) with every block's attention converted by `gqa_to_mla` from the block's
    inputs on the calibration tokens `[B, T]` (required for "pca" and `refit="attention"`); `moments`:
    their `layer_input_moments` if already computed (to calibrate once and convert several ways). All
    other weights are copied."""
    check_sizes(model, config)
    if isinstance(calibration, list):
        raise ValueError(
            "pass calibration tokens [batch, tokens] as `calibration` and their moments as `moments=`"
        )
    if calibration is None and config.refit == "attention":
        raise ValueError("refit 'attention' needs calibration tokens [batch, tokens]; or pass refit='none'")
    if calibration is None and moments is None and config.method == "pca":
        raise ValueError("method 'pca' needs calibration tokens [batch, tokens]")
    if moments is None:
        if calibration is None:
            moments = [Moments.isotropic(model.config.d_model) for _ in model.blocks]
        else:
            moments = layer_input_moments(model, calibration, progress=progress)
    elif len(moments) != len(model.blocks):
        raise ValueError(f"calibration moments for {len(moments)} layers, the model has {len(model.blocks)}")
    slots = shared_slots(model, config, moments)
    windows: Iterator[list[Tensor] | None] = iter([None] * len(moments))
    if config.refit == "attention":
        windows = (inputs for _, inputs in _attention_inputs(model, calibration))
    layers = []
    for index, (block, layer_moments, layer_windows) in enumerate(
        zip(model.blocks, moments, windows, strict=True)
    ):
        layers.append(gqa_to_mla(block.attn, config, layer_moments, slots=slots, windows=layer_windows))
        if progress:
            progress(f"converted layer {index + 1}/{len(model.blocks)}")
    shared = replace(layers[0].config, norm_eps=max(layer.config.norm_eps for layer in layers))
    rebuilt = []
    for layer in layers:
        weight = layer.w_o.weight
        state = layer.state_dict()
        state["kv_norm.weight"] = torch.full_like(state["kv_norm.weight"], math.sqrt(shared.norm_eps))
        rebuilt.append(MLA(shared, device=weight.device, dtype=weight.dtype))
        rebuilt[-1].load_state_dict(state)
    return assemble(model, rebuilt, shared)
