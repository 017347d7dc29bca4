"""Norm-preserving activations for 1-Lipschitz networks."""

from __future__ import annotations

import torch
from torch import nn

from lipkern.bounds.parsing import BoundParser, register_bound_rule
from lipkern.certify.rounding import register_rounding_rule

__all__ = ["MaxMin"]


class MaxMin(nn.Module):
    """Split the channels in two halves a, b and return ``cat(max(a, b), min(a, b))``.

    The output is a permutation of the input at every point, so the map is 1-Lipschitz and gradient-norm
    preserving (Anil et al. 2019, used by AOL and "1-Lipschitz Layers Compared").
    """

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= self.dim or x.shape[self.dim] % 2:
            raise ValueError(f"MaxMin: dimension {self.dim} must exist and have even size, got shape "
                             f"{tuple(x.shape)}")
        a, b = x.chunk(2, dim=self.dim)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


@register_bound_rule(MaxMin)
def _maxmin_bound_rule(parser: BoundParser, module, shape):
    """1: sorting each pair of coordinates is a piecewise permutation."""
    return parser.constant(module, 1.0, shape)


@register_rounding_rule(MaxMin)
def _maxmin_rounding_rule(analysis, module, shape):
    """Comparisons and copies: no rounding."""
    return analysis.exact(module, shape)
