"""Train a reference network with its paper's recipe, checkpoint it, and certify it (``lipkern train``).

A run is described by a :class:`TrainConfig`; every field left at ``None`` comes from the recipe of the
model's family (:data:`lipkern.models.MODEL_FAMILIES`), see :data:`RECIPES`:

- aol (Prach & Lampert 2022, papers.md §2): offset cross-entropy (u = √2, t = 1/4), SGD with Nesterov momentum
  0.9, weight decay 5e-4, batch 250, lr divided by 10 at 90%, 99% and 99.9% of training (900/990/999 of 1000
  epochs). The paper's lr is 1e-3 over 1000 epochs;
- cpl (Meunier et al. 2022, §3): multi-margin hinge (margin 0.7), Adam lr 1e-3, batch 256, triangular schedule
  0 → lr at 40% → lr/20 at 80% → 0;
- spectral ("1-Lipschitz Layers Compared", §7): offset cross-entropy with u = 2√2·36/255, t = 1/4, SGD
  momentum 0.9 with PyTorch's OneCycleLR, batch 256; the paper random-searches lr in 10^[−4, −1] and weight
  decay in 10^[−5.5, −3.5]: the defaults 0.01 and 1e-4 lie in that range (a choice, not the paper's number);
- liplt (Fazlyab et al. 2023, §1): CRM loss (t = 5, λ = 15, r₀ = 0.2, robust term from epoch 10) with the
  differentiable LipLT bound :class:`lipkern.bounds.LipschitzEstimate` (5 power-iteration steps per training
  step), Adam (eps 1e-7) lr 1e-3 decayed exponentially to 1e-6 at the end ("exponentialWithStopping"),
  batch 512;
- lmt (Tsuzuku et al. 2018, §6): LMT loss with c ramped linearly from 1e-5 to 0.1 over the first 5 epochs,
  the product-of-norms bound advanced by one power-iteration step per training step, SGD Nesterov momentum
  0.9, lr 0.01 × 0.1 at 50% and 75% of training (80 and 120 of 160 epochs), batch 128;
- splitz (Zhong & Tandon 2024, §5; as the authors' code trains): the noise N(0, σ²) added after the left half
  (the model's ``sigma``), cross-entropy on the noisy logits, and while the left half's local Lipschitz
  estimate on B(x, γ) (:class:`lipkern.certify.LocalLipschitzEstimate`, two power-iteration steps) exceeds
  θ = 0.5 the loss (1 − κ)·CE + κ·L̂ (:func:`lipkern.certify.splitz_loss`); κ goes 1 → 0.7 and γ 0 → 0.05
  linearly over the first two thirds of training; Adam lr 1e-3, constant for half of training, then decayed
  exponentially to 1e-6 ("hold-exponential"); batch 256. ``splitz_noise_warmup`` > 0 ramps σ up over that
  fraction of training (the authors: none). Certified at the end by SPLITZ (randomized smoothing of the right
  half with ``certify_samples`` draws, α = 0.001, divided by the left half's sound local bound).

Schedules are applied per optimizer step as functions of the fraction of training done, so a run of any length
keeps the recipe's shape. Epoch counts default to 100 (the papers' 200–1000 are long for a first run).

The data are in memory (:func:`lipkern.data.load_dataset`). Each epoch visits a permutation drawn from the
seed and the epoch in global batches of ``batch_size`` (the last incomplete batch is dropped); under
``torchrun`` (WORLD_SIZE > 1) rank r trains on the rows r, r + W, r + 2W, … of each global batch, and DDP
averages the gradients, so W processes follow the same trajectory as one process (up to the all-reduce's
rounding; MaxMin networks can amplify it through near-ties). Rank 0 logs, writes the checkpoint after every
epoch and certifies at the end.

Checkpoints (``torch.save`` of plain containers, loadable with ``torch.load(weights_only=True)``):
``{"format": "lipkern-train-1", "model": name, "model_args": {num_classes, in_channels, input_size, ...},
"family", "state_dict", "optimizer", "scheduler", "bound" (the power-iteration vectors of the training
bound), "epoch" (epochs done), "config", "history"}``. :func:`load_checkpoint_model` rebuilds the model;
``lipkern certify --checkpoint PATH`` reads it.

The certification at the end uses :func:`lipkern.bounds.lipschitz_bound` (a guaranteed upper bound) and
:func:`lipkern.certify.certified_accuracy` on the test split (radii for the network as it runs: its float32
evaluation in any summation order, with the weights it applies).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "RECIPES", "TrainConfig", "TrainError", "certifiable", "certify_model",
           "certify_splitz_model",
           "load_checkpoint", "load_checkpoint_model", "resolve_config", "train"]

CHECKPOINT_FORMAT = "lipkern-train-1"
LOSSES = ("offset-ce", "hinge", "crm", "lmt", "ce", "splitz")
OPTIMIZERS = ("sgd", "nesterov", "adam")
SCHEDULES = ("constant", "steps", "triangular", "onecycle", "exponential", "hold-exponential")
BOUND_METHODS = ("liplt", "product")
DEFAULT_EPS = (0.0, 36 / 255, 72 / 255, 108 / 255, 0.5, 1.0)
SQRT2 = math.sqrt(2.0)

RECIPES: dict[str, dict] = {
    "aol": dict(loss="offset-ce", offset=SQRT2, temperature=0.25, optimizer="nesterov", lr=1e-3, momentum=0.9,
                weight_decay=5e-4, batch_size=250, schedule="steps", milestones=(0.9, 0.99, 0.999),
                source="AOL (Prach & Lampert 2022)"),
    "cpl": dict(loss="hinge", margin=0.7, optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=256,
                schedule="triangular", source="CPL (Meunier et al. 2022)"),
    "sll": dict(loss="offset-ce", offset=3 * SQRT2 / 2, temperature=0.25, optimizer="adam", lr=0.01,
                adam_betas=(0.5, 0.9), weight_decay=0.0, batch_size=256, schedule="triangular",
                source="SLL (Araujo et al. 2023)"),
    "spectral": dict(loss="offset-ce", offset=2 * SQRT2 * 36 / 255, temperature=0.25, optimizer="sgd",
                     lr=0.01, momentum=0.9, weight_decay=1e-4, batch_size=256, schedule="onecycle",
                     source="1-Lipschitz Layers Compared (Prach et al. 2024)"),
    "liplt": dict(loss="crm", crm_t=5.0, crm_lambda=15.0, crm_r0=0.2, crm_start_epoch=10, optimizer="adam",
                  lr=1e-3, adam_eps=1e-7, weight_decay=0.0, batch_size=512, schedule="exponential",
                  min_lr=1e-6, bound_method="liplt", bound_iters=5,
                  source="LipLT + CRM (Fazlyab et al. 2023)"),
    "lmt": dict(loss="lmt", lmt_c=0.1, lmt_ramp_epochs=5, optimizer="nesterov", lr=0.01, momentum=0.9,
                weight_decay=0.0, batch_size=128, schedule="steps", milestones=(0.5, 0.75),
                bound_method="product", bound_iters=1, source="LMT (Tsuzuku et al. 2018)"),
    "splitz": dict(loss="splitz", optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=256,
                   schedule="hold-exponential", min_lr=1e-6, splitz_kappa=(1.0, 0.7), splitz_theta=0.5,
                   splitz_gamma=0.05, splitz_ramp=2 / 3, splitz_noise_warmup=0.0, certify_samples=10_000,
                   source="SPLITZ (Zhong & Tandon 2024)"),
}


class TrainError(ValueError):
    """A problem with the run's options, data or checkpoint: the message names it."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run: the message says what was saved and how to go on."""


