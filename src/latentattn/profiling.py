"""Measuring what a computation keeps alive for backward, device-agnostically."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def saved_activation_bytes(
    forward: Callable[[], Tensor], parameters: Iterable[Tensor] = ()
) -> tuple[Tensor, int]:
    """Run `forward()` and count the bytes of the distinct tensor storages autograd saves for backward,
    leaving out `parameters` (weights are saved too but are not activation memory). Returns
    (output, bytes)."""
    excluded = {parameter.untyped_storage().data_ptr() for parameter in parameters}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    return output, sum(storages.values())
