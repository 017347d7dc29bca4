"""Adaptive against fixed-n CERTIFY on a noise-trained classifier (issue: certification at scale, item 3).

The classifier is the right half of a SPLITZ network (lipkern.models.SplitzNet "splitz-s") trained with the
splitz recipe's pieces (noise N(0, σ²) after the left half, splitz_loss with LocalLipschitzEstimate, Adam):
its input z = left(x) is what the noise is added to, so RandomizedSmoothing(right, σ) at z is Cohen et al.'s
smoothed classifier of a Gaussian-noise-trained network. For every test point both procedures run with the
same selection draws (seed = point index): fixed n (RandomizedSmoothing.certify) and adaptive
(certify_adaptive, looks at 1,000, 2,000, 4,000, … draws up to the same n). Reported: the certified counts
(correct and radius > ε) at each ε of the table, and the noise draws each used (selection included).

  python benchmarks/adaptive_smoothing.py --dataset digits --epochs 60 --points 200 --num-samples 100000
  python benchmarks/adaptive_smoothing.py --dataset mnist --data-root ../shared/data/mnist --epochs 6 \\
      --points 100 --num-samples 20000

MNIST: only the test file may be at hand; its first 8,000 images train, the last 2,000 are the test points.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from lipkern.certify import LocalLipschitzEstimate, RandomizedSmoothing, splitz_loss
from lipkern.data import load_dataset
from lipkern.models import build_model


def _data(args):
    if args.dataset == "digits":
        return load_dataset("digits", split="train"), load_dataset("digits", split="test")
    x, y = load_dataset("mnist", root=args.data_root, split="test")
    return (x[:8000], y[:8000]), (x[8000:], y[8000:])


def train(args, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """The splitz recipe's loss, estimate and κ / γ ramps over the run; Adam at lr 1e-3, batch 64."""
    torch.manual_seed(0)
    model = build_model("splitz-s", num_classes=10, in_channels=x.shape[1], input_size=x.shape[-1],
                        sigma=args.sigma)
    estimate = LocalLipschitzEstimate(model.left, tuple(x.shape[1:]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = len(y) // 64
    for epoch in range(args.epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        model.train()
        for step in range(steps):
            rows = order[step * 64:(step + 1) * 64]
            ramp = min(1.0, (epoch * steps + step) / (args.epochs * steps) * 1.5)
            ce = nn.functional.cross_entropy(model(x[rows]), y[rows])
            loss = splitz_loss(ce, estimate(x[rows], 0.05 * ramp), 1.0 - 0.3 * ramp)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--data-root")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=100_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.0, 0.125, 0.25, 0.5, 0.75])
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--output", default=None)
    parser.add_argument("--model-cache", help="load the trained model from here if it exists, else save it there")
    args = parser.parse_args()
    torch.set_num_threads(1)
    (x_train, y_train), (x_test, y_test) = _data(args)
    start = time.perf_counter()
    if args.model_cache and Path(args.model_cache).exists():
        model = build_model("splitz-s", num_classes=10, in_channels=x_train.shape[1], input_size=x_train.shape[-1],
                            sigma=args.sigma)
        model.load_state_dict(torch.load(args.model_cache, weights_only=True))
        model.eval()
    else:
        model = train(args, x_train, y_train)
        if args.model_cache:
            torch.save(model.state_dict(), args.model_cache)
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"{args.dataset}: trained in {train_seconds:.0f} s, base test accuracy {accuracy:.3f}", flush=True)
    smoother = RandomizedSmoothing(model.right, args.sigma, 10)
    rows = []
    for i in range(min(args.points, len(y_test))):
        with torch.no_grad():
            z = model.left(x_test[i][None])[0]
        t0 = time.perf_counter()
        fixed = smoother.certify(z, 100, args.num_samples, args.alpha, args.batch_size, seed=i)
        t1 = time.perf_counter()
        adaptive = smoother.certify_adaptive(z, 100, args.num_samples, args.alpha, args.batch_size, args.eps, seed=i)
        t2 = time.perf_counter()
        rows.append({"label": int(y_test[i]), "fixed": list(fixed), "adaptive": list(adaptive),
                     "fixed_seconds": t1 - t0, "adaptive_seconds": t2 - t1})
    counts = {}
    for mode in ("fixed", "adaptive"):
        counts[mode] = [sum(r[mode][0] == r["label"] and r[mode][1] > e for r in rows) for e in args.eps]
    draws_fixed = len(rows) * (100 + args.num_samples)
    draws_adaptive = sum(r["adaptive"][2] for r in rows)
    summary = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()},
               "dataset": args.dataset, "points": len(rows), "sigma": args.sigma, "n": args.num_samples,
               "alpha": args.alpha, "eps": args.eps, "base_accuracy": accuracy, "epochs": args.epochs,
               "certified_fixed": counts["fixed"], "certified_adaptive": counts["adaptive"],
               "draws_fixed": draws_fixed, "draws_adaptive": draws_adaptive,
               "share": draws_adaptive / draws_fixed,
               "seconds_fixed": sum(r["fixed_seconds"] for r in rows),
               "seconds_adaptive": sum(r["adaptive_seconds"] for r in rows), "rows": rows}
    print(f"eps: {args.eps}\ncertified, fixed n = {args.num_samples:,}: {counts['fixed']}\ncertified, adaptive: "
          f"{counts['adaptive']}\nnoise draws: adaptive {draws_adaptive:,} of fixed {draws_fixed:,} "
          f"({100 * summary['share']:.1f}%); seconds {summary['seconds_adaptive']:.0f} against "
          f"{summary['seconds_fixed']:.0f}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
