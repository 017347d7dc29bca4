"""Spectral norms of layers: estimates (named so) and guaranteed upper bounds (floating-point error included)."""

from lipkern.bounds.gram import gram_upper_bound
from lipkern.bounds.spectral import (
    SpectralNorm,
    conv2d_spectral_norm,
    frequency_matrices,
    linear_spectral_norm,
)

__all__ = ["SpectralNorm", "conv2d_spectral_norm", "frequency_matrices", "gram_upper_bound", "linear_spectral_norm"]