@dataclass
class TrainConfig:
    """One training run. ``None`` fields are filled from the family's recipe by :func:`resolve_config`; when
    resuming, first from the checkpoint's run (so ``TrainConfig(resume=path)`` continues it as it was)."""

    model: str | None = "convnet-xs-aol"
    model_args: dict | None = field(default_factory=dict)  # extra keyword options of build_model
    dataset: str | None = "digits"
    data_root: str | None = None
    input_size: int | None = None  # None: the dataset's size; larger: zero padding (fit), centered
    fit: str = "pad"  # 'pad' | 'resize' (see lipkern.data.fit_to_size)
    train_limit: int | None = None  # use the first N training points only
    val_split: float = 0.0  # hold out this fraction of the training points (see split_validation) for val acc
    # With val_split, keep best.pt, the checkpoint of the epoch with the best 'val' accuracy or, with
    # 'certified@EPS', the best certified accuracy of the val points at radius EPS (sound bound every epoch).
    save_best: str | None = None
    epochs: int = 100
    batch_size: int | None = None  # global batch (all ranks together)
    lr: float | None = None
    optimizer: str | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    adam_eps: float | None = None
    adam_betas: tuple | None = None  # default (0.9, 0.999)
    schedule: str | None = None
    milestones: tuple | None = None
    min_lr: float | None = None
    loss: str | None = None
    offset: float | None = None
    temperature: float | None = None
    margin: float | None = None
    crm_t: float | None = None
    crm_lambda: float | None = None
    crm_r0: float | None = None
    crm_start_epoch: int | None = None
    lmt_c: float | None = None
    lmt_ramp_epochs: int | None = None
    bound_method: str | None = None
    bound_iters: int | None = None
    bound_pairwise: bool = False
    splitz_kappa: tuple | None = None  # (start, end) weight of the local Lipschitz term
    splitz_theta: float | None = None  # the term is off while the estimate is <= theta
    splitz_gamma: float | None = None  # radius of the balls of the local estimate (reached after the ramp)
    splitz_ramp: float | None = None  # fraction of training over which kappa and gamma move to their end values
    splitz_noise_warmup: float | None = None  # fraction of training over which sigma ramps up from 0
    seed: int = 0
    device: str | None = None
    threads: int | None = None  # torch.set_num_threads for the run (None: torch's default)
    output_dir: str | None = None  # default: the resumed checkpoint's folder, else runs/<model>-<dataset>[-N]
    resume: str | None = None  # a checkpoint path
    stop_after: int | None = None  # stop (checkpointed, not certified) after this many epochs of ``epochs``
    progress: bool = True
    tensorboard: bool | None = None  # scalars per epoch in <output_dir>/tensorboard; None: when installed
    certify: bool = True
    eps: tuple = DEFAULT_EPS
    certify_method: str | None = None  # default: 'product' for 1-Lipschitz families, 'liplt' otherwise
    certify_pairwise: bool = True
    certify_limit: int | None = None
    certify_evaluation: str = "auto"  # what the radii cover (lipkern.certify.certified_accuracy's evaluation)
    certify_samples: int | None = None  # splitz: noise draws per point (after 100 selection draws), alpha 0.001
    source: str | None = None  # the recipe's citation (filled in)


# --- configuration ------------------------------------------------------------------------------------------
def _families() -> dict[str, str]:
    from lipkern.models import MODEL_FAMILIES

    return MODEL_FAMILIES


def resolve_config(config: TrainConfig) -> TrainConfig:
    """A copy of ``config`` with the recipe's values in every ``None`` field, validated (TrainError)."""
    families = _families()
    if config.model not in families:
        raise TrainError(f"unknown model {config.model!r}; choices: {', '.join(families)}")
    recipe = RECIPES[families[config.model]]
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for key, value in recipe.items():
        if values.get(key) is None:
            values[key] = value
    defaults = dict(momentum=0.0, weight_decay=0.0, adam_eps=1e-8, adam_betas=(0.9, 0.999), milestones=(),
                    min_lr=1e-6, offset=SQRT2,
                    temperature=0.25, margin=0.7, crm_t=5.0, crm_lambda=15.0, crm_r0=0.2, crm_start_epoch=10,
                    lmt_c=0.1, lmt_ramp_epochs=5, bound_method="liplt", bound_iters=5,
                    **{key: value for key, value in RECIPES["splitz"].items()
                       if key.startswith("splitz_") or key == "certify_samples"})
    for key, value in defaults.items():
        if values[key] is None:
            values[key] = value
    if values["certify_method"] is None:
        one_lipschitz = families[config.model] in ("aol", "cpl", "sll", "spectral")
        values["certify_method"] = "product" if one_lipschitz else "liplt"
    values["save_best"] = {True: "val", False: None}.get(values["save_best"], values["save_best"])  # older runs
    values["milestones"] = tuple(values["milestones"])
    values["splitz_kappa"] = tuple(float(k) for k in values["splitz_kappa"])
    values["adam_betas"] = tuple(float(b) for b in values["adam_betas"])
    values["eps"] = tuple(float(e) for e in values["eps"])
    resolved = TrainConfig(**values)
    _validate(resolved)
    return resolved


