"""Spectral norms of layers: estimates (named so) and guaranteed upper bounds (floating-point error included)."""

from lipkern.bounds.chain import chain_upper_bounds, head_chain_norms
from lipkern.bounds.gram import gram_upper_bound
from lipkern.bounds.network import LipschitzBound, LipschitzEstimate, lipschitz_bound, lipschitz_estimate
from lipkern.bounds.parsing import BoundParser, register_bound_rule, unregister_bound_rule
from lipkern.bounds.spectral import (
    SpectralNorm,
    conv2d_spectral_norm,
    frequency_matrices,
    linear_spectral_norm,
)

__all__ = ["BoundParser", "LipschitzBound", "LipschitzEstimate", "SpectralNorm", "chain_upper_bounds",
           "conv2d_spectral_norm", "frequency_matrices", "gram_upper_bound", "head_chain_norms",
           "linear_spectral_norm", "lipschitz_bound", "lipschitz_estimate", "register_bound_rule",
           "unregister_bound_rule"]
