"""`BatchEntropyTrainer`: `transformers.Trainer` with layerwise batch-entropy regularization.

The glue lives in a mixin, `BatchEntropyMixin`, which gives LBE to any `Trainer` subclass: `BatchEntropyTrainer`
(`Trainer`), `BatchEntropySeq2SeqTrainer` (`Seq2SeqTrainer`), or your own, e.g. TRL's `SFTTrainer`:

    class SFTWithLBETrainer(BatchEntropyMixin, SFTTrainer):
        pass

It only glues the pieces into `Trainer`'s hooks:

- `compute_loss`: the task loss as `Trainer` computes it (label smoothing, `compute_loss_func`, `num_items_in_batch`
  included), captured activations → the batch's sequences and real tokens (`tokens.TokenLayout`: padded, packed or
  with virtual tokens) → entropies → `L_task · (1 + β·mean_l lbe_l)`. The first call chooses where the activations
  come from (`capture.select_capture`, at the first forward the trainer runs, never a forward of its own); the
  forward measured is the one with gradients, masked with the inputs it got; the first training call
  builds the `BatchEntropyRegularizer`, by then on the model's device and after any wrapping (DDP, FSDP2,
  DeepSpeed), whoever built the optimizer;
- `training_step` / `log`: a guard: with `lbe_beta > 0`, a logging window without a regularized step is an error
  that names the cause, never a silent run without LBE;
- `on_pre_optimizer_step` / `on_optimizer_step` (an internal callback): `α` is trained by the regularizer's own AdamW,
  once per optimizer step that `Trainer` takes, at the main schedule's factor; `Trainer`'s optimizer and scheduler
  see model parameters only;
- `log` / `evaluation_loop` / `prediction_step`: named LBE metrics, summed on the device per mode and reduced across
  processes once per logging window (training) or per `evaluate()` / `predict()` call (with or without labels); the
  NaN/inf check reads its tally there too, so the training step never synchronizes with the host;
- `save_model` / `train(resume_from_checkpoint=...)` / `_load_best_model`: `α` and its optimizer state travel with
  every checkpoint and the final folder; the model's own files stay plain Transformers files.

What it relies on in `Trainer`, accelerate and torch beyond their public APIs (private attributes, the order of
hooks) is named in `_compat`, each with a test in `tests/test_compat.py`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers import DataCollatorWithFlattening, Seq2SeqTrainer, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from ._compat import deepspeed_loss_scale, grad_scaler_scale, inner_optimizer, lambda_lr_factor
from .capture import select_capture
from .config import BatchEntropyConfig, BatchEntropySeq2SeqConfig, with_batch_entropy_fields
from .entropy import batch_entropies, is_measurable
from .modelcard import MODEL_TAG, SECTION_TITLE, model_card_section
from .regularizer import REGULARIZER_CONFIG_NAME, BatchEntropyRegularizer, raise_if_nonfinite
from .tokens import TokenLayout

logger = logging.get_logger(__name__)

__all__ = ["BatchEntropyMixin", "BatchEntropySeq2SeqTrainer", "BatchEntropyTrainer"]

# Metrics summed per logging window that are per optimizer step, like Trainer's "loss"; the others are per measured
# forward pass (`measured` counts those).
_PER_STEP = ("task_loss", "lbe_loss")


class _AlphaStep(TrainerCallback):
    """Steps the regularizer's optimizer right after each optimizer step of `Trainer`, before the scheduler moves."""

    def __init__(self, trainer: BatchEntropyMixin):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._unscale_alpha_grad()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._step_alpha()


def _with_lbe_args(
    base_init: Any, pos_args: tuple, kwargs: dict[str, Any], default_class: type | None
) -> tuple[tuple, dict[str, Any]]:
    """The base trainer's constructor arguments with its `args` upgraded to carry the `lbe_*` fields (or, where none
    was given and the trainer has one, `default_class(output_dir="trainer_output")`), in the same position or keyword.

    Where `base_init` takes no `args` parameter, or the arguments do not bind to its signature, they are returned
    unchanged: the base constructor reports its own error, and the arguments it builds are upgraded after it."""
    try:
        signature = inspect.signature(base_init)
        bound = signature.bind_partial(*pos_args, **kwargs)
    except (TypeError, ValueError):
        return pos_args, kwargs
    if "args" not in signature.parameters:
        return pos_args, kwargs
    value = bound.arguments.get("args")
    if value is None and default_class is not None:
        bound.arguments["args"] = default_class(output_dir="trainer_output")
    elif value is not None:
        bound.arguments["args"] = with_batch_entropy_fields(value)
    return bound.args, bound.kwargs