def _validate(c: TrainConfig) -> None:
    def positive_int(name, value, allow_none=False):
        if allow_none and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrainError(f"{name} must be a positive integer, got {value!r}")

    positive_int("epochs", c.epochs)
    positive_int("batch_size", c.batch_size)
    positive_int("bound_iters", c.bound_iters)
    positive_int("train_limit", c.train_limit, allow_none=True)
    if not (isinstance(c.val_split, (int, float)) and 0 <= c.val_split < 1):
        raise TrainError(f"val_split must be a fraction in [0, 1), got {c.val_split!r}")
    best_metric(c.save_best)
    if c.save_best and not c.val_split:
        raise TrainError("save_best picks the epoch with the best validation metric: give val_split > 0 too")
    if c.tensorboard and not _tensorboard_installed():
        raise TrainError("tensorboard=True needs the tensorboard package (pip install tensorboard)")
    positive_int("certify_limit", c.certify_limit, allow_none=True)
    positive_int("certify_samples", c.certify_samples)
    positive_int("input_size", c.input_size, allow_none=True)
    positive_int("stop_after", c.stop_after, allow_none=True)
    positive_int("threads", c.threads, allow_none=True)
    for name in ("lr", "temperature", "crm_t", "min_lr", "adam_eps"):
        value = getattr(c, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise TrainError(f"{name} must be a finite number > 0, got {value!r}")
    for name in ("momentum", "weight_decay", "crm_lambda", "crm_r0", "lmt_c"):
        value = getattr(c, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise TrainError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, value, choices in (("loss", c.loss, LOSSES), ("optimizer", c.optimizer, OPTIMIZERS),
                                 ("schedule", c.schedule, SCHEDULES), ("bound_method", c.bound_method,
                                                                       BOUND_METHODS),
                                 ("certify_method", c.certify_method, BOUND_METHODS), ("fit", c.fit,
                                                                                       ("pad", "resize"))):
        if value not in choices:
            raise TrainError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    if c.certify_evaluation not in CERTIFY_EVALUATIONS:
        raise TrainError(f"certify_evaluation must be one of {', '.join(CERTIFY_EVALUATIONS)}; got "
                         f"{c.certify_evaluation!r}")
    if len(c.adam_betas) != 2 or not all(0 <= b < 1 for b in c.adam_betas):
        raise TrainError(f"adam_betas must be two numbers in [0, 1), got {c.adam_betas!r}")
    if not all(0 < m <= 1 for m in c.milestones):
        raise TrainError(f"milestones are fractions of training in (0, 1], got {c.milestones}")
    if any(not e >= 0 for e in c.eps):
        raise TrainError(f"eps values must be >= 0, got {c.eps}")
    if not isinstance(c.model_args, dict):
        raise TrainError(f"model_args must be a dict of build_model options, got "
                         f"{type(c.model_args).__name__}")
    reserved = {"num_classes", "in_channels", "input_size"} & set(c.model_args)
    if reserved:
        raise TrainError(f"model_args may not set {', '.join(sorted(reserved))}: they come from the dataset "
                         f"(use --input-size for the input size)")
    _validate_splitz(c)
    if c.loss in ("crm", "lmt") and c.crm_start_epoch < 0:
        raise TrainError(f"crm_start_epoch must be >= 0, got {c.crm_start_epoch}")


def _validate_splitz(c: TrainConfig) -> None:
    if len(c.splitz_kappa) != 2 or not all(0 <= k <= 1 for k in c.splitz_kappa):
        raise TrainError(f"splitz_kappa must be two weights (start, end) in [0, 1], got {c.splitz_kappa!r}")
    for name in ("splitz_theta", "splitz_gamma"):
        value = getattr(c, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise TrainError(f"{name} must be a finite number >= 0, got {value!r}")
    for name in ("splitz_ramp", "splitz_noise_warmup"):
        value = getattr(c, name)
        if not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise TrainError(f"{name} must be a fraction of training in [0, 1], got {value!r}")
    splitz_model = _families()[c.model] == "splitz"
    if (c.loss == "splitz") != splitz_model:
        raise TrainError(f"the splitz loss trains the splitz-* models and they train with it only; got model "
                         f"{c.model!r} with loss {c.loss!r}")
    if splitz_model and c.save_best not in (None, "val"):
        raise TrainError("save_best certified@EPS needs the Lipschitz-margin certificate; a splitz model is "
                         "certified by smoothing at the end only: use save_best 'val'")


# --- pieces -------------------------------------------------------------------------------------------------
def _build_model(name: str, model_args: dict, device) -> nn.Module:
    from lipkern.models import build_model

    kwargs = dict(model_args)
    try:
        return _certified_layers(build_model(name, **kwargs).to(device))
    except (TypeError, ValueError) as err:
        raise TrainError(f"could not build {name!r} with {kwargs}: {err}") from None


def _certified_layers(model: nn.Module) -> nn.Module:
    """Spectral / CPL layers with ``certified=True``: in eval mode they divide by (step with) a guaranteed
    bound, so the per-epoch test accuracy, the checkpoint's model and the certificate are one network (training
    steps do not change: they use the power-iteration estimate either way)."""
    for module in model.modules():
        if isinstance(getattr(module, "certified", None), bool):
            module.certified = True
    return model


def usable_device(name: str, error: type[Exception]) -> torch.device:
    """torch.device(name), or ``error`` saying why this torch cannot use it (a CPU build asked for CUDA)."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise error(f"--device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise error(f"--device {name}: {build}; use --device cpu")
    return device


def load_checkpoint(path) -> dict:
    """A checkpoint written by :func:`train` (``torch.load(weights_only=True)``), checked for its format."""
    from lipkern.data import read_torch_file

    state = read_torch_file(path, f"checkpoint {path}", TrainError)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a lipkern train checkpoint (format {CHECKPOINT_FORMAT!r})")
    return state


def load_checkpoint_model(path_or_state, device="cpu") -> tuple[nn.Module, dict]:
    """(model with the checkpoint's weights, in eval mode, checkpoint dict): rebuilt by
    ``build_model(checkpoint["model"], **checkpoint["model_args"])``, its Spectral / CPL layers certified (the
    network ``lipkern train`` evaluated every epoch and certified)."""
    state = path_or_state if isinstance(path_or_state, dict) else load_checkpoint(path_or_state)
    model = _build_model(state["model"], state["model_args"], device)
    model.load_state_dict(state["state_dict"])
    return model.eval(), state


def _loss_function(c: TrainConfig, num_classes: int) -> nn.Module:
    from lipkern.losses import CRMLoss, LMTLoss, MultiMarginHinge, OffsetCrossEntropy

    if c.loss == "offset-ce":
        return OffsetCrossEntropy(c.offset, c.temperature)
    if c.loss == "hinge":
        return MultiMarginHinge(c.margin)
    if c.loss == "crm":
        return CRMLoss(c.crm_t, c.crm_lambda, c.crm_r0, c.crm_start_epoch, pairwise=c.bound_pairwise)
    if c.loss == "lmt":
        return LMTLoss(c.lmt_c, pairwise=c.bound_pairwise)
    return nn.CrossEntropyLoss()


def _optimizer(c: TrainConfig, params) -> torch.optim.Optimizer:
    if c.optimizer == "adam":
        return torch.optim.Adam(params, lr=c.lr, eps=c.adam_eps, betas=tuple(c.adam_betas),
                                weight_decay=c.weight_decay)
    return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                           nesterov=c.optimizer == "nesterov" and c.momentum > 0)


def _lr_factor(c: TrainConfig, progress: float) -> float:
    """The schedule's lr multiplier after a fraction ``progress`` in [0, 1] of the optimizer steps."""
    if c.schedule == "steps":
        return 0.1 ** sum(progress >= m for m in c.milestones)
    if c.schedule == "triangular":  # CPL: 0 -> 1 at 40%, -> 1/20 at 80%, -> 0 at 100%
        return _interp(progress, (0.0, 0.4, 0.8, 1.0), (0.0, 1.0, 0.05, 0.0))
    if c.schedule == "exponential":  # CRM "exponentialWithStopping": lr -> min_lr at the end
        return 1.0 if c.min_lr >= c.lr else (c.min_lr / c.lr) ** progress
    if c.schedule == "hold-exponential":  # SPLITZ: constant for half of training, then exponential to min_lr
        return 1.0 if c.min_lr >= c.lr or progress <= 0.5 else (c.min_lr / c.lr) ** (2 * progress - 1)
    return 1.0


def _interp(x: float, xs, ys) -> float:
    for (x0, x1), (y0, y1) in zip(zip(xs, xs[1:]), zip(ys, ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def _scheduler(c: TrainConfig, optimizer, total_steps: int):
    if c.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=c.lr, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(c, step / total_steps))


def _prepare(x: torch.Tensor, c: TrainConfig) -> torch.Tensor:
    from lipkern.data import fit_to_size

    if c.input_size is None:
        return x
    try:
        return fit_to_size(x, c.input_size, c.fit)
    except ValueError as err:
        raise TrainError(f"input_size {c.input_size}: {err}") from None


# --- distributed --------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    owned: bool = False  # this module initialized the process group (and tears it down)


def _init_distributed(device: torch.device) -> _Dist:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(minutes=30))
    return _Dist(dist.get_rank(), dist.get_world_size(), owned=True)


def _device(c: TrainConfig) -> torch.device:
    if c.device is not None:
        return usable_device(c.device, TrainError)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


# --- the run ------------------------------------------------------------------------------------------------
def _log(dist_state: _Dist, *args):
    if dist_state.rank == 0:
        print(*args, file=sys.stderr, flush=True)


def train(config: TrainConfig) -> dict:
    """Train (or resume) as ``config`` says, checkpoint after every epoch, certify at the end.

    Returns a dict: ``config`` (resolved, as a dict), ``history`` (per epoch: train loss and accuracy, test
    accuracy, lr, seconds), ``checkpoint`` (path), ``train_seconds``, and on rank 0 with ``config.certify``
    ``certification`` (the :func:`certify_model` result). Raises :class:`TrainError` for bad options.

    A resumed run restores every state (weights, power-iteration vectors, optimizer, schedule, the training
    bound's vectors, the epoch's permutation). It repeats an uninterrupted run bit for bit for networks without
    grouped power iterations; with Spectral/CPL layers the first step after loading runs each layer's power
    iteration alone instead of in its stacked group, which rounds differently (observed: weights within 2e-3
    after 3 epochs of ConvNet-CPL, same certified accuracy).
    """
    c = resolve_config(_with_checkpoint_options(config))
    c = dataclasses.replace(c, output_dir=str(_output_dir(c)))  # before any work: a bad folder fails at once
    if c.threads is not None:
        torch.set_num_threads(c.threads)
    device = _device(c)
    dist_state = _init_distributed(device)
    try:
        result = _run(c, device, dist_state)
        if dist_state.owned:  # no rank tears the group down while another still uses it
            torch.distributed.barrier()
        return result
    finally:
        if dist_state.owned:
            torch.distributed.destroy_process_group()


CERTIFY_EVALUATIONS = ("auto", "float32", "tf32", "float64", "exact")  # lipkern.certify.certified_accuracy's
# Options of the run itself, not of what it trains: a resumed run never takes them from the checkpoint.
SESSION_OPTIONS = ("device", "threads", "output_dir", "resume", "stop_after", "progress", "tensorboard",
                   "certify", "source")


def _with_checkpoint_options(config: TrainConfig) -> TrainConfig:
    """Resuming: every option left ``None`` takes the checkpoint run's value (then the recipe's)."""
    if config.resume is None:
        return config
    old = load_checkpoint(config.resume).get("config", {})
    values = {f.name: old[f.name] for f in dataclasses.fields(config)
              if getattr(config, f.name) is None and f.name not in SESSION_OPTIONS and f.name in old}
    resumed = dataclasses.replace(config, **values)
    base = TrainConfig()  # what the checkpoint does not say: the defaults
    return dataclasses.replace(resumed, **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)
                                           if getattr(resumed, f.name) is None
                                           and getattr(base, f.name) is not None})


def _check_diverged(c: TrainConfig, model: nn.Module, record: dict, epoch: int, checkpoint_path: Path,
                    epochs_done: int) -> None:
    """After an epoch (one host read per parameter, once per epoch): a non-finite loss or weight stops the run
    before it is evaluated or saved, so the last checkpoint stays the last finite one."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if math.isfinite(record["loss"]) and not bad:
        return
    what = f"the weights {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} are" if bad else "the loss is"
    kept = (f"the checkpoint of epoch {epochs_done} in {checkpoint_path} is kept (finite)" if epochs_done else
            "no checkpoint was saved")
    raise TrainError(f"training diverged in epoch {epoch + 1}: {what} NaN or Inf (lr {c.lr:g}); {kept}. Train "
                     "again with a lower --lr")


def _interrupted_message(when: str, checkpoint_path: Path, epochs_done: int) -> str:
    if epochs_done == 0:
        return f"interrupted {when}; no epoch had finished, nothing was saved"
    return (f"interrupted {when}; the checkpoint after epoch {epochs_done} is safe in {checkpoint_path}: continue "
            f"with lipkern train --resume {checkpoint_path}")


# The files a run writes in its folder (a folder holding any of them holds a run).
_RUN_FILES = ("checkpoint.pt", "best.pt", "results.json", "certified_accuracy.png", "metrics.csv")
_METRICS = ("epoch", "loss", "train_accuracy", "val_accuracy", "val_certified_accuracy", "test_accuracy", "lr",
            "seconds")


def best_metric(save_best: str | None) -> tuple[str, float | None] | None:
    """save_best as (history key, eps): 'val' -> ('val_accuracy', None), 'certified@EPS' ->
    ('val_certified_accuracy', EPS); None -> None. Anything else is a TrainError."""
    if save_best is None:
        return None
    if save_best == "val":
        return "val_accuracy", None
    kind, _, value = str(save_best).partition("@")
    try:
        eps = float(value)
    except ValueError:
        eps = float("nan")
    if kind != "certified" or not (math.isfinite(eps) and eps >= 0):
        raise TrainError(f"save_best must be 'val' or 'certified@EPS' with a radius EPS >= 0 (e.g. "
                         f"certified@0.141), got {save_best!r}")
    return "val_certified_accuracy", eps


def _best_so_far(history: list, key: str) -> bool:
    """The last epoch's ``key`` beats every earlier one (ties keep the earlier epoch)."""
    return history[-1][key] > max((r.get(key, -1.0) for r in history[:-1]), default=-1.0)


def _certified_val_accuracy(c: TrainConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                            eps: float) -> float:
    """Certified accuracy of (x, y) at radius eps under the run's final certificate (:func:`certify_model`
    with certify_method, certify_pairwise, certify_evaluation); the model's training flag is restored."""
    was_training = model.training
    try:
        result = certify_model(model, x, y, [eps], method=c.certify_method, pairwise=c.certify_pairwise,
                               evaluation=c.certify_evaluation, log=lambda *args: None)
    finally:
        model.train(was_training)
    return result["certified_accuracy"][0]


def _tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _tensorboard_writer(c: TrainConfig, out_dir: Path, rank: int):
    """A SummaryWriter on <out_dir>/tensorboard (rank 0, when tensorboard is on or, by default, installed)."""
    wanted = c.tensorboard if c.tensorboard is not None else _tensorboard_installed()
    if rank != 0 or not wanted:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _log_scalars(writer, record: dict) -> None:
    """One TensorBoard scalar per number of the epoch's record (metrics.csv's columns), at step = epoch."""
    for key in _METRICS[1:]:
        if key in record:
            writer.add_scalar(key, record[key], global_step=record["epoch"])
    writer.flush()


def split_validation(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int):
    """((x, y) to train on, (x, y) held out): the held-out points are the first round(fraction·N) of
    ``torch.randperm(N)`` under ``torch.Generator().manual_seed(seed)``, both parts in their original order
    (fraction 0: nothing held out)."""
    count = round(fraction * len(y))
    if count == 0:
        return (x, y), (x[:0], y[:0])
    held = torch.zeros(len(y), dtype=torch.bool)
    held[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:count]] = True
    return (x[~held], y[~held]), (x[held], y[held])


def _write_metrics(path: Path, history: list) -> None:
    """metrics.csv: one row per epoch (the whole history, so a resumed run's file is complete), written next to
    the checkpoint after each epoch."""
    import csv

    columns = [key for key in _METRICS if key == "epoch" or key in history[0]]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for epoch, record in enumerate(history, start=1):
            writer.writerow([epoch, *(record[key] for key in columns[1:])])
    os.replace(tmp, path)


def _run_files(folder: Path) -> list[str]:
    return [name for name in _RUN_FILES if (folder / name).exists()]


def _output_dir(c: TrainConfig) -> Path:
    """Where this run writes: ``output_dir``; else the folder of the checkpoint it resumes; else
    runs/<model>-<dataset>, or the first of runs/<model>-<dataset>-2, -3, … that holds no earlier run. An
    earlier run is never overwritten: a given folder that holds one is refused, unless this run resumes the
    checkpoint in it."""
    if c.output_dir is None and c.resume is None:
        base = Path(f"runs/{c.model}-{c.dataset}")
        out, n = base, 1
        while out.exists() and (not out.is_dir() or _run_files(out)):
            n += 1
            out = base.with_name(f"{base.name}-{n}")
        return out
    out = Path(c.output_dir) if c.output_dir is not None else Path(c.resume).parent
    if out.exists() and not out.is_dir():
        raise TrainError(f"--output-dir {out} is a file, not a folder")
    earlier = _run_files(out)
    resuming_here = c.resume is not None and Path(c.resume).resolve().parent == out.resolve()
    if earlier and not resuming_here:
        raise TrainError(f"{out} holds an earlier run ({', '.join(earlier)}); it is not overwritten: choose "
                         f"another --output-dir, or continue that run with --resume {out / 'checkpoint.pt'}")
    return out


def _run(c: TrainConfig, device: torch.device, dist_state: _Dist) -> dict:
    from lipkern.data import DATASET_CLASSES, DatasetError, load_dataset

    try:
        x_train, y_train = load_dataset(c.dataset, c.data_root, "train")
        x_test, y_test = load_dataset(c.dataset, c.data_root, "test")
    except DatasetError as err:
        raise TrainError(str(err)) from None
    if c.train_limit is not None:
        x_train, y_train = x_train[:c.train_limit], y_train[:c.train_limit]
    (x_train, y_train), (x_val, y_val) = split_validation(x_train, y_train, c.val_split, c.seed)
    x_train, x_test = _prepare(x_train, c), _prepare(x_test, c)
    num_classes = max(DATASET_CLASSES.get(c.dataset.lower(), 0), int(max(y_train.max(), y_test.max())) + 1)
    if c.batch_size % dist_state.world:
        raise TrainError(f"batch_size {c.batch_size} (global) must be a multiple of the {dist_state.world} "
                         f"processes")
    if c.batch_size > len(y_train):
        raise TrainError(f"batch_size {c.batch_size} is larger than the {len(y_train)} training points")
    height, width = x_train.shape[-2:]
    model_args = dict(num_classes=num_classes, in_channels=x_train.shape[1],
                      input_size=height if height == width else (height, width), **c.model_args)
    torch.manual_seed(c.seed)
    model = _build_model(c.model, model_args, device)
    input_shape = tuple(x_train.shape[1:])
    bound = None
    if c.loss == "splitz":
        from lipkern.certify import LocalLipschitzEstimate

        try:
            bound = LocalLipschitzEstimate(model.left, input_shape).to(device)
        except ValueError as err:
            raise TrainError(f"loss 'splitz' needs a local Lipschitz estimate of {c.model!r}'s left half: "
                             f"{err}") from None
    if c.loss in ("crm", "lmt"):
        from lipkern.bounds import LipschitzEstimate

        try:
            bound = LipschitzEstimate(model, input_shape, method=c.bound_method, pairwise=c.bound_pairwise,
                                   n_iter=c.bound_iters).to(device)
        except (TypeError, ValueError, NotImplementedError) as err:
            raise TrainError(f"loss {c.loss!r} needs a Lipschitz bound of {c.model!r}: {err}") from None
    loss_fn = _loss_function(c, num_classes)
    optimizer = _optimizer(c, model.parameters())
    steps_per_epoch = len(y_train) // c.batch_size
    scheduler = _scheduler(c, optimizer, steps_per_epoch * c.epochs)
    out_dir = Path(c.output_dir)
    checkpoint_path = out_dir / "checkpoint.pt"
    start_epoch, history = 0, []
    if c.resume:
        state = load_checkpoint(c.resume)
        _check_resumable(state, c, model_args)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if bound is not None and state.get("bound") is not None:
            bound.load_state_dict(state["bound"])
        start_epoch, history = int(state["epoch"]), list(state.get("history", []))
        _log(dist_state, f"resumed from {c.resume} after epoch {start_epoch}")
        stale = [name for name in _run_files(out_dir) if name not in ("checkpoint.pt", "metrics.csv", "best.pt")]
        if stale and dist_state.rank == 0:  # they describe the checkpoint this run replaces
            for name in stale:
                (out_dir / name).unlink()
            _log(dist_state, f"removed {', '.join(stale)} of {out_dir}: they described the checkpoint before "
                             "this resume")
    net = model
    if dist_state.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                  else None)
    _log(dist_state, f"lipkern train: {c.model} ({_families()[c.model]} recipe: {c.source}) on {c.dataset} "
                     f"{tuple(x_train.shape)}, {sum(p.numel() for p in model.parameters()):,} parameters, "
                     f"device {device}, {dist_state.world} process(es)")
    _log(dist_state, f"loss {c.loss}, optimizer {c.optimizer} lr {c.lr} wd {c.weight_decay}, schedule "
                     f"{c.schedule}, batch {c.batch_size}, epochs {c.epochs}"
                     + (f", bound {c.bound_method} ({c.bound_iters} power-iteration steps per step)"
                        if c.loss in ("crm", "lmt") else "")
                     + (f", sigma {model.sigma}, kappa {c.splitz_kappa[0]} -> {c.splitz_kappa[1]} and gamma 0 -> "
                        f"{c.splitz_gamma} over {c.splitz_ramp:.0%} of training, theta {c.splitz_theta}"
                        if c.loss == "splitz" else ""))
    x_test_dev, y_test_dev = x_test.to(device), y_test.to(device)
    x_val_dev, y_val_dev = x_val.to(device), y_val.to(device)
    x_train, y_train = x_train.to(device), y_train.to(device)
    start = time.perf_counter()
    last_epoch = c.epochs if c.stop_after is None else min(c.epochs, c.stop_after)
    epoch = start_epoch
    best = best_metric(c.save_best)
    writer = _tensorboard_writer(c, out_dir, dist_state.rank)
    try:
        for epoch in range(start_epoch, last_epoch):
            record = _train_epoch(c, net, model, bound, loss_fn, optimizer, scheduler, x_train, y_train, epoch,
                                  dist_state, device)
            _check_diverged(c, model, record, epoch, checkpoint_path, len(history))
            if len(y_val):
                record["val_accuracy"] = _accuracy(model, x_val_dev, y_val_dev)
            if best is not None and best[1] is not None and dist_state.rank == 0:
                record["val_certified_accuracy"] = _certified_val_accuracy(c, model, x_val, y_val, best[1])
            record["test_accuracy"] = _accuracy(model, x_test_dev, y_test_dev)
            history.append(record)
            val = f"val acc {100 * record['val_accuracy']:.1f}%, " if len(y_val) else ""
            if "val_certified_accuracy" in record:
                val += f"val certified acc at {best[1]:g} {100 * record['val_certified_accuracy']:.1f}%, "
            _log(dist_state, f"epoch {epoch + 1}/{c.epochs}: loss {record['loss']:.4f}, train acc "
                             f"{100 * record['train_accuracy']:.1f}%, {val}test acc "
                             f"{100 * record['test_accuracy']:.1f}%, "
                             f"lr {record['lr']:.2e}, {record['seconds']:.1f} s")
            if dist_state.rank == 0:
                _save_checkpoint(checkpoint_path, c, model_args, model, optimizer, scheduler, bound, epoch + 1,
                                 history)
                _write_metrics(out_dir / "metrics.csv", history)
                if writer is not None:
                    _log_scalars(writer, record)
                if best is not None and _best_so_far(history, best[0]):
                    shutil.copyfile(checkpoint_path, out_dir / "best.pt")  # the epoch's checkpoint, as written
                    _log(dist_state, f"best {best[0].replace('_', ' ')} so far: {out_dir / 'best.pt'} "
                                     f"(epoch {epoch + 1})")
    except KeyboardInterrupt:
        raise TrainInterrupted(_interrupted_message(f"during epoch {epoch + 1}", checkpoint_path,
                                                    len(history))) from None
    finally:
        if writer is not None:
            writer.close()
    result = {"config": dataclasses.asdict(c), "history": history, "checkpoint": str(checkpoint_path),
              "train_seconds": time.perf_counter() - start, "model_args": model_args}
    if c.certify and dist_state.rank == 0 and last_epoch == c.epochs:
        limit = c.certify_limit or len(y_test)
        try:
            if c.loss == "splitz":
                result["certification"] = certify_splitz_model(model, x_test[:limit], y_test[:limit], c.eps,
                                                               num_samples=c.certify_samples, seed=c.seed,
                                                               evaluation=c.certify_evaluation,
                                                               log=lambda *a: _log(dist_state, *a))
            else:
                result["certification"] = certify_model(model, x_test[:limit], y_test[:limit], c.eps,
                                                        method=c.certify_method, pairwise=c.certify_pairwise,
                                                        evaluation=c.certify_evaluation,
                                                        log=lambda *a: _log(dist_state, *a))
        except KeyboardInterrupt:
            raise TrainInterrupted(f"interrupted during the certification; training is done and saved in "
                                   f"{checkpoint_path}: certify it with lipkern certify --checkpoint "
                                   f"{checkpoint_path}") from None
        result["certification"]["model"] = f"{c.model} ({checkpoint_path})"
        result["certification"]["data"] = f"{c.dataset} test split"
        result["certification"]["device"] = str(device)
    return result


