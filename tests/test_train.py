"""lipkern.train: a short run on digits learns, checkpoint + resume reproduces an uninterrupted run bit for
bit, two gloo ranks under DDP follow one process on the same global batch, bad options fail clearly."""

import math
import os
from datetime import timedelta

import pytest
import torch

from lipkern._dispatch import configure
import torch.distributed as dist
import torch.multiprocessing as mp

from lipkern.train import (TrainConfig, TrainError, load_checkpoint, load_checkpoint_model, resolve_config,
                           train)
from tests.helpers import free_port

# A small AOL ConvNet on 8x8 digits (width 8, 3 downsizing blocks): about a second per epoch on the CPU.
SMALL = dict(model="convnet-xs-aol", model_args={"width": 8}, dataset="digits", progress=False)


@pytest.fixture(autouse=True)
def _torch_backend_one_thread(monkeypatch, knobs):
    knobs(backend="torch")  # the reference math; kernels are tested elsewhere
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: one thread is faster, and much faster on a busy machine
    yield
    torch.set_num_threads(threads)


def _state(path) -> dict:
    return load_checkpoint(path)["state_dict"]


def test_short_run_learns_and_certifies(tmp_path):
    # CRM recipe with a constant lr: cross-entropy for 3 epochs, then the radius term switches on
    result = train(TrainConfig(model="liplt-4c3f", dataset="digits", progress=False, epochs=4, batch_size=32,
                               train_limit=640, schedule="constant", crm_start_epoch=3,
                               output_dir=str(tmp_path), eps=(0.0, 0.1)))
    history = result["history"]
    assert len(history) == 4
    assert history[2]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["test_accuracy"] > 0.6  # chance is 0.1
    cert = result["certification"]
    # independent check of the table: rebuild from the checkpoint, radii from the margins and the sound bound
    model, _ = load_checkpoint_model(result["checkpoint"])
    from lipkern.bounds import lipschitz_bound
    from lipkern.data import load_dataset

    x, y = load_dataset("digits", split="test")
    bound = lipschitz_bound(model, (1, 8, 8), method="liplt", pairwise=True)
    assert torch.equal(torch.tensor(cert["lipschitz"]["value"], dtype=torch.float64), bound)
    with torch.no_grad():  # float64 logits of the applied weights, as the tool's
        logits = model.double()(x.double())
    predicted = logits.argmax(1)
    # the float32 evaluation's proven rounding (per point, recorded) comes off the margins, its growth with the
    # distance onto the denominators (test_rounding checks the bound itself)
    assert cert["evaluation"] == "float32"
    rounding = torch.tensor(cert["points"]["rounding"], dtype=torch.float64)
    margins = (logits.gather(1, predicted[:, None]) - logits - math.sqrt(2) * rounding[:, None]).clamp_min(0)
    rows = bound[predicted] + math.sqrt(2) * cert["rounding_slope"]
    radius = torch.where(rows > 0, margins / rows, torch.full_like(margins, math.inf))
    radius = radius.masked_fill(torch.nn.functional.one_hot(predicted, 10).bool(), math.inf).amin(1)
    correct = predicted == y
    assert cert["clean_count"] == int(correct.sum())
    for e, count in zip(cert["eps"], cert["certified_count"]):
        expected = int((correct & (radius > e)).sum())
        assert count == expected
    assert cert["certified_count"][0] > 0.3 * len(y)


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    # the CRM recipe: a schedule, a training bound with persistent power-iteration vectors, the robust term
    # switching on at epoch 1: all of it must resume exactly
    common = dict(model="liplt-4c3f", dataset="digits", progress=False, epochs=3, batch_size=64,
                  train_limit=256, crm_start_epoch=1, certify=False)
    full = train(TrainConfig(**common, output_dir=str(tmp_path / "full")))
    train(TrainConfig(**common, output_dir=str(tmp_path / "split"), stop_after=1))
    first = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert first["epoch"] == 1
    resumed = train(TrainConfig(**common, output_dir=str(tmp_path / "split"),
                                resume=str(tmp_path / "split" / "checkpoint.pt")))
    a, b = _state(full["checkpoint"]), _state(resumed["checkpoint"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["0.weight"], first["state_dict"]["0.weight"])  # epochs 2-3 changed the weights
    end_a, end_b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for key, value in end_a["bound"].items():
        assert torch.equal(value, end_b["bound"][key]), key
    assert [h["loss"] for h in full["history"]] == [h["loss"] for h in resumed["history"]]


def _ddp_worker(rank: int, port: int, config: dict) -> None:
    configure(backend="torch")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    dist.barrier()
    try:
        train(TrainConfig(**config))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    # the CRM recipe (Adam, exponential schedule, the LipLT training bound, the radius term from epoch 0) on a
    # ReLU network: 2 ranks x 16 rows must follow 1 process x 32 rows up to the all-reduce's rounding.
    # (MaxMin networks amplify rounding differences through near-ties, so they are not used here.)
    config = dict(model="liplt-4c3f", dataset="digits", progress=False, epochs=2, batch_size=32,
                  train_limit=128, crm_start_epoch=0, certify=False)
    single = train(TrainConfig(**config, output_dir=str(tmp_path / "one")))
    mp.spawn(_ddp_worker, args=(free_port(), dict(config, output_dir=str(tmp_path / "two"))), nprocs=2,
             join=True)
    one, two = load_checkpoint(single["checkpoint"]), load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    torch.manual_seed(0)
    from lipkern.models import build_model

    init = build_model("liplt-4c3f", num_classes=10, in_channels=1, input_size=8).state_dict()
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, rtol=1e-4, atol=1e-6)
        # every tensor trained: not a match between two untrained models
        assert float((value - init[key]).abs().max()) > 1e-4, key
    for key, value in one["bound"].items():  # the training bound's power-iteration vectors too
        torch.testing.assert_close(two["bound"][key], value, rtol=1e-4, atol=1e-6)
    assert [h["epoch"] for h in two["history"]] == [1, 2]


