"""Batch-entropies over the global batch of all processes (`lbe_sync_entropy`), like `SyncBatchNorm`.

Each unit's count, mean and sum of squared deviations are merged across the processes of the default
`torch.distributed` group before the entropy is taken, with gradients through the merge (`_AllReduceSum`), so that N
processes with batch B/N give what one process with batch B gives. Every process must measure the same units
(`check_same_layout` says so on every rank before a collective could hang).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .fused import chunk_workspace, squares_of_chunk
from .reference import padding_of

__all__ = ["check_same_layout", "global_squares"]


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


_SHAPE_GROUPS: dict[int, object] = {}


def _shape_group():
    """A process group whose collectives run on CPU tensors (gloo): the default one where it is gloo, else a gloo
    group made once (by every rank, at their first synchronized step); `None` where gloo is not available."""
    default = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return default
    key = id(default)
    if key not in _SHAPE_GROUPS:
        _SHAPE_GROUPS[key] = dist.new_group(backend="gloo") if dist.is_gloo_available() else None
    return _SHAPE_GROUPS[key]


def check_same_layout(activations: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None) -> None:
    """Raise the same error on every rank where the ranks' activations do not have the same units (a sequence length
    that differs between ranks: dynamic padding, packing), before the all-reduces, whose sizes would then differ
    (gloo aborts one rank with a size mismatch, NCCL hangs).

    The shapes are host metadata: they are all-gathered as CPU tensors (a gloo group; no device synchronization) and
    compared on the host. Only where gloo is missing do they travel on the device, and then comparing them reads the
    device."""
    shapes = [tuple(x.shape[1:]) for x in activations]
    dims = max(len(s) for s in shapes)
    masked = [masks is not None and masks[i] is not None for i in range(len(shapes))]
    # Per layer: its number of dimensions, its unit dimensions (padded with -1), whether it is masked (a masked layer
    # sends per-unit counts); the batch may differ.
    local = torch.tensor([[len(s), *s, *([-1] * (dims - len(s))), int(m)] for s, m in zip(shapes, masked)],
                         dtype=torch.int64)
    group = _shape_group()
    device = torch.device("cpu") if group is not None else activations[0].device
    world = dist.get_world_size()
    # Sizes first (the number of layers and of dimensions may differ too), then the shapes padded to the largest.
    size = torch.tensor([local.shape[0], local.shape[1]], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    rows, cols = (max(int(s[i]) for s in sizes) for i in (0, 1))
    padded = torch.full((rows, cols), -2, dtype=torch.int64)
    padded[: local.shape[0], : local.shape[1]] = local
    padded = padded.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    if all(torch.equal(g, gathered[0]) for g in gathered[1:]):
        return
    described = []
    for rank, g in enumerate(gathered):
        first = g[0].tolist()
        described.append(f"rank {rank}: {sum(1 for row in g.tolist() if row[0] >= 0)} layers, the first of shape "
                         f"(batch, {', '.join(str(d) for d in first[1 : 1 + first[0]])})")
    raise ValueError(
        "lbe_sync_entropy pools each unit's statistics across processes, so every process must measure the same units, "
        f"but their activations differ ({'; '.join(described)}): usually a sequence length that differs between "
        "processes (dynamic padding, packing). Pad every batch to one length (padding='max_length' with a fixed "
        "max_length, or a data collator that pads to it), or turn lbe_sync_entropy off."
    )


def global_squares(
    units: list[torch.Tensor], chunks: list[list[int]], originals: Sequence[torch.Tensor],
    masks: list[torch.Tensor | None],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per chunk `Σ (x − μ)²` `(L_chunk, U)` over the union of all processes' batches, and the global number of values
    per unit (a scalar, or `(U,)` where masked; tensors on the device, never read on the host).

    Two passes, like `torch.var`: first the global counts and means, then the squared deviations from those means, so
    it is as stable as the single-process computation (no `E[x²] − E[x]²` cancellation). All chunks travel together:
    two all-reduces forward (counts and sums; squared deviations) and one backward, of `Σ_layers U` floats each.
    """
    device = units[chunks[0][0]].device
    with torch.no_grad():
        sums, counts = [], []
        for chunk in chunks:
            mask = masks[chunk[0]]
            layer_sums = [units[i].float() if mask is None else units[i].float().masked_fill(padding_of(mask), 0)
                          for i in chunk]
            sums.append(torch.stack([x.sum(dim=0) for x in layer_sums]))
            counts.append(
                torch.full((1,), float(units[0].shape[0]), device=device) if mask is None else mask.sum(dim=0).to(device)
            )
        flat = torch.cat([s.flatten().to(device) for s in sums] + counts)
        dist.all_reduce(flat)
        means, offset = [], 0
        for s in sums:
            means.append(flat[offset : offset + s.numel()].view_as(s))
            offset += s.numel()
        global_counts = []
        for c in counts:
            global_counts.append(flat[offset : offset + c.numel()] if c.numel() > 1 else flat[offset])
            offset += c.numel()
        means = [
            (m / (c.clamp_min(1) if c.dim() else c)).unsqueeze(1).to(s.device)
            for m, c, s in zip(means, global_counts, sums)
        ]
    workspace = chunk_workspace(units, chunks)
    local = [
        squares_of_chunk(mean, [units[i] for i in chunk], [originals[i] for i in chunk], masks[chunk[0]], workspace)
        for mean, chunk in zip(means, chunks)
    ]
    flat = _AllReduceSum.apply(torch.cat([sq.flatten().to(device) for sq in local]))
    squares, offset = [], 0
    for sq in local:
        squares.append(flat[offset : offset + sq.numel()].view_as(sq).to(sq.device))
        offset += sq.numel()
    return squares, global_counts
