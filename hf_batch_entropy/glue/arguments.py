"""`scripts/run_glue.py`'s training arguments, importable so that the `training_args.bin` Trainer pickles loads anywhere."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import BatchEntropyConfig

__all__ = ["GlueTrainingArguments"]


@dataclass
class GlueTrainingArguments(BatchEntropyConfig):
    """`BatchEntropyConfig` with the LBE defaults for fine-tuning a pretrained transformer: `scripts/run_glue.py`'s
    training arguments (defined here, importable, so that the `training_args.bin` Trainer pickles loads anywhere).

    `BatchEntropyConfig`'s own defaults (β = α₀ = α_min = 0.5) are the paper's for training deep networks from scratch;
    fine-tuning wants a light touch on layers that already carry information. β = 0.05 is the top of the paper's
    fine-tuning grid {0.005, 0.01, 0.05}, and α₀ = α_min = 0.5 the setting of our measured GLUE runs
    (docs/results.md): every layer is held at or above 0.5 nats. Logging: a first log after step 1 and then every 50
    steps, so that even a short run shows the LBE metrics.
    """

    lbe_beta: float = field(default=0.05, metadata={"help": "Weight β of the LBE term; fine-tuning default 0.05 (the "
                            "paper searched 0.005, 0.01, 0.05). 0: the baseline, trained exactly like Trainer."})
    lbe_alpha: float = field(default=0.5, metadata={"help": "Initial entropy target α₀ of every layer (nats)."})
    lbe_alpha_min: float = field(default=0.5, metadata={"help": "Floor of the entropy targets (nats)."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N steps (LBE metrics included)."})
    logging_first_step: bool = field(default=True, metadata={"help": "Also log after the first step."})
