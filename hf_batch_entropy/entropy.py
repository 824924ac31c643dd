r"""Batch-entropy: how much information about the input a layer's activations still carry.

For activations `a` of shape `(B, ...)`, flattened to `(B, U)` (`B` examples, `U` units), each unit's values over the
mini-batch are taken to be Gaussian with unbiased variance `σ_u²`, and its differential entropy (in nats) is

    H_u = ½ · ln(π·e·σ_u² + 1)

The `+ 1` keeps `H_u ≥ 0` and makes a dead unit (`σ_u = 0`) have entropy exactly 0. The layer's batch-entropy is
`H = mean_u H_u`. It is undefined for `B < 2`.

Two paths compute it:

- `batch_entropy(x)`: one layer, the reference, written as the formula reads.
- `batch_entropies(xs)`: many layers at once. Layers of the same flattened shape are reduced together in one pass
  (a custom autograd function that keeps only the per-unit means, not a stacked copy of the activations, for the
  backward), so the number of kernels per step does not grow with depth. With `sync=True` the per-unit statistics are
  merged across processes first (`torch.distributed`), with gradients flowing through the merge.

Everything is computed in float32 whatever the activations' dtype or autocast: bf16 has 8 bits of mantissa, too few for
a variance, and fp16 variances over- and underflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["batch_entropy", "batch_entropies", "entropy_from_variance"]

PI_E = math.pi * math.e

# Layers are stacked in chunks of at most this many floats so that the transient stacked copy stays small.
_MAX_CHUNK_NUMEL = 1 << 24


def entropy_from_variance(var: torch.Tensor) -> torch.Tensor:
    """`H = ½·ln(π·e·σ² + 1)`, elementwise, in nats. `var`: per-unit unbiased variances (any shape)."""
    return 0.5 * torch.log1p(PI_E * var)


def _as_units(x: torch.Tensor, what: str = "activations") -> torch.Tensor:
    """`(B, ...)` → `(B, U)` float32, after checking that a batch-entropy exists."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Batch-entropy needs a tensor of {what}, got {type(x).__name__}.")
    if x.dim() == 0 or x.shape[0] < 2:
        shape = tuple(x.shape)
        raise ValueError(
            f"Batch-entropy is a statistic over the batch and needs at least 2 examples; the {what} have shape "
            f"{shape}. Use a per-device batch size of 2 or more (and `dataloader_drop_last=True` so the last batch "
            "is not a single example), or turn on `lbe_sync_entropy` to pool the batch across processes."
        )
    return x.reshape(x.shape[0], -1).float()


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def batch_entropy(x: torch.Tensor) -> torch.Tensor:
    """Batch-entropy of one layer's activations, the reference implementation.

    Args:
        x: activations of shape `(B, ...)`, `B ≥ 2`; any float dtype.

    Returns:
        A float32 scalar: `mean_u ½·ln(π·e·σ_u² + 1)` with `σ_u` the unbiased standard deviation over the batch of
        unit `u` of `x.flatten(1)`. Differentiable.
    """
    x = _as_units(x)
    return entropy_from_variance(torch.var(x, dim=0, correction=1)).mean()


