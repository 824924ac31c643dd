"""hf-batch-entropy: layerwise batch-entropy regularization (LBE) for the Hugging Face stack.

Peer, Keulen, Stabinger, Piater and Rodríguez-Sánchez, "Improving the Trainability of Deep Neural Networks through
Layerwise Batch-Entropy Regularization", TMLR 2022.
"""

from .config import BatchEntropyArguments, BatchEntropyConfig, BatchEntropySeq2SeqConfig, batch_entropy_config
from .entropy import batch_entropies, batch_entropy
from .glue import bundled_minilm_path, load_glue_files
from .metrics import load_glue_metric
from .models import (
    VanillaCNNConfig,
    VanillaCNNForImageClassification,
    VanillaMLPConfig,
    VanillaMLPForImageClassification,
)
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
    "VanillaCNNConfig",
    "VanillaCNNForImageClassification",
    "VanillaMLPConfig",
    "VanillaMLPForImageClassification",
    "batch_entropies",
    "batch_entropy",
    "batch_entropy_config",
    "bundled_minilm_path",
    "diagnose",
    "load_glue_files",
    "load_glue_metric",
]


def __getattr__(name: str):
    # `diagnose` is imported on first use so that `python -m hf_batch_entropy.diagnosis` (the CLI) does not find its
    # module already imported by the package.
    if name == "diagnose":
        from .diagnosis import diagnose

        return diagnose
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
