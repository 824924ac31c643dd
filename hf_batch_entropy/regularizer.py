r"""The LBE regularizer: learnable per-layer entropy targets `α`, their optimizer, and the loss that pulls each layer
towards its target.

For layers `l = 1…L` with batch-entropies `H_l` (see `entropy.py`):

    target_l = max(α_min, |α_l|)
    lbe_l    = (H_l − target_l)²
    L        = L_task + β · mean_l(lbe_l) · L_task          (scale_by_task_loss=True, the default: the paper's)
    L        = L_task + β · mean_l(lbe_l)                   (scale_by_task_loss=False)

Multiplying by `L_task` (as the paper does) makes the regularizer fade as the task is learned, and makes it scale with
whatever normalization the task loss already has (gradient accumulation, token averaging across devices).

**Task losses that are zero or negative** (policy-gradient losses such as GRPO's and RLOO's, which are advantages
times log-ratios and average about 0; some preference losses): multiplied by a negative `L_task`, the term's gradient
would push every entropy away from its target. So the factor the entropies' gradient sees is `|L_task|`: the value is
the paper's, `β·mean_l(lbe_l)·L_task`, for every sign, and so is the gradient with respect to `L_task`
(`β·mean_l(lbe_l)`, which leaves the task's gradient scaled by `1 + β·mean_l(lbe_l) > 0`); the gradient with respect
to the entropies (and to `α`) is `β·|L_task|·∂mean_l(lbe_l)`, which is the paper's wherever `L_task ≥ 0`. Where
`L_task` is about 0 the term has (as in the paper) next to no effect; for such losses, `scale_by_task_loss=False`
adds `β·mean_l(lbe_l)` instead, whose pull does not depend on the task loss (β then is in the units of nats²
relative to the loss, so choose it smaller, e.g. 1e-3 to 1e-2).

`α` is not a parameter of the model, and it is not trained by the model's optimizer: the regularizer owns an AdamW
for it (`configure_optimizer`, `step`), as the paper trains `α` with Adam. So the model's optimizer and scheduler,
whoever builds them (`Trainer`, the user, DeepSpeed, FSDP), only ever see model parameters, and `α`'s optimizer state
travels in the regularizer's own files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import check_settings
from .entropy import batch_entropies

__all__ = [
    "BatchEntropyRegularizer",
    "LBEOutput",
    "REGULARIZER_CONFIG_NAME",
    "REGULARIZER_WEIGHTS_NAME",
    "raise_if_nonfinite",
]

REGULARIZER_WEIGHTS_NAME = "batch_entropy_regularizer.safetensors"
REGULARIZER_CONFIG_NAME = "batch_entropy_regularizer.json"

# The regularizer's settings: the `BatchEntropyConfig` field each comes from (the name it is saved and read under) →
# the constructor argument (and, as the 0.1.0 files named them, the legacy key).
SETTINGS = {"lbe_beta": "beta", "lbe_alpha": "alpha", "lbe_alpha_min": "alpha_min", "lbe_fused": "fused",
            "lbe_sync_entropy": "sync_entropy", "lbe_scale_by_task_loss": "scale_by_task_loss"}
_LEGACY_KEYS = {argument: field for field, argument in SETTINGS.items()}
# Where the module keeps a constructor argument under another attribute name (`alpha` is the parameter itself).
_ATTRIBUTES = {"alpha": "alpha_init"}
# AdamW state tensors of `α`, stored in the safetensors file as `optimizer.<name>`.
_OPTIMIZER_STATE = ("step", "exp_avg", "exp_avg_sq")


def nonfinite_message(nonfinite: torch.Tensor, layer_names: Sequence[str]) -> str | None:
    """What is wrong where an entry of `nonfinite` `(L,)` is non-zero (a count or a flag of NaN/inf batch-entropies),
    naming those layers; None where all are zero. Reads `nonfinite` on the host: call it where a synchronization is
    acceptable."""
    bad = [layer_names[i] for i, count in enumerate(nonfinite.tolist()) if count]
    if not bad:
        return None
    return (
        f"Batch-entropy is NaN or inf for {len(bad)} layer(s): {', '.join(bad[:10])}"
        f"{' ...' if len(bad) > 10 else ''}. Their activations contain NaN or inf values, so the model has "
        "diverged (or overflowed in fp16). Lower the learning rate, enable gradient clipping "
        "(`max_grad_norm`), or train in bf16/fp32 instead of fp16."
    )


def raise_if_nonfinite(nonfinite: torch.Tensor, layer_names: Sequence[str]) -> None:
    """Raise a `FloatingPointError` with `nonfinite_message` where some layer's batch-entropy was NaN/inf."""
    message = nonfinite_message(nonfinite, layer_names)
    if message:
        raise FloatingPointError(message)


