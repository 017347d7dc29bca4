"""Power iteration for every sub-chain A_k ⋯ A_j (j ≤ k) of a chain of linear maps, all at once.

LipLT (papers.md §1) needs the norms of all K(K+1)/2 sub-chain products of a chain of K linear layers. The
eager formulation (CRM-LipLT) runs one power-iteration loop per sub-chain: a chain of length n costs 2n
operator calls per step, so one step for all chains costs Σ_{j≤k} 2(k−j+1) = K(K+1)(K+2)/3 calls (O(K³)).

Here rows are grouped by LAYER instead of by chain. One power-iteration step is:
- a forward sweep over layers l = 1..K: the batch at layer l holds every chain (j, k) with j ≤ l ≤ k; the
  chains starting at l (their vectors u_{l,k}) join the rows carried from layer l−1, the operator A_l is applied
  ONCE to the whole batch, and the chains ending at l (k = l) leave with w_{j,l} = A_l ⋯ A_j u_{j,l};
- an adjoint sweep over l = K..1: the chains ending at l join (their w), A_lᵀ is applied once to the batch,
  and the chains starting at l leave with z_{l,k} = (A_k ⋯ A_l)ᵀ w_{l,k} (w is not normalized: the direction
  of z is the same, and one normalization per layer is saved);
- u_{j,k} ← z / ‖z‖ for all rows at once (kept when z = 0); σ_{j,k} = ‖z‖/‖w‖ = ‖Aᵀv‖ with v = w/‖w‖ (an
  estimate of ‖A_k ⋯ A_j‖₂ from below).
So a step costs 2K operator calls (batched, each with up to ⌈K/2⌉·⌈(K+1)/2⌉ rows) instead of O(K³) calls.
The arithmetic is the same (every row sees the same maps); only the number of launches changes.

Row layout (0-based): the vectors of the chains starting at layer j are one tensor ``u[j]`` of shape
(K − j, *maps[j].in_shape), row i for the chain (j, j + i). In the forward sweep the batch at layer l is
(K − l blocks by k = l..K−1) × (l + 1 rows by j = 0..l), so the leaving chains (k = l) are the first block
and the joining vectors are appended to every block with one ``cat``; the adjoint sweep mirrors this
(blocks by j, rows by k). No gather or scatter is needed.

Layout of this file: the two sweeps, the reference (one loop per chain: the eager baseline and the oracle),
the batched power iteration, the differentiable chain-norm estimates. Torch only (the operators are cuDNN /
GEMM calls already); no custom op: the maps are Python objects (:class:`lipkern.bounds.operators.LinearMap`).
Per step and chain: 2K operator calls, 2(K − 1) cats, K + 1 row-norm reductions and ~8 elementwise passes
over the flat vectors (the eager loop: 2·Σ lengths = K(K+1)(K+2)/3 calls and 2 normalizations per chain).
No host synchronization. Chain norms must fit the dtype (no rescaling: ‖A_k⋯A_j‖² must not overflow).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from lipkern.ops.conv_power_iteration import cpu_conv_power_rows
from lipkern.ops.power_iteration import initial_vectors

__all__ = ["advance_chains", "chain_norm_estimates", "chain_power_iteration", "chain_power_iteration_ref",
           "initial_chain_vectors"]


# ----------------------------------------------------------------------------------------------------------
# The two sweeps (batched over all chains).
# ----------------------------------------------------------------------------------------------------------
def chain_forward_sweep(maps: Sequence, u: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """w[k] (k + 1, *maps[k].out_shape), row j = A_k ⋯ A_j u_{j,k}, for u[j] (K − j, *maps[j].in_shape).
    K operator calls; differentiable in the maps' weights (and in u)."""
    count = len(maps)
    outs, carried = [], None
    for layer, op in enumerate(maps):
        new = u[layer].reshape(count - layer, 1, *op.in_shape)
        if carried is None:
            x = new
        else:
            x = torch.cat([carried.reshape(count - layer, layer, *op.in_shape), new], dim=1)
        y = op.forward(x.reshape(-1, *op.in_shape)).reshape(count - layer, layer + 1, *op.out_shape)
        outs.append(y[0])
        carried = y[1:]
    return outs


