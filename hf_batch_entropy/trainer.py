"""`BatchEntropyTrainer`: `transformers.Trainer` with layerwise batch-entropy regularization.

It only glues the pieces into `Trainer`'s hooks:

- `create_optimizer`: find the regularized layers (one probe forward on two training examples, RNG untouched), build
  the `BatchEntropyRegularizer` and add its `α` to the optimizer as a group without weight decay;
- `compute_loss`: the task loss as `Trainer` computes it (label smoothing, `compute_loss_func`, `num_items_in_batch`
  included), captured activations → entropies → `L_task · (1 + β·mean_l lbe_l)`;
- `training_step` / `log`: the LBE metrics, summed on the device, reduced across processes and averaged per logging
  window;
- `save_model` / `_load_from_checkpoint`: `α` and the settings travel with every checkpoint; the model's own files
  stay plain Transformers files.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.utils import logging

from .capture import ForwardHookCapture, HiddenStatesCapture, resolve_target_modules
from .config import BatchEntropyConfig
from .modelcard import MODEL_TAG, SECTION_TITLE, model_card_section
from .regularizer import REGULARIZER_CONFIG_NAME, BatchEntropyRegularizer

logger = logging.get_logger(__name__)

__all__ = ["BatchEntropyTrainer"]

# Order of the per-step statistics summed in the logging window; per-layer entropies follow.
_TRAIN_STATS = ("task_loss", "lbe_loss", "batch_entropy_mean", "batch_entropy_min", "lbe_alpha_mean")
_EVAL_STATS = ("batch_entropy_mean", "batch_entropy_min")


class BatchEntropyTrainer(Trainer):
    """A `transformers.Trainer` that adds layerwise batch-entropy regularization (LBE) to the training loss.

    Same constructor and behaviour as `Trainer`; `args` is a `BatchEntropyConfig` (a `TrainingArguments` is accepted and
    upgraded with the default `lbe_*` settings). With `lbe_beta=0` the losses and updates are exactly `Trainer`'s.

    Attributes:
        regularizer: the `BatchEntropyRegularizer` (its `alpha` has one entry per regularized layer). Built when
            training starts (or by `prepare_regularizer()`); `None` before.
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *pos_args, **kwargs):
        if args is None:
            args = BatchEntropyConfig(output_dir="trainer_output")
        elif not isinstance(args, BatchEntropyConfig):
            args = BatchEntropyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})
        super().__init__(model, args, *pos_args, **kwargs)
        self.regularizer: BatchEntropyRegularizer | None = None
        self._capture: HiddenStatesCapture | ForwardHookCapture | None = None
        self._resume_regularizer_from: str | None = None
        self._task_fraction: torch.Tensor | None = None
        self._alpha_grad_step: tuple[int, int] | None = None
        self._windows: dict[str, dict[str, Any]] = {}
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags([MODEL_TAG])

    # --- setup ------------------------------------------------------------------------------------------------------

    def prepare_regularizer(self, model: torch.nn.Module | None = None) -> BatchEntropyRegularizer:
        """Choose the regularized layers of `model` (default `self.model`) and build a fresh regularizer for them.

        Runs one forward pass, in eval mode and without gradients, on two training examples; the RNG states are
        restored afterwards, so the training run is the same as without it. `model` may be the wrapped model (FSDP
        creates the optimizer after wrapping, and only the wrapper can run a forward pass then).
        """
        if self._capture is not None:
            self._capture.remove()
        model = self.model if model is None else model
        unwrapped = self.accelerator.unwrap_model(model)
        targets = self.args.lbe_target_modules
        if targets is None and isinstance(unwrapped, PreTrainedModel):
            capture = HiddenStatesCapture()
            activations, names = self._probe(model, capture)
            if not activations:
                logger.warning(
                    f"{type(unwrapped).__name__} returned no hidden_states with output_hidden_states=True; "
                    "regularizing the outputs of its activation modules instead (set lbe_target_modules to choose)."
                )
                capture = None
        else:
            capture = None
        if capture is None:
            capture = ForwardHookCapture(resolve_target_modules(unwrapped, targets))
            activations, names = self._probe(model, capture)
            if not activations:
                capture.remove()
                raise ValueError(
                    f"None of the modules chosen for LBE ({', '.join(capture.module_names[:10])}) ran in the forward "
                    "pass of a training batch. Check lbe_target_modules."
                )
        regularizer = BatchEntropyRegularizer.from_config(self.args, num_layers=len(activations), layer_names=names)
        (logger.warning if capture.source == "forward_hooks" and targets is None else logger.info)(
            f"LBE regularizes {len(names)} layers ({capture.source}): {', '.join(names[:8])}"
            f"{' ... ' + names[-1] if len(names) > 8 else ''}"
        )
        self._capture = capture
        self.regularizer = regularizer.to(self.args.device)
        self._windows = {}
        return self.regularizer

    def _probe(self, model: torch.nn.Module, capture) -> tuple[list[torch.Tensor], list[str]]:
        """One no-grad forward on two training examples; returns what `capture` collected from it."""
        if self.train_dataset is None:
            raise ValueError("BatchEntropyTrainer needs a train_dataset to find the layers to regularize.")
        dataset, collator = self.train_dataset, self.data_collator
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="LBE probe")
            else:
                collator = self._get_collator_with_removed_columns(collator, description="LBE probe")
        except ImportError:
            collator = self._get_collator_with_removed_columns(collator, description="LBE probe")
        loader = DataLoader(dataset, batch_size=2, collate_fn=collator, shuffle=False)
        devices = [self.args.device] if self.args.device.type == "cuda" else []
        was_training = model.training
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            batch = self._prepare_inputs(next(iter(loader)))
            model.eval()
            try:
                with capture.capturing():
                    outputs = model(**capture.prepare_inputs(batch))
                return capture.collect(outputs)
            finally:
                model.train(was_training)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """`Trainer`'s optimizer, plus a parameter group for `α` (no weight decay; `lbe_alpha_learning_rate` if set)."""
        if self.optimizer is None or self.regularizer is None:
            self.prepare_regularizer(model)
            if self._resume_regularizer_from is not None:
                self._load_regularizer(self._resume_regularizer_from)
        optimizer = super().create_optimizer(model)
        alpha = self.regularizer.alpha
        if not any(p is alpha for group in optimizer.param_groups for p in group["params"]):
            group = {"params": [alpha], "weight_decay": 0.0}
            if self.args.lbe_alpha_learning_rate is not None:
                group["lr"] = self.args.lbe_alpha_learning_rate
            optimizer.add_param_group(group)
            if hasattr(optimizer, "register_step_pre_hook"):
                optimizer.register_step_pre_hook(self._average_alpha_grad)
        return optimizer

    def _average_alpha_grad(self, optimizer, args, kwargs) -> None:
        # α lives outside the DDP-wrapped model, so nothing averages its gradient across processes: do it here, once
        # per optimizer step, so every rank applies the same update and α stays identical everywhere.
        grad = self.regularizer.alpha.grad if self.regularizer is not None else None
        if grad is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(grad)
            grad.div_(dist.get_world_size())

    # --- loss -------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        training = model.training
        if self._capture is None or not (training or self.args.lbe_eval_entropy):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        keep_hidden_states = bool(inputs.get("output_hidden_states")) or bool(
            getattr(getattr(self.accelerator.unwrap_model(model), "config", None), "output_hidden_states", False)
        )
        with self._capture.capturing():
            loss, outputs = super().compute_loss(
                model, self._capture.prepare_inputs(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        activations, _ = self._capture.collect(outputs)
        if not keep_hidden_states:
            outputs = self._capture.strip(outputs)
        if training:
            lbe = self.regularizer(activations, loss)
            self._task_fraction = torch.where(lbe.loss != 0, lbe.task_loss / lbe.loss, 1.0).detach().float()
            self._accumulate(
                "train",
                torch.cat(
                    [
                        torch.zeros(2, device=lbe.entropies.device),  # task/lbe parts, filled in by training_step
                        torch.stack([lbe.entropies.mean(), lbe.entropies.min(), lbe.targets.mean()]),
                        lbe.entropies,
                    ]
                ).detach(),
            )
            loss = lbe.loss
        else:
            with torch.no_grad():
                entropies = self.regularizer.entropies(activations)
            self._accumulate("eval", torch.cat([torch.stack([entropies.mean(), entropies.min()]), entropies]))
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        step = (id(self.state), self.state.global_step)
        if self.regularizer is not None and self._alpha_grad_step != step:
            # Trainer clears gradients with `model.zero_grad()`, which does not reach α (not a model parameter): start
            # each optimizer step with a fresh α.grad, or every update of α would add up all its past gradients.
            self.regularizer.alpha.grad = None
            self._alpha_grad_step = step
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._task_fraction is not None:
            # `loss` is what Trainer adds to its logged "loss" (already scaled for gradient accumulation); split it
            # into the task part and the LBE part with the same scaling, so that logged loss = task_loss + lbe_loss.
            window = self._windows["train"]
            task = loss.float() * self._task_fraction
            window["sums"][0] += task
            window["sums"][1] += loss.float() - task
            self._task_fraction = None
        return loss

    # --- metrics ----------------------------------------------------------------------------------------------------

    def _accumulate(self, mode: str, values: torch.Tensor) -> None:
        window = self._windows.get(mode)
        if window is None:
            window = self._windows[mode] = {"sums": torch.zeros_like(values), "count": 0, "step": self.state.global_step}
        window["sums"] += values
        window["count"] += 1

    def _flush(self, mode: str) -> torch.Tensor | None:
        """The window's sums, added up across processes, and the count of steps in it; then an empty window."""
        window = self._windows.pop(mode, None)
        if window is None:
            return None
        sums = window["sums"]
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        return sums / (window["count"] * self.accelerator.num_processes)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and "train" in self._windows:
            window = self._windows["train"]
            steps = max(1, self.state.global_step - window["step"])
            micro_steps = window["count"]
            means = self._flush("train").tolist()
            # task_loss and lbe_loss are per optimizer step, like Trainer's "loss"; the rest per forward pass.
            logs["task_loss"] = means[0] * micro_steps / steps
            logs["lbe_loss"] = means[1] * micro_steps / steps
            logs.update(zip(_TRAIN_STATS[2:], means[2 : len(_TRAIN_STATS)]))
            if self.args.lbe_log_per_layer:
                logs.update((f"batch_entropy/layer_{i}", v) for i, v in enumerate(means[len(_TRAIN_STATS) :]))
        prefix = next((k[: -len("_runtime")] for k in logs if k.endswith("_runtime") and k != "train_runtime"), None)
        if prefix is not None and "eval" in self._windows:
            means = self._flush("eval").tolist()
            logs.update((f"{prefix}_{name}", v) for name, v in zip(_EVAL_STATS, means))
            if self.args.lbe_log_per_layer:
                logs.update((f"{prefix}_batch_entropy/layer_{i}", v) for i, v in enumerate(means[len(_EVAL_STATS) :]))
        super().log(logs, start_time)

    # --- checkpoints and the Hub ------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.regularizer is not None and self.args.should_save:
            self.regularizer.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not os.path.isfile(os.path.join(resume_from_checkpoint, REGULARIZER_CONFIG_NAME)):
            logger.warning(
                f"{resume_from_checkpoint} holds no batch-entropy regularizer (it was not written by "
                "BatchEntropyTrainer): the targets α start again from lbe_alpha."
            )
            return
        if self.regularizer is not None and self.optimizer is not None:
            self._load_regularizer(resume_from_checkpoint)
        else:
            self._resume_regularizer_from = resume_from_checkpoint

    def _load_regularizer(self, checkpoint: str) -> None:
        saved = BatchEntropyRegularizer.read_settings(checkpoint)
        if saved["num_layers"] != self.regularizer.num_layers:
            raise ValueError(
                f"The checkpoint {checkpoint} regularized {saved['num_layers']} layers, but this model now has "
                f"{self.regularizer.num_layers} ({self._capture.source}). Resume with the same model and "
                "lbe_target_modules."
            )
        self.regularizer.load_alpha(checkpoint)
        self._resume_regularizer_from = None

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
