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
- `squared_difference`, `squared_difference_backward`: ATen's `mse_loss` without reduction (`torch._C._nn.mse_loss`
  with `out=`) and its backward op (`aten::mse_loss_backward.grad_input`), the fused estimator's one-operation
  `(x − μ)²` and `2·(x − μ)·g` per layer; each rounds as the two operations it replaces (`sub` then `square`;
  `sub` then `mul` by the doubled gradient), which the test checks bit for bit.
- `prepare_inputs`: `Trainer._prepare_inputs`, which moves a batch to the device as `prediction_step` will (the
  mixin measures an unlabelled prediction batch with those tensors).
- `CONV_LAYERS`: `torch.nn.modules.conv._ConvNd`, the base class of every `Conv`/`ConvTranspose` layer (the default
  hook targets of a model without activation modules).
- `prompt_learning_config`: PEFT's `PeftModel.active_peft_config` and its `num_virtual_tokens`, `peft_type`,
  `is_prompt_learning` (the virtual tokens a prompt-learning model prepends to every sequence).
- `quiet_deepspeed_cpu_notice`: DeepSpeed's logger (`logging.getLogger("DeepSpeed")`) and the text of the warning its
  import logs where it finds no accelerator ("Setting accelerator to CPU. ..."). `Trainer` imports DeepSpeed where it
  is installed (accelerate's `unwrap_model` asks whether the model is a `DeepSpeedEngine`); on a CPU that warning is
  no news, so importing `hf_batch_entropy` drops that one record. DeepSpeed chooses its accelerator exactly as before
  (`DS_ACCELERATOR` still overrides it) and every other DeepSpeed message passes.
- `packs_sequences`: TRL's `SFTConfig.packing` / `padding_free` and `SFTTrainer.padding_free` (a batch size of one may
  still hold several sequences).

Copies of `Trainer`'s decisions (functions below; each test compares the copy with what `Trainer` does):

- `prediction_uses_compute_loss`: whether `Trainer.prediction_step` (or `Seq2SeqTrainer`'s) computes the batch's loss
  through `compute_loss` (labels present, or `return_loss` without label names), or runs the model directly.
- `generation_loss_forward`: whether `Seq2SeqTrainer.prediction_step` generates and then runs the labelled batch
  through the model directly for its loss (`predict_with_generate` with labels).
- `model_card_path`: `Trainer.create_model_card` writes the card to `<output_dir>/README.md`; the mixin appends its
  section there.

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
- (g) `Trainer` sends every event through `self.callback_handler`, a `CallbackHandler` whose methods (`on_*`) call the
  callbacks in its `callbacks` list; the mixin gives that one handler object a subclass with its own reactions to two
  events, so that α's step is not a callback in the user's list.
- (h) `Trainer._clip_grad_norm(model)`: with `max_grad_norm > 0`, `Trainer` clips through this one method, once per
  optimizer step and before `on_pre_optimizer_step`, and logs what it returns as `grad_norm`. The repository's
  frontier experiment (`experiments/frontier/runs.py`, not part of the package) overrides it with a faster clip that
  gives the same gradients bit for bit.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

__all__ = [
    "CONV_LAYERS",
    "deepspeed_loss_scale",
    "grad_scaler_scale",
    "inner_optimizer",
    "lambda_lr_factor",
    "model_card_path",
    "order_backward",
    "packs_sequences",
    "prediction_uses_compute_loss",
    "prepare_inputs",
    "prompt_learning_config",
    "quiet_deepspeed_cpu_notice",
    "squared_difference",
    "squared_difference_backward",
]

CONV_LAYERS: type[torch.nn.Module] = torch.nn.modules.conv._ConvNd

#: The start of the message DeepSpeed logs when it finds no accelerator (deepspeed/accelerator/real_accelerator.py).
DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it"


class _DropDeepSpeedCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DEEPSPEED_CPU_NOTICE)


def quiet_deepspeed_cpu_notice() -> None:
    """Drop DeepSpeed's CPU fallback notice from its logger, once per process (the logger need not exist yet:
    DeepSpeed configures the same `logging.getLogger("DeepSpeed")` object when it is imported, and keeps its filters)."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropDeepSpeedCpuNotice) for f in logger.filters):
        logger.addFilter(_DropDeepSpeedCpuNotice())


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


# `at::Reduction::None`, `mse_loss`'s `reduction` argument for no reduction.
_NO_REDUCTION = 0


def squared_difference(x: torch.Tensor, target: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`(x − target)²` elementwise in one pass (rounds as `sub` then `square`), into `out` where given (may be `x`)."""
    if out is not None:
        return torch._C._nn.mse_loss(x, target, _NO_REDUCTION, out=out)
    return torch._C._nn.mse_loss(x, target, _NO_REDUCTION)


