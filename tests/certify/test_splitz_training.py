"""SPLITZ end to end: the training objective and its local Lipschitz estimate (against exact Jacobian norms),
the recipe's schedules, a splitz-s network trained on digits by ``lipkern train`` whose certificate PGD cannot
break (neither the left half's displacement nor the smoothed prediction inside the radii), ``lipkern certify
--splitz`` reproducing the training run's certificate, Cohen's PREDICT on the command line, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lipkern import cli
from lipkern.certify import (ABSTAIN, LocalLipschitzEstimate, LocalReluLipschitz, RandomizedSmoothing,
                             SplitzCertifier, splitz_loss)
from lipkern.nn import AOLConv2d, MaxMin


# --- the objective -----------------------------------------------------------------------------------------
def test_splitz_loss_mixes_above_theta_and_is_cross_entropy_below():
    ce = torch.tensor([2.0, 2.0])
    estimate = torch.tensor([0.8, 0.3], requires_grad=True)
    loss = splitz_loss(ce, estimate, kappa=0.7, theta=0.5)
    torch.testing.assert_close(loss, torch.tensor([0.3 * 2.0 + 0.7 * 0.8, 2.0]))
    loss.sum().backward()
    torch.testing.assert_close(estimate.grad, torch.tensor([0.7, 0.0]))
    with pytest.raises(ValueError, match="kappa"):
        splitz_loss(ce, estimate, kappa=1.5)


def _jacobian_norm(module: nn.Module, x: torch.Tensor) -> float:
    jac = torch.autograd.functional.jacobian(lambda p: module(p[None]).reshape(-1), x)
    return torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), 2).item()


def _left(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bn":
        left = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.AvgPool2d(2), nn.ReLU(),
                             nn.Conv2d(6, 4, 3, padding=1), nn.ReLU())
    else:
        left = nn.Sequential(AOLConv2d(1, 6, 3, padding=1), nn.AvgPool2d(2), MaxMin())
    left = left.double()
    with torch.no_grad():
        for m in left.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
    return left


@pytest.mark.parametrize("kind", ["bn", "aol"])
def test_local_estimate_at_a_tiny_ball_is_the_jacobian_norm_and_below_the_sound_bound(kind):
    """At γ → 0 the masks are the activation pattern at x, so the converged power iteration gives ‖J(x)‖
    (float64 autograd + SVD, the eval-mode function); the sound local bound lies above it at any γ."""
    left = _left(kind)
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    estimate = LocalLipschitzEstimate(left, (1, 6, 6), n_iter=200).double()
    value = estimate(x, 1e-9)
    left.eval()
    exact = [_jacobian_norm(left, point) for point in x]
    assert value.item() == pytest.approx(sum(exact) / 3, rel=1e-6)
    sound = LocalReluLipschitz(left, (1, 6, 6))
    for gamma in (1e-3, 0.1):
        assert all(sound(point, gamma) >= e * (1 - 1e-9) for point, e in zip(x, exact))


def test_local_estimate_trains_the_weights_and_carries_its_vector():
    left = _left("bn").float().train()
    estimate = LocalLipschitzEstimate(left, (1, 6, 6))
    start = estimate.u.clone()
    x = torch.randn(8, 1, 6, 6)
    estimate(x, 0.05).backward()
    assert left[0].weight.grad is not None and left[0].weight.grad.abs().sum() > 0
    assert left[1].weight.grad is not None  # BatchNorm's scale enters the running-statistics Jacobian
    assert not torch.equal(estimate.u, start) and estimate.u.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert "u" in estimate.state_dict() and not any(k.startswith("0.") for k in estimate.state_dict())
    aol = _left("aol").float().train()
    LocalLipschitzEstimate(aol, (1, 6, 6))(x, 0.05).backward()  # through AOL's rescaling
    assert aol[0].weight.grad is not None and aol[0].weight.grad.abs().sum() > 0


def test_local_estimate_grows_with_the_ball():
    left = _left("bn").float()
    x = torch.randn(16, 1, 6, 6)
    values = [LocalLipschitzEstimate(left, (1, 6, 6), n_iter=50)(x, g).item() for g in (1e-6, 0.3, 100.0)]
    assert values[0] <= values[1] * (1 + 1e-5) and values[1] <= values[2] * (1 + 1e-5)


def test_local_estimate_errors():
    with pytest.raises(ValueError, match="left half"):
        LocalLipschitzEstimate(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), (3,))
    with pytest.raises(ValueError, match="n_iter"):
        LocalLipschitzEstimate(nn.Linear(3, 3), (3,), n_iter=0)
    with pytest.raises(ValueError, match="inputs"):
        LocalLipschitzEstimate(nn.Linear(3, 3), (3,))(torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError, match="gamma"):
        LocalLipschitzEstimate(nn.Linear(3, 3), (3,))(torch.zeros(2, 3), -1.0)


# --- the recipe -------------------------------------------------------------------------------------------
def test_recipe_schedules():
    from lipkern.train import TrainConfig, _lr_factor, _splitz_schedule, resolve_config

    c = resolve_config(TrainConfig(model="splitz-s", splitz_noise_warmup=0.25))
    assert (c.loss, c.optimizer, c.schedule, c.lr) == ("splitz", "adam", "hold-exponential", 1e-3)
    assert _splitz_schedule(c, 0.5, 0.0) == (1.0, 0.0, 0.0)
    kappa, gamma, sigma = _splitz_schedule(c, 0.5, 1 / 3)
    assert kappa == pytest.approx(0.85) and gamma == pytest.approx(0.025) and sigma == 0.5
    assert _splitz_schedule(c, 0.5, 0.9) == pytest.approx((0.7, 0.05, 0.5))
    assert _lr_factor(c, 0.3) == 1.0 and _lr_factor(c, 0.5) == 1.0
    assert _lr_factor(c, 0.75) == pytest.approx(math.sqrt(1e-3)) and _lr_factor(c, 1.0) == pytest.approx(1e-3)


def test_recipe_errors():
    from lipkern.train import TrainConfig, TrainError, resolve_config

    for bad, match in ((dict(model="splitz-s", loss="ce"), "splitz"), (dict(model="convnet-xs-aol", loss="splitz"),
                                                                        "splitz"),
                       (dict(model="splitz-s", splitz_kappa=(1.0, 2.0)), "splitz_kappa"),
                       (dict(model="splitz-s", splitz_ramp=1.5), "splitz_ramp"),
                       (dict(model="splitz-s", certify_samples=0), "certify_samples"),
                       (dict(model="splitz-s", val_split=0.1, save_best="certified@0.1"), "smoothing")):
        with pytest.raises(TrainError, match=match):
            resolve_config(TrainConfig(**bad))


def test_splitz_net_is_right_of_left_with_noise_in_training_only():
    from lipkern.models import build_model

    model = build_model("splitz-s", num_classes=10, in_channels=1, input_size=8, sigma=0.5).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.right(model.left(x)))
        model.train()
        assert not torch.allclose(model(x), model(x))
    assert model.sigma == 0.5
    with pytest.raises(ValueError, match="even"):
        build_model("splitz-s", input_size=7)


# --- trained on digits ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """splitz-s trained on digits by lipkern train (20 epochs, batch 64), certified at the end on 40 test
    points with 1,000 draws."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("splitz") / "run"
    try:
        code = cli.main(["train", "--model", "splitz-s", "--dataset", "digits", "--epochs", "20",
                         "--batch-size", "64", "--output-dir", str(run), "--no-progress", "--certify-limit", "40",
                         "--certify-samples", "1000", "--eps", "0", "0.05", "0.1", "0.2"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return run, json.loads((run / "results.json").read_text())["certification"]


def _pgd_displacement(left: nn.Module, x: torch.Tensor, radius: float, steps: int = 60) -> torch.Tensor:
    """x' in the ball B(x, radius) maximizing ‖left(x') − left(x)‖ (projected gradient ascent, random start)."""
    with torch.no_grad():
        anchor = left(x[None])
    delta = torch.randn_like(x)
    delta = delta / delta.norm() * radius * 0.5
    for _ in range(steps):
        delta.requires_grad_(True)
        gap = (left((x + delta)[None]) - anchor).norm()
        (grad,) = torch.autograd.grad(gap, delta)
        with torch.no_grad():
            delta = delta + 0.1 * radius * grad / grad.norm().clamp_min(1e-30)
            delta = delta * min(1.0, radius / delta.norm().item())
    return (x + delta).detach()


def _pgd_smoothed(model, x: torch.Tensor, label: int, radius: float, steps: int = 40) -> torch.Tensor:
    """x' in B(x, radius) maximizing the cross-entropy of the right half under 64 fixed noise draws after the
    left half (the smoothed classifier's soft surrogate)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        noise = torch.randn((64, *model.left(x[None]).shape[1:]), generator=generator) * model.sigma
    target = torch.full((64,), label)
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model.right(model.left((x + delta)[None]) + noise)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, target), delta)
        with torch.no_grad():
            delta = delta + 0.1 * radius * grad / grad.norm().clamp_min(1e-30)
            delta = delta * min(1.0, radius / delta.norm().item())
    return (x + delta).detach()


def test_trained_splitz_model_certifies_and_pgd_finds_no_flip(trained):
    """The trained run certifies points; at each certified point PGD inside its radius (1) cannot move the
    left half's output by more than the local bound allows, nor as far as the right half's radius, and (2)
    cannot make Cohen's PREDICT of the smoothed classifier at x' return another class."""
    from lipkern.data import load_dataset
    from lipkern.train import load_checkpoint_model

    run, certification = trained
    assert certification["mode"] == "splitz" and certification["num_points"] == 40
    assert certification["clean_accuracy"] >= 0.8
    model, _ = load_checkpoint_model(run / "checkpoint.pt")
    x, y = load_dataset("digits", split="test")
    points = certification["points"]
    certified = [i for i, (r, ok) in enumerate(zip(points["radius"], points["correct"])) if ok and r > 0]
    assert len(certified) >= 20, certification["certified_count"]
    certifier = SplitzCertifier(model.left, model.right, model.sigma, 10)
    smoother = RandomizedSmoothing(model.right, model.sigma, 10)
    flips = 0
    for i in certified[:12]:
        radius, gamma = points["radius"][i], points["gamma"][i]
        assert 0 < radius <= gamma
        _, right_radius = certifier.smoothing.certify(model.left(x[i][None])[0].detach(), 100, 1000, 0.001, 1000,
                                                      seed=i)
        bound = certifier.lipschitz_at(x[i], gamma)
        moved_to = _pgd_displacement(model.left, x[i], radius)
        with torch.no_grad():
            moved = (model.left(moved_to[None]) - model.left(x[i][None])).norm().item()
        assert moved <= bound * (moved_to - x[i]).norm().item() * (1 + 1e-5) + 1e-6
        assert moved < right_radius
        attacked = _pgd_smoothed(model, x[i], int(y[i]), radius)
        assert (attacked - x[i]).norm().item() <= radius * (1 + 1e-6)
        with torch.no_grad():
            z = model.left(attacked[None])[0]
        prediction = smoother.predict(z, 2000, 0.001, 1000, seed=10_000 + i)
        flips += prediction not in (int(y[i]), ABSTAIN)
    assert flips == 0


def test_certify_splitz_reproduces_the_training_run_and_predicts(trained, capsys, tmp_path):
    run, certification = trained
    out = tmp_path / "c.json"
    code = cli.main(["certify", "--checkpoint", str(run / "checkpoint.pt"), "--splitz", "--limit", "40",
                     "--num-samples", "1000", "--batch-size", "1000", "--device", "cpu", "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "SPLITZ" in captured.out and "local Lipschitz bound" in captured.out
    assert "left half as it runs" in captured.out and certification["smoothing"]["evaluation"] == "auto"
    again = json.loads(out.read_text())
    assert again["points"]["radius"] == certification["points"]["radius"]
    assert again["points"]["gamma"] == pytest.approx(certification["points"]["gamma"], rel=1e-12)  # threads
    assert again["certified_count"] == certification["certified_count"]

    code = cli.main(["certify", "--checkpoint", str(run / "checkpoint.pt"), "--splitz", "--predict", "--limit",
                     "10", "--num-samples", "500", "--device", "cpu", "--output", str(tmp_path / "p.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "PREDICT" in captured.out and "abstained" in captured.out and "certified accuracy" not in captured.out
    predicted = json.loads((tmp_path / "p.json").read_text())
    assert predicted["mode"] == "smoothing-predict" and predicted["points"]["samples"] == [500] * 10
    from lipkern.data import load_dataset
    from lipkern.train import load_checkpoint_model

    model, _ = load_checkpoint_model(run / "checkpoint.pt")
    x, _ = load_dataset("digits", split="test")
    smoother = RandomizedSmoothing(model.right, model.sigma, 10)
    with torch.no_grad():
        direct = [smoother.predict(model.left(x[i][None])[0], 500, 0.001, 256, seed=i) for i in range(10)]
    assert predicted["points"]["prediction"] == direct


def test_certify_splitz_errors(trained, capsys, tmp_path):
    run, _ = trained
    checkpoint = str(run / "checkpoint.pt")
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    state["left.0.bias"][0] = math.nan  # a diverged left half: a clear error (exit 2), not a traceback
    torch.save(state, tmp_path / "nan.pt")
    code = cli.main(["certify", "--model", "SplitzNet", "--model-args", '{"in_channels": 1, "image_size": 8}',
                     "--state-dict", str(tmp_path / "nan.pt"), "--dataset", "digits", "--splitz", "--limit", "2",
                     "--num-samples", "100", "--device", "cpu"])
    assert code == 2 and "NaN" in capsys.readouterr().err
    code = cli.main(["certify", "--checkpoint", checkpoint, "--splitz", "--evaluation", "exact", "--limit", "3",
                     "--num-samples", "200", "--device", "cpu"])
    assert code == 0 and "real-arithmetic one" in capsys.readouterr().out
    for extra, match in ((["--splitz", "--sigma", "0.5"], "leave --sigma out"),
                         (["--splitz", "--adaptive"], "--adaptive"),
                         (["--predict"], "--predict goes with"),
                         (["--splitz", "--smoothing"], "not both")):
        code = cli.main(["certify", "--checkpoint", checkpoint, "--limit", "2", "--num-samples", "100",
                         "--device", "cpu", *extra])
        assert code == 2 and match in capsys.readouterr().err
