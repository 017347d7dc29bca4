"""--batch-size auto: the largest smoothing batch that fits by itself (a base model whose allocator "fails"
above a size stands in for a full GPU), the same certificate as any fixed batch on the command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lipkern import cli
from lipkern.certify import RandomizedSmoothing


class RunsOutAbove(nn.Module):
    """A linear classifier that raises torch.OutOfMemoryError for batches above ``limit`` (as the CUDA
    allocator does) and records the batch sizes it saw."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.seen = limit, []
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        self.seen.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"a batch of {x.shape[0]} does not fit")
        return self.linear(x)


@pytest.mark.parametrize("limit, cap, expected", [(3000, 100_000, 2048), (100_000, 5000, 4096), (100, 10_000, 256),
                                                  (10, 100, 100)])
def test_largest_batch_doubles_until_memory_or_the_cap(limit, cap, expected):
    """256·2^k up to the last size that ran (never below min(256, cap): the run itself reports an allocator
    failure at that size), capped by the draws needed."""
    base = RunsOutAbove(limit)
    smoother = RandomizedSmoothing(base, 0.5, 3)
    assert smoother.largest_batch(torch.zeros(4), cap) == expected
    assert base.training  # restored
    assert base.seen == sorted(base.seen) and all(size <= cap for size in base.seen)
    assert expected in base.seen or expected == min(256, cap)  # the size chosen ran (or is the floor)
    with pytest.raises(ValueError, match="cap"):
        smoother.largest_batch(torch.zeros(4), 0)


def test_certify_batch_size_auto(tmp_path, capsys):
    """On the CPU --batch-size auto doubles up to --num-samples; the run prints the size it chose and its
    result is that of the same command with that number."""
    from lipkern import models

    torch.manual_seed(0)
    model = models.build_model("convnet-xs-aol", num_classes=3, in_channels=1, input_size=4, width=4).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.save({"x": torch.rand(3, 1, 4, 4), "y": torch.tensor([0, 1, 2])}, tmp_path / "d.pt")
    common = ["certify", "--model", "ConvNet", "--model-args",
              '{"size": "XS", "layer": "aol", "in_channels": 1, "num_classes": 3, "image_size": 4, "width": 4}',
              "--state-dict", str(tmp_path / "w.pt"), "--data", str(tmp_path / "d.pt"), "--smoothing", "--sigma",
              "0.5", "--num-samples", "1000", "--device", "cpu"]
    assert cli.main([*common, "--batch-size", "auto", "--output", str(tmp_path / "a.json")]) == 0
    assert "smoothing batch size 512" in capsys.readouterr().err
    assert cli.main([*common, "--batch-size", "512", "--output", str(tmp_path / "b.json")]) == 0
    auto, fixed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert auto["points"]["radius"] == fixed["points"]["radius"]
    assert cli.main(["certify", *common[1:9], "--lipschitz", "1", "--batch-size", "auto"]) == 2
    assert "--batch-size auto" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*common, "--batch-size", "lots"])


@pytest.mark.gpu
def test_largest_batch_on_a_gpu_stops_at_the_allocator_and_certifies_alike():
    """On a real GPU: a conv base model whose activations outgrow the free memory at some batch; the size found
    fits in the free memory (its activations' bytes), and twice it was refused by the allocator only near
    that limit (within the model's unknown workspace, a factor 8), not early; a small cap is respected."""
    device = torch.device("cuda")
    base = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10)).to(device)
    base(torch.zeros(1, 3, 64, 64, device=device))
    smoother = RandomizedSmoothing(base.eval(), 0.25, 10)
    x = torch.rand(3, 64, 64, device=device)
    free, _ = torch.cuda.mem_get_info(device)
    cap = 2 ** 40
    chosen = smoother.largest_batch(x, cap)
    per_draw = 64 * 64 * 64 * 4 + 3 * 64 * 64 * 4  # activations and the noisy input, bytes
    assert chosen * per_draw <= free * 1.5 and chosen * 2 * per_draw >= free / 8
    assert smoother.largest_batch(x, 1000) <= 1000
