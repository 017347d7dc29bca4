"""What AOL's proven rounding margin costs: r̂/r − 1 and 1 − d/d_exact per Gram scheme, weight family and size.

The margin is a formula of r and S (lipkern/ops/aol.py): r̂ = r + (ε_gram + c_out)·S, d = (1 − m)·r̂^(-1/2).
The last column marks the scheme the CPU path's ``auto`` takes (fp32 where out + kk ≤ 320 and its Gram
margin is ≤ 2⁻¹² of every r_i). This script evaluates it in float64 on the CPU (no GPU needed: the margin does not depend on the machine;
the computed Gram sums differ from the exact ones by far less than the margin) and prints a Markdown table.

    python benchmarks/aol_margin_cost.py [--sizes 64 256 512]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lipkern.ops.aol import (_FP32_GRAM_MAX_COST, _FP32_GRAM_MAX_TERMS, _scale_margin, gram_error_bound,
                              output_rounding_margin)


def weight(kind: str, c: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = c * k * k
    if kind == "orthogonal":  # trained AOL layers approach this: r_i ≈ 1, S_i ≈ 0.64·c·k²
        q, _ = torch.linalg.qr(torch.randn(cols, c, generator=g, dtype=torch.float64))
        w = q.T
    elif kind == "identity+noise":
        w = torch.eye(c, cols, dtype=torch.float64) + 0.01 * torch.randn(c, cols, generator=g, dtype=torch.float64)
    else:
        w = torch.randn(c, cols, generator=g, dtype=torch.float64)
    return w.reshape(c, c, k, k)


def gram_sums(w: torch.Tensor):
    wt = w.transpose(0, 1)
    r = F.conv2d(wt, wt, padding=w.shape[-1] - 1).abs().sum((1, 2, 3))
    col = w.abs().sum((2, 3))
    return r, col.T @ col.sum(1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    args = parser.parse_args(argv)
    print("| c | k | weights | S/r (max) | scheme | ε_gram | r̂/r − 1 (max) | 1 − d/d_exact (max) | CPU auto |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in args.sizes:
        for k in (3, 1):
            for kind in ("random", "identity+noise", "orthogonal"):
                w = weight(kind, c, k)
                r, mass = gram_sums(w)
                eps32, _ = gram_error_bound("fp32", c, k * k, torch.float32)
                fits = c + k * k <= _FP32_GRAM_MAX_TERMS and bool((eps32 * mass <= _FP32_GRAM_MAX_COST * r).all())
                for scheme in ("fp64", "fp32", "tf32x3"):
                    eps, _ = gram_error_bound(scheme, c, k * k, torch.float32)
                    r_hat = r + (eps + output_rounding_margin(torch.float32)) * mass
                    d_cost = 1 - (1 - _scale_margin(torch.float32, c, c, k * k)) * (r / r_hat).sqrt()
                    auto = "" if scheme == "tf32x3" else "yes" if (scheme == "fp32") == fits else ""
                    print(f"| {c} | {k} | {kind} | {(mass / r).max():.3g} | {scheme} | {eps:.3g} | "
                          f"{(r_hat / r - 1).max():.3g} | {d_cost.max():.3g} | {auto} |")


if __name__ == "__main__":
    main()