def _check_resumable(state: dict, c: TrainConfig, model_args: dict) -> None:
    if state["model"] != c.model or state["model_args"] != model_args:
        raise TrainError(f"--resume: the checkpoint is {state['model']} {state['model_args']}, this run "
                         f"{c.model} {model_args}")
    old = state.get("config", {})
    for key in ("dataset", "batch_size", "loss", "optimizer", "schedule", "seed", "train_limit", "input_size",
                "fit", "lr", "momentum", "weight_decay", "val_split"):  # (the optimizer's and the schedule's state keep them)
        if key in old and old[key] != getattr(c, key):
            raise TrainError(f"--resume: {key} was {old[key]!r} in the checkpoint, {getattr(c, key)!r} now")
    if "epochs" in old and old["epochs"] != c.epochs and c.schedule != "constant":
        raise TrainError(f"--resume: the schedule {c.schedule!r} was laid out for {old['epochs']} epochs; "
                         f"resume with --epochs {old['epochs']} (or a constant schedule)")
    if int(state["epoch"]) >= c.epochs:
        raise TrainError(f"--resume: the checkpoint has already trained {state['epoch']} of {c.epochs} "
                         f"epochs")


def _train_epoch(c, net, model, bound, loss_fn, optimizer, scheduler, x, y, epoch, dist_state,
                 device) -> dict:
    net.train()
    generator = torch.Generator().manual_seed(c.seed * 1_000_003 + epoch)
    order = torch.randperm(len(y), generator=generator).to(device)
    steps = len(y) // c.batch_size
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    begin = time.perf_counter()
    bar = range(steps)
    if c.progress and dist_state.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"epoch {epoch + 1}/{c.epochs}", unit="step", file=sys.stderr, leave=False)
    if c.loss == "lmt":  # LMT: c ramps linearly from 1e-5 to c over the first lmt_ramp_epochs epochs
        ramp = min(1.0, (epoch + 1) / c.lmt_ramp_epochs) if c.lmt_ramp_epochs > 0 else 1.0
        loss_fn.c = 1e-5 + (c.lmt_c - 1e-5) * ramp if c.lmt_c > 1e-5 else c.lmt_c
    lr = optimizer.param_groups[0]["lr"]
    sigma = model.sigma if c.loss == "splitz" else None
    if sigma is not None:
        from lipkern.certify import splitz_loss
    for step in bar:
        rows = order[step * c.batch_size:(step + 1) * c.batch_size][dist_state.rank::dist_state.world]
        inputs, targets = x[rows], y[rows]
        if c.loss == "splitz":
            progress = (epoch * steps + step) / (c.epochs * steps)
            kappa, gamma, model.noise.sigma = _splitz_schedule(c, sigma, progress)
        logits = net(inputs)
        if c.loss == "splitz":
            loss = splitz_loss(loss_fn(logits, targets), bound(inputs, gamma), kappa, c.splitz_theta)
        elif c.loss == "crm":
            loss = loss_fn(logits, targets, bound(), epoch)
        elif c.loss == "lmt":
            loss = loss_fn(logits, targets, bound())
        else:
            loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(1) == targets).sum()
    if sigma is not None:
        model.noise.sigma = sigma  # the model's own noise level (what it is certified with)
    totals = torch.stack([loss_sum.double(), correct.double()])
    if dist_state.world > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    loss_mean = float(totals[0]) / (steps * dist_state.world)
    return {"epoch": epoch + 1, "loss": loss_mean,
            "train_accuracy": float(totals[1]) / (steps * c.batch_size),
            "lr": lr, "seconds": time.perf_counter() - begin}


