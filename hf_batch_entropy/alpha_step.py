"""α's step beside the model's: its optimizer's implementation, its schedule factor, its gradient's unscaling.

The targets `α` are trained by the regularizer's own AdamW (`BatchEntropyRegularizer.configure_optimizer`/`step`), not
by the model's optimizer, so that `Trainer`'s optimizer and scheduler see model parameters only. `AlphaStepper` makes
that AdamW step as if `α` were a parameter group of the model's optimizer:

- the same torch Adam implementation (`fused`, `foreach`: `adam_implementation`), so that the updates are
  bit-identical to those of an `α` inside that optimizer (as the paper trains it);
- once per optimizer step that `Trainer` takes, none on a step it skips (an fp16 overflow), at the factor the main
  schedule gave that step (`ScheduleFactor`);
- after the loss scaling of fp16 training is taken out of `α`'s gradient, as the scaler takes it out of the model's.

`AlphaStepper.before_optimizer_step` and `after_optimizer_step` run right before and right after `optimizer.step()`:
`Trainer`'s `on_pre_optimizer_step` and `on_optimizer_step` events, which `attach_alpha_step` hooks into its callback
handler without adding a callback to the user's list (`Trainer` has no public hook between the optimizer's step and
the scheduler's other than a callback, and a callback would be one of the user's).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.trainer_callback import CallbackHandler

from ._compat import deepspeed_loss_scale, grad_scaler_scale, inner_optimizer, lambda_lr_factor

__all__ = ["AlphaStepper", "ScheduleFactor", "adam_implementation", "attach_alpha_step"]


def adam_implementation(model_optimizer: Any) -> dict[str, Any]:
    """The `fused`/`foreach` switches of the model's torch Adam/AdamW (unwrapped from accelerate's wrapper), for α's
    AdamW; `{}` (torch's default) for any other optimizer."""
    optimizer = inner_optimizer(model_optimizer)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return {key: optimizer.defaults.get(key) for key in ("fused", "foreach")}
    return {}


class ScheduleFactor:
    """The main schedule's current factor: α's learning rate is `lbe_alpha_learning_rate` (or `learning_rate`) times
    it, so warm-up and decay apply to α as to the model. Defined for every scheduler and optimizer:

    - a `LambdaLR` (Trainer's own schedules, `get_scheduler`): exactly its `λ(step)`, the factor the model's step got,
      as for a parameter group of its own;
    - a torch scheduler that records the rate it scales (`initial_lr` in the model optimizer's first group): the
      model's current rate over that one, `lr / initial_lr`;
    - otherwise (`ReduceLROnPlateau`, `AdafactorSchedule` and Adafactor's relative steps, a user's own scheduler): the
      model's current rate relative to the largest it has had so far, `lr_t / max_{s≤t} lr_s`. It starts at 1,
      follows every decay, and is 1 where the model's rate is not a number or has been 0 all along (so α still moves
      at a rate of its own). That largest rate (`peak`) is state: it travels with the checkpoint (`state_dict`), so
      that a resumed run continues with the same factor.

    Never a ratio to `args.learning_rate`, which a user's optimizer need not use.
    """

    def __init__(self) -> None:
        self.peak = 0.0  # the largest model learning rate seen where the factor is relative to it

    def __call__(self, optimizer: Any, scheduler: Any) -> float:
        """The factor for α's step now, from the model's `optimizer` (wrapped or not) and `scheduler` (or `None`)."""
        factor = lambda_lr_factor(scheduler)
        if factor is not None:
            # Exactly the factor the scheduler applied to the model's step (base · λ), as for a group of its own.
            return factor
        group = optimizer.param_groups[0]
        lr = group.get("lr")
        if not isinstance(lr, (int, float)) and scheduler is not None and hasattr(scheduler, "get_last_lr"):
            lr = scheduler.get_last_lr()[0]
        if not isinstance(lr, (int, float)) or not math.isfinite(lr):
            return 1.0
        base = group.get("initial_lr")
        if isinstance(base, (int, float)) and base > 0:
            return lr / base
        self.peak = max(self.peak, lr)
        return lr / self.peak if self.peak > 0 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"peak_lr": self.peak}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore `state_dict()`'s values; a missing entry (a checkpoint written before it was saved) keeps the
        current one."""
        self.peak = float(state.get("peak_lr", self.peak))


class AlphaStepper:
    """Steps α's optimizer once per optimizer step of the model's, at the model schedule's factor: the one place that
    decides when α steps, at which rate and with which gradient. `attach(trainer)` hooks it into a trainer's events.

    Attributes:
        factor: the `ScheduleFactor` (its state is saved with α's, see `BatchEntropyRegularizer.save_pretrained`).
    """

    def __init__(self) -> None:
        self.factor = ScheduleFactor()

    def attach(self, trainer: Any) -> None:
        """Step `trainer.regularizer`'s α around each of `trainer`'s optimizer steps (`attach_alpha_step`)."""
        attach_alpha_step(trainer, self)

    @staticmethod
    def configure_optimizer(regularizer: Any, args: Any, model_optimizer: Any) -> None:
        """Give `regularizer`'s α its AdamW: at `args.lbe_alpha_learning_rate` (default: `learning_rate`), with the
        arguments' Adam betas and epsilon and the model optimizer's torch implementation (`adam_implementation`)."""
        regularizer.configure_optimizer(
            args.lbe_alpha_learning_rate if args.lbe_alpha_learning_rate is not None else args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            **adam_implementation(model_optimizer),
        )

    @staticmethod
    def unscale(grad: torch.Tensor | None, scaler: Any = None, deepspeed_engine: Any = None) -> None:
        """Take fp16 loss scaling out of α's gradient `grad`, in place: the loss was scaled with the model's, but the
        scaler unscales only the model's gradients. `scaler`: accelerate's `GradScaler` (or `None`);
        `deepspeed_engine`: a DeepSpeed engine training in fp16, which scales the loss inside itself (or `None`).
        Nothing is read on the host."""
        if grad is None:
            return
        if scaler is not None and scaler.is_enabled():
            scale = grad_scaler_scale(scaler)  # the scale tensor: dividing by it reads nothing on the host
            grad.div_(scale.to(grad.device) if isinstance(scale, torch.Tensor) else scale)
        elif deepspeed_engine is not None:
            # fp16 under DeepSpeed is not in the CPU tests.
            scale = deepspeed_loss_scale(deepspeed_engine)
            if scale is not None:
                grad.div_(scale)

    def step(self, regularizer: Any, optimizer: Any, scheduler: Any, skipped: bool = False) -> None:
        """After the model's `optimizer.step()` and before `scheduler.step()`: α's step at the factor the model's step
        had (`regularizer.step(factor)`), or, where the model's step was `skipped` (fp16 overflow), no step and α's
        gradient dropped."""
        if regularizer is None:
            return
        if skipped:
            regularizer.alpha.grad = None
            return
        regularizer.step(self.factor(optimizer, scheduler))

    def before_optimizer_step(self, trainer: Any) -> None:
        """`unscale` with what `trainer` trains with (its accelerator's scaler, its DeepSpeed engine under fp16)."""
        regularizer = trainer.regularizer
        deepspeed_fp16 = trainer.is_deepspeed_enabled and trainer.args.fp16
        self.unscale(regularizer.alpha.grad if regularizer is not None else None, trainer.accelerator.scaler,
                     trainer.model_wrapped if deepspeed_fp16 else None)

    def after_optimizer_step(self, trainer: Any) -> None:
        """`step` with `trainer`'s regularizer, optimizer and scheduler, skipped where its accelerator skipped."""
        self.step(trainer.regularizer, trainer.optimizer, trainer.lr_scheduler,
                  skipped=trainer.accelerator.optimizer_step_was_skipped)

    def reset(self) -> None:
        """A new optimizer: a new schedule, whose factor starts afresh."""
        self.factor = ScheduleFactor()


class _AlphaStepEvents(CallbackHandler):
    """`Trainer`'s callback handler, which also steps α around each optimizer step (after the user's callbacks) without
    being a callback itself: `callback_handler.callbacks` and `add/pop/remove_callback` stay the user's."""

    def on_pre_optimizer_step(self, args, state, control):
        control = super().on_pre_optimizer_step(args, state, control)
        self._lbe_alpha_step.before_optimizer_step(self._lbe_trainer)
        return control

    def on_optimizer_step(self, args, state, control):
        control = super().on_optimizer_step(args, state, control)
        self._lbe_alpha_step.after_optimizer_step(self._lbe_trainer)
        return control


def attach_alpha_step(trainer: Any, stepper: AlphaStepper) -> None:
    """Make `trainer`'s callback handler call `stepper.before_optimizer_step(trainer)` on `on_pre_optimizer_step` and
    `stepper.after_optimizer_step(trainer)` on `on_optimizer_step`, after the user's callbacks (`_compat`, contract
    (g)): the handler object keeps its state and its list, and gets a subclass of its own class."""
    handler = trainer.callback_handler
    handler.__class__ = type(f"LBE{type(handler).__name__}", (_AlphaStepEvents, type(handler)), {})
    handler._lbe_alpha_step, handler._lbe_trainer = stepper, trainer