def squared_difference_backward(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """`2·(x − mean)·grad` elementwise in one pass into a fresh tensor (rounds as `(x − mean)·(2·grad)`; doubling is
    exact): the gradient of `Σ (x − mean)²` with `mean` held constant. `grad` and `mean` broadcast against `x`."""
    return torch.ops.aten.mse_loss_backward.grad_input(grad, x, mean, _NO_REDUCTION, grad_input=torch.empty_like(x))


def prepare_inputs(trainer: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch as `Trainer` hands it to the model: tensors on the device (`Trainer._prepare_inputs`). Preparing a
    prepared batch again changes nothing."""
    return trainer._prepare_inputs(inputs)


def prediction_uses_compute_loss(trainer: Any, inputs: dict[str, Any], prediction_loss_only: bool, base: type) -> bool:
    """Whether `base.prediction_step` (the trainer class's, `Trainer` or `Seq2SeqTrainer`) goes through
    `compute_loss` for this batch, as it decides: with generation (`predict_with_generate`, not loss only) it generates,
    which counts as yes (not a batch to measure by hooks); otherwise when every label name has a value in the batch, or
    there are no label names and the model returns a loss (`return_loss` in the batch, else `can_return_loss`).
    A trainer whose `base` is neither (TRL's) has its own `prediction_step`, assumed to call `compute_loss`."""
    from transformers import Seq2SeqTrainer, Trainer

    if getattr(trainer.args, "predict_with_generate", False) and not prediction_loss_only:
        return True  # generation: its forwards are decoding steps, not batches of sequences
    if base not in (Trainer, Seq2SeqTrainer):
        return True  # a base trainer's own prediction_step (TRL's calls compute_loss for every batch)
    label_names = trainer.label_names
    has_labels = bool(label_names) and all(inputs.get(k) is not None for k in label_names)
    return_loss = inputs.get("return_loss")
    if return_loss is None:
        return_loss = trainer.can_return_loss
    return has_labels or (not label_names and bool(return_loss))


def generation_loss_forward(trainer: Any, inputs: dict[str, Any], prediction_loss_only: bool, base: type) -> bool:
    """Whether `base.prediction_step` is `Seq2SeqTrainer`'s generating one for this batch and, after generating, runs
    the labelled batch through the model itself (teacher forcing, under `no_grad`, not through `compute_loss`) for
    its loss: `predict_with_generate`, not loss only, and `labels` in the batch (its own test, `"labels" in inputs`)."""
    from transformers import Seq2SeqTrainer

    return (
        base is Seq2SeqTrainer and bool(getattr(trainer.args, "predict_with_generate", False))
        and not prediction_loss_only and "labels" in inputs
    )


def packs_sequences(trainer: Any) -> bool:
    """Whether the trainer's batches concatenate several sequences into one row: TRL's `packing` or `padding_free`
    (in its config, or as `SFTTrainer` resolves it on itself), or `transformers.DataCollatorWithFlattening`."""
    from transformers import DataCollatorWithFlattening

    return bool(
        getattr(trainer.args, "packing", False) or getattr(trainer.args, "padding_free", False)
        or getattr(trainer, "padding_free", False) or isinstance(trainer.data_collator, DataCollatorWithFlattening)
    )


def prompt_learning_config(model: Any) -> tuple[str, int] | None:
    """A PEFT prompt-learning model's method (`"PROMPT_TUNING"`, `"P_TUNING"`, `"PREFIX_TUNING"`, ...) and number of
    virtual tokens, from its `active_peft_config`; `None` for any other model (LoRA included)."""
    config = getattr(model, "active_peft_config", None) if model is not None else None
    if config is None or not getattr(config, "is_prompt_learning", False):
        return None
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    return str(peft_type), int(getattr(config, "num_virtual_tokens", None) or 0)


def model_card_path(output_dir: str) -> str:
    """Where `Trainer.create_model_card` writes the card."""
    return os.path.join(output_dir, "README.md")
