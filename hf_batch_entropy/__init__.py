"""hf-batch-entropy: layerwise batch-entropy regularization (LBE) for the Hugging Face stack.

Peer, Keulen, Stabinger, Piater and Rodríguez-Sánchez, "Improving the Trainability of Deep Neural Networks through
Layerwise Batch-Entropy Regularization", TMLR 2022.
"""

from .config import BatchEntropyConfig
from .entropy import batch_entropy, batch_entropies
from .regularizer import BatchEntropyRegularizer, LBEOutput
from .trainer import BatchEntropyTrainer

__version__ = "0.1.0"

__all__ = [
    "BatchEntropyConfig",
    "BatchEntropyRegularizer",
    "BatchEntropyTrainer",
    "LBEOutput",
    "batch_entropies",
    "batch_entropy",
]
