"""One registration path for every lipkern op: :func:`define_op` builds it from one description.

An op is described by its schema (the ``torch.library`` signature), its implementation (``forward``: the fast
kernels, chosen by ``lipkern._dispatch``), the shapes of its outputs (``fake``) and, when it is differentiable,
its ``backward`` (fast kernels) and a ``functional`` forward / ``functional_backward`` written in
differentiable PyTorch ops. From that, :class:`Op` builds:

- the custom op ``lipkern::<name>`` (``torch.compile`` / ``torch.export`` see it) with its fake, and for a
  differentiable op the custom op ``lipkern::<name>_backward`` and ``register_autograd``;
- the eager fast path, one ``autograd.Function`` (one Python dispatch instead of the custom op's layers);
- the fallbacks: under ``torch.func`` transforms the functional forward (functorch differentiates and vmaps
  it); in a backward whose graph is recorded (``create_graph=True``), under autocast or a transform, the
  functional backward (exact second derivatives on every backend);
- autocast: the op runs with autocast off on its device (the public function casts its inputs first, where
  the op's dtype policy says so);
- mutated arguments (declared in the schema): the implementation gets contiguous ones, copied back after.

A call takes the first path that applies: autocast → go on with it off; a torch.func transform →
``functional`` (mutating ops: the custom op); tracing (compile, export, FakeTensorMode, make_fx) → the custom
op; no gradient asked for → ``forward(..., save=False)`` directly; ``composite_when(*args)`` true (the op's
size model: on the CPU at small sizes PyTorch's own autograd of the functional form beats a Python
``autograd.Function`` whose backward issues the same kernels one by one) → ``functional``; else the
autograd.Function.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch._C import _functorch

from lipkern._dispatch import record_implementation, tracing

__all__ = ["Op", "define_op"]


def _functorch_active() -> bool:
    return torch._C._are_functorch_transforms_active()  # (peek_interpreter_stack is not None under Dynamo)


def _autocast_device(tensor: torch.Tensor) -> str | None:
    """The device type of ``tensor`` when autocast is on for it, else None (one C call for CPU / CUDA tensors
    when no autocast is on; ``_is_any_autocast_enabled`` does not see every backend's, e.g. MPS's)."""
    if (tensor.is_cpu or tensor.is_cuda) and not torch._C._is_any_autocast_enabled():
        return None
    device = tensor.device.type
    return device if device != "meta" and torch.is_autocast_enabled(device) else None


def _any_requires_grad(args, count: int) -> bool:
    for i in range(count):  # (a loop: a generator costs a small layer's call more than the test)
        if args[i] is not None and args[i].requires_grad:
            return True
    return False


def _wrapped(tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and _functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _is_tensor_type(arg) -> bool:
    kind = arg.type
    if isinstance(kind, torch._C.OptionalType):
        kind = kind.getElementType()
    return isinstance(kind, torch._C.TensorType)


@dataclasses.dataclass
class Op:
    """See the module docstring. The schema lists the op's tensors first, then its other arguments. Eager
    calls pass the tensors and the op's own form of the others (``to_op_args`` / ``from_op_args`` convert
    between that and the schema's, e.g. a prebuilt conv geometry against its fields; identity by default).

    forward(*args, save) -> outputs: a tensor, or a tuple of ``visible`` differentiable outputs then residuals
        kept for the backward. With ``save`` False no backward follows (residuals may be empty); with ``save``
        True they have the shapes ``fake`` gives (which takes the schema's arguments).
    backward(grads, inputs, saved, needs) -> one gradient (or None) per tensor argument: grads of the visible
        outputs (None where none reached them), inputs the call's arguments, saved the outputs named in
        ``saved_outputs`` then the residuals, needs one bool per tensor argument.
    functional(*args) -> the visible outputs, and functional_backward(...) as backward, in differentiable ops.
    composite_when(*args) -> bool: run ``functional`` under autograd instead of the fast path (recorded as
        '<name>: torch-composite').
    """

    name: str
    schema: str
    forward: Callable
    fake: Callable
    visible: int = 1
    saved_outputs: Sequence[int] = ()
    backward: Callable | None = None
    functional: Callable | None = None
    functional_backward: Callable | None = None
    to_op_args: Callable | None = None
    from_op_args: Callable | None = None
    composite_when: Callable | None = None

    def __post_init__(self):
        parsed = torch._C.parse_schema(f"lipkern::{self.name}{self.schema}")
        kinds = [_is_tensor_type(a) for a in parsed.arguments]
        self.n_tensors = kinds.index(False) if False in kinds else len(kinds)
        if any(kinds[self.n_tensors:]):
            raise ValueError(f"lipkern::{self.name}: the schema must list its tensors first")
        self.mutated = tuple(i for i, a in enumerate(parsed.arguments)
                             if a.alias_info is not None and a.alias_info.is_write)
        self.differentiable = self.backward is not None
        mutated_names = [parsed.arguments[i].name for i in self.mutated]
        self.custom_op = torch.library.custom_op(f"lipkern::{self.name}", self._op_impl,
                                                 mutates_args=mutated_names, schema=self.schema)
        self.custom_op.register_fake(self.fake)
        if self.differentiable:
            declared = self.schema[self.schema.index("(") + 1:self.schema.rindex(") ->")].split(", ")
            statics = "".join(", " + d for d in declared[self.n_tensors:])
            self.backward_op = torch.library.custom_op(
                f"lipkern::{self.name}_backward", self._backward_op_impl, mutates_args=(),
                schema=f"(Tensor?[] grads, Tensor?[] saved, bool[] needs{statics}) -> Tensor[]")
            self.backward_op.register_fake(self._backward_op_fake)
            self.custom_op.register_autograd(self._op_backward, setup_context=self._op_setup_context)

    # ---- calls ---------------------------------------------------------------------------------------------
    def __call__(self, *args):
        """Run the op; returns its visible outputs (one tensor if one)."""
        device = _autocast_device(args[0])
        if device is not None:
            with torch.autocast(device, enabled=False):
                return self(*args)
        if not self.differentiable:  # the mutating power iterations: never part of a graph
            with torch.no_grad():
                if tracing() or _functorch_active():
                    return self.custom_op(*self._op_args(args))
                return self._run_forward(args, save=False)
        if _functorch_active():
            return self.functional(*args)
        if tracing():
            return self._visible(self.custom_op(*self._op_args(args)))
        if not (torch.is_grad_enabled() and _any_requires_grad(args, self.n_tensors)):
            return self._visible(self.forward(*args, save=False))
        if self.composite_when is not None and self.composite_when(*args):
            record_implementation(self.name, "torch-composite")
            return self.functional(*args)
        return self._visible(_EagerFunction.apply(self, *args))

    def _op_args(self, args) -> tuple:
        return tuple(self.to_op_args(*args)) if self.to_op_args is not None else args

    def _call_args(self, op_args) -> tuple:
        return tuple(self.from_op_args(*op_args)) if self.from_op_args is not None else tuple(op_args)

    def _visible(self, outputs):
        if isinstance(outputs, torch.Tensor):
            return outputs
        return outputs[0] if self.visible == 1 else tuple(outputs[:self.visible])

    def _run_forward(self, args, save: bool):
        """forward, with mutated arguments made contiguous for it and copied back after; their version counters
        are bumped (kernels write through raw pointers, which autograd's saved-tensor checks and
        ``lipkern.nn.power``'s credits would not see)."""
        copies = [(i, args[i].contiguous()) for i in self.mutated if not args[i].is_contiguous()]
        work = list(args)
        for i, copy in copies:
            work[i] = copy
        out = self.forward(*work, save=save)
        for i, copy in copies:
            args[i].copy_(copy)
        if self.mutated and not tracing():
            torch.autograd.graph.increment_version([args[i] for i in self.mutated])
        return out

    def _op_impl(self, *op_args):
        with torch.autocast(op_args[0].device.type, enabled=False):  # autocast reaches inside custom ops
            return self._run_forward(self._call_args(op_args), save=True)

    # ---- backward ------------------------------------------------------------------------------------------
    def _kept(self, args, outputs) -> list:
        """What the backward keeps: the tensor arguments, the saved outputs, the residuals."""
        return [*args[:self.n_tensors], *(outputs[i] for i in self.saved_outputs), *outputs[self.visible:]]

    def _save(self, ctx, args, outputs) -> None:
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        ctx.statics = tuple(args[self.n_tensors:])
        ctx.save_for_backward(*self._kept(args, outputs))
        ctx.set_materialize_grads(False)  # no zero tensors for outputs nobody differentiates
        if len(outputs) > self.visible:
            ctx.mark_non_differentiable(*outputs[self.visible:])

    def _gradients(self, ctx, grads, needs, through_op: bool) -> tuple:
        """One gradient per tensor argument (None where not asked for)."""
        kept = ctx.saved_tensors
        args, saved = (*kept[:self.n_tensors], *ctx.statics), tuple(kept[self.n_tensors:])
        grads = grads[:self.visible]
        if all(g is None for g in grads) or not any(needs):
            return (None,) * self.n_tensors
        device = _autocast_device(args[0])
        if torch.is_grad_enabled() or device is not None or _functorch_active() or _wrapped(grads):
            with torch.autocast(device, enabled=False) if device is not None else contextlib.nullcontext():
                result = self.functional_backward(grads, args, saved, needs)
        elif through_op:
            op_args = self._op_args(args)
            result = self.backward_op(list(grads), [*op_args[:self.n_tensors], *saved], list(needs),
                                      *op_args[self.n_tensors:])
        else:
            result = self.backward(grads, args, saved, needs)
        return tuple(g if need else None for g, need in zip(result, needs))

    def _backward_op_impl(self, grads, saved, needs, *statics):
        n = self.n_tensors
        args = self._call_args((*saved[:n], *statics))
        out = self.backward(tuple(grads), args, tuple(saved[n:]), tuple(needs))
        return [g.contiguous() if need and g is not None else _placeholder(t, grads)
                for t, g, need in zip(saved[:n], out, needs)]

    def _backward_op_fake(self, grads, saved, needs, *statics):
        return [torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None
                else _placeholder(t, grads) for t, need in zip(saved[:self.n_tensors], needs)]

    def _op_setup_context(self, ctx, inputs, output):
        self._save(ctx, self._call_args(inputs), output)

    def _op_backward(self, ctx, *grads):
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:self.n_tensors])
        grads_in = self._gradients(ctx, grads, needs, through_op=True)
        return (*grads_in, *(None,) * (len(ctx.needs_input_grad) - self.n_tensors))


def _placeholder(t, grads) -> torch.Tensor:
    """The empty tensor a custom op returns where a gradient was not asked for."""
    like = t if t is not None else next(g for g in grads if g is not None)
    return like.new_empty(0)


class _EagerFunction(torch.autograd.Function):
    """The eager path of every differentiable op: its forward and backward without the custom op's layers."""

    @staticmethod
    def forward(ctx, op: Op, *args):
        outputs = op.forward(*args, save=True)
        ctx.op = op
        op._save(ctx, args, outputs)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        op = ctx.op
        needs = tuple(bool(n) for n in ctx.needs_input_grad[1:op.n_tensors + 1])
        grads_in = op._gradients(ctx, grads, needs, through_op=False)
        return (None, *grads_in, *(None,) * (len(ctx.needs_input_grad) - 1 - op.n_tensors))


def define_op(name: str, schema: str, forward: Callable, fake: Callable, **description) -> Op:
    """Build ``lipkern::<name>`` and its eager, compile, functorch and double-backward paths (see :class:`Op`)."""
    return Op(name, schema, forward, fake, **description)
