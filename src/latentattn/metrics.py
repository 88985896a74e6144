"""How far an output is from its oracle: the one definition the benchmark, the tour and the tests use."""

from __future__ import annotations

import torch


def _ratio(difference: torch.Tensor, scale: torch.Tensor) -> float:
    """`difference / scale`, 0 when both are 0 (an all-zero output that matches an all-zero oracle)."""
    if scale == 0:
        return 0.0 if difference == 0 else float("inf")
    return (difference / scale).item()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|, computed in fp64."""
    actual, expected = actual.double(), expected.double()
    return _ratio((actual - expected).abs().max(), expected.abs().max())


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂, computed in fp64."""
    actual, expected = actual.double(), expected.double()
    return _ratio((actual - expected).norm(), expected.norm())
