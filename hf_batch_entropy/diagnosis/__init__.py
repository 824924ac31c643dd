r"""Trainability diagnosis before training: per-layer batch-entropy at initialization, and the layers where it is ~0.

Peer et al. (TMLR 2022) show that a network in which some layer's batch-entropy is 0, i.e. every example of the batch
is mapped to the same activation, cannot be trained by gradient descent: no information about the input reaches the
layers above, and no useful gradient reaches the layers below. This module measures, for a model and a few batches,

    H_l = mean_u ½·ln(π·e·σ_lu² + 1)      (σ_lu: unbiased std over the batch of unit u of layer l)

for every layer `l` (the model's `hidden_states`, else the outputs of its activation modules, exactly the layers
`BatchEntropyTrainer` would regularize), averaged over the batches, and flags the layers with `H_l < threshold`.

Threshold. A dead layer's entropy is not exactly 0 but sits at a floor set by floating point rounding: its activations
differ across the batch only by rounding errors, `σ ≈ ε·|a|` (ε = 1.2e-7 in float32), so `H ≈ ½·π·e·σ² ≈ 1e-17`
nats for activations of magnitude ~0.1. The default threshold, `1e-13` nats for float32 activations (`σ ≈ 1.5e-7`,
the resolution of float32 for activations of order 1), sits between that floor and what still trains. Measured on
digits (ReLU MLP of width 64, PyTorch's default init; trained without LBE with Adam, lr 1e-3, 400 steps): at
initialization the entropy falls ~5× per layer; depth 6 reaches 91% test accuracy and depth 10 75% (not flagged),
depth 15 75% (its deepest layer at 3e-12 to 7e-13 depending on the seed, not flagged), depth 20 25% (flagged from
layer ~16), depth 30 stays at chance (flagged from layer ~16; floor 1e-17). For half-precision activations the floor
is higher, so the default scales with the squared machine epsilon of the activations' dtype (bf16: 4e-4,
fp16: 7e-6). Pass `threshold=` / `--threshold` to choose another one.

From Python:

    >>> from hf_batch_entropy import diagnose
    >>> from experiments.models import VanillaMLPConfig                # from the root of a clone of the repository
    >>> report = diagnose(VanillaMLPConfig(depth=500, width=64))    # a config, a model, or a Hub name / local path
    >>> report.flagged[:3], report.suggested_settings
    >>> print(report)

From the command line:

    python -m hf_batch_entropy.diagnosis --vanilla mlp --depth 500 --width 64    # from the root of a clone
    python -m hf_batch_entropy.diagnosis bert-base-uncased             # Hub name (or a local folder)
    python -m hf_batch_entropy.diagnosis runs/quickstart               # no tokenizer: random token ids, said so
    python -m hf_batch_entropy.diagnosis runs/quickstart --tokenizer bert-base-uncased

Modules: `report` (the diagnosis, thresholds, suggested settings), `inputs` (digits, sentences, random token ids),
`loading` (the model from a config, module or name, and its default inputs), `clone` (the research models and
`flush_denormals` of the repository's experiments/, where the diagnosis runs in a clone), `cli` (the command line).
"""

from .cli import build_parser, main
from .inputs import SENTENCES, digits_batches, random_token_batches, text_batches
from .loading import load_model
from .report import DEFAULT_THRESHOLD, Diagnosis, default_threshold, diagnose, suggest_settings

__all__ = [
    "DEFAULT_THRESHOLD",
    "SENTENCES",
    "Diagnosis",
    "build_parser",
    "default_threshold",
    "diagnose",
    "digits_batches",
    "load_model",
    "main",
    "random_token_batches",
    "suggest_settings",
    "text_batches",
]