def test_bad_options(tmp_path):
    with pytest.raises(TrainError, match="unknown model 'resnet'.*convnet-xs-aol"):
        resolve_config(TrainConfig(model="resnet"))
    with pytest.raises(TrainError, match="lr must be a finite number > 0"):
        resolve_config(TrainConfig(lr=-1.0))
    with pytest.raises(TrainError, match="loss must be one of"):
        resolve_config(TrainConfig(loss="mse"))
    with pytest.raises(TrainError, match="epochs must be a positive integer"):
        resolve_config(TrainConfig(epochs=0))
    with pytest.raises(TrainError, match="model_args may not set in_channels"):
        resolve_config(TrainConfig(model_args={"in_channels": 3}))
    with pytest.raises(TrainError, match="larger than the 100 training points"):
        train(TrainConfig(**SMALL, train_limit=100, batch_size=128, output_dir=str(tmp_path)))
    with pytest.raises(TrainError, match="unknown dataset"):
        train(TrainConfig(**dict(SMALL, dataset="svhn"), output_dir=str(tmp_path)))
    with pytest.raises(TrainError, match="cannot pad"):
        train(TrainConfig(**SMALL, input_size=4, output_dir=str(tmp_path)))
    with pytest.raises(TrainError, match="could not build 'convnet-xs-aol'"):
        train(TrainConfig(**dict(SMALL, model_args={"width": 7}), output_dir=str(tmp_path)))
    with pytest.raises(TrainError, match="no such file"):
        train(TrainConfig(**SMALL, resume=str(tmp_path / "missing.pt"), output_dir=str(tmp_path)))
    # resuming with another recipe is refused
    train(TrainConfig(**SMALL, epochs=2, stop_after=1, batch_size=50, train_limit=100,
                      output_dir=str(tmp_path / "a")))
    with pytest.raises(TrainError, match="batch_size was 50"):
        train(TrainConfig(**SMALL, epochs=2, batch_size=25, train_limit=100, output_dir=str(tmp_path / "a"),
                          resume=str(tmp_path / "a" / "checkpoint.pt")))
    with pytest.raises(TrainError, match="laid out for 2 epochs"):
        train(TrainConfig(**SMALL, epochs=3, batch_size=50, train_limit=100, output_dir=str(tmp_path / "a"),
                          resume=str(tmp_path / "a" / "checkpoint.pt")))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(TrainError, match="not a lipkern train checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_recipes_fill_only_missing_fields():
    c = resolve_config(TrainConfig(model="convnet-xs-cpl", lr=0.5))
    assert (c.loss, c.optimizer, c.schedule, c.margin, c.lr) == ("hinge", "adam", "triangular", 0.7, 0.5)
    c = resolve_config(TrainConfig(model="liplt-4c3f"))
    assert (c.loss, c.crm_t, c.crm_lambda, c.crm_r0, c.crm_start_epoch, c.bound_iters) == ("crm", 5.0, 15.0,
                                                                                            0.2, 10, 5)
    assert c.certify_method == "liplt"
    c = resolve_config(TrainConfig(model="convnet-xs-aol"))
    assert (c.loss, c.offset, c.temperature, c.optimizer) == ("offset-ce", math.sqrt(2), 0.25, "nesterov")
    assert c.certify_method == "product"


def test_trains_on_mnist_and_cifar10_files(tmp_path):
    """--dataset mnist / cifar10 with a data root: tiny files in the real formats, the model built for their
    channels and sizes, one epoch each."""
    import pickle
    import struct

    import numpy as np

    rng = np.random.default_rng(0)
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    for prefix, n in (("train", 64), ("t10k", 16)):
        images = rng.integers(0, 256, (n, 12, 12), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (mnist / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">Iiii", 0x0803, n, 12, 12)
                                                            + images.tobytes())
        (mnist / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">Ii", 0x0801, n) + labels.tobytes())
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, 8)]}
        (cifar / name).write_bytes(pickle.dumps(batch, protocol=2))
    for dataset, root, shape in (("mnist", mnist, (1, 12)), ("cifar10", cifar, (3, 32))):
        result = train(TrainConfig(model="liplt-4c3f", dataset=dataset, data_root=str(root), progress=False,
                                   epochs=1, batch_size=16, certify=False, output_dir=str(tmp_path / dataset)))
        args = result["model_args"]
        assert (args["in_channels"], args["input_size"], args["num_classes"]) == (*shape, 10)
        model, state = load_checkpoint_model(result["checkpoint"])
        assert state["config"]["dataset"] == dataset
        assert model(torch.rand(2, shape[0], shape[1], shape[1])).shape == (2, 10)


