"""What the diagnosis takes from a clone of the repository, where it runs in one: the research models and the flushing
of subnormal floats on every thread.

The installed package holds neither: the vanilla MLP/CNN and the autoencoder live in the repository's
`experiments/models`, `flush_denormals` in `experiments/denormals.py`. `python -m hf_batch_entropy.diagnosis` puts the
working directory on `sys.path`, so run from the root of a clone it finds them: importing `experiments.models`
registers the models with the Auto classes, so their saved folders load without `--trust_remote_code`, and
`--vanilla` can build them. Elsewhere the diagnosis works on every other model, and says how to reach these.

Only this repository's `experiments` package is imported: one whose `models/` holds `modeling_vanilla.py`. A folder of
another project that happens to be called `experiments` is left alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

__all__ = ["CLONE_HINT", "RESEARCH_MODEL_TYPES", "experiment_models", "flush_subnormals"]

#: The `model_type`s of `experiments/models`' configs.
RESEARCH_MODEL_TYPES = ("vanilla_mlp", "vanilla_cnn", "dense_autoencoder")

CLONE_HINT = (
    "The vanilla and autoencoder models are research code of the hf-batch-entropy repository (experiments/models), "
    "not of the installed package: run the diagnosis from the root of a clone of the repository."
)


def _experiments_package_dir() -> str | None:
    """The folder of this repository's `experiments` package if it is importable, found without importing it."""
    try:
        spec = importlib.util.find_spec("experiments")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if os.path.isfile(os.path.join(folder, "models", "modeling_vanilla.py")):
            return folder
    return None


def experiment_models() -> ModuleType | None:
    """`experiments.models` of a clone, imported (which registers its models with the Auto classes), or `None` where
    the repository's experiments are not importable (an installed package used outside a clone)."""
    if _experiments_package_dir() is None:
        return None
    return importlib.import_module("experiments.models")


def flush_subnormals() -> None:
    """Flush subnormal floats to zero: on every thread of torch's OpenMP pool with the clone's
    `experiments.denormals`, else on the calling thread (`torch.set_flush_denormal`). Deep dead networks carry
    subnormals, on which CPU arithmetic is slow, and they are ~0 for the diagnosis anyway."""
    if _experiments_package_dir() is not None:
        importlib.import_module("experiments.denormals").flush_denormals()
    else:
        torch.set_flush_denormal(True)
