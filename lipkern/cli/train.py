"""``lipkern train``: train a reference network (lipkern.models.build_model) on a dataset (lipkern.data) with
its paper's recipe, checkpoint and resume, then certify it (lipkern.train); DDP under torchrun."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from lipkern.cli.certify import (DEFAULT_EPS, CertifyError, _model_args, format_certify_table,
                                 write_certify_plot)

TRAIN_HELP = """\
Train a reference network with its paper's recipe, checkpoint every epoch, and certify it on the test split.

The model's family (lipkern.models.MODEL_FAMILIES) selects the recipe (lipkern.train.RECIPES): loss,
optimizer, lr, weight decay, schedule, batch size; every option given here overrides it. The inputs keep the
dataset's size unless --input-size pads them (centered zeros, an isometry) or --fit resize resizes them.

At the end: the certified accuracy on the test split from the sound (guaranteed, float64) Lipschitz bound
(--certify-method, --certify-pairwise; the radii cover the float32 network as it runs, --certify-evaluation),
a table, results.json and certified_accuracy.png in --output-dir
(a plot needs matplotlib). Under torchrun (WORLD_SIZE > 1) the same command trains with DDP: --batch-size is
the global batch, split evenly over the processes; rank 0 logs, checkpoints and certifies.

Examples:
  lipkern train --model convnet-xs-aol --dataset digits --epochs 30 --batch-size 64 --lr 0.05
  lipkern train --model liplt-4c3f --dataset mnist --data-root ~/data/mnist --epochs 50
  lipkern train --model convnet-xs-aol --resume runs/convnet-xs-aol-digits/checkpoint.pt --epochs 30
  torchrun --nproc-per-node 2 -m lipkern.cli train --model convnet-xs-aol --dataset digits
  lipkern certify --checkpoint runs/convnet-xs-aol-digits/checkpoint.pt --pairwise