def _splitz_schedule(c: TrainConfig, sigma: float, progress: float) -> tuple[float, float, float]:
    """(κ, γ, σ) after a fraction ``progress`` of training: κ and γ move linearly to their end values over
    ``splitz_ramp``, σ ramps up from 0 over ``splitz_noise_warmup`` (0: the full σ from the start)."""
    ramp = min(1.0, progress / c.splitz_ramp) if c.splitz_ramp > 0 else 1.0
    kappa = c.splitz_kappa[0] + (c.splitz_kappa[1] - c.splitz_kappa[0]) * ramp
    noise = min(1.0, progress / c.splitz_noise_warmup) if c.splitz_noise_warmup > 0 else 1.0
    return kappa, c.splitz_gamma * ramp, sigma * noise


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                      for i in range(0, len(y), batch))
    model.train(was_training)
    return correct / max(len(y), 1)


def _save_checkpoint(path: Path, c, model_args, model, optimizer, scheduler, bound, epochs_done, history):
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, "model": c.model, "model_args": model_args,
             "family": _families()[c.model], "state_dict": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "bound": bound.state_dict() if bound is not None else None, "epoch": epochs_done,
             "config": json.loads(json.dumps(dataclasses.asdict(c))), "history": history}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while writing leaves the previous checkpoint intact