def test_resume_refuses_other_input_preprocessing(tmp_path):
    """Resuming with another --input-size/--fit would train the rest on differently prepared inputs."""
    first = train(TrainConfig(**SMALL, input_size=10, output_dir=str(tmp_path), certify=False, stop_after=1))
    with pytest.raises(TrainError, match="fit was 'pad' in the checkpoint, 'resize' now"):
        train(TrainConfig(**SMALL, input_size=10, fit="resize", output_dir=str(tmp_path), certify=False,
                          resume=str(first["checkpoint"])))


def test_logged_accuracy_checkpoint_model_and_certificate_are_one_network(tmp_path):
    """Spectral layers (their eval norm: an estimate, or with certified=True a guaranteed bound): the per-epoch
    test accuracy, the model load_checkpoint_model returns and the certificate all use the certified network."""
    from lipkern.data import load_dataset

    result = train(TrainConfig(model="convnet-xs-spectral", model_args={"width": 8}, dataset="digits",
                               progress=False, epochs=1, batch_size=32, train_limit=128, eps=(0.0,),
                               certify_evaluation="float32", output_dir=str(tmp_path)))
    model, _ = load_checkpoint_model(result["checkpoint"])
    layers = [m for m in model.modules() if isinstance(getattr(m, "certified", None), bool)]
    assert layers and all(m.certified for m in layers)
    x, y = load_dataset("digits", split="test")
    with torch.no_grad():
        certified_logits = model(x)
    correct = int((certified_logits.argmax(1) == y).sum())
    assert result["history"][-1]["test_accuracy"] == correct / len(y)
    assert result["certification"]["clean_count"] == correct
    for m in layers:  # the estimate-normalized network is another one: the equalities above are not vacuous
        m.certified = False
    with torch.no_grad():
        assert not torch.allclose(model(x), certified_logits, rtol=1e-4, atol=0)


def test_unreadable_checkpoints_say_why(tmp_path):
    """Junk, empty, text, truncated, object-holding files and folders: one line naming the file and the reason,
    never PyTorch's advice to load arbitrary pickles (weights_only=False)."""
    (tmp_path / "junk").write_bytes(b"abcdef")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "results.json").write_text('{"certification": {}}')
    torch.save({"config": TrainConfig()}, tmp_path / "objects.pt")  # a dataclass: not weights-only
    torch.save({"w": torch.zeros(64)}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:120])
    expected = {"junk": "is not a file written by torch.save (it starts with b'abcdef')",
                "empty": "is empty (0 bytes)", "results.json": "text: JSON?",
                "objects.pt": "holds Python objects besides tensors", "cut.pt": "damaged or truncated",
                "": "is a folder, not a file"}
    for name, reason in expected.items():
        with pytest.raises(TrainError) as info:
            load_checkpoint(tmp_path / name)
        message = str(info.value)
        assert reason in message and str(tmp_path / name) in message, message
        assert "weights_only=False" not in message and "\n" not in message, message


