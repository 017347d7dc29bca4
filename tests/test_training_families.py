"""Every model family of lipkern.models trains: a small member of each, built by build_model at the data's
input size, learns scikit-learn's digits (8×8, 10 classes; upsampled to 16×16 for LMT's LeNet, which needs
16) in 120 steps of batch 64 on CPU and classifies held-out digits far above chance.

Threshold: chance is 10% (balanced classes); 50% on 397 held-out digits is 40 binomial standard deviations
above it, so passing means the network learned, and failing means it did not (the collapse this file guards
against gives 10%: constant outputs). The 1-Lipschitz families train with the offset cross-entropy of AOL
(margin √2·0.25, temperature 1/4: plain cross-entropy cannot reach confident logits with a 1-Lipschitz
network); the optimizer is SGD Nesterov for AOL (the AOL paper's; Adam collapses deep AOL stacks, see
lipkern/models.py), Adam for CPL (the CPL code's) and Spectral (it learns fastest in 120 steps: 69% against
48% for SGD at lr 0.02), with learning rates for a 120-step run. The plain networks
(LipLT, LMT) train with cross-entropy and Adam: their certified-training losses are tested in test_losses.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipkern.losses import OffsetCrossEntropy
from lipkern.models import MODEL_FAMILIES, build_model

pytest.importorskip("sklearn")

STEPS, BATCH, THRESHOLD = 120, 64, 0.5

# name: (build_model options, input size, loss, optimizer, lr)
CASES = {
    "convnet-xs-aol": ({"width": 8}, 8, "offset", "nesterov", 0.05),
    "convnet-xs-cpl": ({"width": 8}, 8, "offset", "adam", 3e-3),
    "convnet-xs-spectral": ({"width": 8}, 8, "offset", "adam", 1e-3),
    "aol-s": ({"width": 4, "conv_channels": 16, "n_conv": 2, "n_dense": 2}, 8, "offset", "nesterov", 0.05),
    "cpl-s": ({"n_conv": 2, "n_dense": 2, "dense_hidden": 64}, 8, "offset", "adam", 3e-3),
    "sll-s": ({"n_conv": 2, "n_dense": 2, "dense_hidden": 64}, 8, "offset", "adam", 3e-3),
    "liplt-4c3f": ({}, 8, "ce", "adam", 1e-3),
    "lmt": ({}, 16, "ce", "adam", 1e-3),
    "splitz-s": ({}, 8, "ce", "adam", 1e-3),  # noise N(0, 0.25²) after the left half in training
}
SLOW = {"convnet-xs-cpl"}  # the slowest case; cpl-s covers the family in the fast run


@pytest.fixture(autouse=True)
def torch_backend_one_thread(monkeypatch, knobs):
    knobs(backend="torch")  # the kernels are tested in tests/ops
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a busy 2-core machine: threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def test_every_family_has_a_case():
    assert {MODEL_FAMILIES[name] for name in CASES} == set(MODEL_FAMILIES.values())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_family_learns_digits(name, digits):
    options, size, loss_name, optimizer, lr = CASES[name]
    x, y = digits
    if size != 8:
        x = F.interpolate(x, size=size, mode="nearest")
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=1, input_size=size, **options)
    loss_fn = OffsetCrossEntropy(math.sqrt(2) * 0.25, 0.25) if loss_name == "offset" else nn.CrossEntropyLoss()
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        idx = torch.randint(0, len(y_train), (BATCH,), generator=g)
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= THRESHOLD, f"{name}: held-out accuracy {accuracy:.3f} after {STEPS} steps"
