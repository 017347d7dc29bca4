"""Whole-network Lipschitz bounds (ℓ₂): the product of layer norms and LipLT (Fazlyab et al. 2023).

Layout: :mod:`lipkern.bounds.parsing` walks the model into items through the **bound rules** each module type
registers (:func:`~lipkern.bounds.parsing.register_bound_rule`: torch's layers there, lipkern's next to their
code in ``lipkern.nn`` and ``lipkern.models``), :mod:`lipkern.bounds.liplt` holds the LipLT algebra, this module
the public functions.

**The chain.** A model (an ``nn.Sequential``, nested ones flattened; also ``lipkern.models.ConvNet`` /
``CPLNet`` / ``LipLTNet``) is parsed once into items, tracking the shape of one input through it:
- linear maps (:class:`~lipkern.bounds.operators.LinearMap`, biases dropped): ``nn.Linear``, ``nn.Conv2d`` (any
  padding, 'zeros'/'circular', stride, dilation, groups), AOL / Spectral layers with the weight they APPLY
  (AOL's rescaled weight; Spectral: W/σ with the eval-mode σ, or in training mode σ = ‖A u‖ for the layer's
  current unit vector u, an estimate), ``LinearNormalized`` (rows normalized), ``nn.BatchNorm1d/2d`` folded into diag(γ/√(var+ε))
  with the RUNNING statistics (the eval-mode function), ``Normalize`` (diag 1/std), ``nn.AvgPool2d`` (a
  depthwise conv, count_include_pad=True when padded), ``FirstChannels`` / ``ZeroChannelPad`` (1×1 convs or
  dense maps with 0/1 weights) and ``nn.PixelUnshuffle`` (a stride-r conv with 0/1 weights): exact maps;
- elementwise activations, slope-restricted in [α, β]: ReLU (0, 1), LeakyReLU(a) (min(a,1), max(a,1)), ReLU6
  (0, 1), Tanh (0, 1), Sigmoid (0, ¼), Softplus (0, 1), ELU(a) (0, max(1, a)), or user-declared
  (``activation_slopes={type or module: (α, β)}``);
- opaque blocks with a known constant: MaxMin (1), ``nn.PixelShuffle`` (1, a permutation), nn.MaxPool2d
  (√(windows covering a pixel), LMT, papers.md §6), CPL layers (1: for the bound only certified layers in
  eval mode, whose step size is proven), ``Residual(branch, skip)`` (L(skip) + L(branch), each bounded the
  same way), and any module given in ``lipschitz_constants={module or type: L}`` (THE USER'S RESPONSIBILITY);
- reshapes (free): nn.Flatten, nn.Unflatten, nn.Identity.
Maximal runs of maps and activations are LipLT **segments**; the model's bound is the product over segments
and opaque blocks. Inside a segment, two maps with no activation between them get the identity (α = β = 1:
the exact norm of their product), consecutive activations compose (slopes in the hull of the products), and
activations before the first / after the last map of a segment are constants max(|α|, |β|).

**LipLT with per-activation slopes (derivation).** A segment is z_0 = A_0 x, z_k = A_k φ_{k−1}(z_{k−1}), output
z_{K−1}. Write φ_i(t) = a_i t + ψ_i(t) with a_i = (α_i + β_i)/2: ψ_i has slopes in [−b_i, b_i],
b_i = (β_i − α_i)/2, so (elementwise) ‖ψ_i(z) − ψ_i(z')‖₂ ≤ b_i‖z − z'‖₂. Unrolling z_k = a_{k−1} A_k z_{k−1}
+ A_k ψ_{k−1}(z_{k−1}):
    z_k = (∏_{i<k} a_i) A_k⋯A_0 x + Σ_{j<k} (∏_{i=j+1}^{k−1} a_i) A_k⋯A_{j+1} ψ_j(z_j).
With m_j a Lipschitz constant of x ↦ z_j and the triangle inequality:
    m_0 = ‖A_0‖,  m_k = |∏_{i<k} a_i|·‖A_k⋯A_0‖ + Σ_{j<k} b_j·|∏_{i=j+1}^{k−1} a_i|·‖A_k⋯A_{j+1}‖·m_j,
which for ReLU (a = b = ½) is papers.md §1's recursion. By induction with ‖A_k⋯A_j‖ ≤ ∏‖A_i‖ and the
identity ∏(|a_i| + b_i) = ∏|a_i| + Σ_j b_j ∏_{i<j}(|a_i| + b_i) ∏_{i>j}|a_i|, m_{K−1} ≤ ∏‖A_i‖·∏max(|α_i|,|β_i|)
= the product bound. Estimated norms need not be submultiplicative, so every segment's value is
min(LipLT, product of the same norms): LipLT ≤ product holds always.
**Pairwise** (L_ab for f_a − f_b, the margin certificate of class a against b): the last map A_{K−1} of the
network is replaced by (e_a − e_b)ᵀA_{K−1}; the chain norms ending there come from
:func:`lipkern.bounds.chain.head_chain_norms` (exact, C×C Grams), clamped by √2·‖A_{K−1}⋯A_j‖; everything
before the last segment multiplies. So L_ab ≤ √2·L and L_ab ≤ L_a + L_b.

**The bound** (:func:`lipschitz_bound`, always sound): float64, every sub-chain norm from
:func:`lipkern.bounds.chain.chain_upper_bounds` (guaranteed), the chains ending at the logits also from
``head_chain_norms(sound=True)`` (the smaller of both), every operation of the recursion rounded upward
(``torch.nextafter`` after each IEEE operation), the slope coefficients exact rationals rounded up: a
GUARANTEED upper bound of the Lipschitz constant of the real-arithmetic network with the weights it applies
(floating-point evaluation of the network itself is not covered; BatchNorm/Normalize scales are computed in
float64 and rounded up). It requires the model's function to be fixed: BatchNorm and Spectral layers in eval
mode, CPL layers certified and in eval mode. BatchNorm's γ/√(var+ε), Normalize's 1/std and average pooling's
1/k² are float64 values within a few units of float64 rounding of the real ones: every chain through them is
charged the difference (:func:`_inexact_corrections`). Every intermediate is rounded upward (nextafter),
underflow included.
**The estimate** (:func:`lipschitz_estimate`, :class:`LipschitzEstimate`, for training): the chain
norms are power-iteration ESTIMATES (from below),
differentiable in the weights; no host synchronization.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from lipkern._checks import as_shape
from lipkern.bounds.chain_power_iteration import advance_chains, chain_norm_estimates, initial_chain_vectors
from lipkern.bounds.liplt import (_coefficient_tensors, _Plain, _segment_value, _sequence_value, _sound_bound,
                                  build_plan)

__all__ = ["LipschitzBound", "LipschitzEstimate", "lipschitz_bound", "lipschitz_estimate"]


class LipschitzEstimate(nn.Module):
    """Differentiable ESTIMATE of a model's Lipschitz constant (LipLT or product of norms), for training: NOT a
    bound (a certificate needs :func:`lipschitz_bound`).

    model: see the module docstring (parsed once, on inputs of ``input_shape`` without the batch dim; the
    model is NOT registered as a submodule: its parameters stay the model's own, this module holds only the
    power-iteration vectors as buffers, one tensor per (segment, start layer), deterministic from the shapes).
    forward(): advances the vectors of ALL sub-chains by ``n_iter`` power-iteration steps in one
    :func:`lipkern.bounds.chain_power_iteration.chain_power_iteration` pass (no_grad; 2K operator calls per step for a segment of K
    maps), then returns σ_jk = ‖A_k⋯A_j u_jk‖ (u detached; gradient to the weights) combined by the
    recursion: a 0-dim tensor, or with ``pairwise=True`` a (C, C) tensor of L_ab (zero diagonal; the chains
    ending at the logits exactly from ``head_chain_norms``). An estimate from below of the bound (power
    iteration converges from below): use :func:`lipschitz_bound` for a certificate.
    No host synchronization. Options: ``activation_slopes``, ``lipschitz_constants`` (see the module docstring).
    """

    def __init__(self, model: nn.Module, input_shape, method: str = "liplt", pairwise: bool = False,
                 n_iter: int = 5, *, activation_slopes=None, lipschitz_constants=None):
        super().__init__()
        if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 1:
            raise ValueError(f"{type(self).__name__}: n_iter must be an int >= 1, got {n_iter!r}")
        self._plan = build_plan(model, input_shape, method, pairwise, False, activation_slopes,
                                lipschitz_constants)
        object.__setattr__(self, "_model", model)  # a plain reference: not a submodule, not in state_dict
        object.__setattr__(self, "_parsed_layers", tuple(model.modules()))  # what the plan was built from
        self.method, self.pairwise, self.n_iter = method, bool(pairwise), n_iter
        self.input_shape = as_shape(input_shape, "input_shape")
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
        device = tensors[0].device if tensors else torch.device("cpu")
        if dtype not in (torch.float32, torch.float64):
            dtype = torch.float32
        self._dtype, self._device = dtype, device  # used only by a model without linear layers
        self._vector_names = []
        for s, seg in enumerate(self._plan.segments):
            names = []
            for j, u in enumerate(initial_chain_vectors([m.template for m in seg.maps], dtype, device,
                                                        key=f"liplt:{s}")):
                names.append(f"u_{s}_{j}")
                self.register_buffer(names[-1], u)
            self._vector_names.append(names)
            for name, t in zip(("full", "coef", "slopes"), _coefficient_tensors(seg, dtype, device)):
                self.register_buffer(f"_{name}_{s}", t, persistent=False)

    @property
    def model(self) -> nn.Module:
        return self._model

    def forward(self) -> torch.Tensor:
        layers = tuple(self._model.modules())
        if len(layers) != len(self._parsed_layers) or any(a is not b for a, b in zip(layers, self._parsed_layers)):
            raise ValueError(f"{type(self).__name__}: the model's layers changed after this estimate was built (a "
                             f"replaced or added submodule): build a new one for the model as it is now")
        dtype, device = self._dtype, self._device
        if self._plan.segments:
            dtype, device = self.u_0_0.dtype, self.u_0_0.device
        segments = [[m.current(dtype, device) for m in seg.maps] for seg in self._plan.segments]
        vectors = [[getattr(self, n) for n in names] for names in self._vector_names]
        advance_chains(segments, vectors, self.n_iter)
        ar, seg_values = _Plain(), []
        for s, (seg, maps) in enumerate(zip(self._plan.segments, segments)):
            if len(maps) == 1 and not (self.pairwise and seg is self._plan.blocks[-1]):
                # one map (the product method): σ = ‖A u‖ as a 0-dim tensor, no (K, K) table to index (each
                # view is a node of the backward); u cloned: the buffer is written in place by the next step
                seg_values.append(torch.linalg.vector_norm(maps[0].forward(vectors[s][0].detach().clone())))
                continue
            norms = chain_norm_estimates(maps, vectors[s])
            head = None
            if self.pairwise and seg is self._plan.blocks[-1]:
                from lipkern.bounds.chain import head_chain_norms

                pair = head_chain_norms(maps, pairwise=True, sound=False).to(dtype)
                head = torch.minimum(pair, math.sqrt(2.0) * norms[:, -1, None, None])
            coefs = (getattr(self, f"_full_{s}"), getattr(self, f"_coef_{s}"), getattr(self, f"_slopes_{s}"))
            seg_values.append(_segment_value(norms, head, coefs, ar))
        return _sequence_value(self._plan.blocks, seg_values, ar, torch.ones((), dtype=dtype, device=device))

    def extra_repr(self) -> str:
        sizes = [len(seg.maps) for seg in self._plan.segments]
        return (f"method={self.method!r}, pairwise={self.pairwise}, n_iter={self.n_iter}, input_shape="
                f"{self.input_shape}, segment lengths={sizes}")


class LipschitzBound(LipschitzEstimate):
    """Deprecated name of :class:`LipschitzEstimate` (it is an estimate from below, not a bound)."""

    def __init__(self, *args, **kwargs):
        warnings.warn("lipkern.bounds.LipschitzBound is renamed LipschitzEstimate: it is a differentiable "
                      "estimate from below, not a bound (lipschitz_bound gives the guaranteed upper bound)",
                      DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)


def lipschitz_bound(model: nn.Module, input_shape, method: str = "liplt", pairwise: bool = False, *,
                    activation_slopes=None, lipschitz_constants=None, dense_limit: int | None = None,
                    gram_limit: int | None = None, sound: bool | None = None) -> torch.Tensor:
    """A GUARANTEED upper bound (float64) of the Lipschitz constant (ℓ₂) of ``model`` on inputs of
    ``input_shape`` (one input, no batch dim): the real-arithmetic network with the weights it applies, every
    floating-point operation of the bound itself rounded upward (module docstring: what is covered and
    required). For the differentiable training estimate use :func:`lipschitz_estimate`.

    method: "liplt" (loop transformation, papers.md §1, generalized to [α, β] slopes; always ≤ "product") or
    "product" (∏ of the layers' norms and constants). pairwise=True: a (C, C) tensor of L_ab, the Lipschitz
    constants of the logit differences f_a − f_b (zero diagonal), else a 0-dim tensor.
    ``dense_limit`` and ``gram_limit`` are passed to :func:`lipkern.bounds.chain.chain_upper_bounds`: sub-chains
    whose explicit matrix has more than ``dense_limit`` entries are certified through the Gram matrix of their
    smaller side (:mod:`lipkern.bounds.probing`) when it has at most ``gram_limit`` entries, and otherwise get
    only products of shorter chains' bounds (sound, looser). With the defaults, LipLTNet("4C3F") and ("6C2F") at
    1×28×28 are within 0.1% of the estimate (random weights; 25 s and 33 s on a 2-core CPU); ``gram_limit=0``
    gives the products instead (2.0× and 2.2×, in seconds). ``sound``: deprecated (the bound is always sound);
    ``sound=False`` is refused.
    """
    if sound is not None:
        if not sound:
            raise ValueError("lipschitz_bound is always a guaranteed upper bound; the differentiable estimate "
                             "(from below) is lipschitz_estimate(model, input_shape, method, pairwise, n_iter)")
        warnings.warn("lipschitz_bound(sound=True): the bound is always sound now; drop the argument",
                      DeprecationWarning, stacklevel=2)
    plan = build_plan(model, input_shape, method, pairwise, True, activation_slopes, lipschitz_constants)
    with torch.no_grad():
        limits = {"dense_limit": dense_limit, "gram_limit": gram_limit}
        return _sound_bound(plan, pairwise, {name: value for name, value in limits.items() if value is not None})


def lipschitz_estimate(model: nn.Module, input_shape, method: str = "liplt", pairwise: bool = False,
                       n_iter: int = 100, *, activation_slopes=None, lipschitz_constants=None) -> torch.Tensor:
    """An ESTIMATE of the Lipschitz constant (ℓ₂) of ``model`` on inputs of ``input_shape``: a fresh
    :class:`LipschitzEstimate` run for ``n_iter`` power-iteration steps, differentiable in the weights, from
    below the exact-norm value it converges to. Not a certificate: use :func:`lipschitz_bound` for one.
    method / pairwise / activation_slopes / lipschitz_constants as for :func:`lipschitz_bound`."""
    return LipschitzEstimate(model, input_shape, method, pairwise, n_iter, activation_slopes=activation_slopes,
                             lipschitz_constants=lipschitz_constants)()
