"""Ready-made `accelerate launch` configurations for BatchEntropyTrainer: `ddp`, `fsdp`, `deepspeed_zero2`,
`deepspeed_zero3`.

    accelerate launch --config_file "$(python -c 'import hf_batch_entropy.accelerate_configs as c; print(c.path("ddp"))')" \
        scripts/train_vanilla.py ...

See docs/distributed.md.
"""

from __future__ import annotations

import os

__all__ = ["CONFIGS", "path"]

_HERE = os.path.dirname(os.path.abspath(__file__))

#: The names of the bundled configurations.
CONFIGS = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


def path(name: str) -> str:
    """The file of the bundled `accelerate` configuration `name` (one of `CONFIGS`), for `--config_file`."""
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if name not in CONFIGS:
        raise ValueError(f"Unknown accelerate configuration {name!r}; choose one of {', '.join(CONFIGS)}.")
    return os.path.join(_HERE, f"{name}.yaml")