def test_a_diverging_run_stops_with_a_message_and_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch):
    """lr 1e30: the loss or the weights go NaN/Inf in the first epoch: a TrainError names the epoch and the lr
    and says that nothing was saved. A run whose second epoch ends with a NaN loss stops before saving it: the
    checkpoint of epoch 1 stays as it was. A changed lr on resume is refused (the optimizer state would keep
    the old one)."""
    import lipkern.train as train_module

    good = dict(SMALL, epochs=3, batch_size=32, train_limit=64, schedule="constant", certify=False)
    with pytest.raises(TrainError, match=r"diverged in epoch 1: .* NaN or Inf \(lr 1e\+30\); no checkpoint was saved"):
        train(TrainConfig(**dict(good, lr=1e30), output_dir=str(tmp_path / "a")))
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    original = train_module._train_epoch

    def nan_in_epoch_two(*args):
        record = original(*args)
        if args[9] == 1:  # epoch (0-based)
            record["loss"] = math.nan
        return record

    monkeypatch.setattr(train_module, "_train_epoch", nan_in_epoch_two)
    with pytest.raises(TrainError, match="diverged in epoch 2: the loss is NaN or Inf .* the checkpoint of epoch 1"):
        train(TrainConfig(**good, output_dir=str(tmp_path / "b")))
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1
    monkeypatch.setattr(train_module, "_train_epoch", original)
    with pytest.raises(TrainError, match="lr was 0.001 in the checkpoint, 0.01 now"):
        train(TrainConfig(**dict(good, lr=0.01), resume=str(tmp_path / "b" / "checkpoint.pt")))


def test_metrics_csv_has_one_row_per_epoch_across_a_resume(tmp_path):
    import csv

    options = dict(SMALL, epochs=2, batch_size=32, train_limit=64, certify=False, output_dir=str(tmp_path))
    train(TrainConfig(**options, stop_after=1))
    result = train(TrainConfig(**options, resume=str(tmp_path / "checkpoint.pt")))
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row, record in zip(rows, result["history"]):
        for key in ("loss", "train_accuracy", "test_accuracy", "lr", "seconds"):
            assert float(row[key]) == record[key]


def test_validation_split_and_best_checkpoint(tmp_path):
    """val_split holds out round(f·N) training points (the documented seeded permutation), logs their accuracy
    every epoch (metrics.csv too), and save_best keeps the checkpoint of the first epoch with the best one."""
    import csv

    from lipkern.data import load_dataset
    from lipkern.train import split_validation

    result = train(TrainConfig(**SMALL, epochs=3, batch_size=32, train_limit=128, val_split=0.25, save_best=True,
                               schedule="constant", certify=False, output_dir=str(tmp_path)))
    history = result["history"]
    x, y = load_dataset("digits", split="train")
    (x_fit, _), (x_val, y_val) = split_validation(x[:128], y[:128], 0.25, 0)
    assert len(y_val) == 32 and len(x_fit) == 96
    assert not any(bool((x_fit == v).flatten(1).all(1).any()) for v in x_val)  # disjoint (digits rows differ)
    best = max(range(3), key=lambda e: (history[e]["val_accuracy"], -e))
    state = load_checkpoint(tmp_path / "best.pt")
    assert state["epoch"] == best + 1
    model, _ = load_checkpoint_model(tmp_path / "best.pt")
    with torch.no_grad():
        accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
    assert accuracy == pytest.approx(history[best]["val_accuracy"], abs=1e-9)
    with open(tmp_path / "metrics.csv", newline="") as fh:
        assert [float(r["val_accuracy"]) for r in csv.DictReader(fh)] == [r["val_accuracy"] for r in history]
    with pytest.raises(TrainError, match="give val_split > 0"):
        resolve_config(TrainConfig(save_best=True))
    with pytest.raises(TrainError, match="val_split must be a fraction"):
        resolve_config(TrainConfig(val_split=1.0))


