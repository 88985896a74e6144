"""MLA's latent stored in 8 bits: FlashMLA's 656-byte layout.

Per token per layer: c_KV as d_c int8 or fp8-e4m3 values with one fp32 scale per group of 128 values
(symmetric absmax scaling), and the RoPE key k_pe kept in bf16: 512 + 4·4 + 64·2 = 656 bytes for
DeepSeek's d_c = 512, d_R = 64, against 1,152 in bf16. Caches take the latent in the compute dtype;
attention reads it back dequantized one block of keys at a time. `QuantizedLatentCache` is the
contiguous cache; the paged one stores the same entries in its pools (`latent_encoding`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from latentattn.caches.base import FullPrecision, LatentEncoding, Workspace
from latentattn.caches.contiguous import LatentCache
from latentattn.calculator import latent_group_size
from latentattn.config import MLAConfig
from latentattn.registry import LATENT_FORMATS, lookup, resolve


class EightBitLatent(LatentEncoding):
    """`[c_KV | k_pe]` with c_KV quantized per group of `group_size` values (default 128, or d_c when
    smaller; `calculator.latent_group_size`): entries `c_kv` [C] int8 or float8_e4m3fn, `scale`
    [C / group_size] fp32, `k_pe` [R] bf16."""

    def __init__(self, config: MLAConfig, format: str = "fp8", group_size: int | None = None) -> None:
        storage = getattr(torch, lookup(LATENT_FORMATS, format, "latent cache format").storage)
        group_size = latent_group_size(config.kv_lora_rank, group_size)  # the calculator's rule too
        self.rounds = not storage.is_floating_point
        self.qmax = float((torch.iinfo if self.rounds else torch.finfo)(storage).max)
        self.format = format
        self.group_size = group_size
        self.kv_lora_rank = config.kv_lora_rank
        self.width = config.cache_width
        self.entries = {
            "c_kv": ((config.kv_lora_rank,), storage),
            "scale": ((config.kv_lora_rank // group_size,), torch.float32),
            "k_pe": ((config.qk_rope_head_dim,), torch.bfloat16),
        }

    def encode(self, latent: Tensor) -> dict[str, Tensor]:
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.width - self.kv_lora_rank], dim=-1)
        groups = c_kv.float().unflatten(-1, (-1, self.group_size))  # [B, T, C/g, g]
        scale = groups.abs().amax(dim=-1) / self.qmax  # [B, T, C/g]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero groups
        scaled = groups / scale[..., None]
        if self.rounds:  # integer storage: round to the nearest level (a cast would truncate)
            scaled = scaled.round().clamp(-self.qmax, self.qmax)
        stored = scaled.flatten(-2).to(self.entries["c_kv"][1])
        return {"c_kv": stored, "scale": scale, "k_pe": k_pe.to(torch.bfloat16)}

    def decode(self, stored: dict[str, Tensor], dtype: torch.dtype, workspace: Workspace | None) -> Tensor:
        c_kv = stored["c_kv"]
        shape = (*c_kv.shape[:2], self.width)
        if workspace is None:
            latent = torch.empty(shape, dtype=dtype, device=c_kv.device)
        else:
            latent = workspace.take("rows", shape, dtype, c_kv.device)
        latent[..., : self.kv_lora_rank] = c_kv
        latent[..., : self.kv_lora_rank].unflatten(-1, (-1, self.group_size)).mul_(stored["scale"][..., None])
        latent[..., self.kv_lora_rank :] = stored["k_pe"]
        return latent


def latent_encoding(config: MLAConfig, dtype: torch.dtype, latent_format: str | None) -> LatentEncoding:
    """How an MLA layer's cache stores its latents: as computed (`latent_format` None) or in 8 bits
    (one of `registry.LATENT_FORMATS`)."""
    if latent_format is None:
        return FullPrecision(config.cache_width, dtype)
    return resolve(lookup(LATENT_FORMATS, latent_format, "latent cache format").encoding)(
        config, latent_format
    )


class QuantizedLatentCache(LatentCache):
    """The contiguous latent cache in 8 bits: buffers `c_kv` [B, L, C], `scale` [B, L, C / group_size],
    `k_pe` [B, L, R] (see `EightBitLatent`); `options` as `LatentCache`'s (device, dtype, static, ...)."""

    def __init__(
        self,
        config: MLAConfig,
        batch_size: int,
        max_len: int,
        *,
        format: str = "fp8",
        group_size: int | None = None,
        **options: Any,
    ) -> None:
        self.format = format
        super().__init__(
            config, batch_size, max_len, encoding=EightBitLatent(config, format, group_size), **options
        )
