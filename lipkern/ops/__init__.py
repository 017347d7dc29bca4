"""Fused ops: one file per op (reference, Triton kernels, launchers, custom op, public function)."""

from lipkern.ops.aol import aol_rescale, aol_rescale_ref
from lipkern.ops.conv_power_iteration import conv_power_iteration, initial_conv_vectors
from lipkern.ops.cpl import cpl_conv2d, cpl_linear
from lipkern.ops.power_iteration import batched_power_iteration
from lipkern.ops.sll import sll_conv2d, sll_conv2d_ref, sll_guaranteed_scale, sll_linear, sll_linear_ref, sll_scale

__all__ = ["aol_rescale", "aol_rescale_ref", "batched_power_iteration", "conv_power_iteration", "cpl_conv2d",
           "cpl_linear", "initial_conv_vectors", "sll_conv2d", "sll_conv2d_ref", "sll_guaranteed_scale",
           "sll_linear", "sll_linear_ref", "sll_scale"]

_MOVED = {"chain_power_iteration": "lipkern.bounds.chain_power_iteration",
          "chain_power_iteration_ref": "lipkern.bounds.chain_power_iteration"}


def __getattr__(name: str):
    """Names that moved out of ``lipkern.ops`` (no kernel of their own): still importable from here, with a
    DeprecationWarning naming the new place."""
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"lipkern.ops.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'lipkern.ops' has no attribute {name!r}")