class BatchEntropyMixin:
    """Adds layerwise batch-entropy regularization (LBE) to the training loss of the `Trainer` subclass it is mixed
    into (list it first: `class T(BatchEntropyMixin, SomeTrainer)`).

    Same constructor and behaviour as that trainer; `args` carries the `lbe_*` fields (`BatchEntropyConfig`,
    `BatchEntropySeq2SeqConfig`, or `batch_entropy_config(YourArgs)`); arguments without them are upgraded with the
    default `lbe_*` settings. With `lbe_beta=0` the losses and updates are exactly the base trainer's.

    Attributes:
        regularizer: the `BatchEntropyRegularizer` (its `alpha` has one entry per regularized layer, its `optimizer`
            trains them). Built at the first training step; `None` before.
    """

    _default_args_class: type | None = None  # what `args=None` becomes; None: the base trainer's default, upgraded

    def __init__(self, *pos_args, **kwargs):
        # The base trainer's own signature decides where `args` is (`Trainer(model, args, ...)`, but
        # `DPOTrainer(model, ref_model, args, ...)`, `GRPOTrainer(model, reward_funcs, args, ...)`).
        pos_args, kwargs = _with_lbe_args(super().__init__, pos_args, kwargs, self._default_args_class)
        super().__init__(*pos_args, **kwargs)
        if not hasattr(self.args, "lbe_beta"):
            self.args = with_batch_entropy_fields(self.args)
        self.regularizer: BatchEntropyRegularizer | None = None
        self._capture = None
        self._tokens: TokenLayout | None = None
        self._layer_names: list[str] = []
        self._resume_from: str | None = None
        self._lr_peak = 0.0  # the largest model learning rate seen, for α's schedule factor (see `_lr_factor`)
        # The guard's host-side counts over the logging window (see `_check_window`): micro-batches trained, those that
        # reached our compute_loss, those regularized, and regularized ones since training started.
        self._window = {"micro_batches": 0, "ours": 0, "regularized": 0}
        self._regularized_in_run = 0
        self._warned_unmeasured = False
        self._step_lbe = None  # the LBEOutput of the micro-step in flight, from compute_loss to training_step
        self._lbe_metrics: dict[str, dict[str, torch.Tensor]] = {}  # mode → name → sum on the device
        self._window_start: dict[str, int] = {}
        self._warned_batch_of_one = False
        self.add_callback(_AlphaStep(self))
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags([MODEL_TAG])

    # --- training ----------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; `α` and its optimizer state come back from `resume_from_checkpoint` when it has them."""
        self._check_batch_size()
        if self.model_init is not None or self.optimizer is None:
            # A new model or a new optimizer: new layers to find, new targets α to learn.
            self._reset()
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            # As Trainer: the last checkpoint, and an error where there is none (not a run from scratch).
            output_dir = self.args.output_dir
            resume_from_checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
        self._resume_from = resume_from_checkpoint or None
        if self.regularizer is not None and self._resume_from is not None:
            self._load_regularizer(self._resume_from)
        self._window = dict.fromkeys(self._window, 0)
        self._regularized_in_run = 0
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        if self.regularizer is None and self._resume_from is not None:
            # A finished run resumed: no step was left to build the regularizer, but its α is the run's.
            self._restore_regularizer(self._resume_from)
        self._check_window()  # the steps after the last log are a window too
        self._flush("train")  # the steps after the last log: nothing to report, but a NaN among them is an error
        return output

    def _restore_regularizer(self, checkpoint: str) -> None:
        """Build the regularizer from a checkpoint's files alone (its layer names and α), where no training step
        built it; the next forward checks that the model's layers are those."""
        if not os.path.isfile(os.path.join(checkpoint, REGULARIZER_CONFIG_NAME)):
            self._resume_from = None
            return
        self._layer_names = list(BatchEntropyRegularizer.read_settings(checkpoint)["layer_names"])
        self._build_regularizer()

    def _packs_sequences(self) -> bool:
        """Whether the batches concatenate several sequences into one row (packing, padding-free), so that a batch
        size of one can still hold several sequences."""
        return bool(
            getattr(self.args, "packing", False) or getattr(self.args, "padding_free", False)
            or getattr(self, "padding_free", False) or isinstance(self.data_collator, DataCollatorWithFlattening)
        )

    def _check_batch_size(self) -> None:
        if self._packs_sequences():
            return  # one packed row holds several sequences; the guard catches a run where none had two
        if not is_measurable(self.args.train_batch_size, self.args.lbe_sync_entropy):
            raise ValueError(
                f"Batch-entropy is a statistic over the batch and needs at least 2 examples per forward pass, but "
                f"per_device_train_batch_size is {self.args.per_device_train_batch_size}. Use a batch size of 2 or "
                "more (gradient accumulation does not help: each micro-batch is measured on its own), or with several "
                "processes turn on lbe_sync_entropy to pool their batches."
            )

    def _reset(self) -> None:
        if self._capture is not None:
            self._capture.remove()
        self._capture, self._tokens, self._layer_names, self.regularizer = None, None, [], None
        self._lbe_metrics, self._window_start = {}, {}
        self._lr_peak = 0.0

    def _select_capture(self, model: torch.nn.Module) -> None:
        """Decide where the regularized activations come from (`capture.select_capture`: from the model, and where
        that needs a forward, at the first one the trainer runs; never a forward of its own)."""
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        self._capture = select_capture(unwrapped, self.args.lbe_target_modules)
        self._tokens = TokenLayout(unwrapped)
        self._layer_names = []

    def _collect(self, outputs: Any, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The activations of the forward just captured, as sequences with their masks (`TokenLayout.views`, on the
        inputs that forward got); the first one fixes the layer names."""
        activations, names = self._capture.collect(outputs)
        if not self._layer_names and names:
            self._set_layer_names(names)
        return self._tokens.views(self._capture.inputs_seen(inputs), activations, names, self.args.lbe_ignore_padding)

    def _set_layer_names(self, names: list[str]) -> None:
        if self.args.lbe_beta > 0:
            logger.info(f"LBE regularizes these {len(names)} layers (lbe_beta={self.args.lbe_beta}).")
        else:
            logger.info(f"lbe_beta=0: the batch-entropy of these {len(names)} layers is measured and logged; the loss "
                        "is not regularized.")
        if self.regularizer is not None and list(names) != self.regularizer.layer_names:
            # A regularizer restored from a checkpoint before any forward (a finished run): its α must be this model's.
            raise ValueError(
                "The batch-entropy regularizer restored from the checkpoint belongs to other layers than this model's.\n"
                f"  checkpoint ({self.regularizer.num_layers}): {self.regularizer.layer_names}\n"
                f"  model ({len(names)}): {list(names)}\n"
                "Use the same model and lbe_target_modules as the checkpoint."
            )
        self._layer_names = list(names)

    def _build_regularizer(self) -> BatchEntropyRegularizer:
        args = self.args
        regularizer = BatchEntropyRegularizer.from_config(
            args, len(self._layer_names), layer_names=self._layer_names, check_finite=False
        ).to(args.device)
        regularizer.configure_optimizer(
            args.lbe_alpha_learning_rate if args.lbe_alpha_learning_rate is not None else args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            **self._alpha_optimizer_implementation(),
        )
        self.regularizer = regularizer
        if self._resume_from is not None:
            self._load_regularizer(self._resume_from)
        return regularizer

    def _alpha_optimizer_implementation(self) -> dict[str, Any]:
        # The model's torch Adam/AdamW implementation (fused, foreach), so that α's updates are bit-identical to those
        # of an α inside that optimizer (as the paper trains it). For any other optimizer torch's default.
        optimizer = inner_optimizer(self.optimizer)
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return {key: optimizer.defaults.get(key) for key in ("fused", "foreach")}
        return {}

    def _unscale_alpha_grad(self) -> None:
        # Trainer's loss scaling (fp16) scaled α's gradient with the model's; the scaler unscales only the model's.
        grad = self.regularizer.alpha.grad if self.regularizer is not None else None
        if grad is None:
            return
        scaler = self.accelerator.scaler
        if scaler is not None and scaler.is_enabled():
            scale = grad_scaler_scale(scaler)  # the scale tensor: dividing by it reads nothing on the host
            grad.div_(scale.to(grad.device) if isinstance(scale, torch.Tensor) else scale)
        elif self.is_deepspeed_enabled and self.args.fp16:
            # DeepSpeed scales the loss inside its engine (fp16 under DeepSpeed is not in the CPU tests).
            scale = deepspeed_loss_scale(self.model_wrapped)
            if scale is not None:
                grad.div_(scale)

    def _step_alpha(self) -> None:
        if self.regularizer is None:
            return
        if self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: Trainer skipped the model's step too
            self.regularizer.alpha.grad = None
            return
        self.regularizer.step(self._lr_factor())

    def _lr_factor(self) -> float:
        """The main schedule's current factor: α's learning rate is `lbe_alpha_learning_rate` (or `learning_rate`)
        times it, so warm-up and decay apply to α as to the model. Defined for every scheduler and optimizer:

        - a `LambdaLR` (Trainer's own schedules, `get_scheduler`): exactly its `λ(step)`, the factor the model's step
          got, as for a parameter group of its own;
        - a torch scheduler that records the rate it scales (`initial_lr` in the model optimizer's first group): the
          model's current rate over that one, `lr / initial_lr`;
        - otherwise (`ReduceLROnPlateau`, `AdafactorSchedule` and Adafactor's relative steps, a user's own scheduler):
          the model's current rate relative to the largest it has had so far, `lr_t / max_{s≤t} lr_s`. It starts at 1,
          follows every decay, and is 1 where the model's rate is not a number or has been 0 all along (so α still
          moves at a rate of its own).

        Never a ratio to `args.learning_rate`, which a user's optimizer need not use.
        """
        scheduler = self.lr_scheduler
        factor = lambda_lr_factor(scheduler)
        if factor is not None:
            # Exactly the factor the scheduler applied to the model's step (base · λ), as for a group of its own.
            return factor
        group = self.optimizer.param_groups[0]
        lr = group.get("lr")
        if not isinstance(lr, (int, float)) and scheduler is not None and hasattr(scheduler, "get_last_lr"):
            lr = scheduler.get_last_lr()[0]
        if not isinstance(lr, (int, float)) or not math.isfinite(lr):
            return 1.0
        base = group.get("initial_lr")
        if isinstance(base, (int, float)) and base > 0:
            return lr / base
        self._lr_peak = max(self._lr_peak, lr)
        return lr / self._lr_peak if self._lr_peak > 0 else 1.0

    # --- loss --------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        training = model.training
        if not (training or self.args.lbe_eval_entropy):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if training:
            self._window["ours"] += 1
        if self._capture is None:
            self._select_capture(model)
        user_wants_hidden_states = bool(inputs.get("output_hidden_states")) or bool(
            getattr(getattr(self.accelerator.unwrap_model(model, keep_torch_compile=False), "config", None), "output_hidden_states", False)
        )
        # The outputs only where someone needs them: the caller, or nn.DataParallel, whose replicas' hidden states
        # are gathered in the outputs alone. Otherwise the capture records them from the forward itself, and a base
        # trainer that would run a second forward to return outputs (TRL's SFTTrainer) does not.
        wants_outputs = return_outputs or isinstance(model, torch.nn.DataParallel)
        with self._capture.capturing():
            result = super().compute_loss(
                model, self._capture.prepare_inputs(inputs), return_outputs=wants_outputs,
                num_items_in_batch=num_items_in_batch,
            )
        loss, outputs = result if wants_outputs else (result, None)
        activations, masks = self._collect(outputs, inputs)
        if outputs is not None:
            outputs = self._capture.restore(outputs, keep_hidden_states=user_wants_hidden_states)
        if loss.dim() > 0:
            loss = loss.mean()  # nn.DataParallel: one loss per replica, averaged as Trainer's training_step does
        measurable = bool(activations) and is_measurable(activations[0].shape[0], self.args.lbe_sync_entropy)
        if training:
            loss = self._regularize(activations, loss, masks) if measurable else self._skip_batch_of_one(loss)
        elif measurable:  # a batch of one example (the last of an evaluation set) has no batch-entropy
            self._measure_eval(activations, masks)
        return (loss, outputs) if return_outputs else loss

    def _measure_eval(self, activations: list[torch.Tensor], masks: list[torch.Tensor | None]) -> None:
        with torch.no_grad():
            entropies, measured = batch_entropies(
                activations, fused=self.args.lbe_fused, sync=self.args.lbe_sync_entropy, masks=masks,
                return_measured=True,
            )
        self._tally("eval", entropies, measured)

    def _regularize(self, activations: list[torch.Tensor], task_loss: torch.Tensor, masks) -> torch.Tensor:
        regularizer = self.regularizer if self.regularizer is not None else self._build_regularizer()
        lbe = regularizer(activations, task_loss, masks)
        self._step_lbe = lbe
        self._window["regularized"] += 1
        self._regularized_in_run += 1
        self._tally("train", lbe.entropies, lbe.measured, lbe_alpha_mean=lbe.targets.mean())
        return lbe.loss

    def _skip_batch_of_one(self, task_loss: torch.Tensor) -> torch.Tensor:
        if not self._warned_batch_of_one:
            logger.warning(
                "A training batch holds a single example (sequence), which has no batch-entropy: it trains on the task "
                "loss alone. (Usually the last batch of an epoch; dataloader_drop_last=True drops it.) Said once."
            )
            self._warned_batch_of_one = True
        return task_loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        self._window["micro_batches"] += 1
        loss = super().training_step(model, inputs, num_items_in_batch)
        # `loss` is what Trainer adds to its logged "loss" (scaled for gradient accumulation as Trainer scales it):
        # split it into the task part and the LBE part in the same proportion, so that loss = task_loss + lbe_loss.
        lbe, self._step_lbe = self._step_lbe, None
        total = loss.float()
        task = total if lbe is None else total * torch.where(lbe.loss != 0, lbe.task_loss / lbe.loss, 1.0).float()
        self._add("train", task_loss=task, lbe_loss=total - task)
        return loss

    def _check_window(self) -> None:
        """The guard against a silent run without LBE: with `lbe_beta > 0`, a logging window of training steps none of
        which was regularized is an error naming the cause. Host-side counts only (nothing read on the device).

        A window of one micro-batch that is a batch of one, after regularized ones (the last batch of an epoch, logged
        on its own), is not an error: that batch trains on the task loss with one warning.
        """
        window, self._window = self._window, dict.fromkeys(self._window, 0)
        if self.args.lbe_beta == 0 or window["micro_batches"] == 0 or window["regularized"] > 0:
            return
        if window["micro_batches"] == 1 and self._regularized_in_run > 0:
            return
        steps = f"{window['micro_batches']} training batch(es) since the last log"
        if window["ours"] == 0:
            raise RuntimeError(
                f"LBE regularized none of the {steps}: {type(self).__name__}.compute_loss never reached "
                "BatchEntropyMixin.compute_loss, so the loss has no LBE term (lbe_beta="
                f"{self.args.lbe_beta}). A subclass that overrides compute_loss must call super().compute_loss(...) "
                "(for a custom loss, pass compute_loss_func= to the trainer instead); or set lbe_beta=0."
            )
        raise RuntimeError(
            f"LBE regularized none of the {steps}: each held a single sequence along the batch dimension, which has no "
            "batch-entropy. Either per_device_train_batch_size is 1 (use 2 or more, or lbe_sync_entropy with several "
            "processes), or the batches are packed/padding-free without sequence boundaries LBE can read (it needs "
            "cu_seq_lens_q, seq_idx or position_ids in the batch, as TRL's packing and DataCollatorWithFlattening "
            "give), or each packed row holds one sequence."
        )

    # --- prediction without labels ----------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """`Trainer.prediction_step`; with `lbe_eval_entropy`, a batch that `Trainer` runs through the model directly
        (no labels, so no `compute_loss`) is measured too, by hooks around that forward: the outputs it returns are
        those it would return without LBE."""
        if not self.args.lbe_eval_entropy or self._prediction_computes_loss(inputs, prediction_loss_only):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        if self._capture is None:
            self._select_capture(model)
        with self._measuring_forward(model, inputs):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def _prediction_computes_loss(self, inputs: dict[str, Any], prediction_loss_only: bool) -> bool:
        """Whether `prediction_step` goes through `compute_loss` (measured there), or generates (not measured), as
        `Trainer.prediction_step` and `Seq2SeqTrainer.prediction_step` decide."""
        if getattr(self.args, "predict_with_generate", False) and not prediction_loss_only:
            return True  # generation: its forwards are decoding steps, not batches of sequences
        mro = type(self).__mro__
        base = next(c for c in mro[mro.index(BatchEntropyMixin) + 1 :] if "prediction_step" in vars(c))
        if base not in (Trainer, Seq2SeqTrainer):
            return True  # a base trainer's own prediction_step (TRL's calls compute_loss for every batch)
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        return_loss = inputs.get("return_loss")
        if return_loss is None:
            return_loss = self.can_return_loss
        return has_labels or (not self.label_names and bool(return_loss))

    @contextlib.contextmanager
    def _measuring_forward(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Iterator[None]:
        """Around the first forward of `model` in this block: ask it for the captured activations, measure them
        (`eval` tally) and hand the caller the outputs without them."""
        capture, done = self._capture, []

        def before(module, args, kwargs):
            return (args, kwargs if done else capture.prepare_inputs(kwargs))

        def after(module, args, kwargs, output):
            if done:
                return output
            done.append(True)
            activations, masks = self._collect(output, inputs)
            if activations and is_measurable(activations[0].shape[0], self.args.lbe_sync_entropy):
                self._measure_eval(activations, masks)
            return capture.restore(output, keep_hidden_states=bool(inputs.get("output_hidden_states")))

        handles = [model.register_forward_pre_hook(before, with_kwargs=True),
                   model.register_forward_hook(after, with_kwargs=True)]
        try:
            with capture.capturing():
                yield
        finally:
            for handle in handles:
                handle.remove()

    # --- metrics -----------------------------------------------------------------------------------------------------

    def _add(self, mode: str, **values: torch.Tensor) -> None:
        """Add named values to this mode's tally (sums on the device, nothing read on the host)."""
        tally = self._lbe_metrics.get(mode)
        if tally is None:
            tally = self._lbe_metrics[mode] = {}
            self._window_start[mode] = self.state.global_step
        for name, value in values.items():
            value = value.detach().float()
            tally[name] = tally[name] + value if name in tally else value.clone()

    def _tally(
        self, mode: str, entropies: torch.Tensor, measured: torch.Tensor | None = None, **extra: torch.Tensor
    ) -> None:
        """The metrics of one forward pass: entropy mean/min over the measured layers, per-layer values and counts,
        NaN/inf count. `measured` `(L,)` bool says which layers had a batch-entropy (`None`: all); a pass without any
        counts in `passes` but not in `measured`, so that the means are over the passes that measured something."""
        ones = torch.ones((), device=entropies.device)
        if measured is None:
            mean, low, any_measured = entropies.mean(), entropies.min(), ones
            layers, per_layer = torch.ones_like(entropies), entropies
        else:
            weight = measured.to(entropies.dtype)
            any_measured = measured.any().to(entropies.dtype)
            mean = (entropies * weight).sum() / weight.sum().clamp_min(1)
            low = torch.where(measured, entropies, torch.inf).min().nan_to_num(posinf=0.0)
            layers, per_layer = weight, entropies * weight
        self._add(
            mode,
            passes=ones,
            measured=any_measured,
            batch_entropy_mean=mean,
            batch_entropy_min=low,
            batch_entropy_per_layer=per_layer,
            layers_measured=layers,
            nonfinite=(~torch.isfinite(entropies)).float(),
            **extra,
        )

    def _flush(self, mode: str) -> dict[str, Any]:
        """This mode's tally summed across processes (one reduce), then forgotten; raises on NaN/inf entropies.

        Returns the means: entropy metrics per measured forward pass, `_PER_STEP` ones per process (divide by the
        window's optimizer steps), `batch_entropy_per_layer` as a list. Empty when nothing was tallied.
        """
        tally = self._lbe_metrics.pop(mode, None)
        if not tally:
            return {}
        names = list(tally)
        flat = torch.cat([tally[name].reshape(-1) for name in names])
        if self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(flat, reduction="sum")
        values, offset, listed = {}, 0, flat.tolist()
        for name in names:
            size = tally[name].numel()
            values[name] = listed[offset] if tally[name].dim() == 0 else listed[offset : offset + size]
            offset += size
        if "nonfinite" in values:
            raise_if_nonfinite(torch.tensor(values.pop("nonfinite")), self._layer_names)
        measured = values.pop("measured", 0.0)
        passes = values.pop("passes", 0.0)
        layers = values.pop("layers_measured", None)
        if passes > measured and not self._warned_unmeasured:
            logger.warning(
                f"{int(passes - measured)} batch(es) had no position where two sequences hold a real token (e.g. all "
                "but one example empty): they have no batch-entropy and trained on the task loss alone. Said once."
            )
            self._warned_unmeasured = True
        means = {}
        for name, value in values.items():
            if name in _PER_STEP:
                means[name] = value / self.accelerator.num_processes
            elif name == "batch_entropy_per_layer" and layers is not None:
                means[name] = [v / n if n else float("nan") for v, n in zip(value, layers)]
            elif measured:
                means[name] = [v / measured for v in value] if isinstance(value, list) else value / measured
        return means

    def _entropy_logs(self, means: dict[str, Any], prefix: str = "") -> dict[str, float]:
        logs = {f"{prefix}{name}": value for name, value in means.items() if name != "batch_entropy_per_layer"}
        if self.args.lbe_log_per_layer and "batch_entropy_per_layer" in means:
            logs.update((f"{prefix}batch_entropy/layer_{i}", v) for i, v in enumerate(means["batch_entropy_per_layer"]))
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: Trainer's "loss" is averaged over the same window
            steps = max(1, self.state.global_step - self._window_start.get("train", self.state.global_step))
            self._check_window()
            means = self._flush("train")
            for name in _PER_STEP:
                if name in means:
                    means[name] /= steps
            logs.update(self._entropy_logs(means))
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """`Trainer.evaluation_loop`, plus the batch-entropies of this call (`lbe_eval_entropy`) in its metrics as
        `<metric_key_prefix>_batch_entropy_mean/min`. Each `evaluate()` / `predict()` call has a tally of its own."""
        self._lbe_metrics.pop("eval", None)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update(self._entropy_logs(self._flush("eval"), prefix=f"{metric_key_prefix}_"))
        return output

    # --- checkpoints and the Hub -------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.regularizer is not None and self.args.should_save:
            self.regularizer.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        if self.regularizer is not None:
            self._load_regularizer(self.state.best_model_checkpoint)  # the best weights' α, not the last step's

    def _load_regularizer(self, checkpoint: str) -> None:
        if not os.path.isfile(os.path.join(checkpoint, REGULARIZER_CONFIG_NAME)):
            logger.warning(
                f"{checkpoint} holds no batch-entropy regularizer (it was not written by BatchEntropyTrainer): the "
                f"targets α start from lbe_alpha={self.args.lbe_alpha}."
            )
        else:
            self.regularizer.load_state(checkpoint)
        self._resume_from = None

    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        """`Trainer`'s model card, tagged `batch-entropy`, with a section on LBE: its settings and the paper."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        if MODEL_TAG not in tags:
            tags.append(MODEL_TAG)
        super().create_model_card(*args, tags=tags, **kwargs)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, encoding="utf-8") as f:
            card = f.read()
        if SECTION_TITLE not in card:
            section = model_card_section(
                self.args.lbe_settings,
                self.regularizer.num_layers if self.regularizer is not None else None,
                self._capture.source if self._capture is not None else None,
            )
            with open(path, "w", encoding="utf-8") as f:
                f.write(card.rstrip("\n") + "\n" + section)


class BatchEntropyTrainer(BatchEntropyMixin, Trainer):
    """A `transformers.Trainer` that adds layerwise batch-entropy regularization (LBE) to the training loss.

    Same constructor and behaviour as `Trainer`; `args` is a `BatchEntropyConfig` (a `TrainingArguments` is accepted
    and upgraded with the default `lbe_*` settings). With `lbe_beta=0` the losses and updates are exactly `Trainer`'s.
    See `BatchEntropyMixin`.
    """

    _default_args_class = BatchEntropyConfig


class BatchEntropySeq2SeqTrainer(BatchEntropyMixin, Seq2SeqTrainer):
    """A `transformers.Seq2SeqTrainer` (`predict_with_generate` and all) with LBE on the encoder's and the decoder's
    hidden states; `args` is a `BatchEntropySeq2SeqConfig`. See `BatchEntropyMixin`."""

    _default_args_class = BatchEntropySeq2SeqConfig
