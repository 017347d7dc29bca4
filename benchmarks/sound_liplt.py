"""Sound LipLT against the converged estimate: tightness, time, certified accuracy (issue: certificates that are
theorems, item 3).

    python benchmarks/sound_liplt.py random --archs 4C3F 6C2F 8C2F
    python benchmarks/sound_liplt.py trained --data-root ../shared/data/mnist --archs 4C3F 6C2F --epochs 30
    python benchmarks/sound_liplt.py random --device cuda --archs 4C3F 6C2F 8C2F   # a lent GPU (unmeasured)

``random``: LipLTNet with its default (random) initialization at 1×28×28 (4C3F, 6C2F) or 3×32×32 (8C2F).
``trained``: the same nets trained with CRM (lipkern.losses.CRMLoss, LipLT estimate in the loss) on the first
8,000 images of MNIST's t10k file (the only MNIST files at hand), evaluated on the other 2,000.

For each model: the LipLT estimate (LipschitzEstimate, ``--estimate-iters`` power steps: from below the
converged value), the sound bound ``lipschitz_bound`` with the default limits and with ``gram_limit=0`` (the
products of shorter chains' bounds beyond the dense limit: the previous behaviour), their ratios and times;
for trained models also the pairwise constants and the certified accuracy from the estimate (what the paper's
method reports) and from the sound bound. One thread count for every timing (``--threads``, default 2).
Results: ``--json`` (default benchmarks/results/sound_liplt_<mode>[_<device>].json) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lipkern.bounds import LipschitzEstimate, lipschitz_bound
from lipkern.models import LipLTNet

SHAPES = {"4C3F": (1, 28, 28), "6C2F": (1, 28, 28), "8C2F": (3, 32, 32)}
EPS = (0.1, 0.3, 0.5, 1.0, 1.58)


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _model(arch: str, seed: int) -> LipLTNet:
    torch.manual_seed(seed)
    shape = SHAPES[arch]
    return LipLTNet(arch, in_channels=shape[0], input_size=shape[1]).eval()


def _estimate(model, shape, pairwise: bool, iters: int) -> torch.Tensor:
    with torch.no_grad():
        return LipschitzEstimate(model, shape, "liplt", pairwise, iters)().detach().double()


def compare(model, arch: str, iters: int, pairwise: bool = False, products: bool = True) -> dict:
    shape = SHAPES[arch]
    estimate, t_est = _timed(lambda: _estimate(model, shape, pairwise, iters))
    sound, t_sound = _timed(lambda: lipschitz_bound(model, shape, pairwise=pairwise))
    row = {"arch": arch, "pairwise": pairwise, "estimate": estimate.tolist(), "estimate_seconds": t_est,
           "sound": sound.tolist(), "sound_seconds": t_sound}
    off = ~torch.eye(estimate.shape[0], dtype=torch.bool) if pairwise else torch.ones((), dtype=torch.bool)
    row["sound_over_estimate"] = float((sound / estimate)[off].max())
    if products:
        old, t_old = _timed(lambda: lipschitz_bound(model, shape, pairwise=pairwise, gram_limit=0))
        row.update(products=old.tolist(), products_seconds=t_old,
                   products_over_estimate=float((old / estimate)[off].max()))
    return row


def _mnist(root: str, shape):
    from lipkern.data import fit_to_size, load_dataset

    x, y = load_dataset("mnist", root=root, split="test")
    x = fit_to_size(x, shape[1])
    return (x[:8000], y[:8000]), (x[8000:], y[8000:])


def train(arch: str, data, epochs: int, seed: int, log=print) -> LipLTNet:
    """CRM training (Adam 1e-3, batch 256, the robust term from a third of the epochs on, MNIST's r₀ = 2.2 and
    λ = 30 from the paper scaled to this short schedule: λ = 5)."""
    from lipkern.losses import CRMLoss

    (x, y), _ = data
    model = _model(arch, seed).train()
    bound = LipschitzEstimate(model, SHAPES[arch], "liplt", True, 2)
    loss_fn = CRMLoss(5.0, 5.0, 2.2, epochs // 3, pairwise=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        start, total = time.perf_counter(), 0.0
        for step in range(len(y) // 256):
            rows = order[step * 256:(step + 1) * 256]
            loss = loss_fn(model(x[rows]), y[rows], bound(), epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        log(f"{arch} epoch {epoch + 1}/{epochs}: loss {total / (len(y) // 256):.4f} "
            f"({time.perf_counter() - start:.0f} s)")
    return model.eval()


def certified(model, data, lipschitz: torch.Tensor) -> dict:
    from lipkern.certify import certified_accuracy

    _, (x, y) = data
    result = certified_accuracy(model, (x, y), list(EPS), lipschitz=lipschitz, pairwise=lipschitz.dim() == 2)
    return {f"{eps:g}": float(acc) for eps, acc in zip(EPS, result.accuracy.tolist())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("random", "trained"))
    parser.add_argument("--archs", nargs="+", default=["4C3F", "6C2F"], choices=list(SHAPES))
    parser.add_argument("--data-root", default="../shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--estimate-iters", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the bounds run (training stays on the CPU)")
    parser.add_argument("--no-products", action="store_true", help="skip the gram_limit=0 (previous) bound")
    parser.add_argument("--models", default="runs/sound_liplt", help="folder of the trained weights (reused)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for arch in args.archs:
        if args.mode == "random":
            model = _model(arch, args.seed).to(args.device)
            rows.append(compare(model, arch, args.estimate_iters, products=not args.no_products))
            print(json.dumps(rows[-1]), flush=True)
            continue
        data = _mnist(args.data_root, SHAPES[arch])
        path = Path(args.models) / f"{arch.lower()}_e{args.epochs}_s{args.seed}.pt"
        model = _model(arch, args.seed)
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            model = train(arch, data, args.epochs, args.seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
        model.eval()
        _, (x_test, y_test) = data
        model.to(args.device)
        x_test, y_test = x_test.to(args.device), y_test.to(args.device)
        data = (data[0], (x_test, y_test))
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        for pairwise in (False, True):
            row = compare(model, arch, args.estimate_iters, pairwise, products=not args.no_products)
            estimate = torch.tensor(row["estimate"], dtype=torch.float64)
            sound = torch.tensor(row["sound"], dtype=torch.float64)
            row.update(accuracy=accuracy, certified_from_estimate=certified(model, data, estimate),
                       certified_sound=certified(model, data, sound))
            if "products" in row:
                row["certified_products"] = certified(model, data, torch.tensor(row["products"], dtype=torch.float64))
            if pairwise:
                for key in ("estimate", "sound", "products"):
                    row.pop(key, None)  # (C, C) matrices: the ratios and accuracies say it
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    suffix = "" if args.device == "cpu" else "_" + args.device.replace(":", "")
    out = Path(args.json or f"benchmarks/results/sound_liplt_{args.mode}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "epochs": args.epochs, "seed": args.seed,
            "estimate_iters": args.estimate_iters, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(_table(rows))


def _table(rows) -> str:
    lines = ["| model | pairwise | sound / estimate (s) | products / estimate (s) | certified: estimate → sound |",
             "|---|---|---|---|---|"]
    for r in rows:
        products = (f"{r['products_over_estimate']:.4f} ({r['products_seconds']:.0f})" if "products_over_estimate"
                    in r else "–")
        acc = ""
        if "certified_sound" in r:
            acc = ", ".join(f"{e}: {r['certified_from_estimate'][e]:.3f} → {r['certified_sound'][e]:.3f}"
                            for e in r["certified_sound"])
        lines.append(f"| {r['arch']} | {r['pairwise']} | {r['sound_over_estimate']:.4f} ({r['sound_seconds']:.0f}) | "
                     f"{products} | {acc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
