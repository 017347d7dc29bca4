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
    computes what that class computes: it runs the class's ``forward`` unchanged (:func:`computes_forward_of`),
    has no ``forward`` of its own on the instance, and keeps the methods the registration names as ``helpers``
    (those ``forward`` calls, e.g. ``nn.Conv2d._conv_forward``). Anything else needs a rule of its own.
    Registering a class twice raises unless ``replace=True``: a rule decides what a certificate claims."""

    def __init__(self, what: str):
        self.what = what
        self.rules: dict[type, Callable] = {}
        self.helpers: dict[type, tuple[str, ...]] = {}

    def register(self, *classes: type, replace: bool = False, helpers: tuple[str, ...] = ()):
        """Decorator registering the rule for ``classes``."""
        def register(rule: Callable) -> Callable:
            for cls in classes:
                if cls in self.rules and not replace and self.rules[cls] is not rule:
                    raise ValueError(f"{self.what}: {cls.__qualname__} already has a rule "
                                     f"({self.rules[cls].__qualname__}); pass replace=True to replace it")
                self.rules[cls], self.helpers[cls] = rule, tuple(helpers)
            return rule
        return register

    def unregister(self, *classes: type) -> None:
        for cls in classes:
            self.rules.pop(cls, None)
            self.helpers.pop(cls, None)

    def rule_for(self, module: nn.Module) -> Callable | None:
        for cls in type(module).__mro__:
            rule = self.rules.get(cls)
            if rule is not None:
                return rule if self._computes_as(module, cls) else None
        return None

    def _computes_as(self, module: nn.Module, cls: type) -> bool:
        if not computes_forward_of(module, cls):
            return False
        own = module.__dict__.get("forward")
        if own is not None and not getattr(getattr(own, "__func__", own), "same_function", False):
            return False  # an instance-level forward (marked ``same_function`` when it computes the same)
        return all(getattr(type(module), name, None) is getattr(cls, name, None) for name in self.helpers[cls])

    def names(self) -> str:
        """The registered types, sorted, as users write them (nn.Linear, lipkern.nn.AOLConv2d, ...)."""
        def display(cls: type) -> str:
            for package, shown in (("torch.nn", "nn"), ("lipkern.nn", "lipkern.nn"),
                                   ("lipkern.models", "lipkern.models")):
                if cls.__module__ == package or cls.__module__.startswith(package + "."):
                    return f"{shown}.{cls.__name__}"
            return f"{cls.__module__}.{cls.__name__}"

        return ", ".join(sorted(display(cls) for cls in self.rules))
