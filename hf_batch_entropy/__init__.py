"""hf-batch-entropy: layerwise batch-entropy regularization (LBE) for the Hugging Face stack.

Peer, Keulen, Stabinger, Piater and Rodríguez-Sánchez, "Improving the Trainability of Deep Neural Networks through
Layerwise Batch-Entropy Regularization", TMLR 2022.

`import hf_batch_entropy` loads the core: the estimator, the regularizer, activation capture, the config and the
trainer. The rest are subpackages imported on use: `hf_batch_entropy.glue` (GLUE data and its metric),
`hf_batch_entropy.models` (the vanilla MLP/CNN, registered with the Auto classes when imported) and
`hf_batch_entropy.diagnosis`.
"""

import importlib

from .config import BatchEntropyArguments, BatchEntropyConfig, BatchEntropySeq2SeqConfig, batch_entropy_config
from .entropy import batch_entropies, batch_entropy
from .regularizer import BatchEntropyRegularizer, LBEOutput
from .trainer import BatchEntropyMixin, BatchEntropySeq2SeqTrainer, BatchEntropyTrainer

__version__ = "0.1.0"

__all__ = [
    "BatchEntropyArguments",
    "BatchEntropyConfig",
    "BatchEntropyMixin",
    "BatchEntropyRegularizer",
    "BatchEntropySeq2SeqConfig",
    "BatchEntropySeq2SeqTrainer",
    "BatchEntropyTrainer",
    "LBEOutput",
    "batch_entropies",
    "batch_entropy",
    "batch_entropy_config",
    "diagnose",
]

# Names that live in a subpackage, imported when first asked for: `diagnose` so that `python -m
# hf_batch_entropy.diagnosis` does not find its module already imported; the others so that the core does not load
# GLUE parsing, scikit-learn or the vanilla models (whose import registers Auto classes) unless they are used.
_ON_USE = {
    "diagnose": "diagnosis",
    "bundled_minilm_path": "glue",
    "load_glue_files": "glue",
    "load_glue_metric": "metrics",
    "DenseAutoencoderConfig": "models",
    "DenseAutoencoderModel": "models",
    "VanillaCNNConfig": "models",
    "VanillaCNNForImageClassification": "models",
    "VanillaMLPConfig": "models",
    "VanillaMLPForImageClassification": "models",
}


def __getattr__(name: str):
    if name in _ON_USE:
        return getattr(importlib.import_module(f".{_ON_USE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