def test_best_checkpoint_by_certified_accuracy(tmp_path):
    """save_best='certified@EPS' logs the val points' certified accuracy at EPS every epoch (metrics.csv too),
    keeps best.pt at the first epoch with the best one, and equals what certify_model (the end-of-run
    certificate) reports for best.pt; the per-epoch certification leaves training unchanged."""
    import csv

    from lipkern.data import load_dataset
    from lipkern.train import certify_model, split_validation

    options = dict(SMALL, epochs=3, batch_size=32, train_limit=128, val_split=0.25, schedule="constant",
                   certify=False, certify_method="product", certify_pairwise=False)
    result = train(TrainConfig(**options, save_best="certified@0.05", output_dir=str(tmp_path / "cert")))
    history = result["history"]
    assert all(0 <= r["val_certified_accuracy"] <= r["val_accuracy"] for r in history)
    best = max(range(3), key=lambda e: (history[e]["val_certified_accuracy"], -e))
    assert load_checkpoint(tmp_path / "cert" / "best.pt")["epoch"] == best + 1
    x, y = load_dataset("digits", split="train")
    _, (x_val, y_val) = split_validation(x[:128], y[:128], 0.25, 0)
    model, _ = load_checkpoint_model(tmp_path / "cert" / "best.pt")
    alone = certify_model(model, x_val, y_val, [0.05], method="product", pairwise=False, log=lambda *a: None)
    assert alone["certified_accuracy"][0] == history[best]["val_certified_accuracy"]
    with open(tmp_path / "cert" / "metrics.csv", newline="") as fh:
        assert [float(r["val_certified_accuracy"]) for r in csv.DictReader(fh)] == [
            r["val_certified_accuracy"] for r in history]

    train(TrainConfig(**options, save_best="val", output_dir=str(tmp_path / "val")))
    for key, value in _state(tmp_path / "cert" / "checkpoint.pt").items():
        assert torch.equal(value, _state(tmp_path / "val" / "checkpoint.pt")[key]), key
    for bad in ("certified", "certified@-1", "certified@nan", "test", "certified@x"):
        with pytest.raises(TrainError, match="save_best must be 'val' or 'certified@EPS'"):
            resolve_config(TrainConfig(val_split=0.2, save_best=bad))
    assert resolve_config(TrainConfig(val_split=0.2, save_best=True)).save_best == "val"  # older checkpoints


class _FakeSummaryWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter where tensorboard is not installed."""
    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _FakeSummaryWriter.made.append(self)

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_scalars_are_the_metrics(tmp_path, monkeypatch):
    """With tensorboard installed (a recording writer here) a run logs metrics.csv's numbers, one scalar per
    column and epoch, in <output_dir>/tensorboard, and closes the writer; tensorboard=False writes nothing;
    tensorboard=True without the package is refused before any work."""
    import csv
    import sys
    import types

    import lipkern.train as train_module

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr(train_module, "_tensorboard_installed", lambda: True)
    _FakeSummaryWriter.made.clear()
    options = dict(SMALL, epochs=2, batch_size=32, train_limit=64, val_split=0.25, certify=False)
    train(TrainConfig(**options, output_dir=str(tmp_path / "on")))
    (writer,) = _FakeSummaryWriter.made
    assert writer.log_dir == str(tmp_path / "on" / "tensorboard") and writer.closed
    with open(tmp_path / "on" / "metrics.csv", newline="") as fh:
        expected = sorted((key, float(value), int(row["epoch"])) for row in csv.DictReader(fh)
                          for key, value in row.items() if key != "epoch")
    assert sorted(writer.scalars) == expected and len(expected) == 2 * 6

    train(TrainConfig(**options, tensorboard=False, output_dir=str(tmp_path / "off")))
    assert len(_FakeSummaryWriter.made) == 1
    monkeypatch.setattr(train_module, "_tensorboard_installed", lambda: False)
    with pytest.raises(TrainError, match="pip install tensorboard"):
        train(TrainConfig(**options, tensorboard=True, output_dir=str(tmp_path / "missing")))
    assert not (tmp_path / "missing").exists()


def test_tensorboard_event_files_when_installed(tmp_path):
    """The real writer, where tensorboard is installed: the event file holds the run's test accuracy."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(TrainConfig(**SMALL, epochs=2, batch_size=32, train_limit=64, certify=False,
                               output_dir=str(tmp_path)))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("test_accuracy")]
    assert logged == [(r["epoch"], pytest.approx(r["test_accuracy"], rel=1e-6)) for r in result["history"]]
