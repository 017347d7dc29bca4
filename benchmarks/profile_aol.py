"""torch.profiler summary of the AOL kernels: aol_rescale forward+backward (3×3, fp32) at several widths and
one ConvNet AOL train step, as key_averages tables sorted by self device time (CPU time without a GPU).

    python benchmarks/profile_aol.py --output profile.txt
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile


def _table(prof, rows: int, on_gpu: bool) -> str:
    averages = prof.key_averages()
    keys = ["self_device_time_total", "self_cuda_time_total"] if on_gpu else ["self_cpu_time_total"]
    for key in keys:
        try:
            return averages.table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=rows)


def _profiled(step, on_gpu: bool, calls: int, rows: int) -> str:
    for _ in range(3):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        if on_gpu:
            torch.cuda.synchronize()
    return _table(prof, rows, on_gpu)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="-", help="text file for the tables (default: stdout)")
    parser.add_argument("--rows", type=int, default=20, help="rows per table")
    parser.add_argument("--calls", type=int, default=5, help="profiled calls per section")
    args = parser.parse_args(argv)

    import lipkern
    from lipkern.models import ConvNet
    from lipkern.ops import aol_rescale

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    header = (f"device: {torch.cuda.get_device_name() if on_gpu else 'cpu'} | torch {torch.__version__} | "
              f"lipkern._C {lipkern.cuda_extension_available()} | TF32 matmul="
              f"{torch.backends.cuda.matmul.allow_tf32} cudnn={torch.backends.cudnn.allow_tf32}")
    sections = [header]
    for c in (64, 256, 512) if on_gpu else (16,):
        w = torch.randn(c, c, 3, 3, device=device, requires_grad=True)
        grad = torch.randn_like(w)

        def rescale_step():
            w.grad = None
            aol_rescale(w).backward(grad)

        sections.append(f"\n== aol_rescale forward+backward, c={c}, 3x3, fp32 ({args.calls} calls)\n"
                        + _profiled(rescale_step, on_gpu, args.calls, args.rows))

    size, batch = ("S", 256) if on_gpu else ("XS", 4)
    model = ConvNet(size, layer="aol", device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, 32, 32, device=device)

    def train_step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    sections.append(f"\n== ConvNet-{size} (AOL) train step, batch {batch}, 32x32 ({args.calls} calls)\n"
                    + _profiled(train_step, on_gpu, args.calls, args.rows))
    text = "\n".join(sections) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as fh:
            fh.write(text)
        print(f"profile: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
