"""The guard against a silent run without LBE.

Before training (with `lbe_beta > 0`): a batch size of one (`check_batch_size`) and a model with nothing to measure
(`check_model`) are errors.

During training: with `lbe_beta > 0`, a logging window of training steps none of which was regularized is an error that names the
cause, never a run that quietly trains on the task loss alone. The trainer counts, per window, on the host (nothing
read on the device):

- `micro_batches`: the micro-batches trained (`training_step`);
- `ours`: those whose loss went through the mixin's `compute_loss` (a subclass that overrides it without calling
  `super()` never gets there);
- `regularized`: those that got the LBE term;
- `tails`: those left unregularized because they were a short last batch holding one sequence (an epoch's remainder,
  smaller than the configured batch), trained on the task loss with a warning.

A window is fine when one of its micro-batches was regularized, when it holds only short last batches, or when it is
one micro-batch after regularized ones in the same run (the last batch of an epoch, logged on its own).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .capture import accepts_hidden_states, default_target_modules, resolve_target_modules
from .entropy import is_measurable

logger = logging.get_logger(__name__)

__all__ = ["RegularizationGuard", "check_batch_size", "check_model", "nothing_to_measure"]

_COUNTS = ("micro_batches", "ours", "regularized", "tails")


class RegularizationGuard:
    """Per-window counts of the trainer's micro-batches and the check at the end of each window (`check`)."""

    def __init__(self) -> None:
        self.window = dict.fromkeys(_COUNTS, 0)
        self.regularized_in_run = 0
        self._warned_batch_of_one = False

    def start_run(self) -> None:
        """A `train()` call starts: nothing counted yet."""
        self.window = dict.fromkeys(_COUNTS, 0)
        self.regularized_in_run = 0

    def count(self, name: str) -> None:
        """One more micro-batch of kind `name` (`micro_batches`, `ours`, `regularized`, `tails`) in this window."""
        self.window[name] += 1
        if name == "regularized":
            self.regularized_in_run += 1

    def skip_batch_of_one(self, task_loss: torch.Tensor, activations: list[torch.Tensor], per_device_batch_size: int,
                          beta: float) -> torch.Tensor:
        """The loss of a training batch of one sequence, which has no batch-entropy: the task loss alone, counted as a
        short last batch (`tails`) where it is smaller than the configured batch, with a warning once per trainer."""
        if activations and activations[0].shape[0] < per_device_batch_size:
            self.count("tails")  # fewer sequences than a full batch: an epoch's last batch
        if not self._warned_batch_of_one and beta > 0:
            logger.warning(
                "A training batch holds a single example (sequence), which has no batch-entropy: it trains on the task "
                "loss alone. (Usually the last batch of an epoch; dataloader_drop_last=True drops it.) Said once."
            )
            self._warned_batch_of_one = True
        return task_loss

    def check(self, beta: float, trainer_name: str) -> None:
        """End the window: raise a `RuntimeError` naming the cause where `beta > 0` and the window trained but
        regularized nothing (see the module's docstring); start the next window."""
        window, self.window = self.window, dict.fromkeys(_COUNTS, 0)
        if beta == 0 or window["micro_batches"] == 0 or window["regularized"] > 0:
            return
        if window["micro_batches"] == 1 and self.regularized_in_run > 0:
            return
        if window["tails"] == window["micro_batches"]:
            return
        steps = f"{window['micro_batches']} training batch(es) since the last log"
        if window["ours"] == 0:
            raise RuntimeError(
                f"LBE regularized none of the {steps}: {trainer_name}.compute_loss never reached "
                f"BatchEntropyMixin.compute_loss, so the loss has no LBE term (lbe_beta={beta}). A subclass that "
                "overrides compute_loss must call super().compute_loss(...) (for a custom loss, pass "
                "compute_loss_func= to the trainer instead); or set lbe_beta=0."
            )
        raise RuntimeError(
            f"LBE regularized none of the {steps}: each held a single sequence along the batch dimension, which has no "
            "batch-entropy. Either per_device_train_batch_size is 1 (use 2 or more, or lbe_sync_entropy with several "
            "processes), or the batches are packed/padding-free without sequence boundaries LBE can read (it needs "
            "cu_seq_lens_q, seq_idx or position_ids in the batch, as TRL's packing and DataCollatorWithFlattening "
            "give), or each packed row holds one sequence."
        )


def check_batch_size(batch_size: int, per_device_batch_size: int, sync_entropy: bool, packs_sequences: bool) -> None:
    """Raise a `ValueError` where a forward pass holds fewer than 2 sequences to measure: `batch_size` examples per
    forward (pooled across processes with `sync_entropy`: `entropy.is_measurable`). Batches that pack several
    sequences into one row (`packs_sequences`) pass: the window check catches a run in which none had two."""
    if packs_sequences or is_measurable(batch_size, sync_entropy):
        return
    raise ValueError(
        f"Batch-entropy is a statistic over the batch and needs at least 2 examples per forward pass, but "
        f"per_device_train_batch_size is {per_device_batch_size}. Use a batch size of 2 or more (gradient accumulation "
        "does not help: each micro-batch is measured on its own), or with several processes turn on lbe_sync_entropy "
        "to pool their batches."
    )


def nothing_to_measure(model: nn.Module) -> bool:
    """Whether, by its structure, `model` has nothing LBE could measure by default: no activation, Linear or Conv module
    to hook, and no hidden states (its forward does not take `output_hidden_states`, or it has no layers at all)."""
    return not default_target_modules(model) and (not accepts_hidden_states(model) or not any(model.children()))


def check_model(model: nn.Module, target_modules: Any) -> None:
    """Raise the `ValueError` that says what to set where `model`'s structure offers LBE nothing to measure: no module
    matches `target_modules`, or (without them) `nothing_to_measure`."""
    if target_modules is not None or nothing_to_measure(model):
        resolve_target_modules(model, target_modules)