@dataclass
class LBEOutput:
    """What one regularized step produced. All tensors are float32; `(L,)` means one value per layer."""

    loss: torch.Tensor
    """The regularized loss `L_task + lbe_loss` (scalar, differentiable)."""
    task_loss: torch.Tensor
    """The task loss it was given (scalar)."""
    lbe_loss: torch.Tensor
    """The added term `β · mean_l(lbe_l) · L_task` (or `β · mean_l(lbe_l)` without `scale_by_task_loss`; scalar)."""
    entropies: torch.Tensor
    """`H_l`, shape `(L,)`, nats per unit."""
    lbe_per_layer: torch.Tensor
    """`(H_l − target_l)²`, shape `(L,)`."""
    targets: torch.Tensor
    """`max(α_min, |α_l|)`, shape `(L,)`."""
    measured: torch.Tensor | None = None
    """Which layers had a batch-entropy this step, bool `(L,)`; `None` when every layer did (no padding masks)."""


def _measured_only(per_layer: torch.Tensor, measured: torch.Tensor | None) -> torch.Tensor:
    """`per_layer` with the layers that were not measured set to 0 (selected: their value means nothing)."""
    return per_layer if measured is None else per_layer.masked_fill(~measured, 0)


class BatchEntropyRegularizer(nn.Module):
    """Holds one learnable entropy target `α_l` per regularized layer, computes the LBE loss and (once
    `configure_optimizer` was called) trains `α` with its own AdamW.

    Args:
        num_layers: number of regularized layers `L` (one `α` each).
        beta: weight `β` of the LBE term; 0 measures entropies but leaves the loss untouched.
        alpha: initial value `α₀` of every `α_l`.
        alpha_min: floor of the targets.
        fused: compute all layers' entropies in one fused reduction (see `batch_entropies`).
        sync_entropy: compute entropies over the global batch of all processes.
        scale_by_task_loss: multiply the term by the task loss (the paper's; the entropies' gradient by `|L_task|`,
            see the module's docstring); `False`: add `β · mean_l(lbe_l)` alone.
        layer_names: optional names of the layers, for messages, logs and checking a checkpoint against the model.
        check_finite: raise a `FloatingPointError` at once when an entropy is NaN or inf. This reads a value on the
            host every step (a device synchronization); `BatchEntropyTrainer` turns it off and checks a tally of
            non-finite entropies at each logging step instead.

    Example:
        >>> reg = BatchEntropyRegularizer(num_layers=3, beta=0.5, alpha=0.5, alpha_min=0.5)
        >>> reg.configure_optimizer(lr=1e-3)
        >>> out = reg([h1, h2, h3], task_loss)      # each h: (B, ...) activations
        >>> out.loss.backward()                     # gradients for the model and for reg.alpha
        >>> model_optimizer.step(); reg.step()      # reg.step(): AdamW on α, then α's gradient is cleared
    """

    def __init__(
        self,
        num_layers: int,
        beta: float = 0.5,
        alpha: float = 0.5,
        alpha_min: float = 0.5,
        fused: bool = True,
        sync_entropy: bool = False,
        layer_names: Sequence[str] | None = None,
        check_finite: bool = True,
        scale_by_task_loss: bool = True,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"BatchEntropyRegularizer needs at least one layer, got num_layers={num_layers}.")
        if layer_names is not None and len(layer_names) != num_layers:
            raise ValueError(f"Got {len(layer_names)} layer names for {num_layers} layers.")
        checked = check_settings(beta=beta, alpha=alpha, alpha_min=alpha_min)
        self.beta, self.alpha_init, self.alpha_min = checked["beta"], checked["alpha"], checked["alpha_min"]
        self.fused = fused
        self.sync_entropy = sync_entropy
        self.scale_by_task_loss = bool(scale_by_task_loss)
        self.check_finite = check_finite
        self.layer_names = list(layer_names) if layer_names is not None else [f"layer_{i}" for i in range(num_layers)]
        self.alpha = nn.Parameter(torch.full((num_layers,), self.alpha_init))
        self.optimizer: torch.optim.AdamW | None = None
        self.learning_rate: float | None = None

    @classmethod
    def from_config(cls, config: Any, num_layers: int, layer_names: Sequence[str] | None = None,
                    **kwargs) -> BatchEntropyRegularizer:
        """Build from a `BatchEntropyConfig`, or anything with the same `lbe_*` attributes (see `SETTINGS`)."""
        # A setting the config does not have (files written before it existed) takes the constructor's default.
        settings = {argument: getattr(config, field) for field, argument in SETTINGS.items() if hasattr(config, field)}
        return cls(num_layers, layer_names=layer_names, **settings, **kwargs)

    @property
    def num_layers(self) -> int:
        return self.alpha.numel()

    def targets(self) -> torch.Tensor:
        """`max(α_min, |α_l|)`, shape `(L,)`."""
        return self.alpha.abs().clamp_min(self.alpha_min)

    def entropies(
        self,
        activations: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor | None] | None = None,
        return_measured: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Batch-entropies `(L,)` of the activations (with their padding masks, if any; see `batch_entropies`), after
        checking that they are the layers this regularizer has; with `return_measured`, also which layers have one
        (`None`: all)."""
        if len(activations) != self.num_layers:
            raise ValueError(
                f"The model produced {len(activations)} regularized activations this step, but the regularizer has "
                f"{self.num_layers} targets α (one per layer, fixed when training started). LBE needs the same layers "
                "at every step: a model whose depth changes between steps (layer drop, early exit, a module called a "
                "varying number of times) must be regularized on a fixed set of layers; choose them with "
                "`lbe_target_modules`."
            )
        entropies, measured = batch_entropies(
            activations, fused=self.fused, sync=self.sync_entropy, masks=masks, return_measured=True
        )
        if self.check_finite:
            raise_if_nonfinite(~torch.isfinite(entropies), self.layer_names)
        return (entropies, measured) if return_measured else entropies

    @staticmethod
    def _layer_mean(per_layer: torch.Tensor, measured: torch.Tensor | None) -> torch.Tensor:
        """`mean_l` over the measured layers (all where `measured` is None); 0, not NaN, when none is measured, so that
        the step trains on the task loss alone."""
        if measured is None:
            return per_layer.mean()
        weight = measured.to(per_layer.dtype)
        return (per_layer * weight).sum() / weight.sum().clamp_min(1)

    def forward(
        self,
        activations: Sequence[torch.Tensor],
        task_loss: torch.Tensor,
        masks: Sequence[torch.Tensor | None] | None = None,
    ) -> LBEOutput:
        """Regularize one step.

        Args:
            activations: the `L` regularized layers' activations, each `(B, ...)`.
            task_loss: the scalar task loss `L_task`.
            masks: optional padding masks, one `(B, T)` mask (or `None`) per layer, for token-level activations: the
                entropies then leave padding out (`batch_entropies`).

        Returns:
            An `LBEOutput` whose `loss` is `L_task + β·mean_l((H_l − max(α_min, |α_l|))²)·L_task` (the
            entropies' gradient weighted by `|L_task|`; without `scale_by_task_loss`, `L_task + β·mean_l(...)`),
            the mean over the
            layers that have a batch-entropy this step (a masked layer without two real tokens at any position has
            none: its `lbe_per_layer` is 0 and it is left out; with none left the loss is `L_task`). `measured` says
            which layers counted.
        """
        if task_loss.dim() != 0:
            raise ValueError(f"task_loss must be a scalar, got shape {tuple(task_loss.shape)}.")
        targets = self.targets()
        if self.beta == 0.0:
            # Measured but not trained: the loss, and so every gradient, is exactly the task's.
            with torch.no_grad():
                entropies, measured = self.entropies(activations, masks, return_measured=True)
                lbe_per_layer = _measured_only((entropies - targets).square(), measured)
            return LBEOutput(
                loss=task_loss,
                task_loss=task_loss,
                lbe_loss=torch.zeros((), device=task_loss.device),
                entropies=entropies,
                lbe_per_layer=lbe_per_layer,
                targets=targets.detach(),
                measured=measured,
            )
        entropies, measured = self.entropies(activations, masks, return_measured=True)
        lbe_per_layer = _measured_only((entropies - targets).square(), measured)
        lbe_loss = self.beta * self._scaled(self._layer_mean(lbe_per_layer, measured), task_loss.float())
        return LBEOutput(
            loss=task_loss + lbe_loss.to(task_loss.dtype),
            task_loss=task_loss,
            lbe_loss=lbe_loss,
            entropies=entropies,
            lbe_per_layer=lbe_per_layer,
            targets=targets.detach(),
            measured=measured,
        )

    def _scaled(self, mean_lbe: torch.Tensor, task_loss: torch.Tensor) -> torch.Tensor:
        """`mean_l(lbe_l) · L_task` whose gradient with respect to `mean_l(lbe_l)` is `|L_task|` (so that a negative
        task loss still pulls the entropies towards their targets) and with respect to `L_task` is `mean_l(lbe_l)`: the
        paper's value and, where `L_task ≥ 0`, its gradients. `mean_l(lbe_l)` alone without `scale_by_task_loss`."""
        if not self.scale_by_task_loss:
            return mean_lbe
        detached = mean_lbe.detach()
        return detached * task_loss + (mean_lbe - detached) * task_loss.detach().abs()

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, beta={self.beta}, alpha_init={self.alpha_init}, "
            f"alpha_min={self.alpha_min}, fused={self.fused}, sync_entropy={self.sync_entropy}, "
            f"scale_by_task_loss={self.scale_by_task_loss}"
        )

    # --- α's optimizer -----------------------------------------------------------------------------------------------

    def configure_optimizer(
        self,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
        foreach: bool | None = None,
    ) -> torch.optim.AdamW:
        """Give `α` its own AdamW (no weight decay): the paper trains `α` with Adam beside the model.

        Args:
            lr: the base learning rate of `α`; `step(lr_factor)` applies `lr · lr_factor` (a schedule's factor).
            betas: Adam's betas; `BatchEntropyTrainer` passes the training arguments' `adam_beta1/2`.
            eps: Adam's epsilon; `BatchEntropyTrainer` passes `adam_epsilon`.
            fused: torch's fused implementation switch. Choosing the model optimizer's (and its `foreach`) makes
                `α`'s updates bit-identical to those it would get as a parameter group of that optimizer.
            foreach: torch's multi-tensor implementation switch (see `fused`).
        """
        if lr is None:
            raise ValueError("configure_optimizer needs a learning rate for α, got lr=None.")
        self.learning_rate = check_settings(alpha_learning_rate=lr)["alpha_learning_rate"]
        self.optimizer = torch.optim.AdamW(
            [self.alpha], lr=self.learning_rate, betas=betas, eps=eps, weight_decay=0.0, fused=fused, foreach=foreach
        )
        return self.optimizer

    def step(self, lr_factor: float = 1.0) -> None:
        """One AdamW step of `α` at `lr · lr_factor`, then clear `α`'s gradient.

        Across processes (an initialized `torch.distributed` group of more than one), `α`'s gradient is averaged
        first, so every process applies the same update and `α` stays identical everywhere; a process without a
        gradient this step (e.g. a batch of one example was skipped) takes part with zeros. Nothing is read on the
        host.
        """
        if self.optimizer is None:
            raise RuntimeError("BatchEntropyRegularizer.step() needs an optimizer: call configure_optimizer() first.")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if self.alpha.grad is None:
                self.alpha.grad = torch.zeros_like(self.alpha)
            dist.all_reduce(self.alpha.grad)
            self.alpha.grad.div_(dist.get_world_size())
        if self.alpha.grad is not None:
            self.optimizer.param_groups[0]["lr"] = self.learning_rate * lr_factor
            self.optimizer.step()
        self.alpha.grad = None

    # --- persistence -------------------------------------------------------------------------------------------------

    def settings(self) -> dict:
        """Everything but the tensors, as JSON-able values; the `lbe_*` keys are those of `BatchEntropyConfig`."""
        settings = {
            "num_layers": self.num_layers,
            "layer_names": self.layer_names,
            **{field: getattr(self, _ATTRIBUTES.get(argument, argument)) for field, argument in SETTINGS.items()},
        }
        if self.optimizer is not None:
            group = self.optimizer.param_groups[0]
            settings["optimizer"] = {"name": "AdamW", "lr": self.learning_rate, "betas": list(group["betas"]),
                                     "eps": group["eps"]}
        return settings

    def save_pretrained(self, save_directory: str | os.PathLike, schedule: dict[str, float] | None = None) -> None:
        """Write `α` and its AdamW state (safetensors) and the settings (JSON) into `save_directory`, beside the
        model's own files. `schedule`: the state of the schedule that scales α's rate (the trainer's
        `ScheduleFactor.state_dict()`), saved with the optimizer's settings (`read_schedule` reads it back)."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        tensors = {"alpha": self.alpha.detach().cpu().contiguous()}
        state = self.optimizer.state.get(self.alpha, {}) if self.optimizer is not None else {}
        for name in _OPTIMIZER_STATE:
            if name in state:
                tensors[f"optimizer.{name}"] = torch.as_tensor(state[name]).detach().cpu().contiguous()
        save_file(tensors, os.path.join(save_directory, REGULARIZER_WEIGHTS_NAME))
        settings = self.settings()
        if schedule and "optimizer" in settings:
            settings["optimizer"]["schedule"] = dict(schedule)
        with open(os.path.join(save_directory, REGULARIZER_CONFIG_NAME), "w") as f:
            json.dump(settings, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides) -> BatchEntropyRegularizer:
        """Rebuild a regularizer saved by `save_pretrained` (with its optimizer, if one was saved); keyword arguments
        override the constructor's arguments."""
        settings = cls.read_settings(directory)
        kwargs = {"layer_names": settings["layer_names"], **overrides}
        regularizer = cls.from_config(SimpleNamespace(**settings), settings["num_layers"], **kwargs)
        optimizer = settings.get("optimizer")
        if optimizer is not None:
            regularizer.configure_optimizer(optimizer["lr"], betas=tuple(optimizer["betas"]), eps=optimizer["eps"])
        regularizer.load_state(directory)
        return regularizer

    @staticmethod
    def read_settings(directory: str | os.PathLike) -> dict:
        path = os.path.join(directory, REGULARIZER_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No batch-entropy regularizer in {directory} (missing {REGULARIZER_CONFIG_NAME}). It is written by "
                "BatchEntropyTrainer with every checkpoint; was this folder saved by plain transformers.Trainer?"
            )
        with open(path) as f:
            settings = json.load(f)
        return {_LEGACY_KEYS.get(key, key): value for key, value in settings.items()}

    @classmethod
    def read_schedule(cls, directory: str | os.PathLike) -> dict[str, float]:
        """The schedule state `save_pretrained(..., schedule=...)` wrote into `directory` (`{}` where none was)."""
        return dict((cls.read_settings(directory).get("optimizer") or {}).get("schedule") or {})

    def load_state(self, directory: str | os.PathLike) -> None:
        """Copy the saved `α` into this regularizer's parameter, in place, and its AdamW state into the optimizer
        (when both were saved and this regularizer has one).

        The saved layer names must be this regularizer's: `α_l` belongs to one layer, and a model whose layers differ
        from the checkpoint's would otherwise get its targets silently shuffled.
        """
        from safetensors.torch import load_file

        saved = self.read_settings(directory)
        if list(saved["layer_names"]) != self.layer_names:
            raise ValueError(
                f"The batch-entropy regularizer saved in {directory} belongs to other layers than this model's.\n"
                f"  saved ({saved['num_layers']}): {saved['layer_names']}\n"
                f"  model ({self.num_layers}): {self.layer_names}\n"
                "Resume with the same model and lbe_target_modules as the checkpoint, or start α afresh from a "
                "folder without batch_entropy_regularizer.* files."
            )
        tensors = load_file(os.path.join(directory, REGULARIZER_WEIGHTS_NAME))
        with torch.no_grad():
            self.alpha.copy_(tensors["alpha"].to(self.alpha.device))
        if self.optimizer is not None and all(f"optimizer.{name}" in tensors for name in _OPTIMIZER_STATE):
            state = self.optimizer.state_dict()
            state["state"] = {0: {name: tensors[f"optimizer.{name}"] for name in _OPTIMIZER_STATE}}
            self.optimizer.load_state_dict(state)
