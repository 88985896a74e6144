"""Fused CPU kernels, compiled from C++ on first use; every caller falls back to the torch path when
`kernel_status()` says they are unavailable."""

from latentattn.kernels.build import KernelStatus, kernel_status
from latentattn.kernels.head_products import fused_head_products
from latentattn.kernels.latent_decode import fused_latent_decode

__all__ = ["KernelStatus", "fused_head_products", "fused_latent_decode", "kernel_status"]
