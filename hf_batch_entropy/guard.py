"""The guard against a silent run without LBE.

With `lbe_beta > 0`, a logging window of training steps none of which was regularized is an error that names the
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

__all__ = ["RegularizationGuard"]

_COUNTS = ("micro_batches", "ours", "regularized", "tails")


class RegularizationGuard:
    """Per-window counts of the trainer's micro-batches and the check at the end of each window (`check`)."""

    def __init__(self) -> None:
        self.window = dict.fromkeys(_COUNTS, 0)
        self.regularized_in_run = 0

    def start_run(self) -> None:
        """A `train()` call starts: nothing counted yet."""
        self.window = dict.fromkeys(_COUNTS, 0)
        self.regularized_in_run = 0

    def count(self, name: str) -> None:
        """One more micro-batch of kind `name` (`micro_batches`, `ours`, `regularized`, `tails`) in this window."""
        self.window[name] += 1
        if name == "regularized":
            self.regularized_in_run += 1

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
