"""Issue check: on small TRAINED networks (scikit-learn digits), an ℓ₂ PGD attack with restarts never changes a
prediction inside the radius certified from lipkern's own sound bounds (LipLT and product, global and pairwise),
and the same attack does find flips well outside it (so it is not toothless)."""

import pytest
import torch
from torch import nn

from lipkern.bounds import lipschitz_bound
from lipkern.certify import certified_radius
from lipkern.losses import OffsetCrossEntropy
from tests.helpers import pgd_flips

sklearn = pytest.importorskip("sklearn.datasets")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch, knobs):
    knobs(backend="torch")


def _digits():
    data = sklearn.load_digits()
    x = torch.tensor(data.data, dtype=torch.float64).reshape(-1, 1, 8, 8) / 16
    return x, torch.tensor(data.target)


def _train(model: nn.Module, x, y, steps: int = 150) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = OffsetCrossEntropy()
    for step in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=torch.Generator().manual_seed(step))
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


MODELS = {
    "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 10)),
    "conv": lambda: nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 4, stride=2, padding=1),
                                  nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)),
}


@pytest.mark.parametrize("arch", MODELS)
def test_pgd_never_flips_inside_the_certified_radius_of_a_trained_network(arch):
    x, y = _digits()
    torch.manual_seed(1)
    model = _train(MODELS[arch]().double(), x[:1200], y[:1200])
    test_x = x[1200:1240]
    with torch.no_grad():
        logits = model(test_x)
    assert (logits.argmax(1) == y[1200:1240]).double().mean() > 0.7  # it learned
    bounds = {
        "liplt": lipschitz_bound(model, (1, 8, 8), method="liplt"),
        "product": lipschitz_bound(model, (1, 8, 8), method="product"),
        "pairwise": lipschitz_bound(model, (1, 8, 8), method="liplt", pairwise=True),
    }
    assert bounds["liplt"] <= bounds["product"]
    for name, bound in bounds.items():
        radius = certified_radius(logits, bound)
        assert (radius > 0).float().mean() > 0.5, name
        assert not pgd_flips(model, test_x, radius * (1 - 1e-9), steps=20).any(), name
    far = certified_radius(logits, bounds["pairwise"]) * 30
    assert pgd_flips(model, test_x, far, steps=20).float().mean() > 0.3  # the attack finds flips well outside
