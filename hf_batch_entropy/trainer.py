"""`BatchEntropyTrainer`: `transformers.Trainer` with layerwise batch-entropy regularization.

The glue lives in a mixin, `BatchEntropyMixin`, which gives LBE to any `Trainer` subclass: `BatchEntropyTrainer`
(`Trainer`), `BatchEntropySeq2SeqTrainer` (`Seq2SeqTrainer`), or your own, e.g. TRL's `SFTTrainer`:

    class SFTWithLBETrainer(BatchEntropyMixin, SFTTrainer):
        pass

It only glues the pieces into `Trainer`'s hooks:

- `compute_loss`: the task loss as `Trainer` computes it (label smoothing, `compute_loss_func`, `num_items_in_batch`
  included), captured activations → entropies → `L_task · (1 + β·mean_l lbe_l)`. The first call chooses where the
  activations come from (`capture.select_capture`, on a no-grad probe of that batch, RNG untouched); the first
  training call builds the `BatchEntropyRegularizer`, by then on the model's device and after any wrapping (DDP,
  FSDP2, DeepSpeed), whoever built the optimizer;
- `on_pre_optimizer_step` / `on_optimizer_step` (an internal callback): `α` is trained by the regularizer's own AdamW,
  once per optimizer step that `Trainer` takes, at the main schedule's factor; `Trainer`'s optimizer and scheduler
  see model parameters only;
- `log` / `evaluation_loop`: named LBE metrics, summed on the device per mode and reduced across processes once per
  logging window (training) or per `evaluate()` / `predict()` call; the NaN/inf check reads its tally there too, so
  the training step never synchronizes with the host;
- `save_model` / `train(resume_from_checkpoint=...)` / `_load_best_model`: `α` and its optimizer state travel with
  every checkpoint and the final folder; the model's own files stay plain Transformers files.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .capture import padding_masks, select_capture
from .config import BatchEntropyConfig, BatchEntropySeq2SeqConfig, with_batch_entropy_fields
from .entropy import batch_entropies
from .modelcard import MODEL_TAG, SECTION_TITLE, model_card_section
from .regularizer import REGULARIZER_CONFIG_NAME, BatchEntropyRegularizer, raise_if_nonfinite

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

    def __init__(self, model=None, args: TrainingArguments | None = None, *pos_args, **kwargs):
        if args is None and self._default_args_class is not None:
            args = self._default_args_class(output_dir="trainer_output")
        elif args is not None:
            args = with_batch_entropy_fields(args)
        super().__init__(model, args, *pos_args, **kwargs)
        if not hasattr(self.args, "lbe_beta"):
            self.args = with_batch_entropy_fields(self.args)
        self.regularizer: BatchEntropyRegularizer | None = None
        self._capture = None
        self._layer_names: list[str] = []
        self._resume_from: str | None = None
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
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)  # None: Trainer raises its own error
        self._resume_from = resume_from_checkpoint or None
        if self.regularizer is not None and self._resume_from is not None:
            self._load_regularizer(self._resume_from)
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        self._flush("train")  # the steps after the last log: nothing to report, but a NaN among them is an error
        return output

    def _check_batch_size(self) -> None:
        pooled = self.args.lbe_sync_entropy and self.args.world_size > 1
        if self.args.train_batch_size < 2 and not pooled:
            raise ValueError(
                f"Batch-entropy is a statistic over the batch and needs at least 2 examples per forward pass, but "
                f"per_device_train_batch_size is {self.args.per_device_train_batch_size}. Use a batch size of 2 or "
                "more (gradient accumulation does not help: each micro-batch is measured on its own), or with several "
                "processes turn on lbe_sync_entropy to pool their batches."
            )

    def _reset(self) -> None:
        if self._capture is not None:
            self._capture.remove()
        self._capture, self._layer_names, self.regularizer = None, [], None
        self._lbe_metrics, self._window_start = {}, {}

    def _select_capture(self, model: torch.nn.Module, inputs: dict[str, Any]) -> None:
        """Decide, once, where the regularized activations come from, with a no-grad forward of this batch."""
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        devices = [self.args.device] if self.args.device.type == "cuda" else []

        def probe(capture):
            was_training = model.training
            # Eval mode, no gradients, forked RNG: the run is the same as without the probe (β = 0 stays Trainer).
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                model.eval()
                try:
                    with capture.capturing():
                        outputs = model(**capture.prepare_inputs(inputs))
                    return capture.collect(outputs)
                finally:
                    model.train(was_training)

        self._capture, _, self._layer_names = select_capture(unwrapped, self.args.lbe_target_modules, probe)

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
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
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
            scale = getattr(scaler, "_scale", None)  # the scale tensor: dividing by it reads nothing on the host
            grad.div_(scale.to(grad.device) if scale is not None else scaler.get_scale())
        elif self.is_deepspeed_enabled and self.args.fp16:
            # DeepSpeed scales the loss inside its engine (untested here: deepspeed needs a GPU).
            scale = getattr(getattr(self.model_wrapped, "optimizer", None), "loss_scale", None)
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
        times it, so warm-up and decay apply to α as to the model."""
        scheduler = self.lr_scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            # Exactly the factor the scheduler applied to the model's step (base · λ), as for a group of its own.
            return scheduler.lr_lambdas[0](scheduler.last_epoch)
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("initial_lr", self.args.learning_rate)

    # --- loss --------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        training = model.training
        if not (training or self.args.lbe_eval_entropy):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._capture is None:
            self._select_capture(model, inputs)
        user_wants_hidden_states = bool(inputs.get("output_hidden_states")) or bool(
            getattr(getattr(self.accelerator.unwrap_model(model, keep_torch_compile=False), "config", None), "output_hidden_states", False)
        )
        with self._capture.capturing():
            loss, outputs = super().compute_loss(
                model, self._capture.prepare_inputs(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        activations, names = self._capture.collect(outputs)
        outputs = self._capture.restore(outputs, keep_hidden_states=user_wants_hidden_states)
        masks = padding_masks(inputs, activations, names) if self.args.lbe_ignore_padding else None
        if loss.dim() > 0:
            loss = loss.mean()  # nn.DataParallel: one loss per replica, averaged as Trainer's training_step does
        measurable = activations[0].shape[0] >= 2 or (self.args.lbe_sync_entropy and self.args.world_size > 1)
        if training:
            loss = self._regularize(activations, loss, masks) if measurable else self._skip_batch_of_one(loss)
        elif measurable:  # a batch of one example (the last of an evaluation set) has no batch-entropy
            with torch.no_grad():
                entropies = batch_entropies(
                    activations, fused=self.args.lbe_fused, sync=self.args.lbe_sync_entropy, masks=masks
                )
            self._tally("eval", entropies)
        return (loss, outputs) if return_outputs else loss

    def _regularize(self, activations: list[torch.Tensor], task_loss: torch.Tensor, masks) -> torch.Tensor:
        regularizer = self.regularizer if self.regularizer is not None else self._build_regularizer()
        lbe = regularizer(activations, task_loss, masks)
        self._step_lbe = lbe
        self._tally("train", lbe.entropies, lbe_alpha_mean=lbe.targets.mean())
        return lbe.loss

    def _skip_batch_of_one(self, task_loss: torch.Tensor) -> torch.Tensor:
        if not self._warned_batch_of_one:
            logger.warning(
                "A training batch holds a single example, which has no batch-entropy: it trains on the task loss "
                "alone. (Usually the last batch of an epoch; dataloader_drop_last=True drops it.) Said once."
            )
            self._warned_batch_of_one = True
        return task_loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # `loss` is what Trainer adds to its logged "loss" (scaled for gradient accumulation as Trainer scales it):
        # split it into the task part and the LBE part in the same proportion, so that loss = task_loss + lbe_loss.
        lbe, self._step_lbe = self._step_lbe, None
        total = loss.float()
        task = total if lbe is None else total * torch.where(lbe.loss != 0, lbe.task_loss / lbe.loss, 1.0).float()
        self._add("train", task_loss=task, lbe_loss=total - task)
        return loss

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

    def _tally(self, mode: str, entropies: torch.Tensor, **extra: torch.Tensor) -> None:
        """The metrics of one measured forward pass: entropy mean/min over layers, per-layer values, NaN/inf count."""
        self._add(
            mode,
            measured=torch.ones((), device=entropies.device),
            batch_entropy_mean=entropies.mean(),
            batch_entropy_min=entropies.min(),
            batch_entropy_per_layer=entropies,
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
        means = {}
        for name, value in values.items():
            if name in _PER_STEP:
                means[name] = value / self.accelerator.num_processes
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
