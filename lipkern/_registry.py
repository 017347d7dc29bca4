"""Rules keyed by module type: the registries of :mod:`lipkern.bounds.parsing` (Lipschitz bound rules) and
:mod:`lipkern.certify.rounding` (floating-point error rules). A module type registers its rule next to its own
code; the analyses look it up by type, so they import no layer or model code."""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["TypeRegistry", "computes_forward_of"]


def computes_forward_of(module: nn.Module, *classes: type) -> bool:
    """``module`` is an instance of one of ``classes`` and runs that class's own forward: a subclass that
    overrides forward (say ``100 * super().forward(x)``) is not the class it derives from. Parametrizations
    (torch.nn.utils.parametrize) change the weight, not the forward, and count."""
    return any(isinstance(module, cls) and type(module).forward is cls.forward for cls in classes)


class TypeRegistry:
    """{module type: rule}. A module gets the rule of the nearest class in its MRO that registered one, if it
    runs that class's forward unchanged (:func:`computes_forward_of`): a subclass that overrides ``forward``
    computes something else and needs a rule of its own."""

    def __init__(self):
        self.rules: dict[type, Callable] = {}

    def register(self, *classes: type):
        """Decorator registering the rule for ``classes``."""
        def register(rule: Callable) -> Callable:
            for cls in classes:
                self.rules[cls] = rule
            return rule
        return register

    def rule_for(self, module: nn.Module) -> Callable | None:
        for cls in type(module).__mro__:
            rule = self.rules.get(cls)
            if rule is not None:
                return rule if computes_forward_of(module, cls) else None
        return None

    def names(self) -> str:
        """The registered types, sorted, as users write them (nn.Linear, lipkern.nn.AOLConv2d, ...)."""
        def display(cls: type) -> str:
            for package, shown in (("torch.nn", "nn"), ("lipkern.nn", "lipkern.nn"),
                                   ("lipkern.models", "lipkern.models")):
                if cls.__module__ == package or cls.__module__.startswith(package + "."):
                    return f"{shown}.{cls.__name__}"
            return f"{cls.__module__}.{cls.__name__}"

        return ", ".join(sorted(display(cls) for cls in self.rules))
