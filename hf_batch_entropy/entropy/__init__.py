r"""Batch-entropy: how much information about the input a layer's activations still carry.

For activations `a` of shape `(B, ...)`, flattened to `(B, U)`, `H = mean_u ½·ln(π·e·σ_u² + 1)` in nats, with `σ_u²`
the unbiased variance of unit `u` over the batch (`reference` has the formula, padding masks and units in full).

Three parts, one direction (reference ← fused ← distributed), composed here by `batch_entropies`:

- `reference`: one layer, `batch_entropy(x, mask)`, written as the formula reads; the rule of what can be measured
  (`is_measurable`).
- `fused`: many same-shaped layers in one pass per chunk, with a custom backward that saves no stacked copy.
- `distributed`: the per-unit statistics merged across processes (`sync=True`, `lbe_sync_entropy`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .distributed import check_same_layout, global_squares
from .fused import chunk_layers, local_squares
from .reference import (
    as_units,
    batch_entropy,
    entropy_from_variance,
    is_measurable,
    masked_layer_entropy,
    pools_across_processes,
    unit_mask,
)

__all__ = [
    "batch_entropies",
    "batch_entropy",
    "entropy_from_variance",
    "is_measurable",
    "pools_across_processes",
    "unit_mask",
]


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def batch_entropies(
    activations: Sequence[torch.Tensor],
    *,
    fused: bool = True,
    sync: bool = False,
    masks: Sequence[torch.Tensor | None] | None = None,
    return_measured: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Batch-entropies of many layers at once.

    Args:
        activations: `L` tensors, layer `l` of shape `(B, ...)` with the same `B` for all; shapes, dtypes and devices
            may differ.
        fused: reduce same-shaped layers together (the default; fewer kernels and less memory). `False` loops over
            layers with `batch_entropy`; both give the same numbers.
        sync: merge the per-unit statistics across all processes of the default `torch.distributed` group before
            taking the entropy, so that the batch is the global one. A no-op without an initialized process group.
        masks: optional padding masks, one per layer (`None` for a layer without padding): a `(B, T)` mask of real
            tokens for token-level activations `(B, T, ...)`. Layers sharing one mask tensor share its expansion.
        return_measured: also return which layers have a batch-entropy (see Returns).

    Returns:
        A float32 tensor of shape `(L,)` on the device of the first layer: `H_l = mean_u ½·ln(π·e·σ_lu² + 1)` in layer
        order (over the units at positions with at least two real tokens, where masked; 0 for a masked layer without
        any such position). Differentiable. With `return_measured=True`, the pair `(H, measured)`: `measured` is a
        bool tensor `(L,)`, False for a masked layer without any position of two real tokens (across processes where
        pooled), or `None` where no layer is masked (then every layer is measured).
    """
    if len(activations) == 0:
        raise ValueError("batch_entropies got no activations: there is no layer to regularize.")
    if masks is not None and len(masks) != len(activations):
        raise ValueError(f"Got {len(masks)} masks for {len(activations)} layers: give one per layer (None: no mask).")
    distributed = pools_across_processes(sync)
    fused = fused or distributed
    if distributed:
        check_same_layout(activations, masks)
    units = [as_units(x, i, to_float=not fused, sync=sync) for i, x in enumerate(activations)]
    batch = units[0].shape[0]
    for i, x in enumerate(units):
        if x.shape[0] != batch:
            raise ValueError(
                f"All layers must share the batch dimension: layer 0 has {batch} examples, layer {i} has {x.shape[0]}."
            )
    any_mask = masks is not None and any(m is not None for m in masks)
    if masks is None:
        masks = [None] * len(units)
    if not fused:
        entropies = torch.stack([
            entropy_from_variance(torch.var(x, dim=0, correction=1)).mean() if m is None else batch_entropy(a, m)
            for x, a, m in zip(units, activations, masks)
        ])
        if not return_measured:
            return entropies
        measured = None
        if any_mask:
            measured = torch.stack([
                torch.ones((), dtype=torch.bool, device=entropies.device) if m is None
                else (m.sum(dim=0).max() >= 2).to(entropies.device)
                for m in masks
            ])
        return entropies, measured

    # One float mask (B, U) per distinct (mask, layer shape), shared by the layers that have both.
    mask_keys, unit_masks = None, masks
    if any_mask:
        expanded: dict[tuple, torch.Tensor] = {}
        mask_keys, unit_masks = [], []
        for x, a, m in zip(units, activations, masks):
            key = None if m is None else (id(m), tuple(a.shape), x.device)
            if key is not None and key not in expanded:
                expanded[key] = unit_mask(m.to(x.device), a.shape)
            mask_keys.append(key)
            unit_masks.append(None if key is None else expanded[key])

    # Group layers by shape (same-shaped layers are the common case: every block of a transformer or a vanilla
    # network), chunk each group so the transient stacked copy stays bounded, and reduce each chunk in one pass.
    groups = chunk_layers(units, mask_keys)
    chunks = [chunk for group in groups for chunk in group]
    squares, counts = (global_squares if distributed else local_squares)(units, chunks, activations, unit_masks)
    device = units[0].device
    values, flags, position = [], [], 0
    for group in groups:
        group_squares = squares[position : position + len(group)]
        count = counts[position]
        position += len(group)
        sq = torch.cat(group_squares) if len(group_squares) > 1 else group_squares[0]
        if unit_masks[group[0][0]] is None:
            entropy = entropy_from_variance(sq / (count - 1)).mean(dim=1)
            measured = torch.ones((), dtype=torch.bool, device=device)
        else:
            entropy, measured = masked_layer_entropy(sq, count.to(sq.device))
        values.append(entropy.to(device))
        flags.append(measured.to(device).expand(sq.shape[0]))
    entropies = torch.cat(values) if len(values) > 1 else values[0]
    measured = (torch.cat(flags) if len(flags) > 1 else flags[0]) if any_mask and return_measured else None
    order = [i for chunk in chunks for i in chunk]
    if order != sorted(order):
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        entropies = entropies[inverse.to(device)]
        measured = measured[inverse.to(device)] if measured is not None else None
    return (entropies, measured) if return_measured else entropies
