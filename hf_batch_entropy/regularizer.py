r"""The LBE regularizer: learnable per-layer entropy targets `α` and the loss that pulls each layer towards its target.

For layers `l = 1…L` with batch-entropies `H_l` (see `entropy.py`):

    target_l = max(α_min, |α_l|)
    lbe_l    = (H_l − target_l)²
    L        = L_task + β · mean_l(lbe_l) · L_task

Multiplying by `L_task` (as the paper does) makes the regularizer fade as the task is learned, and makes it scale with
whatever normalization the task loss already has (gradient accumulation, token averaging across devices).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .entropy import batch_entropies

__all__ = ["BatchEntropyRegularizer", "LBEOutput", "REGULARIZER_CONFIG_NAME", "REGULARIZER_WEIGHTS_NAME"]

REGULARIZER_WEIGHTS_NAME = "batch_entropy_regularizer.safetensors"
REGULARIZER_CONFIG_NAME = "batch_entropy_regularizer.json"


@dataclass
class LBEOutput:
    """What one regularized step produced. All tensors are float32; `(L,)` means one value per layer."""

    loss: torch.Tensor
    """The regularized loss `L_task + lbe_loss` (scalar, differentiable)."""
    task_loss: torch.Tensor
    """The task loss it was given (scalar)."""
    lbe_loss: torch.Tensor
    """The added term `β · mean_l(lbe_l) · L_task` (scalar)."""
    entropies: torch.Tensor
    """`H_l`, shape `(L,)`, nats per unit."""
    lbe_per_layer: torch.Tensor
    """`(H_l − target_l)²`, shape `(L,)`."""
    targets: torch.Tensor
    """`max(α_min, |α_l|)`, shape `(L,)`."""


class BatchEntropyRegularizer(nn.Module):
    """Holds one learnable entropy target `α_l` per regularized layer and computes the LBE loss.

    Args:
        num_layers: number of regularized layers `L` (one `α` each).
        beta: weight `β` of the LBE term; 0 measures entropies but leaves the loss untouched.
        alpha: initial value `α₀` of every `α_l`.
        alpha_min: floor of the targets.
        fused: compute all layers' entropies in one fused reduction (see `batch_entropies`).
        sync_entropy: compute entropies over the global batch of all processes.
        layer_names: optional names of the layers, for messages and logs.

    Example:
        >>> reg = BatchEntropyRegularizer(num_layers=3, beta=0.5, alpha=0.5, alpha_min=0.5)
        >>> out = reg([h1, h2, h3], task_loss)      # each h: (B, ...) activations
        >>> out.loss.backward()                     # trains the model and reg.alpha
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
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"BatchEntropyRegularizer needs at least one layer, got num_layers={num_layers}.")
        if layer_names is not None and len(layer_names) != num_layers:
            raise ValueError(f"Got {len(layer_names)} layer names for {num_layers} layers.")
        self.beta = float(beta)
        self.alpha_init = float(alpha)
        self.alpha_min = float(alpha_min)
        self.fused = fused
        self.sync_entropy = sync_entropy
        self.layer_names = list(layer_names) if layer_names is not None else [f"layer_{i}" for i in range(num_layers)]
        self.alpha = nn.Parameter(torch.full((num_layers,), float(alpha)))

    @classmethod
    def from_config(cls, config, num_layers: int, layer_names: Sequence[str] | None = None) -> BatchEntropyRegularizer:
        """Build from a `BatchEntropyConfig` (or anything with the same `lbe_*` attributes)."""
        return cls(
            num_layers,
            beta=config.lbe_beta,
            alpha=config.lbe_alpha,
            alpha_min=config.lbe_alpha_min,
            fused=config.lbe_fused,
            sync_entropy=config.lbe_sync_entropy,
            layer_names=layer_names,
        )

    @property
    def num_layers(self) -> int:
        return self.alpha.numel()

    def targets(self) -> torch.Tensor:
        """`max(α_min, |α_l|)`, shape `(L,)`."""
        return self.alpha.abs().clamp_min(self.alpha_min)

    def entropies(self, activations: Sequence[torch.Tensor]) -> torch.Tensor:
        """Batch-entropies `(L,)` of the activations, after checking that they are the layers this regularizer has."""
        if len(activations) != self.num_layers:
            raise ValueError(
                f"The model produced {len(activations)} regularized activations this step, but the regularizer has "
                f"{self.num_layers} targets α (one per layer, fixed when training started). LBE needs the same layers "
                "at every step: a model whose depth changes between steps (layer drop, early exit, a module called a "
                "varying number of times) must be regularized on a fixed set of layers; choose them with "
                "`lbe_target_modules`."
            )
        entropies = batch_entropies(activations, fused=self.fused, sync=self.sync_entropy)
        # One host sync per step; a NaN here would otherwise silently poison the loss and every α.
        if not bool(torch.isfinite(entropies).all()):
            bad = [self.layer_names[i] for i in torch.nonzero(~torch.isfinite(entropies)).flatten().tolist()]
            raise FloatingPointError(
                f"Batch-entropy is NaN or inf for {len(bad)} layer(s): {', '.join(bad[:10])}"
                f"{' ...' if len(bad) > 10 else ''}. Their activations contain NaN or inf values, so the model has "
                "diverged (or overflowed in fp16). Lower the learning rate, enable gradient clipping "
                "(`max_grad_norm`), or train in bf16/fp32 instead of fp16."
            )
        return entropies

    def forward(self, activations: Sequence[torch.Tensor], task_loss: torch.Tensor) -> LBEOutput:
        """Regularize one step.

        Args:
            activations: the `L` regularized layers' activations, each `(B, ...)`.
            task_loss: the scalar task loss `L_task`.

        Returns:
            An `LBEOutput` whose `loss` is `L_task + β·mean_l((H_l − max(α_min, |α_l|))²)·L_task`.
        """
        if task_loss.dim() != 0:
            raise ValueError(f"task_loss must be a scalar, got shape {tuple(task_loss.shape)}.")
        targets = self.targets()
        if self.beta == 0.0:
            # Measured but not trained: the loss, and so every gradient, is exactly the task's.
            with torch.no_grad():
                entropies = self.entropies(activations)
                lbe_per_layer = (entropies - targets).square()
            return LBEOutput(
                loss=task_loss,
                task_loss=task_loss,
                lbe_loss=torch.zeros((), device=task_loss.device),
                entropies=entropies,
                lbe_per_layer=lbe_per_layer,
                targets=targets.detach(),
            )
        entropies = self.entropies(activations)
        lbe_per_layer = (entropies - targets).square()
        lbe_loss = self.beta * lbe_per_layer.mean() * task_loss.float()
        return LBEOutput(
            loss=task_loss + lbe_loss.to(task_loss.dtype),
            task_loss=task_loss,
            lbe_loss=lbe_loss,
            entropies=entropies,
            lbe_per_layer=lbe_per_layer,
            targets=targets.detach(),
        )

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, beta={self.beta}, alpha_init={self.alpha_init}, "
            f"alpha_min={self.alpha_min}, fused={self.fused}, sync_entropy={self.sync_entropy}"
        )

    # --- persistence -------------------------------------------------------------------------------------------------

    def settings(self) -> dict:
        """Everything but `α` itself, as JSON-able values."""
        return {
            "num_layers": self.num_layers,
            "beta": self.beta,
            "alpha": self.alpha_init,
            "alpha_min": self.alpha_min,
            "fused": self.fused,
            "sync_entropy": self.sync_entropy,
            "layer_names": self.layer_names,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `α` (safetensors) and the settings (JSON) into `save_directory`, beside the model's own files."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        save_file({"alpha": self.alpha.detach().cpu().contiguous()}, os.path.join(save_directory, REGULARIZER_WEIGHTS_NAME))
        with open(os.path.join(save_directory, REGULARIZER_CONFIG_NAME), "w") as f:
            json.dump(self.settings(), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides) -> BatchEntropyRegularizer:
        """Rebuild a regularizer saved by `save_pretrained`; keyword arguments override saved settings."""
        settings = cls.read_settings(directory)
        settings.update(overrides)
        regularizer = cls(**settings)
        regularizer.load_alpha(directory)
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
            return json.load(f)

    def load_alpha(self, directory: str | os.PathLike) -> None:
        """Copy the saved `α` into this regularizer's parameter, in place (optimizers keep referring to it)."""
        from safetensors.torch import load_file

        alpha = load_file(os.path.join(directory, REGULARIZER_WEIGHTS_NAME))["alpha"]
        if alpha.shape != self.alpha.shape:
            raise ValueError(
                f"The regularizer saved in {directory} has {alpha.numel()} layers; this one has {self.num_layers}. "
                "Resume with the same model and lbe_target_modules."
            )
        with torch.no_grad():
            self.alpha.copy_(alpha.to(self.alpha.device))
