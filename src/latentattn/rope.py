"""Rotary position embedding (RoPE) with optional YaRN context extension.

Notation: B batch, T tokens, H heads, R rotary width (even). Angles, cos/sin and the rotation itself
are computed in fp32 (fp64 for fp64 inputs) and cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from latentattn.config import Llama3RopeConfig, RopeConfig, YarnConfig
from latentattn.layers import fp32_or_wider


def _yarn_correction_dim(rotations: float, dim: int, theta: float, original_length: int) -> float:
    """Rotary dimension index whose wavelength fits `rotations` times into `original_length`."""
    return dim * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def rope_inv_freq(dim: int, theta: float, yarn: YarnConfig | None = None) -> Tensor:
    """Inverse frequencies `theta^(-2i/dim)`, i < dim/2, in fp64; YaRN-blended when `yarn` is given.

    YaRN keeps the high frequencies (dims below the correction range computed from `beta_fast`),
    divides the low ones by `factor` (dims above the range from `beta_slow`), and ramps linearly
    between, the range computed from the *original* pre-training context length.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if yarn is None:
        return inv_freq
    low = _yarn_correction_dim(yarn.beta_fast, dim, theta, yarn.original_max_position_embeddings)
    high = _yarn_correction_dim(yarn.beta_slow, dim, theta, yarn.original_max_position_embeddings)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    # ramp 0 → keep the original frequency (extrapolate); ramp 1 → interpolate by `factor`.
    return inv_freq * (1 - ramp) + inv_freq / yarn.factor * ramp


def llama3_inv_freq(inv_freq: Tensor, llama3: Llama3RopeConfig) -> Tensor:
    """Llama 3.1's rescaling of `inv_freq`: long wavelengths divided by `factor`, short ones kept, a
    smooth blend between (as HF's `rope_type: llama3`)."""
    wavelength = 2 * math.pi / inv_freq
    original = llama3.original_max_position_embeddings
    smooth = (original / wavelength - llama3.low_freq_factor) / (
        llama3.high_freq_factor - llama3.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / llama3.factor + smooth * inv_freq
    scaled = torch.where(wavelength > original / llama3.low_freq_factor, inv_freq / llama3.factor, blended)
    return torch.where(wavelength < original / llama3.high_freq_factor, inv_freq, scaled)


def rope_frequencies(dim: int, config: RopeConfig) -> Tensor:
    """The inverse frequencies `[dim/2]` (fp64) of `config`: its listed `frequencies`, or theta's with
    its scaling scheme applied."""
    if config.frequencies is not None:
        if len(config.frequencies) != dim // 2:
            raise ValueError(
                f"RopeConfig.frequencies lists {len(config.frequencies)} pairs, the rotary width {dim} "
                f"has {dim // 2}"
            )
        return torch.tensor(config.frequencies, dtype=torch.float64)
    inv_freq = rope_inv_freq(dim, config.theta, config.yarn)
    if config.llama3 is not None:
        inv_freq = llama3_inv_freq(inv_freq, config.llama3)
    return inv_freq / config.linear_factor


class RotaryEmbedding(nn.Module):
    """Rotates the last dimension of `x: [B, T, H, R]` by angles `positions[b, t] · inv_freq`.

    The frequencies are kept in fp64 outside the module's buffers (so `module.to(torch.bfloat16)`
    cannot round them) and copied once per device and compute dtype. Given a step's `memo` (a dict the
    layers of one forward step share), cos/sin are computed once per step, not once per call.
    """

    def __init__(self, dim: int, config: RopeConfig) -> None:
        super().__init__()
        self.dim = dim
        self.interleave = config.interleave
        self.amplitude = config.yarn.rope_amplitude if config.yarn else 1.0
        self.inv_freq = rope_frequencies(dim, config)
        self.memo_key = f"rope {dim} {config!r}"
        """Names these frequencies in a step's memo (layers with equal RoPE share their cos/sin)."""
        self._inv_freq_copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _frequencies(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        if key not in self._inv_freq_copies:
            self._inv_freq_copies[key] = self.inv_freq.to(dtype).to(device)
        return self._inv_freq_copies[key]

    def cos_sin(
        self, positions: Tensor, dtype: torch.dtype, memo: dict | None = None
    ) -> tuple[Tensor, Tensor]:
        """`cos`, `sin` `[B, T, 1, R/2]` in `dtype` (times YaRN's amplitude) for `positions: [B, T]`."""
        key = (self.memo_key, dtype)
        if memo is not None and key in memo:
            return memo[key]
        angles = positions.to(dtype)[..., None] * self._frequencies(positions.device, dtype)  # [B, T, R/2]
        cos_sin = (
            (angles.cos() * self.amplitude)[:, :, None, :],
            (angles.sin() * self.amplitude)[:, :, None, :],
        )
        if memo is not None:
            memo[key] = cos_sin
        return cos_sin

    def forward(self, x: Tensor, positions: Tensor, memo: dict | None = None) -> Tensor:
        """x: [B, T, H, R]; positions: [B, T] integer token positions. Returns x rotated, same dtype."""
        compute_dtype = fp32_or_wider(x.dtype)
        cos, sin = self.cos_sin(positions, compute_dtype, memo)
        xf = x.to(compute_dtype)
        if self.interleave:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = xf.chunk(2, dim=-1)
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rotated.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, interleave={self.interleave}, amplitude={self.amplitude:.4f}"
