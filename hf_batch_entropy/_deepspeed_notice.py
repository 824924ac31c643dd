"""DeepSpeed's "Setting accelerator to CPU" warning, kept out of training that merely has DeepSpeed installed.

Where DeepSpeed is installed, `transformers.Trainer` imports it while it is being built (accelerate's `unwrap_model`
asks whether the model is a `DeepSpeedEngine`), and DeepSpeed's import picks its accelerator. Finding no GPU or other
accelerator, it prints, in every process, at WARNING level:

    [WARNING] [real_accelerator.py:...:get_accelerator] Setting accelerator to CPU. If you have GPU or other
    accelerator, we were unable to detect it.

On a CPU that is no news: Trainer runs there and says so. `experiments/frontier` and the diagnosis avoid it by
setting `DS_ACCELERATOR=cpu` before the import, which they can because they know they run on the CPU; the library's
users (the quickstart, the examples, their own scripts) import transformers first, before any device is chosen.

So importing `hf_batch_entropy` adds a filter to DeepSpeed's logger ("DeepSpeed") that drops that one record.
DeepSpeed chooses its accelerator exactly as before, `DS_ACCELERATOR` still overrides it, and every other DeepSpeed
message passes.
"""

from __future__ import annotations

import logging

__all__ = ["CPU_FALLBACK_NOTICE", "quiet_cpu_fallback_notice"]

#: The start of the message DeepSpeed logs when it finds no accelerator (deepspeed/accelerator/real_accelerator.py).
CPU_FALLBACK_NOTICE = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it"


class _DropCpuFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CPU_FALLBACK_NOTICE)


def quiet_cpu_fallback_notice() -> None:
    """Drop DeepSpeed's CPU fallback notice from its logger, once per process (the logger need not exist yet:
    DeepSpeed configures the same `logging.getLogger("DeepSpeed")` object when it is imported, and keeps its filters)."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropCpuFallbackNotice) for f in logger.filters):
        logger.addFilter(_DropCpuFallbackNotice())
