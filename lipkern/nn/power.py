"""Power iteration for a whole model: the layers of equal geometry advance their vectors in one stacked call.

Every training-mode spectral / CPL layer (and every subclass of them in user models) goes through
:func:`advance` for its power step; nothing is registered by the user. Except on the CPU where the C++ kernels
take the layer (``_direct_power_rows``: small layers, float32 / float64): a stacked call saves launches, which
the CPU does not have, and its bookkeeping would cost more than the step, so such a layer makes its own call
(not a subclass that overrides ``_stacked_power`` / ``_stacked_sigma_data``: it keeps its own step). The layers
are grouped by ``layer._power_key()``: the operator's geometry, ``n_power_iterations``, dtype and device.

A **stacked call** ("round") runs one ``conv_power_iteration`` / ``batched_power_iteration`` for a set of
layers of a group: ``torch.stack`` of their weights and of their right vectors ``u`` (fresh work tensors, never
the buffers), the op advancing the work tensors in place. Each layer of the round gets a **credit**: its row of
the work tensors plus a snapshot of the inputs the row was computed from (its weight and its ``u`` buffer, as
objects and by ``_version``). When a layer needs σ:

- it holds a credit whose snapshot still matches (same weight and ``u`` tensors, same versions): it consumes
  it: one ``_foreach_copy_`` writes the row into its ``u`` / ``v`` buffers, and σ = vᵀAu uses the row (for
  convs the round also computes G_l = ∂(vᵀA u)/∂W_l in one grouped weight-gradient conv, and σ_l = ⟨W_l, G_l⟩
  is one dot product per layer, differentiable in W_l with gradient G_l);
- otherwise it starts a round, for itself and for the layers of its group that ran in the previous step and
  have not run in this one (without a valid credit).

Why it is correct: a layer's new vectors are a function of (weight, u, n_iter) only, and a row is used only
if the weight and ``u`` are the very tensors, unmodified (``_version`` counts every in-place write: optimizer
steps, ``load_state_dict``, DDP broadcasts), that the row was computed from. So each layer gets exactly the
vectors a per-layer step at its own forward would give (the stacked op computes each layer independently), and
a layer's buffers change only when that layer runs. The choice of the layers in a round is only a performance
choice. The step boundary: a layer of the group that runs again starts a new step; the layers that ran in the
step before form the next round, so in steady state each group issues ONE stacked call per training step (the
first step, which discovers the members, runs one call per layer).

DDP: the vectors are still per-layer buffers (state_dict, broadcast, deterministic initialization unchanged);
every rank runs the same program, so the same rounds, and each row is a function of synchronized tensors.
Not grouped (each layer runs its own round of one, same numerics): under ``torch.compile`` tracing, inference
mode, functorch transforms, tensor subclasses (e.g. DTensor). No host synchronization: the bookkeeping reads
only Python-side metadata (object identity, ``_version``), never a value.
"""

from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["advance", "stacked_power_step"]

_LOCK = threading.Lock()  # nn.DataParallel runs replicas in threads
_GROUPS: dict = {}  # key -> _Group
_CREDITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> _Credit


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The power iteration of float16 / bfloat16 weights runs in float32 (the kernels need the range of
    ‖A‖² and the precision of a unit vector); the buffers keep the layer's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Credit:
    __slots__ = ("rows", "index", "weight", "weight_version", "u", "u_version", "key")

    def __init__(self, weight, u, key, rows, index):
        self.rows, self.index, self.key = rows, index, key
        self.weight, self.weight_version = weakref.ref(weight), weight._version
        self.u, self.u_version = weakref.ref(u), u._version

    def valid(self, weight, u, key) -> bool:
        """(the layer's current weight and u tensors: module attribute lookups cost ~0.5 µs each)"""
        return (self.weight() is weight and weight._version == self.weight_version and self.u() is u
                and u._version == self.u_version and key == self.key)


class _Group:
    __slots__ = ("current", "previous")

    def __init__(self):
        self.current: list = []  # weakrefs of the layers that ran in this step, in order
        self.previous: list = []  # ... in the step before


