"""Everything hf-batch-entropy relies on in transformers, accelerate, DeepSpeed and torch beyond their documented APIs.

The trainer is a mixin on `transformers.Trainer`: it overrides public hooks where they exist, but a few behaviours it
needs are implicit in `Trainer`'s code, and a few values are only reachable through private attributes. All of them
are here, each with what we use, why, and the test in `tests/test_compat.py` that fails if a release changes it, so
that an upgrade breaks one named test instead of the numbers silently.

Private reads (functions below):

- `grad_scaler_scale`: `torch.amp.GradScaler._scale`, the scale as a device tensor (`get_scale()` would read it on the
  host and make the step wait for the device). α's gradient is unscaled with it under fp16.
- `deepspeed_loss_scale`: DeepSpeed's fp16 loss scale, `engine.optimizer.loss_scale`.
- `inner_optimizer`: accelerate's `AcceleratedOptimizer.optimizer`, the torch optimizer it wraps (its Adam flavour is
  the one α's AdamW copies).
- `lambda_lr_factor`: `LambdaLR.lr_lambdas[0](last_epoch)`, the exact factor Trainer's schedule gave the step.
- `order_backward`: torch autograd's `Node._sequence_nr` / `_set_sequence_nr`, which order the estimator's backward
  next to its layers' (only the order of the backward moves; skipped where missing).

Implicit contracts of `Trainer` (no function; each has its test):

- (a) `training_step`'s return value is exactly what `Trainer` adds to the loss it logs (`_tr_loss += tr_loss_step`).
- (b) `"loss" in logs` marks a training log, and a training log comes every `logging_steps` optimizer steps. Trainer
  has already reset its own window start when it calls `log()`, so the mixin counts the window from the
  `global_step` of its previous training log, and averages the LBE metrics over the same steps as "loss".
- (c) `on_optimizer_step` fires after `optimizer.step()` and before `lr_scheduler.step()`: α steps at the factor the
  model's step had.
- (d) checkpoints are written through `save_model(output_dir, _internal_call=True)`, so overriding `save_model` puts the
  regularizer's files into every checkpoint; `_internal_call` keeps Hub pushes to `push_to_hub`'s own.
- (e) `Trainer.optimizer is None` until the first `train()` creates it (unless the user passed one): a new optimizer
  means a fresh run, whose layers and targets are found anew.
- (f) `_load_best_model()` is the one place `load_best_model_at_end` loads the best checkpoint; overriding it restores
  that checkpoint's α with the model.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["deepspeed_loss_scale", "grad_scaler_scale", "inner_optimizer", "lambda_lr_factor", "order_backward"]


def grad_scaler_scale(scaler: Any) -> torch.Tensor | float:
    """The current scale of a `GradScaler`: the device tensor where torch keeps one, else `get_scale()`."""
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else scaler.get_scale()


def deepspeed_loss_scale(engine: Any) -> float | None:
    """The fp16 loss scale of a DeepSpeed engine's optimizer, or None where it has none (bf16, fp32)."""
    return getattr(getattr(engine, "optimizer", None), "loss_scale", None)


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` (the optimizer itself when not wrapped)."""
    return getattr(optimizer, "optimizer", optimizer)


def lambda_lr_factor(scheduler: Any) -> float | None:
    """`λ(step)` of a plain `LambdaLR` (every schedule of `transformers.get_scheduler` but the plateau and
    Adafactor ones), the factor its last step applied to each group's base rate; None for any other scheduler."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and (
        type(scheduler).get_lr is torch.optim.lr_scheduler.LambdaLR.get_lr
    ):
        return scheduler.lr_lambdas[0](scheduler.last_epoch)
    return None


def order_backward(output: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    """Give `output`'s autograd node the highest sequence number among `inputs`' nodes, so that autograd runs it just
    before the deepest of them in the backward. Returns False (nothing changed) where torch lacks the private hook,
    under `torch.compile`, or without a graph."""
    if torch.compiler.is_compiling():
        return False
    node = output.grad_fn
    if node is None or not hasattr(node, "_set_sequence_nr"):
        return False
    numbers = [x.grad_fn._sequence_nr() for x in inputs if x.grad_fn is not None]
    if not numbers:
        return False
    node._set_sequence_nr(max(numbers))
    return True
