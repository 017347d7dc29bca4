"""``lipkern certify``: certified accuracy of a saved model on a saved dataset, from a Lipschitz-margin
certificate or randomized smoothing; a table, a JSON file and optionally a plot."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

from lipkern.cli import _distributed
from lipkern.cli._common import format_columns

DEFAULT_EPS = (0.0, 36 / 255, 72 / 255, 108 / 255, 0.5, 1.0)

CERTIFY_HELP = """\
Certified accuracy of a saved model on a saved dataset.

Model (one of):
  --model NAME --model-args JSON --state-dict PATH   a class of lipkern.models, built with the JSON keyword
                                                     arguments, weights from torch.load(weights_only=True)
  --scripted PATH                                    a TorchScript file (torch.jit.load)
  --exported PATH                                    a torch.export file (torch.export.load(...).module())
  --checkpoint PATH                                  a checkpoint written by lipkern train (the model is
                                                     rebuilt with lipkern.models.build_model)
A scripted or exported model is a black box: certify it with --lipschitz L (a constant YOU declare; it is
printed as such and not verified) or with --smoothing.

Data: --data PATH, a torch.save file holding {"x": (N, ...), "y": (N,)} or a tuple (x, y), or --dataset NAME
(the test split of lipkern.data.load_dataset; --data-root DIR for mnist / cifar10; with --checkpoint, the
training run's dataset and input size by default); --limit N keeps the first N points.

Certificates:
  Lipschitz margin (default): radius = (f_y - f_j) / (sqrt(2) L), or min_j (f_y - f_j) / L_yj with --pairwise;
    L is the sound (float64, rounding included) bound lipkern.bounds.lipschitz_bound(..., method=--method)
    unless --lipschitz is given (a constant you declare: the radii are only as good as it). The radii cover
    the network as it runs (--evaluation): its float32 (TF32, float64) evaluation in any summation order, with
    the weights it applies; margins come from their float64 evaluation less a proven rounding bound.
  --smoothing: Cohen et al.'s CERTIFY on every --skip-th point (sigma, n0, n, alpha); the radius holds with
    probability >= 1 - alpha. --adaptive stops each point's sampling once its outcome at --eps is settled.
  --splitz: SPLITZ for a SplitzNet (a splitz-* checkpoint): smoothing of the right half at left(x), the radius
    divided by the left half's sound local Lipschitz bound, its rounding charged (--evaluation).
  --predict (with --smoothing or --splitz): Cohen's PREDICT, the smoothed class or abstain, no radius.
A point counts as certified at eps iff it is correctly classified and its radius is > eps.

Examples:
  lipkern certify --model ConvNet --model-args '{"size": "S", "layer": "aol"}' --state-dict model.pt \\
      --data test.pt --eps 0 0.141 0.282 --output results.json --plot curve.png
  lipkern certify --scripted model.ts --lipschitz 1 --data test.pt
  lipkern certify --checkpoint runs/convnet-xs-aol-digits/checkpoint.pt --pairwise
  lipkern certify --exported model.pt2 --smoothing --sigma 0.25 --num-samples 10000 --skip 20 --data test.pt
  lipkern certify --checkpoint runs/splitz-s-digits/checkpoint.pt --splitz --num-samples 10000
"""


def _batch_size(text: str):
    """--batch-size: a number or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'auto', got {text!r}") from None


class CertifyError(Exception):
    """A problem with the user's model, data or options: printed as one message, exit code 2."""


def _model_classes() -> dict:
    """The model classes lipkern.models exports: name -> class (nn.Module subclasses in its __all__)."""
    from torch import nn

    from lipkern import models

    return {name: getattr(models, name) for name in getattr(models, "__all__", [])
            if isinstance(getattr(models, name, None), type) and issubclass(getattr(models, name), nn.Module)}


def _black_box(module):
    """Wrap a scripted or exported module so that .eval()/.train() do not reach into it (an exported module
    refuses them; it runs as it was exported, and TorchScript keeps its own flag)."""
    from torch import nn

    class BlackBox(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def train(self, mode: bool = True):
            self.training = mode
            return self

        def forward(self, x):
            return self.inner(x)

    return BlackBox(module)


def _load_state_dict(path: str):
    from lipkern.data import read_torch_file

    state = read_torch_file(path, f"--state-dict {path}", CertifyError)
    if isinstance(state, dict) and str(state.get("format")).startswith("lipkern-train"):
        raise CertifyError(f"--state-dict {path} is a checkpoint of lipkern train: certify it with "
                           f"--checkpoint {path} (the model is rebuilt from it)")
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CertifyError(f"--state-dict {path} does not hold a state_dict (a dict of parameter names to "
                           f"tensors, as model.state_dict() returns); got {type(state).__name__}")
    return state


def load_model(args):
    """(model, description, structure_known). The model is on the CPU, in eval mode."""
    import torch

    if args.model is not None:
        classes = _model_classes()
        if args.model not in classes:
            raise CertifyError(f"unknown --model {args.model!r}; choices (lipkern.models): "
                               f"{', '.join(sorted(classes))}")
        if args.state_dict is None:
            raise CertifyError("--model needs --state-dict PATH (the trained weights, torch.save("
                               "model.state_dict(), PATH))")
        kwargs = _model_args(args)
        description = f"{args.model}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        try:
            model = classes[args.model](**kwargs)
        except (TypeError, ValueError) as err:
            raise CertifyError(f"could not build {description}: {err}") from None
        state = _load_state_dict(args.state_dict)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise CertifyError(f"--state-dict {args.state_dict} does not match {description} (same "
                               f"--model-args as in training?): {err}") from None
        return model.eval(), description, True
    if args.state_dict is not None or args.model_args is not None:
        raise CertifyError("--state-dict and --model-args go with --model, not with --scripted/--exported/"
                           "--checkpoint")
    if args.checkpoint is not None:
        from lipkern.train import TrainError, certifiable, load_checkpoint_model

        try:
            model, state = load_checkpoint_model(args.checkpoint)
        except (TrainError, RuntimeError) as err:
            raise CertifyError(f"--checkpoint {args.checkpoint}: {err}") from None
        args.checkpoint_state = state
        description = f"{state['model']} (checkpoint {args.checkpoint}, epoch {state['epoch']})"
        return certifiable(model), description, True
    if args.lipschitz is None and not args.smoothing:
        flag = "--scripted" if args.scripted else "--exported"
        raise CertifyError(f"{flag}: the Lipschitz structure of a scripted or exported model is unknown; "
                           f"declare its constant with --lipschitz L or use --smoothing (black-box)")
    path = args.scripted or args.exported
    try:
        if args.scripted:
            model = torch.jit.load(path, map_location="cpu")
        else:
            model = torch.export.load(path).module()
    except FileNotFoundError:
        raise CertifyError(f"{path}: no such file") from None
    except Exception as err:
        loader = "torch.jit.load" if args.scripted else "torch.export.load"
        raise CertifyError(f"{path} could not be loaded with {loader}: {err}") from None
    kind = "TorchScript" if args.scripted else "exported"
    return _black_box(model), f"{kind} model {path}", False


def _model_args(args) -> dict:
    """--model-args: a JSON object of keyword arguments (of the model class or of build_model)."""
    try:
        kwargs = json.loads(args.model_args or "{}")
    except json.JSONDecodeError as err:
        raise CertifyError(f"--model-args is not valid JSON ({err}): {args.model_args}") from None
    if not isinstance(kwargs, dict):
        raise CertifyError(f"--model-args must be a JSON object of keyword arguments, got {args.model_args}")
    return kwargs


def load_data(path: str, limit: int | None):
    """(x (N, ...) floating point, y (N,) int64) from a torch.save file of {"x", "y"} or (x, y)."""
    import torch
    from lipkern.data import read_torch_file

    data = read_torch_file(path, f"--data {path}", CertifyError)
    if isinstance(data, dict) and "x" in data and "y" in data:
        x, y = data["x"], data["y"]
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise CertifyError(f"--data {path} must hold {{'x': inputs, 'y': labels}} or a tuple (x, y); found "
                           f"{found}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise CertifyError(f"--data {path}: x and y must be tensors, got {type(x).__name__} and "
                           f"{type(y).__name__}")
    if not x.is_floating_point() or x.dim() < 2:
        raise CertifyError(f"--data {path}: x must be a floating-point (N, ...) tensor (e.g. images scaled "
                           f"to [0, 1]), got {x.dtype} of shape {tuple(x.shape)}")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise CertifyError(f"--data {path}: y must be (N,) integer class labels, got {y.dtype} of shape "
                           f"{tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise CertifyError(f"--data {path}: x has {x.shape[0]} inputs but y has {y.shape[0]} labels")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if x.shape[0] == 0:
        raise CertifyError(f"--data {path}: no inputs to certify")
    return x, y.long()


def load_named_data(args):
    """The test split of --dataset (or, with --checkpoint, of its training dataset, fitted to its input
    size)."""
    from lipkern.data import DatasetError, fit_to_size, load_dataset

    config = (getattr(args, "checkpoint_state", None) or {}).get("config", {})
    name = args.dataset or config.get("dataset")
    if name is None:
        raise CertifyError("give the data: --data PATH or --dataset NAME")
    same = name.lower() == str(config.get("dataset", "")).lower()  # load_dataset ignores the case of names
    root = args.data_root if args.data_root is not None else (config.get("data_root") if same else None)
    try:
        x, y = load_dataset(name, root, "test")
        if config.get("input_size") and same:
            x = fit_to_size(x, config["input_size"], config.get("fit", "pad"))
    except (DatasetError, ValueError) as err:
        raise CertifyError(f"--dataset {name}: {err}") from None
    args.data = f"{name} test split"
    return (x, y) if args.limit is None else (x[:args.limit], y[:args.limit])


def _probe(model, x, device, exported: bool = False):
    """Run the model on the first input: its (1, C) logits. A failure names the shapes."""
    import torch

    try:
        with torch.inference_mode():
            logits = model(x[:1].to(device))
    except Exception as err:
        raise CertifyError(f"the model does not accept the data's inputs of shape {tuple(x.shape[1:])} "
                           f"(as a batch of one): {type(err).__name__}: {err}"
                           + (". An exported model needs a dynamic batch dimension (torch.export.export(..., "
                              "dynamic_shapes=...) with torch.export.Dim)" if exported else "")) from None
    valid = isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] == 1
    if not valid or logits.shape[1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CertifyError(f"the model must map a batch of inputs to (B, C) logits with C >= 2; it returned "
                           f"{shape} for one input")
    return logits


def _curve_counts(radii, correct, eps) -> list[int]:
    return [int((correct & (radii > e)).sum()) for e in eps]


def _lipschitz_for(model, x, args, structure_known: bool):
    """(lipschitz (float or tensor), JSON description)."""
    if args.lipschitz is not None:
        if args.pairwise:
            raise CertifyError("--pairwise needs the model's structure (--model); --lipschitz declares one "
                               "global constant")
        if not args.lipschitz > 0:
            raise CertifyError(f"--lipschitz must be > 0, got {args.lipschitz}")
        return args.lipschitz, {"source": "user-declared (--lipschitz), not verified", "pairwise": False,
                                "value": args.lipschitz}
    if not structure_known:
        raise CertifyError("a scripted or exported model needs --lipschitz L or --smoothing")
    try:
        from lipkern.bounds import lipschitz_bound
    except ImportError:
        raise CertifyError("lipkern.bounds.lipschitz_bound is not available in this installation; pass "
                           "--lipschitz L (a constant you vouch for) or use --smoothing") from None
    try:
        bound = lipschitz_bound(model, tuple(x.shape[1:]), method=args.method, pairwise=args.pairwise)
    except (TypeError, ValueError, NotImplementedError) as err:
        raise CertifyError(f"no sound Lipschitz bound for this model ({args.method}): {err}; pass "
                           f"--lipschitz L or use --smoothing") from None
    bound = bound.detach().double().cpu()
    value = bound.item() if bound.dim() == 0 else bound.tolist()
    source = f"{args.method} bound, sound (guaranteed upper bound, float64, rounding included)"
    return bound, {"source": source, "method": args.method, "pairwise": bool(args.pairwise), "value": value}


def certify_lipschitz(model, x, y, args, device, structure_known: bool, logits_dtype,
                      ranks=_distributed.Ranks()) -> dict | None:
    """The Lipschitz-margin certificate; under torchrun the bound is computed once (rank 0) and broadcast, the
    points' margins and rounding bounds are shared out by index, and rank 0 returns the merged result (None
    elsewhere)."""
    import torch

    from lipkern.certify import certified_accuracy
    from lipkern.certify.margin import CertifiedAccuracy
    from lipkern.train import margin_record

    lipschitz, lip_info = _distributed.broadcast(
        _lipschitz_for(model, x, args, structure_known) if ranks.main else None, ranks)
    evaluation = args.evaluation if structure_known else None
    mine = ranks.shard(list(range(x.shape[0])))
    try:
        part = certified_accuracy(model, (x[mine], y[mine]), list(args.eps), lipschitz=lipschitz,
                                  pairwise=args.pairwise, input_shape=tuple(x.shape[1:]), device=device,
                                  batch_size=args.batch_size, evaluation=evaluation)
    except TypeError as err:
        raise CertifyError(f"{err} (lipkern certify --evaluation exact certifies the real-arithmetic network "
                           f"only)") from None
    parts = _distributed.gather((mine, part), ranks)
    if not ranks.main:
        return None
    result = part
    if ranks.world > 1:  # the points back in their order
        order = torch.tensor([i for indices, _ in parts for i in indices]).argsort()
        joined = {name: torch.cat([getattr(p, name) for _, p in parts])[order]
                  for name in ("radii", "correct") + (("rounding",) if part.rounding is not None else ())}
        correct = joined["correct"].bool()
        accuracy = torch.stack([(correct & (joined["radii"] > e)).double().mean() for e in part.eps])
        result = CertifiedAccuracy(part.eps, accuracy, float(correct.double().mean()), joined["radii"],
                                   joined["correct"], part.evaluation, joined.get("rounding"),
                                   max(p.rounding_slope for _, p in parts))
    record = margin_record(result, y, lip_info)
    if evaluation is None:
        record["evaluation"] = str(logits_dtype).removeprefix("torch.") + " (as computed, rounding not bounded)"
    return record


def _finite_or_none(value: float):
    """JSON has no infinity: an unbounded radius is written as null."""
    import math

    return value if math.isfinite(value) else None


def _shard_path(output: str, rank: int) -> Path:
    """Where a rank writes its points as they finish: <output>.points-<rank>.jsonl."""
    return Path(f"{output}.points-{rank}.jsonl")


def _recorded_batch_size(output: str | None) -> int | None:
    """The batch size in the settings of an earlier run's shards of ``output`` (None: no shard)."""
    if output is None:
        return None
    for shard in sorted(Path(output).parent.glob(Path(output).name + ".points-*.jsonl")):
        lines = shard.read_text().splitlines()
        if lines:
            return json.loads(lines[0]).get("settings", {}).get("batch_size")
    return None


def _fingerprint(model, x, y) -> str:
    """A hash of the model's state (every tensor of its state_dict, by name) and of the data: a resumed run must
    certify the same model on the same points."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    named = [*sorted(state.items()), ("x", x), ("y", y)]
    for name, tensor in named:
        if isinstance(tensor, torch.Tensor):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _smoothing_settings(args, x) -> dict:
    """What a point's result depends on: a resumed run must match it."""
    return {"sigma": args.sigma, "fingerprint": getattr(args, "fingerprint", None), "n0": args.n0, "n": args.n,
            "alpha": args.alpha, "seed": args.seed, "skip": args.skip, "points": int(x.shape[0]), "batch_size": args.batch_size,
            "adaptive": bool(args.adaptive), "eps": [float(e) for e in args.eps] if args.adaptive else None,
            "splitz": bool(args.splitz), "predict": bool(args.predict),
            "evaluation": getattr(args, "evaluation", None) if args.splitz else None}


def _splitz_halves(model):
    """(left, right, sigma) of a SPLITZ model: a lipkern.models.SplitzNet or any module with ``left``,
    ``right`` modules and a ``sigma``."""
    from torch import nn

    halves = [getattr(model, name, None) for name in ("left", "right")]
    sigma = getattr(model, "sigma", None)
    if not all(isinstance(h, nn.Module) for h in halves) or not isinstance(sigma, (int, float)):
        raise CertifyError("--splitz needs a SPLITZ model (lipkern.models.SplitzNet: a --checkpoint of a splitz-* "
                           f"run or --model SplitzNet) with left and right halves and a sigma; got "
                           f"{type(model).__name__}")
    return halves[0], halves[1], float(sigma)


def _largest_batch(model, x, args, device, num_classes: int) -> int:
    """--batch-size auto: RandomizedSmoothing.largest_batch of the smoothed network at the first point (the right
    half at the left half's output with --splitz), capped by --num-samples."""
    import torch

    from lipkern.certify import RandomizedSmoothing

    point = x[0].to(device)
    base = model
    if args.splitz:
        left, base, _ = _splitz_halves(model)
        with torch.inference_mode():
            point = left.eval()(point[None])[0]
    cap = max(args.n, args.n0) if device.type == "cuda" else min(max(args.n, args.n0), 4096)  # a CPU raises
    return RandomizedSmoothing(base, args.sigma, num_classes).largest_batch(point, cap)  # no OOM: capped


def _point_certifier(model, args, num_classes: int, device):
    """certify(x_i, seed) -> (prediction, radius, noise draws, gamma) for the mode of ``args``: Cohen's CERTIFY
    (--smoothing), its adaptive form (--adaptive), SPLITZ (--splitz; gamma: the ball of the local bound),
    or Cohen's PREDICT (--predict: the smoothed class or abstain, radius 0)."""
    import torch

    from lipkern.certify import RandomizedSmoothing, SplitzCertifier

    if args.splitz:
        left, right, sigma = _splitz_halves(model)
        splitz = SplitzCertifier(left, right, sigma, num_classes, evaluation=args.evaluation)
        smoother = splitz.smoothing
    else:
        smoother = RandomizedSmoothing(model, args.sigma, num_classes)

    def certify(x, seed: int):
        if args.predict:
            if args.splitz:
                with torch.inference_mode():
                    x = left.eval()(x[None])[0]
            return smoother.predict(x, args.n, args.alpha, args.batch_size, seed=seed), 0.0, args.n, None
        if args.splitz:
            prediction, radius, gamma = splitz.certify(x, args.n0, args.n, args.alpha, args.batch_size, seed=seed)
            return prediction, radius, args.n0 + args.n, gamma
        if args.adaptive:
            prediction, radius, samples = smoother.certify_adaptive(x, args.n0, args.n, args.alpha,
                                                                    args.batch_size, args.eps, seed=seed)
            return prediction, radius, samples, None
        prediction, radius = smoother.certify(x, args.n0, args.n, args.alpha, args.batch_size, seed=seed)
        return prediction, radius, args.n0 + args.n, None

    return certify


def _finished_points(output: str | None, settings: dict, resume: bool) -> dict:
    """{index: (prediction, radius, seconds)} from the shards of an earlier run of this --output (any number of
    ranks), when resuming; the shards must have been written with the same settings."""
    if output is None:
        if resume:
            raise CertifyError("--resume needs --output PATH (the run's points are kept beside it)")
        return {}
    shards = sorted(Path(output).parent.glob(Path(output).name + ".points-*.jsonl"))
    if not resume:
        if shards:
            raise CertifyError(f"{shards[0]} holds the points of an unfinished run of this --output: continue it "
                               f"with --resume, or delete {Path(output).name}.points-*.jsonl to start again")
        return {}
    done = {}
    for shard in shards:
        lines = shard.read_text().splitlines()
        if not lines:
            continue
        header = json.loads(lines[0])
        if header != {"settings": settings}:
            raise CertifyError(f"--resume: {shard} was written with other settings ({header.get('settings')}), "
                               f"this run has {settings}")
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the interruption: that point runs again
                continue
            done[row[0]] = tuple(row[1:])
    return done


def certify_smoothing(model, x, y, args, device, num_classes: int, ranks=_distributed.Ranks()) -> dict | None:
    """Cohen et al.'s CERTIFY (or SPLITZ's certificate, or PREDICT) for every --skip-th point; under torchrun
    the points are shared out by index (each keeps its seed, so the results equal one process's) and rank 0
    returns the merged result (None elsewhere)."""
    import torch

    if args.splitz:
        sigma = _splitz_halves(model)[2]
        if args.sigma is not None and args.sigma != sigma:
            raise CertifyError(f"--sigma {args.sigma}: this SPLITZ model adds noise of sigma {sigma} after its "
                               "left half (its right half was trained for it); leave --sigma out")
        args.sigma = sigma
        if args.adaptive:
            raise CertifyError("--adaptive stops at the --eps radii of the smoothed classifier; SPLITZ's radius "
                               "also depends on the left half's local bound: use --splitz without --adaptive")
    if args.predict and args.adaptive:
        raise CertifyError("--predict runs Cohen's PREDICT with --num-samples draws; --adaptive is for CERTIFY")
    if args.sigma is None or not args.sigma > 0:
        raise CertifyError("--smoothing needs --sigma S > 0 (the noise level the model was trained with)")
    if not 0 < args.n0 <= args.n:
        raise CertifyError(f"--smoothing needs 0 < --num-select <= --num-samples, got {args.n0} and {args.n}")
    if not 0 < args.alpha < 1:
        raise CertifyError(f"--alpha must lie in (0, 1), got {args.alpha}")
    if args.skip < 1:
        raise CertifyError(f"--skip must be >= 1, got {args.skip}")
    certify_point = _point_certifier(model, args, num_classes, device)
    if args.batch_size == "auto" and args.resume:  # the size the interrupted run chose (its noise streams)
        args.batch_size = _recorded_batch_size(args.output) or "auto"
    if args.batch_size == "auto":  # every rank the same batch (the noise streams depend on it): the smallest
        fits = _distributed.gather(_largest_batch(model, x, args, device, num_classes), ranks)
        args.batch_size = _distributed.broadcast(min(fits) if ranks.main else None, ranks)
        if ranks.main:
            print(f"smoothing batch size {args.batch_size} (the largest that fits on {device} by itself, up to "
                  f"--num-samples)", file=sys.stderr)
    indices = list(range(0, x.shape[0], args.skip))
    mine = ranks.shard(indices)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        def tqdm(iterable, **_):
            return iterable
    if args.output is not None:
        args.fingerprint = _fingerprint(model, x, y)
    settings = _smoothing_settings(args, x)
    done = _finished_points(args.output, settings, args.resume)
    _distributed.barrier(ranks)  # every rank has read the earlier shards before any writes its own
    rows = [(i, *done[i]) for i in mine if i in done]  # (index, prediction, radius, seconds, samples, gamma)
    todo = [i for i in mine if i not in done]
    if ranks.main:
        share = f" ({ranks.world} ranks, {len(mine)} on rank 0)" if ranks.world > 1 else ""
        resumed = f" ({len(done)} done before)" if done else ""
        what = "SPLITZ" if args.splitz else "randomized smoothing"
        draws = f"PREDICT with {args.n:,}" if args.predict else f"{args.n0:,} + {args.n:,}"
        print(f"{what}: {len(indices)} points{share}{resumed}, {draws} noise draws each", file=sys.stderr)
    shard = None
    if args.output is not None:  # each point written as it finishes: an interrupted run loses at most one
        path = _shard_path(args.output, ranks.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists() or path.stat().st_size == 0
        shard = path.open("a")
        if fresh:
            shard.write(json.dumps({"settings": settings}) + "\n")
    try:
        for i in tqdm(todo, desc="certify", unit="point", file=sys.stderr, disable=not ranks.main):
            start = time.perf_counter()
            prediction, radius, samples, gamma = certify_point(x[i].to(device), args.seed + i)
            rows.append((i, int(prediction), float(radius), time.perf_counter() - start, int(samples),
                         None if gamma is None else float(gamma)))
            if shard is not None:
                shard.write(json.dumps(rows[-1]) + "\n")
                shard.flush()
            first = rows[-1][3]
            if len(rows) == len(mine) - len(todo) + 1 and ranks.main and first * len(todo) > 60:  # say so up front
                print(f"smoothing: the first point took {first:.1f} s: about {first * len(todo) / 60:.0f} min "
                      f"for all {len(todo)} (fewer draws: --num-samples; fewer points: --skip K or --limit N)",
                      file=sys.stderr)
    finally:
        if shard is not None:
            shard.close()
    gathered = _distributed.gather(rows, ranks)
    if not ranks.main:
        return None
    rows = sorted((row for part in gathered for row in part), key=lambda row: row[0])
    predictions = [row[1] for row in rows]
    radii = [row[2] for row in rows]
    seconds = [row[3] for row in rows]
    samples = [row[4] for row in rows]
    gammas = [row[5] for row in rows]
    labels = y[indices]
    correct = torch.tensor(predictions) == labels
    radius_t = torch.tensor(radii, dtype=torch.float64)
    counts = _curve_counts(radius_t, correct, args.eps)
    with torch.inference_mode():
        step = min(args.batch_size, 256)  # inputs, not noise draws: the auto size fits the right half only
        base = torch.cat([model(x[indices][j:j + step].to(device)).argmax(1).cpu()
                          for j in range(0, len(indices), step)])
    num = len(indices)
    mode = "smoothing-predict" if args.predict else "splitz" if args.splitz else "randomized-smoothing"
    points = {"index": indices, "label": labels.tolist(), "prediction": predictions,
              "radius": [r if math.isfinite(r) else None for r in radii],  # None: unbounded (a constant left)
              "correct": correct.tolist(), "seconds": seconds, "samples": samples}
    if args.splitz and not args.predict:
        points["gamma"] = gammas
    eps = [] if args.predict else [float(e) for e in args.eps]  # PREDICT: no radii, no certified-accuracy table
    counts = counts[:len(eps)]
    return {"mode": mode, "eps": eps,
            "certified_accuracy": [c / num for c in counts], "certified_count": counts,
            "clean_accuracy": int(correct.sum()) / num, "clean_count": int(correct.sum()), "num_points": num,
            "base_clean_accuracy": int((base == labels).sum()) / num,
            "smoothing": {"sigma": args.sigma, "n0": args.n0, "n": args.n, "alpha": args.alpha,
                          "skip": args.skip, "seed": args.seed, "abstained": predictions.count(-1),
                          "adaptive": bool(args.adaptive), "samples": sum(samples), "splitz": bool(args.splitz),
                          "predict": bool(args.predict),
                          "evaluation": getattr(args, "evaluation", None) if args.splitz else None},
            "points": points}


def format_certify_table(result: dict, command: str = "certify") -> str:
    """The report: what was certified and how, then one row per eps (certified accuracy and count)."""
    n = result["num_points"]
    lines = [f"lipkern {command}: {result.get('model', '?')} on {result.get('data', '?')} ({n} points, "
             f"device {result.get('device', '?')})"]
    if result["mode"] == "lipschitz-margin":
        lip = result["lipschitz"]
        value = lip["value"]
        if isinstance(value, list):
            off = [v for a, row in enumerate(value) for b, v in enumerate(row) if a != b]
            shown = (f"pairwise ({len(value)}x{len(value)}), off-diagonal from {min(off):.6g} to "
                     f"{max(off):.6g}")
        else:
            shown = f"L = {value:.6g}"
        lines.append(f"certificate: Lipschitz margin, {shown} [{lip['source']}]")
        lines.append(evaluation_line(result))
        lines.append(f"clean accuracy: {100 * result['clean_accuracy']:.2f}% ({result['clean_count']}/{n})")
    elif result["mode"] == "smoothing-predict":
        s = result["smoothing"]
        half = " of the right half at the left half's output (SPLITZ)" if s.get("splitz") else ""
        lines.append(f"Cohen's PREDICT{half}: sigma = {s['sigma']}, n = {s['n']}, alpha = {s['alpha']} (every "
                     f"{s['skip']}-th point; a returned class is the smoothed classifier's with probability >= "
                     f"1 - alpha; no radius)")
        wrong = n - result["clean_count"] - s["abstained"]
        lines.append(f"smoothed accuracy: {100 * result['clean_accuracy']:.2f}% ({result['clean_count']}/{n}), "
                     f"{s['abstained']} abstained, {wrong} wrong; base model accuracy on these points: "
                     f"{100 * result['base_clean_accuracy']:.2f}%")
        return "\n".join(lines)
    else:
        s = result["smoothing"]
        if result["mode"] == "splitz":
            lines.append(f"certificate: SPLITZ, randomized smoothing of the right half (sigma = {s['sigma']}, "
                         f"n0 = {s['n0']}, n = {s['n']}, alpha = {s['alpha']}) divided by the left half's sound "
                         f"local Lipschitz bound (every {s['skip']}-th point; radii hold with probability "
                         f">= 1 - alpha)")
            lines.append(_splitz_evaluation_line(s.get("evaluation")))
        else:
            lines.append(f"certificate: randomized smoothing, sigma = {s['sigma']}, n0 = {s['n0']}, "
                         f"n = {s['n']}, alpha = {s['alpha']} (every {s['skip']}-th point; radii hold with "
                         f"probability >= 1 - alpha)")
        lines.append(f"smoothed accuracy: {100 * result['clean_accuracy']:.2f}% "
                     f"({result['clean_count']}/{n}, {s['abstained']} abstained); base model accuracy on "
                     f"these points: "
                     f"{100 * result['base_clean_accuracy']:.2f}%")
        if s.get("adaptive"):
            fixed = n * (s["n0"] + s["n"])
            lines.append(f"adaptive: {s['samples']:,} noise draws in all, {100 * s['samples'] / fixed:.0f}% of fixed "
                         f"n's {fixed:,}")
    body = [[f"{e:.4f}", f"{100 * a:.2f}%", f"{c}/{n}"] for e, a, c in
            zip(result["eps"], result["certified_accuracy"], result["certified_count"])]
    lines += [""] + format_columns(["eps", "certified accuracy", "count"], body, right={0, 1, 2})
    lines.append("a point is certified at eps iff it is correctly classified and its certified radius is "
                 "> eps")
    return "\n".join(lines)


def _splitz_evaluation_line(evaluation) -> str:
    if evaluation is None:
        return "left half: its rounding NOT bounded (the radii hold for the real-arithmetic left half up to it)"
    if evaluation == "exact":
        return ("left half: the real-arithmetic one (the computed left(x)'s distance to it charged to the radius); "
                "its floating-point evaluation at other inputs is NOT covered")
    what = "its own precision" if evaluation == "auto" else evaluation
    return (f"left half as it runs: {what} evaluation in any summation order (its rounding charged to the radius: "
            f"2P from the right half's radius, Q onto L)")


def evaluation_line(result: dict) -> str:
    """What the radii cover: the deployed floating-point evaluation, the real-arithmetic network, or logits
    whose rounding is not bounded."""
    evaluation = str(result.get("evaluation"))
    rounding = result.get("rounding_max")
    if evaluation in ("float32", "tf32", "float64"):
        return (f"network as it runs: {evaluation} evaluation in any summation order (the frozen weights it "
                f"applies; margins from their float64 evaluation less a proven rounding bound, at most "
                f"{rounding:.2g} on the logits)")
    if evaluation == "exact":
        return ("real-arithmetic network (float64 evaluation of the applied weights, its rounding bounded); the "
                "floating-point evaluation of the deployed model is NOT covered")
    return (f"logits: {evaluation}; a black-box model's floating-point evaluation is not analyzed: the radii hold "
            f"for the real-arithmetic network only up to that rounding")


def plot_title(result: dict, width: int = 80) -> str:
    """The plot's title, wrapped to lines of ≤ ``width`` characters (a 6-inch figure at 8 pt holds ~90): a
    checkpoint's long path is not clipped."""
    import textwrap

    title = f"{result.get('model', '')} ({result['mode']}, {result['num_points']} points)"
    return textwrap.fill(title, width, break_long_words=True, break_on_hyphens=False)


def write_certify_plot(result: dict, path) -> Path:
    """Certified accuracy against eps: the curve from every point's radius, the asked eps marked. Needs
    matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    radii = [r if r is not None else float("inf") for r in points["radius"]]
    certified = sorted(r for r, ok in zip(radii, points["correct"]) if ok)
    finite = [r for r in certified if r != float("inf")]
    right = max([*result["eps"], *finite, 1e-3]) * 1.05
    n = result["num_points"]
    xs, ys = [0.0], [sum(r > 0 for r in certified) / n]
    for r in finite:  # the curve drops just after each radius
        xs += [r, r]
        ys += [ys[-1], sum(c > r for c in certified) / n]
    xs.append(right)
    ys.append(ys[-1])
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, color="tab:blue", label="certified accuracy")
    ax.scatter(result["eps"], result["certified_accuracy"], color="tab:red", zorder=3, label="asked eps")
    ax.set_xlim(0, right)
    ax.set_ylim(0, 1)
    ax.set_xlabel("eps (l2 radius)")
    ax.set_ylabel("certified accuracy")
    ax.set_title(plot_title(result), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _certificate_defaults(args) -> None:
    """--method / --pairwise / --evaluation / --eps not given: a checkpoint's own certification settings (so
    that lipkern certify reproduces lipkern train's table), else liplt, global, the model's own evaluation."""
    config = (getattr(args, "checkpoint_state", None) or {}).get("config", {})
    defaults = {"method": config.get("certify_method", "liplt"),
                "pairwise": config.get("certify_pairwise", False),
                "evaluation": config.get("certify_evaluation", "auto"),
                "eps": list(config.get("eps", DEFAULT_EPS))}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def run(args) -> int:
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("lipkern certify --plot needs matplotlib: pip install 'lipkern[plot]' (or pip install "
              "matplotlib).", file=sys.stderr)
        return 2
    ranks = _distributed.ranks_from_env()
    try:
        import torch

        from lipkern.train import usable_device

        device = usable_device(args.device, CertifyError) if args.device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if ranks.world > 1 and device.type == "cuda":
            if ranks.local_rank >= torch.cuda.device_count():
                raise CertifyError(f"torchrun started more ranks on this node ({ranks.local_rank + 1}+) than it has "
                                   f"GPUs ({torch.cuda.device_count()}): --nproc-per-node at most the GPU count")
            device = torch.device("cuda", ranks.local_rank)  # one GPU per rank (torchrun's LOCAL_RANK)
        _distributed.start(ranks, device.type)
        if args.batch_size is None:
            args.batch_size = "auto" if device.type == "cuda" and (args.smoothing or args.splitz) else 256
        if args.batch_size == "auto" and not (args.smoothing or args.splitz):
            raise CertifyError("--batch-size auto sizes the smoothing batches; give a number for the margin "
                               "certificate")
        if args.batch_size != "auto" and args.batch_size < 1:
            raise CertifyError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.threads is not None:
            if args.threads < 1:
                raise CertifyError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.limit is not None and args.limit < 1:
            raise CertifyError(f"--limit must be >= 1, got {args.limit}")
        if args.float64 is not None:
            print("lipkern certify: --float64 is deprecated and has no effect: the margins always come from the "
                  "float64 evaluation of the weights the model applies (see --evaluation)", file=sys.stderr)
        if args.predict and not (args.smoothing or args.splitz):
            raise CertifyError("--predict goes with --smoothing or --splitz (it is Cohen's PREDICT of the smoothed "
                               "classifier)")
        if args.splitz and args.smoothing:
            raise CertifyError("--splitz already smooths the right half: give --splitz or --smoothing, not both")
        if args.predict and args.plot:
            raise CertifyError("--predict gives no radii: there is no certified-accuracy curve to --plot")
        if args.evaluation is not None and (args.smoothing or args.scripted or args.exported):
            raise CertifyError("--evaluation applies to the Lipschitz-margin and SPLITZ certificates of a model "
                               "whose structure is known (--model or --checkpoint)")
        model, description, structure_known = load_model(args)
        _certificate_defaults(args)
        if any(not e >= 0 for e in args.eps):
            raise CertifyError(f"--eps values must be >= 0, got {args.eps}")
        x, y = load_named_data(args) if args.data is None else load_data(args.data, args.limit)
        model = model.to(device)
        probe = _probe(model, x, device, exported=args.exported is not None)
        num_classes = probe.shape[1]
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise CertifyError(f"--data {args.data}: labels must lie in [0, {num_classes}) for a model with "
                               f"{num_classes} outputs, found {int(y.min())}..{int(y.max())}")
        if args.smoothing or args.splitz:
            try:
                result = certify_smoothing(model, x, y, args, device, num_classes, ranks)
            except ValueError as err:  # e.g. a left half with NaN weights, or one no bound applies to
                raise CertifyError(str(err)) from None
        else:
            result = certify_lipschitz(model, x, y, args, device, structure_known, probe.dtype, ranks)
    except CertifyError as err:
        print(f"lipkern certify: error{f' (rank {ranks.rank})' if ranks.world > 1 else ''}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if ranks.main:
            kept = (f"the finished points are kept in {args.output}.points-*.jsonl: run the same command with "
                    f"--resume to continue" if (args.smoothing or args.splitz) and args.output else "nothing was written")
            print(f"\nlipkern certify: interrupted; {kept}", file=sys.stderr)
        return 130
    finally:
        _distributed.stop(ranks)
    if not ranks.main:
        return 0
    if ranks.world > 1:
        result["ranks"] = ranks.world
    result.update(model=description, data=str(args.data), device=str(device))
    print(format_certify_table(result))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        for shard in out.parent.glob(out.name + ".points-*.jsonl"):  # the run is complete: its points are in out
            shard.unlink()
        print(f"\nresults: {out}")
    if args.plot:
        print(f"plot: {write_certify_plot(result, args.plot)}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("certify", help="certified accuracy of a saved model on saved data",
                       description=CERTIFY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="NAME", help="a model class of lipkern.models (with --state-dict)")
    source.add_argument("--scripted", metavar="PATH", help="a TorchScript model (torch.jit.save)")
    source.add_argument("--exported", metavar="PATH", help="a torch.export model (torch.export.save)")
    source.add_argument("--checkpoint", metavar="PATH", help="a checkpoint of lipkern train (model rebuilt "
                        "by name from it)")
    p.add_argument("--model-args", metavar="JSON",
                   help="keyword arguments of --model, e.g. '{\"size\": \"S\"}'")
    p.add_argument("--state-dict", metavar="PATH",
                   help="the weights of --model (torch.save(model.state_dict()))")
    p.add_argument("--data", metavar="PATH",
                   help="torch.save file: {'x': ..., 'y': ...} or (x, y)")
    p.add_argument("--dataset", metavar="NAME", help="instead of --data: the test split of a lipkern.data "
                   "dataset (digits, mnist, cifar10); with --checkpoint, default: the one it was trained on")
    p.add_argument("--data-root", metavar="DIR", help="folder of the mnist / cifar10 files")
    p.add_argument("--limit", type=int, metavar="N", help="certify the first N points only")
    p.add_argument("--batch-size", type=_batch_size, default=None,
                   help="inputs (or noise draws) per forward pass, or 'auto': for smoothing, the largest batch "
                        "that fits on the GPU by itself (default: auto for smoothing on a GPU, else 256)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--eps", type=float, nargs="+", metavar="EPS",
                   help="l2 radii of the table (default: with --checkpoint its training run's, else 0 36/255 "
                        "72/255 108/255 0.5 1)")
    p.add_argument("--method", choices=("liplt", "product"),
                   help="whole-network bound of lipkern.bounds.lipschitz_bound (default: with --checkpoint "
                        "the one its training run certified with, else liplt)")
    p.add_argument("--pairwise", action=argparse.BooleanOptionalAction,
                   help="pairwise constants L_ab of the logit differences (default: with --checkpoint as its "
                        "training run certified, else off)")
    p.add_argument("--evaluation", choices=("auto", "float32", "tf32", "float64", "exact"),
                   help="what the radii cover: the model's floating-point evaluation as deployed, any summation "
                        "order ('auto': its own dtype, TF32 on CUDA where enabled; the default, or with "
                        "--checkpoint its training run's), or 'exact' (the real-arithmetic network only)")
    p.add_argument("--float64", action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)  # deprecated
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads of torch (torch.set_num_threads; on "
                   "a busy machine 1 can be much faster than the default)")
    p.add_argument("--lipschitz", type=float, metavar="L",
                   help="a global Lipschitz constant you declare (not verified; required for a scripted or "
                        "exported model unless --smoothing)")
    p.add_argument("--smoothing", action="store_true", help="randomized smoothing (Cohen et al.) instead")
    p.add_argument("--splitz", action="store_true",
                   help="SPLITZ: smoothing of a SplitzNet's right half at its left half's output, the radius "
                        "divided by the left half's sound local Lipschitz bound (sigma: the model's)")
    p.add_argument("--predict", action="store_true",
                   help="with --smoothing or --splitz: Cohen's PREDICT (the smoothed class, or abstain when the "
                        "top two counts of --num-samples draws do not differ at level --alpha); no radius")
    p.add_argument("--sigma", type=float, help="smoothing noise level")
    # (--num-select / --num-samples: names torchrun's own parser leaves alone; --n0 / --n are the old spellings)
    p.add_argument("--num-select", "--n0", dest="n0", type=int, default=100,
                   help="draws that select the class (default 100)")
    p.add_argument("--num-samples", "--n", dest="n", type=int, default=100_000,
                   help="draws that estimate its probability (default 1e5)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--skip", type=int, default=1, metavar="K", help="smoothing: every K-th point (default 1)")
    p.add_argument("--seed", type=int, default=0, help="smoothing: noise seed (point i uses seed + i)")
    p.add_argument("--adaptive", action="store_true",
                   help="smoothing: stop each point's sampling once its outcome at the --eps radii is settled (same "
                        "guarantee, alpha shared over doubling looks up to --num-samples; see "
                        "RandomizedSmoothing.certify_adaptive)")
    p.add_argument("--resume", action="store_true",
                   help="smoothing: continue an interrupted run of this --output (its finished points are kept in "
                        "PATH.points-*.jsonl as they finish)")
    p.add_argument("--output", metavar="PATH",
                   help="write the results (table values and per-point radii) as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a certified-accuracy-vs-eps plot (needs matplotlib: "
                   "pip install 'lipkern[plot]')")

