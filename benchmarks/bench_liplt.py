"""LipLT bound step (CRM training): one ``LipschitzEstimate.forward`` with n_iter = 5 on LipLTNet("6C2F") at 32×32
(K = 8 maps: 6 convs + 2 dense, 36 sub-chains), forward alone and forward + backward, against the eager
formulation of CRM-LipLT: one power-iteration loop per sub-chain product (through the real conv / conv-transpose
ops), then σ_jk = ‖A_k⋯A_j u_jk‖ per chain, differentiable, and the same recursion.
Groups: liplt-fwd, liplt-fwdbwd. Providers: lipkern, eager, compile (torch.compile of the eager step).

Predicted counts per bound step (K = 8, n_iter = 5; operator call = one conv / conv_transpose / GEMM launch):
- lipkern: 2K = 16 operator calls per power-iteration step (80) + K = 8 for the differentiable sweep (88), plus
  per step 14 cats, 9 row-norm reductions, ~8 elementwise passes (flat normalization and foreach write-back);
- eager: K(K+1)(K+2)/3 = 240 operator calls per step (1200) + K(K+1)(K+2)/6 = 120 for the differentiable
  σ's (1320), plus 2 normalizations per chain and step (~4 ops each: 36·5·4 = 720).
The FLOPs are the same for both (every chain row passes through the same layers: layer l is applied to
(l+1)(K−l) rows per step either way); lipkern batches the rows of a layer into one call. On a GPU the eager
step is launch-bound at this size (each call is a 1-row conv of ≤ 2 MFLOP), so the expected ratio is about the
ratio of launches (~4-7×, target ≥ 5×).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from benchmarks.conftest import DEVICE
from lipkern.bounds import LipschitzEstimate
from lipkern.bounds.liplt import _coefficients, build_plan
from lipkern.models import LipLTNet
from lipkern.bounds.chain_power_iteration import initial_chain_vectors

N_ITER = 5
INPUT = (3, 32, 32)


class EagerLipLT:
    """CRM-LipLT's formulation: every sub-chain (j, k) its own persistent vector and power-iteration loop."""

    def __init__(self, model, n_iter: int):
        plan = build_plan(model, INPUT)
        (self.segment,) = plan.segments
        self.n_iter = n_iter
        maps = [m.current() for m in self.segment.maps]
        self.u = initial_chain_vectors(maps, torch.float32, DEVICE, key="eager")
        self.full, self.coef, self.slopes = _coefficients(self.segment)

    def _apply(self, maps, x):
        for op in maps:
            x = op.forward(x)
        return x

    def _adjoint(self, maps, y):
        for op in reversed(maps):
            y = op.adjoint(y)
        return y

    def __call__(self):
        maps = [m.current() for m in self.segment.maps]
        count = len(maps)
        sigma = {}
        with torch.no_grad():
            detached = [op.with_weight(op.weight.detach()) for op in maps]
            for j in range(count):
                for k in range(j, count):
                    u = self.u[j][k - j][None]
                    for _ in range(self.n_iter):
                        v = self._apply(detached[j:k + 1], u)
                        v = v / v.norm()
                        u = self._adjoint(detached[j:k + 1], v)
                        u = u / u.norm()
                    self.u[j][k - j] = u[0]
        for j in range(count):
            for k in range(j, count):
                sigma[(j, k)] = self._apply(maps[j:k + 1], self.u[j][k - j][None]).norm()
        m = [sigma[(0, 0)]]
        for k in range(1, count):
            m.append(self.full[k] * sigma[(0, k)]
                     + sum(self.coef[j][k] * sigma[(j + 1, k)] * m[j] for j in range(k)))
        product = math.prod(sigma[(i, i)] for i in range(count)) * self.slopes
        return torch.minimum(m[-1], product)


@functools.lru_cache(maxsize=None)
def _model():
    torch.manual_seed(0)
    return LipLTNet("6C2F", device=DEVICE)


def _step(provider: str):
    model = _model()
    if provider == "lipkern":
        bound = LipschitzEstimate(model, INPUT, n_iter=N_ITER).to(DEVICE)
        return bound
    eager = EagerLipLT(model, N_ITER)
    return torch.compile(eager.__call__) if provider == "compile" else eager


@pytest.mark.benchmark(group="liplt-fwd")
@pytest.mark.parametrize("provider", ["lipkern", "eager", "compile"])
def test_liplt_bound_forward(run_timed, provider):
    step = _step(provider)

    def forward():
        with torch.no_grad():
            return step()

    run_timed(forward, provider, arch="6C2F", input=INPUT, n_iter=N_ITER)


@pytest.mark.benchmark(group="liplt-fwdbwd")
@pytest.mark.parametrize("provider", ["lipkern", "eager", "compile"])
def test_liplt_bound_forward_backward(run_timed, provider):
    step = _step(provider)
    model = _model()

    def forward_backward():
        model.zero_grad(set_to_none=True)
        step().backward()

    run_timed(forward_backward, provider, arch="6C2F", input=INPUT, n_iter=N_ITER)