# --- certification ------------------------------------------------------------------------------------------
def certifiable(model: nn.Module) -> nn.Module:
    """The model in eval mode with its Spectral / CPL layers switched to certified norms and step sizes (a
    sound bound needs them)."""
    return _certified_layers(model).eval()


def certify_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, *, method: str = "liplt",
                  pairwise: bool = True, evaluation: str | None = "auto", log=print) -> dict:
    """Certified accuracy of ``model`` on (x, y) from the sound bound ``lipschitz_bound(model, x.shape[1:],
    method, pairwise)`` (float64, rounding included), timed; the radii cover ``evaluation`` (see
    :func:`lipkern.certify.certified_accuracy`: by default the model's own floating-point evaluation, any
    summation order). The result has the keys of ``lipkern certify``'s JSON (so the CLI prints the same table
    and plot)."""
    from lipkern.bounds import lipschitz_bound
    from lipkern.certify import certified_accuracy

    model = certifiable(model)
    start = time.perf_counter()
    log(f"certify: sound {method} bound ({'pairwise' if pairwise else 'global'}) on inputs "
        f"{tuple(x.shape[1:])} ...")
    try:
        lipschitz = lipschitz_bound(model, tuple(x.shape[1:]), method=method, pairwise=pairwise)
    except (TypeError, ValueError, NotImplementedError) as err:
        raise TrainError(f"no sound Lipschitz bound for this model ({method}): {err}") from None
    bound_seconds = time.perf_counter() - start
    lipschitz = lipschitz.detach().double().cpu()
    start = time.perf_counter()
    try:
        result = certified_accuracy(model, (x, y), list(eps), lipschitz=lipschitz, pairwise=pairwise,
                                    evaluation=evaluation)
    except TypeError as err:
        raise TrainError(f"certify: {err}") from None
    margin_seconds = time.perf_counter() - start
    log(f"certify: bound in {bound_seconds:.1f} s, margins of {len(y)} points in {margin_seconds:.1f} s")
    value = lipschitz.item() if lipschitz.dim() == 0 else lipschitz.tolist()
    source = f"{method} bound, sound (guaranteed upper bound, float64, rounding included)"
    record = margin_record(result, y, {"source": source, "method": method, "pairwise": bool(pairwise),
                                       "value": value})
    return dict(record, bound_seconds=bound_seconds, margin_seconds=margin_seconds)


