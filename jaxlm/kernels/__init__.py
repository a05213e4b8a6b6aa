"""Custom Pallas kernels (GPU via Triton, TPU via Mosaic, CPU via interpret mode)."""

from jaxlm.kernels.flash_attention import flash_attention

__all__ = ["flash_attention"]