class _GroupVariance(torch.autograd.Function):
    """Per-unit unbiased variances of `L` same-shaped layers, `(B, U)` each → `(L, U)`, in one reduction.

    Autograd would save the stacked `(L, B, U)` copy for the backward; this saves only the means `(L, U)` and the
    layers themselves (which the model keeps alive for its own backward anyway) and rebuilds the stack when needed.

    `∂σ²_lu / ∂x_lbu = 2·(x_lbu − μ_lu) / (B − 1)`.
    """

    @staticmethod
    def forward(ctx, *layers: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(layers)  # (L, B, U)
        var, mean = torch.var_mean(stacked, dim=1, correction=1)
        ctx.save_for_backward(mean, *layers)
        return var

    @staticmethod
    def backward(ctx, grad_var: torch.Tensor):
        mean, *layers = ctx.saved_tensors
        batch = layers[0].shape[0]
        stacked = torch.stack(layers)
        grad = (stacked - mean.unsqueeze(1)).mul_(grad_var.unsqueeze(1) * (2.0 / (batch - 1)))
        return tuple(grad.unbind(0))


class _AllReduceSum(torch.autograd.Function):
    """`y = Σ_ranks x` on every rank. The gradient of the sum of all ranks' losses w.r.t. one rank's `x` is the sum of
    every rank's `∂loss/∂y`, so the backward is an all-reduce too (as in `SyncBatchNorm`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _global_variance(stacked: torch.Tensor) -> torch.Tensor:
    """Unbiased per-unit variances `(L, U)` of `stacked` `(L, B_r, U)` over the union of all ranks' batches.

    Two passes, like `torch.var`: first the global count and mean, then the squared deviations from that mean. This is
    as stable as the single-process computation (no `E[x²] − E[x]²` cancellation). Cost: two all-reduces of `L·U`
    floats and one of a scalar.
    """
    count = torch.tensor([float(stacked.shape[1])], device=stacked.device)
    dist.all_reduce(count)
    total = int(count.item())
    if total < 2:
        raise ValueError("Batch-entropy needs at least 2 examples across all processes.")
    mean = _AllReduceSum.apply(stacked.sum(dim=1)) / total
    sq_dev = (stacked - mean.unsqueeze(1)).square().sum(dim=1)
    return _AllReduceSum.apply(sq_dev) / (total - 1)


def _sync_active(sync: bool) -> bool:
    return sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def batch_entropies(
    activations: Sequence[torch.Tensor],
    *,
    fused: bool = True,
    sync: bool = False,
) -> torch.Tensor:
    """Batch-entropies of many layers at once.

    Args:
        activations: `L` tensors, layer `l` of shape `(B, ...)` with the same `B` for all; shapes may differ.
        fused: reduce same-shaped layers together (the default; fewer kernels and less memory). `False` loops over
            layers with `batch_entropy`; both give the same numbers.
        sync: merge the per-unit statistics across all processes of the default `torch.distributed` group before
            taking the entropy, so that the batch is the global one. A no-op without an initialized process group.

    Returns:
        A float32 tensor of shape `(L,)`: `H_l = mean_u ½·ln(π·e·σ_lu² + 1)` in layer order. Differentiable.
    """
    if len(activations) == 0:
        raise ValueError("batch_entropies got no activations: there is no layer to regularize.")
    units = [_as_units(x, f"activations of layer {i}") for i, x in enumerate(activations)]
    batch = units[0].shape[0]
    for i, x in enumerate(units):
        if x.shape[0] != batch:
            raise ValueError(
                f"All layers must share the batch dimension: layer 0 has {batch} examples, layer {i} has {x.shape[0]}."
            )
    distributed = _sync_active(sync)
    if not fused and not distributed:
        return torch.stack([entropy_from_variance(torch.var(x, dim=0, correction=1)).mean() for x in units])

    # Group layers by unit count (same-shaped layers are the common case: every block of a transformer or a vanilla
    # network), then chunk each group so the transient stacked copy stays bounded.
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(units):
        groups.setdefault(x.shape[1], []).append(i)
    order: list[int] = []
    values: list[torch.Tensor] = []
    for num_units, indices in groups.items():
        per_chunk = max(1, _MAX_CHUNK_NUMEL // (batch * num_units))
        for start in range(0, len(indices), per_chunk):
            chunk = indices[start : start + per_chunk]
            layers = [units[i] for i in chunk]
            var = _global_variance(torch.stack(layers)) if distributed else _GroupVariance.apply(*layers)
            values.append(entropy_from_variance(var).mean(dim=1))
            order.extend(chunk)
    entropies = torch.cat(values) if len(values) > 1 else values[0]
    if order != sorted(order):
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        entropies = entropies[inverse.to(entropies.device)]
    return entropies
