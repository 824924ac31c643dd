"""hf-batch-entropy: layerwise batch-entropy regularization (LBE) for the Hugging Face stack.

Peer, Keulen, Stabinger, Piater and Rodríguez-Sánchez, "Improving the Trainability of Deep Neural Networks through
Layerwise Batch-Entropy Regularization", TMLR 2022.

`import hf_batch_entropy` loads the library: the estimator, the regularizer, activation capture, the config and the
trainer. The trainability diagnosis, `hf_batch_entropy.diagnosis` (`diagnose`, `python -m hf_batch_entropy.diagnosis`),
is imported on use. The research code stays in the repository, not in the package: the vanilla and autoencoder models
(`experiments/models`), GLUE's data loading and metric (`scripts/glue_utils`, beside `scripts/run_glue.py`).
"""

import importlib

from ._compat import quiet_deepspeed_cpu_notice
from .config import BatchEntropyArguments, BatchEntropyConfig, BatchEntropySeq2SeqConfig, batch_entropy_config
from .entropy import batch_entropies, batch_entropy
from .regularizer import BatchEntropyRegularizer, LBEOutput
from .trainer import BatchEntropyMixin, BatchEntropySeq2SeqTrainer, BatchEntropyTrainer

__version__ = "0.1.0"

quiet_deepspeed_cpu_notice()  # Trainer imports DeepSpeed where it is installed; on a CPU its notice is no news

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

# `diagnose` lives in its subpackage, imported when first asked for, so that `python -m hf_batch_entropy.diagnosis`
# does not find its module already imported and `import hf_batch_entropy` does not load it.
_ON_USE = {"diagnose": "diagnosis"}


def __getattr__(name: str):
    if name in _ON_USE:
        return getattr(importlib.import_module(f".{_ON_USE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
