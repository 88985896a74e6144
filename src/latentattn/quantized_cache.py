"""MLA's latent cache stored in 8 bits: FlashMLA's 656-byte layout.

Per token per layer: c_KV as d_c int8 or fp8-e4m3 values with one fp32 scale per group of 128 values
(symmetric absmax scaling), and the RoPE key k_pe kept in bf16: 512 + 4·4 + 64·2 = 656 bytes for
DeepSeek's d_c = 512, d_R = 64, against 1,152 in bf16. `update` takes the latent in the compute
dtype; attention reads it back dequantized one block of keys at a time (`LatentKeys`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentattn.cache import COPIED_BLOCK, LatentKeys, Workspace, _PreallocatedCache, check_entry
from latentattn.calculator import latent_group_size
from latentattn.config import MLAConfig

FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "int8": (torch.int8, 127.0),
    "fp8": (torch.float8_e4m3fn, torch.finfo(torch.float8_e4m3fn).max),
}
"""Storage dtype of c_KV and the largest magnitude it holds, per format."""


class QuantizedLatentCache(_PreallocatedCache):
    """`[c_KV | k_pe]` per token with c_KV quantized per group of `group_size` values (default 128, or
    d_c when smaller).

    Buffers: `c_kv` [B, L, C] int8 or float8_e4m3fn, `scale` [B, L, C / group_size] fp32,
    `k_pe` [B, L, R] bf16.
    """

    def __init__(
        self,
        config: MLAConfig,
        batch_size: int,
        max_len: int,
        *,
        format: str = "fp8",
        group_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        workspace: Workspace | None = None,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"unknown latent cache format {format!r}; choose one of {', '.join(FORMATS)}")
        group_size = latent_group_size(config.kv_lora_rank, group_size)  # the calculator's rule too
        storage, self.qmax = FORMATS[format]
        self.format = format
        self.group_size = group_size
        self.kv_lora_rank = config.kv_lora_rank
        self.cache_width = config.cache_width
        entries = {
            "c_kv": ((config.kv_lora_rank,), storage),
            "scale": ((config.kv_lora_rank // group_size,), torch.float32),
            "k_pe": ((config.qk_rope_head_dim,), torch.bfloat16),
        }
        super().__init__(entries, batch_size, max_len, device=device, dtype=dtype)
        self.workspace = workspace or Workspace()
        """Where attention's dequantized blocks are built (≤ `COPIED_BLOCK` rows, outside `nbytes`);
        the layers of one model may share one, since they attend one after another."""

    def quantize(self, latent: Tensor) -> dict[str, Tensor]:
        """`latent: [B, T, C + R]` → the stored entries (c_kv, scale, k_pe)."""
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.cache_width - self.kv_lora_rank], dim=-1)
        groups = c_kv.float().unflatten(-1, (-1, self.group_size))  # [B, T, C/g, g]
        scale = groups.abs().amax(dim=-1) / self.qmax  # [B, T, C/g]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero groups
        scaled = groups / scale[..., None]
        if self.format == "int8":
            scaled = scaled.round().clamp(-self.qmax, self.qmax)
        stored = scaled.flatten(-2).to(self.buffers["c_kv"].dtype)
        return {"c_kv": stored, "scale": scale, "k_pe": k_pe.to(torch.bfloat16)}

    def dequantize(
        self,
        c_kv: Tensor,
        scale: Tensor,
        k_pe: Tensor,
        workspace: Workspace | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Stored entries `[B, S, ...]` → the latent `[B, S, C + R]` in `dtype` (default: the compute
        dtype), built in `workspace` when given."""
        shape, dtype = (*c_kv.shape[:2], self.cache_width), dtype or self.dtype
        if workspace is None:
            latent = torch.empty(shape, dtype=dtype, device=c_kv.device)
        else:
            latent = workspace.take(shape, dtype, c_kv.device)
        latent[..., : self.kv_lora_rank] = c_kv
        latent[..., : self.kv_lora_rank].unflatten(-1, (-1, self.group_size)).mul_(scale[..., None])
        latent[..., self.kv_lora_rank :] = k_pe
        return latent

    def update(self, latent: Tensor, n_new: Tensor | None = None) -> tuple[LatentKeys, Tensor | None]:
        """Append `latent: [B, T, C + R]` quantized; returns the keys to read, dequantized on demand
        `[B, S, C + R]`, and the mask `[B, T, S]` (None: causal, last token sees all)."""
        check_entry(
            type(self).__name__,
            "latent",
            latent,
            (self.cache_width,),
            self.batch_size,
            self.dtype,
            self.device,
        )
        stored, mask = self._update(self.quantize(latent), n_new)
        keys = LatentKeys(
            lambda start, stop, workspace, dtype: self.dequantize(
                *(entry[:, start:stop] for entry in stored), workspace, dtype
            ),
            (self.batch_size, stored[0].shape[1], self.cache_width),
            self.dtype,
            max_block=COPIED_BLOCK,
            workspace=self.workspace,
        )
        return keys, mask
