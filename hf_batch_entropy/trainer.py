"""`BatchEntropyTrainer`: `transformers.Trainer` with layerwise batch-entropy regularization.

The glue lives in a mixin, `BatchEntropyMixin`, which gives LBE to any `Trainer` subclass: `BatchEntropyTrainer`
(`Trainer`), `BatchEntropySeq2SeqTrainer` (`Seq2SeqTrainer`), or your own, e.g. TRL's `SFTTrainer`:

    class SFTWithLBETrainer(BatchEntropyMixin, SFTTrainer):
        pass

It only glues the pieces into `Trainer`'s hooks:

- `compute_loss`: the task loss as `Trainer` computes it (label smoothing, `compute_loss_func`, `num_items_in_batch`
  included), captured activations → the batch's sequences and real tokens (`tokens.TokenLayout`: padded, packed or
  with virtual tokens) → entropies → `L_task · (1 + β·mean_l lbe_l)` (or `L_task + β·mean_l lbe_l`; see
  `regularizer.py` for losses that are zero or negative). The first call chooses where the activations
  come from (`capture.select_capture`, at the first forward the trainer runs, never a forward of its own); the
  forward measured is the one with gradients, masked with the inputs it got; the first training call
  builds the `BatchEntropyRegularizer`, by then on the model's device and after any wrapping (DDP, FSDP2,
  DeepSpeed), whoever built the optimizer;
- `training_step` / `log`: the guard (`guard.RegularizationGuard`): with `lbe_beta > 0`, a logging window without
  a regularized step is an error that names the cause, never a silent run without LBE;
- `Trainer`'s `on_pre_optimizer_step` / `on_optimizer_step` events (its callback handler, not a callback in the
  user's list): `α` is trained by the regularizer's own AdamW (`alpha_step.AlphaStepper`), once per optimizer step
  that `Trainer` takes, at the main schedule's factor; `Trainer`'s optimizer and scheduler see model parameters only;
- `log` / `evaluation_loop` / `prediction_step`: named LBE metrics (`tally.MetricTally`), summed on the device per
  mode and reduced across processes once per logging window (training) or per `evaluate()` / `predict()` call (with
  or without labels); the NaN/inf check reads its tally there too, so the training step never synchronizes with the
  host;
- `save_model` / `train(resume_from_checkpoint=...)` / `_load_best_model`: `α`, its optimizer state and its schedule
  factor travel with every checkpoint and the final folder; the model's own files stay plain Transformers files.

What it relies on in `Trainer`, accelerate and torch beyond their public APIs (private attributes, the order of
hooks) is named in `_compat`, each with a test in `tests/test_compat.py`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from ._compat import (
    generation_loss_forward,
    model_card_path,
    packs_sequences,
    prediction_uses_compute_loss,
    prepare_inputs,
)
from .alpha_step import AlphaStepper
from .capture import select_capture
from .config import BatchEntropyConfig, BatchEntropySeq2SeqConfig, with_batch_entropy_fields, with_lbe_args
from .entropy import batch_entropies, is_measurable
from .guard import RegularizationGuard, check_batch_size, check_model, nothing_to_measure
from .modelcard import MODEL_TAG, append_section
from .prediction import measuring_forward
from .regularizer import REGULARIZER_CONFIG_NAME, BatchEntropyRegularizer
from .tally import MetricTally
from .tokens import TokenLayout

logger = logging.get_logger(__name__)

__all__ = ["BatchEntropyMixin", "BatchEntropySeq2SeqTrainer", "BatchEntropyTrainer"]


class BatchEntropyMixin:
    """Adds layerwise batch-entropy regularization (LBE) to the training loss of the `Trainer` subclass it is mixed
    into (list it first: `class T(BatchEntropyMixin, SomeTrainer)`).

    Tested with transformers' `Trainer` and `Seq2SeqTrainer` and TRL's `SFTTrainer`, `DPOTrainer`, `KTOTrainer`,
    `GRPOTrainer`, `RLOOTrainer`, `RewardTrainer` and `DistillationTrainer`: the policy's (student's) training forward
    is measured; a reference, KL or teacher forward, generation and metrics forwards are not.

    Same constructor (keywords and positional order) and behaviour as that trainer; `args` carries the `lbe_*`
    fields (`BatchEntropyConfig`, `BatchEntropySeq2SeqConfig`, or `batch_entropy_config(YourArgs)`); arguments without
    them are upgraded with the default `lbe_*` settings. With `lbe_beta=0` the losses and updates are exactly the base
    trainer's.

    Attributes:
        regularizer: the `BatchEntropyRegularizer` (its `alpha` has one entry per regularized layer, its `optimizer`
            trains them). Built at the first training step; `None` before.
    """

    _default_args_class: type | None = None  # what `args=None` becomes; None: the base trainer's default, upgraded

    def __init__(self, *pos_args, **kwargs):
        # The base trainer's own signature decides where `args` is (`Trainer(model, args, ...)`, but
        # `DPOTrainer(model, ref_model, args, ...)`, `GRPOTrainer(model, reward_funcs, args, ...)`).
        pos_args, kwargs = with_lbe_args(super().__init__, pos_args, kwargs, self._default_args_class)
        super().__init__(*pos_args, **kwargs)
        if not hasattr(self.args, "lbe_beta"):
            self.args = with_batch_entropy_fields(self.args)
        self.regularizer: BatchEntropyRegularizer | None = None
        self._capture = None
        self._measures_nothing = False  # lbe_beta=0 and a model without anything to measure (see `_capture_ready`)
        self._tokens: TokenLayout | None = None
        # The measured model's config, found once with the capture (unwrapping the model walks all its modules).
        self._model_config: Any = None
        self._layer_names: list[str] = []
        self._resume_from: str | None = None
        self._lbe_alpha_step = AlphaStepper()
        self._lbe_alpha_step.attach(self)  # through Trainer's events, not as a callback of the user's list
        self._lbe_guard = RegularizationGuard()
        self._lbe_tally = MetricTally(lambda: self.state.global_step)
        self._step_lbe = None  # the LBEOutput of the micro-step in flight, from compute_loss to training_step
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags([MODEL_TAG])

    # --- training ----------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; `α` and its optimizer state come back from `resume_from_checkpoint` when it has them.
        With `lbe_beta > 0`, a model or batch size LBE cannot measure is an error here, before any step."""
        if self.args.lbe_beta > 0:
            self._check_batch_size()
            check_model(self.model, self.args.lbe_target_modules)
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
        self._lbe_guard.start_run()
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        if self.regularizer is None and self._resume_from is not None:
            # A finished run resumed: no step was left to build the regularizer, but its α is the run's.
            self._restore_regularizer(self._resume_from)
        self._lbe_guard.check(self.args.lbe_beta, type(self).__name__)  # the steps after the last log are a window too
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

    def _check_batch_size(self) -> None:
        args = self.args
        check_batch_size(args.train_batch_size, args.per_device_train_batch_size, args.lbe_sync_entropy,
                         packs_sequences(self))

    def _reset(self) -> None:
        if self._capture is not None:
            self._capture.remove()
        self._capture, self._tokens, self._layer_names, self.regularizer = None, None, [], None
        self._model_config = None
        self._measures_nothing = False
        self._lbe_tally.discard()
        self._lbe_alpha_step.reset()

    def _capture_ready(self, model: torch.nn.Module) -> bool:
        """Whether there is a capture to measure `model` with, deciding where the regularized activations come from
        the first time (`capture.select_capture`: from the model, and where that needs a forward, at the first one the
        trainer runs; never a forward of its own). With `lbe_beta=0`, a model without hidden states or modules to hook
        (nothing to measure) trains exactly as with the base trainer: no capture, no LBE metrics."""
        if self._capture is not None or self._measures_nothing:
            return self._capture is not None
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        targets = self.args.lbe_target_modules
        if self.args.lbe_beta == 0 and targets is None and nothing_to_measure(unwrapped):
            logger.info(f"lbe_beta=0: {type(unwrapped).__name__} has no layers to measure: nothing is measured.")
            self._measures_nothing = True
            return False
        self._capture = select_capture(unwrapped, targets)
        self._tokens = TokenLayout(unwrapped)
        self._model_config = getattr(unwrapped, "config", None)
        self._layer_names = []
        return True

    def _collect(self, outputs: Any, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The activations of the forward just captured, as sequences with their masks (`TokenLayout.views`, on the
        inputs that forward got); the first one fixes the layer names."""
        capture = self._capture
        try:
            activations, names = capture.collect(outputs)
        except (ValueError, RuntimeError) as err:  # nothing to measure (no hidden states, no hooked module with grads)
            if self.args.lbe_beta > 0 or self._layer_names:
                raise
            logger.warning(f"lbe_beta=0: nothing is measured ({err})")
            self._capture.remove()
            self._capture, self._measures_nothing = None, True
            return [], []
        if not self._layer_names and names:
            self._set_layer_names(names)
        sources = capture.take_sources()  # per activation, the inputs of the tower that produced it
        sources = sources if sources is not None and len(sources) == len(activations) else None
        return self._tokens.views(capture.inputs_seen(inputs), activations, names, self.args.lbe_ignore_padding,
                                  sources=sources)

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
        self._lbe_alpha_step.configure_optimizer(regularizer, args, self.optimizer)
        self.regularizer = regularizer
        if self._resume_from is not None:
            self._load_regularizer(self._resume_from)
        return regularizer

    # --- loss --------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        training = model.training
        if training:
            self._lbe_guard.count("ours")
        if not (training or self.args.lbe_eval_entropy) or not self._capture_ready(model):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        user_wants_hidden_states = bool(inputs.get("output_hidden_states")) or bool(
            getattr(self._model_config, "output_hidden_states", False)
        )
        # The outputs only where someone needs them: the caller, or nn.DataParallel, whose replicas' hidden states
        # are gathered in the outputs alone. Otherwise the capture records them from the forward itself, and a base
        # trainer that would run a second forward to return outputs (TRL's SFTTrainer) does not.
        wants_outputs = return_outputs or isinstance(model, torch.nn.DataParallel)
        capture = self._capture  # (`_collect` drops it where, at β = 0, the forward gave nothing to measure)
        with capture.capturing():
            result = super().compute_loss(
                model, capture.prepare_inputs(inputs), return_outputs=wants_outputs,
                num_items_in_batch=num_items_in_batch,
            )
        loss, outputs = result if wants_outputs else (result, None)
        activations, masks = self._collect(outputs, inputs)
        if outputs is not None:
            outputs = capture.restore(outputs, keep_hidden_states=user_wants_hidden_states)
        if loss.dim() > 0:
            loss = loss.mean()  # nn.DataParallel: one loss per replica, averaged as Trainer's training_step does
        measurable = bool(activations) and is_measurable(activations[0].shape[0], self.args.lbe_sync_entropy)
        if training:
            loss = self._regularize(activations, loss, masks) if measurable else self._lbe_guard.skip_batch_of_one(
                loss, activations, self.args.per_device_train_batch_size, self.args.lbe_beta)
        elif measurable:  # a batch of one example (the last of an evaluation set) has no batch-entropy
            self._measure_eval(activations, masks)
        return (loss, outputs) if return_outputs else loss

    def _measure_eval(self, activations: list[torch.Tensor], masks: list[torch.Tensor | None]) -> None:
        with torch.no_grad():
            entropies, measured = batch_entropies(
                activations, fused=self.args.lbe_fused, sync=self.args.lbe_sync_entropy, masks=masks,
                return_measured=True,
            )
        self._lbe_tally.add_pass("eval", entropies, measured)

    def _regularize(self, activations: list[torch.Tensor], task_loss: torch.Tensor, masks) -> torch.Tensor:
        regularizer = self.regularizer if self.regularizer is not None else self._build_regularizer()
        lbe = regularizer(activations, task_loss, masks)
        self._step_lbe = lbe
        self._lbe_guard.count("regularized")
        self._lbe_tally.add_pass("train", lbe.entropies, lbe.measured, lbe_alpha_mean=lbe.targets.mean())
        return lbe.loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        self._lbe_guard.count("micro_batches")
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._measures_nothing:
            return loss
        # `loss` is what Trainer adds to its logged "loss" (scaled for gradient accumulation as Trainer scales it):
        # split it into the task part and the LBE part in the same proportion, so that loss = task_loss + lbe_loss.
        lbe, self._step_lbe = self._step_lbe, None
        total = loss.float()
        task = total if lbe is None else total * torch.where(lbe.loss != 0, lbe.task_loss / lbe.loss, 1.0).float()
        self._lbe_tally.add("train", task_loss=task, lbe_loss=total - task)
        return loss

    # --- prediction without labels ----------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """`Trainer.prediction_step`; with `lbe_eval_entropy`, a batch that `Trainer` runs through the model directly
        (no labels, so no `compute_loss`) is measured too, by hooks around that forward, and so is the labelled
        forward that `Seq2SeqTrainer` runs for the loss after generating (`predict_with_generate`; the decoding steps
        are not measured): the outputs it returns are those it would return without LBE."""
        mro = type(self).__mro__
        base = next(c for c in mro[mro.index(BatchEntropyMixin) + 1 :] if "prediction_step" in vars(c))
        if not self.args.lbe_eval_entropy:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        after_generation = generation_loss_forward(self, inputs, prediction_loss_only, base)
        if not after_generation and prediction_uses_compute_loss(self, inputs, prediction_loss_only, base):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = prepare_inputs(self, inputs)
        if not self._capture_ready(model):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        # After generation, the loss forward is the one given the labels (generate never passes any).
        measured = (lambda kwargs: kwargs.get("labels") is not None) if after_generation else None
        capture = self._capture
        with measuring_forward(model, capture, lambda out: self._measure_prediction_output(capture, out, inputs),
                               measured):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def _measure_prediction_output(self, capture: Any, output: Any, inputs: dict[str, Any]) -> Any:
        """Measure the activations of a prediction forward (`eval` tally) and return its outputs without them."""
        activations, masks = self._collect(output, inputs)  # (drops `self._capture` where β = 0 finds nothing)
        if activations and is_measurable(activations[0].shape[0], self.args.lbe_sync_entropy):
            self._measure_eval(activations, masks)
        return capture.restore(output, keep_hidden_states=bool(inputs.get("output_hidden_states")))

    # --- metrics -----------------------------------------------------------------------------------------------------

    def _flush(self, mode: str, steps: int = 1) -> dict[str, Any]:
        """This mode's tally, reduced across processes and read (see `MetricTally.flush`). NaN/inf entropies are an
        error where they enter the loss (training with `lbe_beta > 0`); at β = 0 a diverging run goes on as Trainer's."""
        return self._lbe_tally.flush(mode, self._layer_names, lambda flat: self.accelerator.reduce(flat, reduction="sum"),
                                   self.accelerator.num_processes, steps, strict=self.args.lbe_beta > 0)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: Trainer's "loss" is averaged over the same window
            steps = max(1, self.state.global_step - self._lbe_tally.window_start("train"))
            self._lbe_guard.check(self.args.lbe_beta, type(self).__name__)
            logs.update(MetricTally.logs(self._flush("train", steps), per_layer=self.args.lbe_log_per_layer))
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """`Trainer.evaluation_loop`, plus the batch-entropies of this call (`lbe_eval_entropy`) in its metrics as
        `<metric_key_prefix>_batch_entropy_mean/min`. Each `evaluate()` / `predict()` call has a tally of its own."""
        self._lbe_tally.discard("eval")
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update(MetricTally.logs(self._flush("eval"), f"{metric_key_prefix}_", self.args.lbe_log_per_layer))
        return output

    # --- checkpoints and the Hub -------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.regularizer is not None and self.args.should_save:
            self.regularizer.save_pretrained(output_dir if output_dir is not None else self.args.output_dir,
                                             schedule=self._lbe_alpha_step.factor.state_dict())

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
            self._lbe_alpha_step.factor.load_state_dict(BatchEntropyRegularizer.read_schedule(checkpoint))
        self._resume_from = None

    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        """`Trainer`'s model card, tagged `batch-entropy`, with a section on LBE: its settings and the paper."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        if MODEL_TAG not in tags:
            tags.append(MODEL_TAG)
        super().create_model_card(*args, tags=tags, **kwargs)
        if not self.is_world_process_zero():
            return
        append_section(model_card_path(self.args.output_dir), self.args.lbe_settings,
                       self.regularizer.num_layers if self.regularizer is not None else None,
                       self._capture.source if self._capture is not None else None)


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
