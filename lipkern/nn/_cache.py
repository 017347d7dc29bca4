"""Eval-mode caches keyed on the weight itself.

A value computed from a weight (AOL's rescaled weight, a spectral / CPL layer's eval σ) is served again only
while the weight is unchanged: same version counter, storage, dtype and device (an optimizer step,
``load_state_dict``, ``copy_``, ``.to()``) **and** equal contents, compared with a copy kept at the fill —
writes through ``weight.data`` (and other paths that do not bump the version counter) change the contents
without the counter. The comparison reads both once per eval forward and the result on the host (a device
synchronization in eval mode, never in training).
"""

from __future__ import annotations

import torch

__all__ = ["WeightSnapshot"]


class WeightSnapshot:
    """The state of a weight when a cached value was computed from it (plus any ``extra`` key parts)."""

    __slots__ = ("_copy", "_key")

    def __init__(self, weight: torch.Tensor, *extra):
        self._key = _key(weight, extra)
        with torch.inference_mode(False), torch.no_grad():
            self._copy = weight.detach().clone()

    def matches(self, weight: torch.Tensor, *extra) -> bool:
        """True when ``weight`` is the weight of the snapshot, unchanged (a NaN never matches)."""
        return self._key == _key(weight, extra) and torch.equal(self._copy, weight.detach())


def _key(weight: torch.Tensor, extra: tuple) -> tuple:
    return (weight._version, weight.data_ptr(), weight.dtype, weight.device, weight.shape, *extra)
