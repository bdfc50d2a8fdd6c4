"""Placeholder: the Numba CPU kernels replace this re-export of the NumPy reference."""

from .reference import dequantize_int8, gather_rows, move_rows, quantize_int8, rope_shift, scatter_rows

__all__ = ["dequantize_int8", "gather_rows", "move_rows", "quantize_int8", "rope_shift", "scatter_rows"]