"""


def _config_from_args(args):
    from lipkern.train import SESSION_OPTIONS, TrainConfig

    model_args = _model_args(args)
    fields = ("model", "dataset", "data_root", "input_size", "fit", "train_limit", "val_split", "save_best",
              "epochs", "batch_size",
              "lr", "optimizer", "momentum", "weight_decay", "schedule", "loss", "offset", "temperature",
              "margin", "crm_t", "crm_lambda", "crm_r0", "crm_start_epoch", "lmt_c", "bound_method",
              "bound_iters", "bound_pairwise", "splitz_kappa", "splitz_theta", "splitz_gamma", "splitz_ramp",
              "splitz_noise_warmup", "certify_samples", "seed", "device", "threads", "output_dir", "resume",
              "stop_after", "tensorboard", "eps",
              "certify_method", "certify_pairwise", "certify_limit", "certify_evaluation")
    values = {name: getattr(args, name) for name in fields}
    values["progress"] = not args.no_progress
    values["certify"] = not args.no_certify
    values["model_args"] = model_args
    if args.resume:  # what the command line does not give comes from the checkpoint's run
        given = _given_options(args.argv, "train")
        values.update({name: None for name in values
                       if name not in given and name not in SESSION_OPTIONS})
    return TrainConfig(**values)


def _given_options(argv: list, command: str) -> set:
    """The dests of the options given on the command line of ``command`` (not their defaults)."""
    from lipkern.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in subparsers.choices[command]._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(argv)
    return set(vars(given)) - {"command"}


def run(args) -> int:
    from lipkern.train import TrainError, TrainInterrupted, train as run_training

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("lipkern train: --plot needs matplotlib: pip install 'lipkern[plot]'", file=sys.stderr)
        return 2
    if args.certify_float64 is not None:
        print("lipkern train: --certify-float64 is deprecated and has no effect: the margins always come from "
              "the float64 evaluation of the weights the model applies (see --certify-evaluation)", file=sys.stderr)
    start = time.perf_counter()
    try:
        result = run_training(_config_from_args(args))
    except (CertifyError, TrainError) as err:
        print(f"lipkern train: error: {err}", file=sys.stderr)
        return 2
    except TrainInterrupted as err:
        print(f"\nlipkern train: {err}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports an interrupted command
    except KeyboardInterrupt:  # before the first epoch (loading data, building the model)
        print("\nlipkern train: interrupted before the first epoch; nothing was saved", file=sys.stderr)
        return 130
    certification = result.get("certification")
    if certification is None:  # not rank 0, or --no-certify
        return 0
    out_dir = Path(result["checkpoint"]).parent
    print(format_certify_table(certification, "train"))
    certified = (f"sound bound {certification['bound_seconds']:.1f} s" if "bound_seconds" in certification else
                 f"certification {sum(certification['points']['seconds']):.0f} s")
    print(f"training {result['train_seconds']:.0f} s, {certified}, total {time.perf_counter() - start:.0f} s; "
          f"checkpoint: {result['checkpoint']}")
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps({k: v for k, v in result.items()}, indent=1, default=str))
    print(f"results: {json_path}")
    plot = args.plot or (out_dir / "certified_accuracy.png"
                         if importlib.util.find_spec("matplotlib") is not None else None)
    if plot:
        print(f"plot: {write_certify_plot(certification, plot)}")
    return 0


def model_recipes_help() -> str:
    """The --model names by family, with each family's recipe (what a run uses unless an option overrides
    it)."""
    from lipkern.models import MODEL_FAMILIES
    from lipkern.train import RECIPES

    lines = ["models (--model) and their recipes:"]
    for family, recipe in RECIPES.items():
        names = [name for name, fam in MODEL_FAMILIES.items() if fam == family]
        if not names:
            continue
        options = ", ".join(f"{key} {value}" for key, value in recipe.items()
                            if key in ("loss", "optimizer", "lr", "batch_size", "schedule"))
        lines.append(f"  {family} ({recipe.get('source', '')}): {options}")
        lines.append(f"    {', '.join(names)}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    from lipkern.train import BOUND_METHODS, CERTIFY_EVALUATIONS, LOSSES, OPTIMIZERS, SCHEDULES

    p = sub.add_parser("train", help="train a reference network with its paper's recipe, then certify it",
                       description=TRAIN_HELP, epilog=model_recipes_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnet-xs-aol",
                   help="a name of lipkern.models.build_model (default convnet-xs-aol; all names and their "
                        "recipes: at the end of this help)")
    p.add_argument("--model-args", metavar="JSON", help="extra build_model options, e.g. '{\"width\": 8}'")
    p.add_argument("--dataset", default="digits", help="digits (default, bundled), mnist or cifar10")
    p.add_argument("--data-root", metavar="DIR", help="folder of the mnist / cifar10 files")
    p.add_argument("--input-size", type=int, metavar="N", help="pad (or --fit resize) inputs to N x N")
    p.add_argument("--fit", choices=("pad", "resize"), default="pad", help="how --input-size is reached")
    p.add_argument("--train-limit", type=int, metavar="N", help="train on the first N points only")
    p.add_argument("--val-split", type=float, default=0.0, metavar="F",
                   help="hold out this fraction of the training points (seeded by --seed) and log their "
                        "accuracy every epoch (default 0: none; the per-epoch test accuracy is logged either "
                        "way)")
    p.add_argument("--save-best", nargs="?", const="val", metavar="METRIC",
                   help="with --val-split: keep best.pt, the checkpoint of the epoch with the best METRIC: "
                        "'val' (the default: val accuracy) or 'certified@EPS' (the val points' certified "
                        "accuracy at radius EPS, from the sound bound of --certify-method every epoch)")
    p.add_argument("--epochs", type=int, default=100, help="epochs in all (default 100)")
    p.add_argument("--batch-size", type=int, help="global batch size (default: the recipe's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="sgd, nesterov (SGD with Nesterov momentum), adam")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, help="weight decay")
    p.add_argument("--schedule", choices=SCHEDULES, help="lr schedule over the whole run")
    p.add_argument("--loss", choices=LOSSES, help="offset-ce (AOL), hinge (CPL), crm, lmt, ce (plain) or "
                   "splitz")
    p.add_argument("--offset", type=float, help="offset-ce: margin u subtracted from the true logit")
    p.add_argument("--temperature", type=float, help="offset-ce: temperature t")
    p.add_argument("--margin", type=float, help="hinge: margin")
    p.add_argument("--crm-t", type=float, help="crm: soft-min sharpness t")
    p.add_argument("--crm-lambda", type=float, help="crm: weight of the radius term")
    p.add_argument("--crm-r0", type=float, help="crm: radius beyond which points are not penalized")
    p.add_argument("--crm-start-epoch", type=int, help="crm: first epoch (0-based) of the radius term")
    p.add_argument("--lmt-c", type=float, help="lmt: target radius c (ramped up over the first 5 epochs)")
    p.add_argument("--bound-method", choices=BOUND_METHODS, help="crm/lmt: the differentiable training bound")
    p.add_argument("--bound-iters", type=int, help="crm/lmt: power-iteration steps per training step")
    p.add_argument("--bound-pairwise", action="store_true",
                   help="crm/lmt: pairwise constants L_ab in training")
    p.add_argument("--splitz-kappa", type=float, nargs=2, metavar=("START", "END"),
                   help="splitz: weight of the local Lipschitz term, moved linearly over --splitz-ramp "
                        "(default 1 0.7)")
    p.add_argument("--splitz-theta", type=float, help="splitz: the term is off while the estimate is <= theta "
                   "(default 0.5)")
    p.add_argument("--splitz-gamma", type=float, help="splitz: l2 radius of the local estimate's balls "
                   "(reached after --splitz-ramp; default 0.05)")
    p.add_argument("--splitz-ramp", type=float, metavar="F", help="splitz: fraction of training over which kappa "
                   "and gamma move (default 2/3)")
    p.add_argument("--splitz-noise-warmup", type=float, metavar="F",
                   help="splitz: fraction of training over which sigma ramps up from 0 (default 0: the model's "
                        "sigma from the start; set sigma with --model-args '{\"sigma\": 0.5}')")
    p.add_argument("--seed", type=int, default=0, help="initialization and data order (default 0)")
    p.add_argument("--device",
                   help="default: cuda (the LOCAL_RANK-th under torchrun) when available, else cpu")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads of torch (torch.set_num_threads; on "
                   "a busy machine 1 can be much faster than the default)")
    p.add_argument("--output-dir", metavar="DIR", help="checkpoint.pt, results.json and the plot go here "
                   "(default: the --resume checkpoint's folder, else runs/<model>-<dataset>, or -2, -3, ... "
                   "when an earlier run is there); a folder holding an earlier run is refused, not "
                   "overwritten")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from its checkpoint: every option "
                   "not given here is the checkpoint run's (an option given that contradicts it is refused)")
    p.add_argument("--stop-after", type=int, metavar="E",
                   help="stop after epoch E of --epochs (checkpointed; "
                   "continue later with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction,
                   help="per-epoch scalars (metrics.csv's columns) in <output-dir>/tensorboard (default: on "
                        "when the tensorboard package is installed)")
    p.add_argument("--no-certify", action="store_true", help="skip the certification at the end")
    p.add_argument("--eps", type=float, nargs="+", default=list(DEFAULT_EPS), metavar="EPS",
                   help="l2 radii of the table (default: 0 36/255 72/255 108/255 0.5 1)")
    p.add_argument("--certify-method", choices=BOUND_METHODS,
                   help="sound bound at the end (default: product for aol/cpl/spectral, liplt otherwise)")
    p.add_argument("--certify-pairwise", action=argparse.BooleanOptionalAction, default=True,
                   help="pairwise constants L_ab for the certificate (default on)")
    p.add_argument("--certify-limit", type=int, metavar="N", help="certify the first N test points only")
    p.add_argument("--certify-samples", type=int, metavar="N",
                   help="splitz: noise draws per point of the SPLITZ certificate at the end (default 10000; "
                        "100 more select the class; alpha 0.001)")
    p.add_argument("--certify-evaluation", choices=CERTIFY_EVALUATIONS, default="auto",
                   help="what the radii cover: the model's floating-point evaluation as deployed, any summation "
                        "order ('auto', the default: its own dtype, TF32 on CUDA where enabled), or 'exact' (the "
                        "real-arithmetic network only)")
    p.add_argument("--certify-float64", action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)
    p.add_argument("--plot", metavar="PATH", help="where to write the plot (default: in --output-dir)")

