"""Small building blocks shared by the attention layers and the model."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def fp32_or_wider(dtype: torch.dtype) -> torch.dtype:
    """The dtype for numerically sensitive steps (RoPE, norms, softmax): fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """`x / rms(x) · weight`, normalised in fp32 (or wider) and cast back before the weight, as HF does."""

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(fp32_or_wider(x.dtype))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