def stacked_power_step(layers: list, n_iter: int) -> tuple:
    """One stacked call for ``layers`` (equal ``_power_key()``): returns the rows of the advanced work tensors
    (U, V, G) as tuples, row i for ``layers[i]``, in the compute dtype (G: what the layers' σ needs besides u
    and v, e.g. the gradient of vᵀAu in the weight for convs, or None); the layers' buffers are not touched."""
    compute = _compute_dtype(layers[0].weight.dtype)
    if len(layers) == 1:  # views and one copy, not a stack
        weights = layers[0].weight.detach()[None]
        u_rows = layers[0].u[None].to(compute, copy=True)
    else:
        weights = torch.stack([layer.weight.detach() for layer in layers])
        u_rows = torch.stack([layer.u for layer in layers])
        if u_rows.dtype != compute:
            u_rows = u_rows.to(compute)
    weights = weights.to(compute)
    v_rows = layers[0]._new_v_rows(len(layers), compute)
    layers[0]._stacked_power(weights, u_rows, v_rows, n_iter)
    extra = layers[0]._stacked_sigma_data(u_rows, v_rows)
    return u_rows.unbind(0), v_rows.unbind(0), (None if extra is None else extra.unbind(0))  # one op per round


def new_empty(shape, dtype, device) -> torch.Tensor:
    """An output buffer: uninitialized (no launch), zeros under torch.compile tracing (traceable)."""
    factory = torch.zeros if torch.compiler.is_compiling() else torch.empty
    return factory(shape, dtype=dtype, device=device)


def _consume(layer, rows, index, buffers=None) -> tuple:
    u_rows, v_rows, extra = rows
    u, v = u_rows[index], v_rows[index]
    torch._foreach_copy_(buffers or [layer.u, layer.v], [u, v])  # one launch writes both buffers
    return u, v, (None if extra is None else extra[index])


def _tensors(layer) -> tuple:
    """(weight, u, v), from the module's dicts where they are there (a parametrized weight is not)."""
    params, buffers = layer._parameters, layer._buffers
    weight = params.get("weight")
    if weight is None:
        weight = layer.weight
    return weight, buffers["u"], buffers["v"]


def _groupable(w, u, v) -> bool:
    if type(w) is not torch.nn.Parameter and type(w) is not torch.Tensor:
        return False
    if type(u) is not torch.Tensor or type(v) is not torch.Tensor:
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(w)


def advance(layer) -> tuple:
    """Advance ``layer``'s vectors by ``layer.n_power_iterations`` steps (its buffers ``u`` and ``v`` are
    written) and return (u, v, extra) to compute σ from (tensors that are never written again)."""
    n_iter = layer.n_power_iterations
    weight, u, v = _tensors(layer)
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or not _groupable(weight, u, v):
        return _consume(layer, stacked_power_step([layer], n_iter), 0)
    key = layer._power_key()
    with _LOCK:
        credit = _CREDITS.pop(layer, None)
        group = _GROUPS.get(key)
        if group is None:
            group = _GROUPS[key] = _Group()
        current = [ref() for ref in group.current]  # strong references: the ids below stay unique
        current_ids = {id(m) for m in current if m is not None}
        if id(layer) in current_ids:  # a layer runs again: a new step begins
            group.previous, group.current, current, current_ids = group.current, [], [], set()
        group.current.append(weakref.ref(layer))
        if credit is not None and credit.valid(weight, u, key):
            return _consume(layer, credit.rows, credit.index, [u, v])
        members, member_ids, member_tensors = [layer], {id(layer)}, []
        for ref in group.previous:  # sets, not scans: CPL-XL has 70 layers in one group
            m = ref()
            if m is None or id(m) in member_ids or not m.training or id(m) in current_ids:
                continue
            tensors = _tensors(m)
            if not _groupable(*tensors) or m._power_key() != key:
                continue
            other = _CREDITS.get(m)
            if other is not None and other.valid(tensors[0], tensors[1], key):
                continue
            members.append(m)
            member_tensors.append(tensors)
            member_ids.add(id(m))
        rows = stacked_power_step(members, n_iter)
        for index, (m, (m_weight, m_u, _)) in enumerate(zip(members[1:], member_tensors), start=1):
            _CREDITS[m] = _Credit(m_weight, m_u, key, rows, index)
        _prune()
    return _consume(layer, rows, 0, [u, v])


def _prune() -> None:
    """Drop groups whose layers are all gone (their keys hold devices and shapes, not layers)."""
    if len(_GROUPS) < 64:
        return
    for key in [k for k, g in _GROUPS.items() if not any(r() is not None for r in g.current + g.previous)]:
        del _GROUPS[key]
