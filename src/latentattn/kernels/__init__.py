"""Fused CPU kernels, compiled from C++ on first use; every caller falls back to the torch path when
`kernel_status()` says they are unavailable."""

from latentattn.kernels.latent_decode import KernelStatus, fused_latent_decode, kernel_status

__all__ = ["KernelStatus", "fused_latent_decode", "kernel_status"]
