"""Argument checks shared by the public functions: a clear error naming the argument, never a silent
conversion (1.9 → 1, True → 1, "no" → True)."""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["as_bool", "as_int", "as_shape", "as_positive_float", "is_int"]


def is_int(value) -> bool:
    """An integer (Python or NumPy, or a 0-dim integer tensor), not a bool."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and not value.is_complex() \
            and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_int(value, name: str, minimum: int | None = None) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def as_shape(values, name: str, minimum: int = 1) -> tuple[int, ...]:
    """A shape: a sequence (or torch.Size) of ints >= ``minimum``."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {values!r}")
    values = tuple(values)
    if not all(is_int(v) for v in values):
        raise TypeError(f"{name} must be a sequence of ints, got {values!r}")
    shape = tuple(int(v) for v in values)
    if any(v < minimum for v in shape):
        raise ValueError(f"{name} must hold ints >= {minimum}, got {shape}")
    return shape


def as_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, numbers.Integral)) or value not in (0, 1):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def as_positive_float(value, name: str, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")
    return value