def chain_adjoint_sweep(maps: Sequence, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """z[j] (K − j, *maps[j].in_shape), row i = (A_{j+i} ⋯ A_j)ᵀ v_{j,j+i}, for v[k] (k + 1, *maps[k].out_shape)
    (row j of v[k] belongs to the chain (j, k)). K adjoint calls."""
    count = len(maps)
    outs: list = [None] * count
    carried = None
    for layer in reversed(range(count)):
        op = maps[layer]
        new = v[layer].reshape(layer + 1, 1, *op.out_shape)
        if carried is None:
            x = new
        else:
            x = torch.cat([new, carried.reshape(layer + 1, count - 1 - layer, *op.out_shape)], dim=1)
        y = op.adjoint(x.reshape(-1, *op.out_shape)).reshape(layer + 1, count - layer, *op.in_shape)
        outs[layer] = y[layer]
        carried = y[:layer]
    return outs


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def _normalize_rows(x: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / ‖x‖ per row, ‖x‖); a zero row stays zero, or becomes ``keep``'s row. NaN propagates."""
    norms = _row_norms(x)
    shape = (-1, *([1] * (x.dim() - 1)))
    unit = x / norms.clamp_min(torch.finfo(norms.dtype).tiny).reshape(shape)
    if keep is not None:
        unit = torch.where((norms != 0).reshape(shape), unit, keep)
    return unit, norms


def _upper_triangle(values: Sequence[torch.Tensor], count: int, by_column: bool) -> torch.Tensor:
    """(K, K) matrix from per-row (j: entries k = j..K−1) or per-column (k: entries j = 0..k) vectors."""
    flat = torch.cat(list(values))
    index = _triangle_index(count, by_column, flat.device)
    return flat.new_zeros(count, count).index_put((index[0], index[1]), flat)


@functools.lru_cache(maxsize=256)
def _triangle_index(count: int, by_column: bool, device: torch.device) -> torch.Tensor:
    """(2, K(K+1)/2) (row, column) indices in the order of :func:`_upper_triangle` (cached: one copy)."""
    rows, cols = [], []
    for a in range(count):
        for b in (range(a + 1) if by_column else range(a, count)):
            rows.append(b if by_column else a)
            cols.append(a if by_column else b)
    return torch.tensor([rows, cols], device=device)


# ----------------------------------------------------------------------------------------------------------
# Reference: one power-iteration loop per chain (the eager formulation, O(K³) operator calls per step).
# ----------------------------------------------------------------------------------------------------------
def _chain_apply(maps, x):
    for op in maps:
        x = op.forward(x)
    return x


def _chain_adjoint(maps, y):
    for op in reversed(maps):
        y = op.adjoint(y)
    return y


def chain_power_iteration_ref(maps: Sequence, u: Sequence[torch.Tensor],
                              n_iter: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sigma (K, K), new u list): every chain (j, k) iterated on its own. ``u`` is not modified."""
    count = len(maps)
    sigma = torch.zeros(count, count, dtype=u[0].dtype, device=u[0].device)
    new_u = [t.clone() for t in u]
    for j in range(count):
        for k in range(j, count):
            chain = maps[j:k + 1]
            vec = u[j][k - j][None]
            for _ in range(n_iter):
                v, _ = _normalize_rows(_chain_apply(chain, vec))
                z = _chain_adjoint(chain, v)
                vec, norm = _normalize_rows(z, keep=vec)
                sigma[j, k] = norm[0]
            new_u[j][k - j] = vec[0]
    return sigma, new_u


# ----------------------------------------------------------------------------------------------------------
# Batched power iteration (2K operator calls per step for all chains).
# ----------------------------------------------------------------------------------------------------------
def initial_chain_vectors(maps: Sequence, dtype: torch.dtype, device, key: str = "") -> list[torch.Tensor]:
    """Deterministic unit vectors u[j] (K − j, *maps[j].in_shape) (a function of the shapes and ``key``)."""
    count = len(maps)
    return [initial_vectors((count - j, op.in_features), dtype, device, key=f"chain:{key}:{j}").reshape(
        count - j, *op.in_shape) for j, op in enumerate(maps)]


def _check(maps, u) -> None:
    if len(maps) == 0 or len(u) != len(maps):
        raise ValueError(f"chain_power_iteration: need one vector tensor per map, got {len(u)} for {len(maps)}")
    for j, (op, t) in enumerate(zip(maps, u)):
        expected = (len(maps) - j, *op.in_shape)
        if tuple(t.shape) != expected:
            raise ValueError(f"chain_power_iteration: u[{j}] must have shape {expected}, got {tuple(t.shape)}")
    for a, b in zip(maps, maps[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"chain_power_iteration: a map with output {a.out_shape} is followed by one taking "
                             f"{b.in_shape}")


@functools.lru_cache(maxsize=256)
def _row_of_element(rows: tuple, sizes: tuple, device: torch.device) -> torch.Tensor:
    """For the flat concatenation of u[0..K−1] (rows[j] rows of sizes[j] elements each): each element's row."""
    counts = torch.tensor([size for r, size in zip(rows, sizes) for _ in range(r)])
    return torch.repeat_interleave(torch.arange(len(counts)), counts).to(device)


def _one_chain(maps, u, n_iter: int, sigma: bool = True) -> torch.Tensor | None:
    """n_iter steps: z = AᵀA u through both sweeps (v is not normalized: one pass fewer per layer; ‖A‖² must
    fit the dtype), then every row of u ← z/‖z‖ at once on the flat concatenation (rows with z = 0 keep u),
    written back with one foreach copy. σ = ‖z‖/‖w‖ = ‖Aᵀv‖ of the last step (None when ``sigma`` is False)."""
    count = len(maps)
    tiny = torch.finfo(u[0].dtype).tiny
    if count == 1:  # one map (the product bound's segments): its power step, without the chain bookkeeping
        return _one_map(maps[0], u[0], n_iter, tiny, sigma)
    rows = _row_of_element(tuple(t.shape[0] for t in u), tuple(t[0].numel() for t in u), u[0].device)
    for step in range(n_iter):
        w = chain_forward_sweep(maps, u)
        z = chain_adjoint_sweep(maps, w)
        z_norms = torch.cat([_row_norms(z_j) for z_j in z])
        flat = torch.cat([z_j.reshape(-1) for z_j in z])
        old = torch.cat([u_j.reshape(-1) for u_j in u])
        scaled = flat * z_norms.clamp_min(tiny).reciprocal()[rows]
        new = torch.where((z_norms != 0)[rows], scaled, old)  # NaN norms propagate
        torch._foreach_copy_(list(u), [part.view_as(u_j) for part, u_j in zip(new.split([t.numel() for t in u]),
                                                                                    u)])
    if not sigma:
        return None
    w_norms = _upper_triangle([_row_norms(w_k) for w_k in w], count, by_column=True)
    z_norms = _upper_triangle(list(z_norms.split([count - j for j in range(count)])), count, by_column=False)
    return torch.where(w_norms != 0, z_norms / w_norms.clamp_min(tiny), 0.0)


def _one_map(op, u: torch.Tensor, n_iter: int, tiny: float, sigma: bool = True) -> torch.Tensor | None:
    """:func:`_one_chain` for K = 1 (u (1, *in_shape)): the same steps and results, written directly. Without σ,
    a small conv on the CPU takes the C++ kernels' power step (the layers' own: one call instead of two oneDNN
    convolutions and ~6 ops; float64 sums, the same direction up to rounding, z = 0 keeps u, NaN propagates; it
    divides W by its largest entry first, so near the dtype's largest or smallest values it stays finite where
    this step overflows or underflows)."""
    if not sigma and op.kind == "conv2d":
        rows = cpu_conv_power_rows(op.weight, u[0], n_iter, op.geometry, gradient=False)
        if rows is not None:
            u.copy_(rows[0].view_as(u))
            return None
    per_row = tuple(range(1, u.dim()))
    for _ in range(n_iter):
        w = op.forward(u)
        z = op.adjoint(w)
        z_norm = torch.linalg.vector_norm(z, dim=per_row, keepdim=True)
        # z / ‖z‖ (entries ≤ 1: no overflow even for a subnormal norm); z = 0 keeps u; NaN norms propagate
        u.copy_(torch.where(z_norm != 0, z / z_norm, u))
    if not sigma:
        return None
    w_norm = torch.linalg.vector_norm(w.flatten(1), dim=1)
    z_norm = z_norm.reshape(1)
    return torch.where(w_norm != 0, z_norm / w_norm.clamp_min(tiny), 0.0).reshape(1, 1)


def chain_power_iteration(chains: Sequence, u: Sequence, n_iter: int = 1) -> list[torch.Tensor]:
    """Advance the power iteration of every sub-chain of every chain by ``n_iter`` steps, in place.

    chains: a list of chains, each a list of K LinearMaps (A_1 first), or a single chain;
    u: per chain, the list of K vector tensors u[j] (K − j, *maps[j].in_shape) (see
    :func:`initial_chain_vectors`), **updated in place**.
    Returns per chain sigma (K, K): sigma[j, k] estimates ‖A_k ⋯ A_j‖₂ from below (the last step's ‖Aᵀv‖),
    zeros below the diagonal. Not differentiable (runs under no_grad): see :func:`chain_norm_estimates`.
    Costs 2K operator calls per step and chain; no host synchronization.
    """
    single = len(chains) > 0 and not isinstance(chains[0], (list, tuple))
    if single:
        chains, u = [chains], [u]
    if len(chains) != len(u):
        raise ValueError(f"chain_power_iteration: {len(chains)} chains but {len(u)} vector lists")
    if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 1:
        raise ValueError(f"chain_power_iteration: n_iter must be an int >= 1, got {n_iter!r}")
    sigmas = _advance(chains, u, n_iter, sigma=True)
    return sigmas[0] if single else sigmas


def advance_chains(chains: Sequence, u: Sequence, n_iter: int) -> None:
    """:func:`chain_power_iteration` for a list of chains, vectors advanced in place, no σ formed (the
    differentiable estimates come from :func:`chain_norm_estimates`)."""
    if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 1:
        raise ValueError(f"chain_power_iteration: n_iter must be an int >= 1, got {n_iter!r}")
    _advance(chains, u, n_iter, sigma=False)


def _advance(chains, u, n_iter: int, sigma: bool) -> list:
    sigmas = []
    with torch.no_grad():
        for maps, vectors in zip(chains, u):
            _check(maps, vectors)
            maps = [op.with_weight(op.weight.detach()) for op in maps]
            sigmas.append(_one_chain(maps, vectors, n_iter, sigma))
    return sigmas


def chain_norm_estimates(maps: Sequence, u: Sequence[torch.Tensor]) -> torch.Tensor:
    """σ (K, K), σ[j, k] = ‖A_k ⋯ A_j u_{j,k}‖ for the (detached) unit vectors u: after a converged power
    iteration the differentiable estimate of ‖A_k ⋯ A_j‖₂ (from below), its gradient in the weights the usual
    spectral-norm gradient. One forward sweep (K operator calls). Zeros below the diagonal."""
    _check(maps, u)
    if len(maps) == 1:  # one map: ‖A u‖ (a clone of u: the buffer is written in place later)
        return _row_norms(maps[0].forward(u[0].detach().clone())).reshape(1, 1)
    u = [t.detach() for t in u]
    u[0] = u[0].clone()  # the first layer's input is a view otherwise; the buffers are written later in place
    norms = [_row_norms(w) for w in chain_forward_sweep(maps, u)]
    return _upper_triangle(norms, len(maps), by_column=True)
