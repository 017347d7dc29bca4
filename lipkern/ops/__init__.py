"""Fused ops: one file per op (reference, Triton kernels, launchers, custom op, public function)."""

from lipkern.ops.aol import aol_rescale, aol_rescale_ref

__all__ = ["aol_rescale", "aol_rescale_ref"]
