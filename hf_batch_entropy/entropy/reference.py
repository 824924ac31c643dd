r"""The batch-entropy of one layer, written as the formula reads: the reference the fused path is tested against.

For activations `a` of shape `(B, ...)`, flattened to `(B, U)` (`B` examples, `U` units), each unit's values over the
mini-batch are taken to be Gaussian with unbiased variance `σ_u²`, and its differential entropy (in nats) is

    H_u = ½ · ln(π·e·σ_u² + 1)

The `+ 1` keeps `H_u ≥ 0` and makes a dead unit (`σ_u = 0`) have entropy exactly 0. The layer's batch-entropy is
`H = mean_u H_u`. It is undefined for `B < 2`.

Padding. Token-level activations `(B, T, ...)` of a padded batch come with a mask `(B, T)` (1 for a real token, 0
for padding). Then unit `u` at position `t` has the `n_t = Σ_b m_bt` values of the examples with a real token there:

    μ_u  = Σ_b m_bt·x_bu / n_t,      σ_u² = Σ_b m_bt·(x_bu − μ_u)² / (n_t − 1)

and the layer's batch-entropy is the mean of `H_u` over the units at positions with `n_t ≥ 2` (others are left out).
The same examples unpadded, padded on the right or on the left give the same value. Padding is left out by selection,
not by multiplying with the mask, so whatever the padded positions hold (NaN and inf included) never reaches the
statistics or the gradients. A layer without any position of two real tokens has no batch-entropy: its value is 0,
never NaN.

Whether a batch can be measured at all is decided in one place, `is_measurable`: at least 2 examples, or any number
when the statistics are pooled across processes (`pools_across_processes`), where the global batch decides.

Everything is computed in float32 whatever the activations' dtype or autocast: bf16 has 8 bits of mantissa, too few for
a variance, and fp16 variances over- and underflow.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = [
    "as_units",
    "batch_entropy",
    "entropy_from_variance",
    "is_measurable",
    "masked_layer_entropy",
    "padding_of",
    "pools_across_processes",
    "unit_mask",
]

PI_E = math.pi * math.e


def entropy_from_variance(var: torch.Tensor) -> torch.Tensor:
    """`H = ½·ln(π·e·σ² + 1)`, elementwise, in nats. `var`: per-unit unbiased variances (any shape)."""
    return 0.5 * torch.log1p(PI_E * var)


def pools_across_processes(sync: bool) -> bool:
    """Whether batch statistics are pooled across processes: `sync` (`lbe_sync_entropy`) is asked for and an
    initialized `torch.distributed` group has more than one process."""
    return _sync_active(sync)


def _sync_active(sync: bool) -> bool:
    return sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_measurable(batch_size: int, sync: bool) -> bool:
    """Whether a forward pass of `batch_size` examples (sequences, for token-level activations) has a batch-entropy:
    the one rule, used by the estimator and the trainer alike. It needs 2 examples, or, where the statistics are pooled
    across processes (`pools_across_processes`), any number: the global batch decides (a global batch of one gives an
    infinite variance, which the callers' finiteness checks report)."""
    return batch_size >= 2 or (batch_size >= 1 and pools_across_processes(sync))


def _what(layer: int | None) -> str:
    return "activations" if layer is None else f"activations of layer {layer}"


def as_units(x: torch.Tensor, layer: int | None = None, to_float: bool = True, sync: bool = False) -> torch.Tensor:
    """`(B, ...)` → `(B, U)` (float32 unless `to_float=False`), after checking that a batch-entropy exists
    (`is_measurable`); `layer`: the index that error messages name."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Batch-entropy needs a tensor of {_what(layer)}, got {type(x).__name__}.")
    if x.dim() == 0 or not is_measurable(x.shape[0], sync):
        shape = tuple(x.shape)
        raise ValueError(
            f"Batch-entropy is a statistic over the batch and needs at least 2 examples; the {_what(layer)} have shape "
            f"{shape}. Use a per-device batch size of 2 or more (and `dataloader_drop_last=True` so the last batch "
            "is not a single example), or turn on `lbe_sync_entropy` to pool the batch across processes."
        )
    if x.dim() != 2:
        # A 2-D tensor is used as it is: `reshape` would return a view, and the estimator's gradient would reach the
        # layer through a view node as a view, which autograd cannot add in place to the model's own gradient of
        # that layer (an extra allocation and copy per layer).
        x = x.reshape(x.shape[0], -1)
    return x.float() if to_float else x


def unit_mask(mask: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A token mask `(B, T)` as a float32 mask `(B, U)` of the units of activations of `shape` `(B, T, ...)`."""
    if mask.dim() != 2 or len(shape) < 2 or tuple(mask.shape) != tuple(shape[:2]):
        raise ValueError(
            f"A padding mask of shape {tuple(mask.shape)} does not fit activations of shape {tuple(shape)}: it must be "
            "(batch, sequence) and the activations (batch, sequence, ...)."
        )
    expanded = mask.to(torch.float32).reshape(*mask.shape, *([1] * (len(shape) - 2))).expand(shape)
    return expanded.reshape(shape[0], -1)


def padding_of(mask: torch.Tensor) -> torch.Tensor:
    """The padded entries (`True`) of a float unit mask `(B, U)`: what selection leaves out."""
    return mask == 0


def masked_layer_entropy(squares: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(L, U)` masked sums of squared deviations and `(U,)` counts → `(L,)` entropies over the units with count ≥ 2,
    and whether there is any such unit (a bool scalar). Without one the entropy is 0, not 0/0: the denominators are
    clamped so that neither the value nor its gradient can be NaN."""
    valid = (count >= 2).to(squares.dtype)
    variance = squares / (count - 1).clamp_min(1)
    num_valid = valid.sum()
    return (entropy_from_variance(variance) * valid).sum(dim=-1) / num_valid.clamp_min(1), num_valid > 0


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def batch_entropy(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-entropy of one layer's activations, the reference implementation.

    Args:
        x: activations of shape `(B, ...)`, `B ≥ 2`; any float dtype.
        mask: optional padding mask `(B, T)` for token-level activations `(B, T, ...)` (see the module docstring).

    Returns:
        A float32 scalar: `mean_u ½·ln(π·e·σ_u² + 1)` with `σ_u` the unbiased standard deviation over the batch of
        unit `u` of `x.flatten(1)` (over the real tokens only, with a mask; 0 where no position has two). Differentiable.
    """
    units = as_units(x)
    if mask is None:
        return entropy_from_variance(torch.var(units, dim=0, correction=1)).mean()
    m = unit_mask(mask.to(units.device), x.shape)
    padding = padding_of(m)
    count = m.sum(dim=0)
    mean = units.masked_fill(padding, 0).sum(dim=0) / count.clamp_min(1)
    squares = (units - mean).masked_fill(padding, 0).square().sum(dim=0)
    return masked_layer_entropy(squares, count)[0]
