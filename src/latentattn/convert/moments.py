"""Second moments of a layer's inputs: the only statistics of the calibration data conversion reads.

Notation: n rows, d model width. Inputs are augmented with a constant 1, x̃ = [x; 1], so that a bias
rides along as one more weight column: for y = W x + b = W̃ x̃, E[y yᵀ] = W̃ E[x̃ x̃ᵀ] W̃ᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

CHUNK_ROWS = 4096
"""Rows per product, so no augmented copy of the whole input is ever made."""


@dataclass
class Moments:
    """Running `Σ x̃ x̃ᵀ` over the `count` rows seen, `[d + 1, d + 1]` in fp64."""

    total: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, d_model: int, device: torch.device | str | None = None) -> Moments:
        return cls(torch.zeros(d_model + 1, d_model + 1, dtype=torch.float64, device=device))

    @classmethod
    def isotropic(cls, d_model: int) -> Moments:
        """Unit-variance, zero-mean inputs: E[x̃ x̃ᵀ] = I (what a conversion without calibration assumes)."""
        return cls(torch.eye(d_model + 1, dtype=torch.float64), count=1)

    @classmethod
    def of(cls, x: Tensor) -> Moments:
        """The moments of `x: [..., d]`."""
        moments = cls.zeros(x.shape[-1], x.device)
        moments.add(x)
        return moments

    @property
    def d_model(self) -> int:
        return self.total.shape[0] - 1

    def add(self, x: Tensor) -> None:
        """Accumulate the rows of `x: [..., d]` (in fp64)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"calibration inputs must have width d_model={self.d_model}, got {x.shape[-1]}")
        for chunk in x.reshape(-1, self.d_model).split(CHUNK_ROWS):
            rows = torch.cat([chunk.double(), chunk.new_ones(len(chunk), 1, dtype=torch.float64)], dim=1)
            self.total += rows.T @ rows
            self.count += len(chunk)

    @property
    def second_moment(self) -> Tensor:
        """E[x̃ x̃ᵀ], `[d + 1, d + 1]`; the top-left `[d, d]` block is E[x xᵀ], the last column E[x̃]."""
        if self.count == 0:
            raise ValueError("no calibration rows were seen")
        return self.total / self.count


def augmented(linear: nn.Linear) -> Tensor:
    """`W̃ = [W | b]` in fp64, `[out, in + 1]` (b = 0 without a bias)."""
    weight = linear.weight.detach().double()
    bias = torch.zeros(len(weight), dtype=torch.float64, device=weight.device)
    if linear.bias is not None:
        bias = linear.bias.detach().double()
    return torch.cat([weight, bias[:, None]], dim=1)