def certify_splitz_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, *, num_samples: int = 10_000,
                         num_select: int = 100, alpha: float = 0.001, batch_size: int = 1000, seed: int = 0,
                         evaluation: str | None = "auto", log=print) -> dict:
    """SPLITZ certified accuracy of a :class:`lipkern.models.SplitzNet` on (x, y): for every point the class and
    radius of :class:`lipkern.certify.SplitzCertifier` (randomized smoothing of ``model.right`` at
    ``model.left(x)`` with σ = ``model.sigma``, point i with noise seed ``seed + i``, divided by the left half's
    sound local Lipschitz bound; ``evaluation``: the left half's rounding covered, see SplitzCertifier),
    holding with probability ≥ 1 − alpha each. The result has the keys of ``lipkern certify --splitz``'s
    JSON."""
    import argparse

    from lipkern.cli.certify import certify_smoothing

    args = argparse.Namespace(sigma=None, n0=num_select, n=num_samples, alpha=alpha, skip=1, seed=seed,
                              adaptive=False, predict=False, splitz=True, output=None, resume=False,
                              eps=list(eps), batch_size=batch_size, evaluation=evaluation)
    device = next(model.parameters()).device
    start = time.perf_counter()
    log(f"certify: SPLITZ (sigma {model.sigma}, {num_select} + {num_samples:,} draws, alpha {alpha}) on "
        f"{len(y)} points ...")
    was_training = model.training
    try:
        result = certify_smoothing(model.eval(), x, y, args, device, _num_classes(model, x))
    finally:
        model.train(was_training)
    log(f"certify: {time.perf_counter() - start:.1f} s")
    return result


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.inference_mode():
        return int(model(x[:1].to(next(model.parameters()).device)).shape[1])


def margin_record(result, y: torch.Tensor, lipschitz: dict) -> dict:
    """A :class:`lipkern.certify.CertifiedAccuracy` as the JSON of ``lipkern certify`` / ``train``: the table's
    counts, what the radii cover, and every point's radius (null: unbounded)."""
    correct, radii = result.correct.bool(), result.radii
    rounding = None if result.rounding is None else float(result.rounding.max())
    return {"mode": "lipschitz-margin", "eps": [float(e) for e in result.eps],
            "certified_accuracy": [float(a) for a in result.accuracy],
            "certified_count": [int((correct & (radii > e)).sum()) for e in result.eps.tolist()],
            "clean_accuracy": float(result.clean_accuracy), "clean_count": int(correct.sum()),
            "num_points": int(correct.numel()), "lipschitz": lipschitz, "evaluation": result.evaluation,
            "rounding_max": rounding, "rounding_slope": result.rounding_slope,
            "points": {"index": list(range(correct.numel())), "label": y.tolist(),
                       "radius": [r if math.isfinite(r) else None for r in radii.tolist()],
                       "correct": correct.tolist(),
                       "rounding": None if result.rounding is None else result.rounding.tolist()}}
