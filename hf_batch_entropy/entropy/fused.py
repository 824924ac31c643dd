r"""The fused estimator: the per-unit sums of squared deviations `Σ_b (x − μ)²` of many same-shaped layers at once.

`batch_entropies` groups layers of the same flattened shape, dtype, device and padding mask, cuts each group into
chunks of bounded size, and reduces each chunk in one pass (`_SquaredDeviations`, a custom autograd function that keeps
only the per-unit means, not a stacked copy of the activations, for the backward). On accelerators the number of
kernels per step then does not grow with depth; on CPUs the chunks are cache-sized and the backward goes layer by
layer, one operation per float32 layer. Values and gradients equal the reference loop's (`reference.batch_entropy`).

Plain PyTorch operators only: nothing is compiled.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from .._compat import order_backward, squared_difference, squared_difference_backward
from .reference import padding_of

__all__ = ["chunk_layers", "local_squares", "squares_of_chunk"]

# Layers are stacked in chunks of at most this many floats so that the transient stacked copy stays small. On CPUs the
# chunks are smaller still, 2 MiB, about an L2 cache: the reductions over a chunk then run from the cache, not from
# memory (on the depth-500 MLP of width 256, 16 layers per chunk were a few percent faster than 8 or 64; the values
# do not depend on the chunking, each layer's reductions are its own).
_MAX_CHUNK_NUMEL = 1 << 24
_CPU_CHUNK_NUMEL = 1 << 19

# Where the backward computes the gradients layer by layer rather than one stacked chunk at a time.
_PER_LAYER_BACKWARD_DEVICES = ("cpu",)


def _chunk_numel(device: torch.device) -> int:
    return min(_MAX_CHUNK_NUMEL, _CPU_CHUNK_NUMEL) if device.type == "cpu" else _MAX_CHUNK_NUMEL


def chunk_layers(units: list[torch.Tensor], mask_keys: Sequence[Hashable] | None = None) -> list[list[list[int]]]:
    """Indices of the layers `(B, U)` grouped by shape, dtype, device and padding mask (in first-seen order), each
    group in chunks of bounded size: `groups[g][c]` is the list of layer indices of chunk `c` of group `g`."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(units):
        groups.setdefault((x.shape[1], x.dtype, x.device, mask_keys[i] if mask_keys else None), []).append(i)
    batch = units[0].shape[0]
    chunked = []
    for (num_units, _, device, _), indices in groups.items():
        per_chunk = max(1, _chunk_numel(device) // (batch * num_units))
        chunked.append([indices[start : start + per_chunk] for start in range(0, len(indices), per_chunk)])
    return chunked


def _stack(layers: Sequence[torch.Tensor], workspace: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """The layers `(B, U)` stacked as float32 `(L, B, U)`, and whether that tensor is a copy of ours (to be written in
    place) rather than the caller's own float32 layer."""
    if (workspace is not None and len(layers) > 1 and layers[0].dtype == torch.float32
            and workspace.numel() >= len(layers) * layers[0].numel() and workspace.device == layers[0].device):
        # Stacked into the caller's scratch: no allocation (and no page faults on fresh memory) per chunk.
        out = workspace[: len(layers) * layers[0].numel()].view(len(layers), *layers[0].shape)
        return torch.stack(layers, out=out), True
    if len(layers) == 1:
        stacked = layers[0].unsqueeze(0)
        return stacked.float(), stacked.dtype != torch.float32
    stacked = torch.stack(layers)
    return (stacked.float() if stacked.dtype != torch.float32 else stacked), True


def _squared_deviations(
    mean: torch.Tensor | None, layers: Sequence[torch.Tensor], mask: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Σ_b m·(x − μ)²  (L, U), μ  (L, 1, U))` of same-shaped layers `(B, U)`, in float32; `μ` computed if `None`;
    `m` the unit mask `(B, U)` (all ones if `None`). Padded entries are replaced by 0 (selection, not a product, so a
    NaN there stays out). `workspace`: optional float32 scratch of at least `L·B·U` elements for the stacked copy
    (nothing returned refers to it, so one call's chunks can share it)."""
    padding = padding_of(mask) if mask is not None else None
    stacked, own = _stack(layers, workspace)
    if padding is not None:
        stacked = stacked.masked_fill_(padding, 0) if own else stacked.masked_fill(padding, 0)
        own = True
    if mean is None:
        mean = _batch_mean(stacked, mask)
    squares = squared_difference(stacked, mean.expand_as(stacked), out=stacked if own else None)
    if padding is not None:
        squares.masked_fill_(padding, 0)  # the padding, now at μ², back to 0
    return squares.sum(dim=1), mean


def _batch_mean(masked: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-unit mean `(L, 1, U)` over the batch of `(L, B, U)` whose padding is already zeroed, over the real
    examples only where masked."""
    if mask is None:
        return masked.mean(dim=1, keepdim=True)
    return masked.sum(dim=1, keepdim=True) / mask.sum(dim=0).clamp_min(1)


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`x` with its padded entries set to 0, in place (`x` is a fresh tensor of ours); `x` itself without a mask."""
    return x if mask is None else x.masked_fill_(padding_of(mask), 0)


class _SquaredDeviations(torch.autograd.Function):
    """`Σ_b (x_lbu − μ_lu)²` of `L` same-shaped layers `(B, U)` → `(L, U)` float32, in one pass over a stacked copy.

    `μ` `(L, 1, U)` is the per-unit mean over the batch, computed here (`mean=None`) or given (the mean over the
    batches of all processes). Either way the backward treats `μ` as a constant, which is exact: the sum of squared
    deviations is stationary in its mean, `∂/∂μ Σ (x − μ)² = −2 Σ (x − μ) = 0`. So

        ∂/∂x_lbu = 2·(x_lbu − μ_lu) · grad_lu

    With a unit mask `m` `(B, U)` (padding), the sums run over the masked-in examples and `μ` is their mean, which is
    stationary in the same way, and `∂/∂x_lbu = 2·(x_lbu − μ_lu)·grad_lu` where `m_bu = 1`, exactly 0 where `m_bu = 0`
    (selected, so a NaN at a padded position does not reach the model's backward either).

    Autograd would save the stacked `(L, B, U)` copy (and the centred one) for the backward; this saves only `μ` and
    the layers themselves, which the model keeps alive for its own backward anyway, in their own dtype (a bf16 layer
    is converted to float32 inside the stacked copy, not kept as a float32 copy). Each layer gets its own gradient
    tensor, which autograd frees as soon as the model's backward has consumed it, so that at no point do the
    gradients of all layers exist at once beyond a chunk.

    Twice differentiable where the mean is the layer's own (`backward(create_graph=True)`, as a gradient penalty
    asks): the backward then computes `2·(x − μ(x))·grad` with differentiable operations, `μ` recomputed from `x`, whose
    derivative is the exact second derivative. A mean pooled across processes has no such graph: that raises.
    """

    @staticmethod
    def forward(ctx, mean: torch.Tensor | None, mask: torch.Tensor | None, workspace: torch.Tensor | None,
                *layers: torch.Tensor) -> torch.Tensor:
        ctx.pooled = mean is not None
        squares, mean = _squared_deviations(mean, layers, mask, workspace)
        ctx.masked = mask is not None
        ctx.save_for_backward(mean, *(([mask]) if mask is not None else []), *layers)
        return squares

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mean, *layers = ctx.saved_tensors
        mask = layers.pop(0) if ctx.masked else None
        if torch.is_grad_enabled():  # backward(create_graph=True): the gradient must have a graph of its own
            return (None, None, None, *_differentiable_gradients(layers, grad, mask, ctx.pooled))
        if layers[0].device.type in _PER_LAYER_BACKWARD_DEVICES or len(layers) == 1:
            # Layer by layer: no stacked copy, and each gradient is its own tensor, freed once autograd has used it.
            # With hundreds of layers the per-operation dispatch cost is a large part of the backward, so a float32
            # layer's gradient is one operation (`squared_difference_backward`). Other dtypes take two multi-tensor
            # (`_foreach`) calls, promoting to float32.
            if layers[0].dtype == torch.float32:
                grads = [squared_difference_backward(g, x, m)
                         for g, x, m in zip(grad.unsqueeze(1).unbind(0), layers, mean.unbind(0))]
            else:
                grads = torch._foreach_sub(layers, mean.unbind(0))
                torch._foreach_mul_(grads, (grad.unsqueeze(1) * 2.0).unbind(0))
            if mask is not None:
                grads = [_masked(g, mask) for g in grads]
            if layers[0].dtype != torch.float32:  # a chunk's layers share one dtype (`chunk_layers`)
                grads = [g.to(layers[0].dtype) for g in grads]
        else:
            # On accelerators, a few large kernels per chunk rather than a few small ones per layer.
            stacked = torch.stack(layers)
            out = stacked.float() if stacked.dtype != torch.float32 else stacked
            out = _masked(out.sub_(mean).mul_(grad.unsqueeze(1) * 2.0), mask)
            grads = out.to(layers[0].dtype).unbind(0)
        return (None, None, None, *grads)


def _differentiable_gradients(
    layers: list[torch.Tensor], grad: torch.Tensor, mask: torch.Tensor | None, pooled: bool
) -> list[torch.Tensor]:
    """`2·(x − μ(x))·grad` per layer, with `μ(x)` the layer's own (masked) batch mean recomputed from `x`: operations
    autograd can differentiate again (double backward)."""
    if pooled:
        raise RuntimeError(
            "The batch-entropy pooled across processes (lbe_sync_entropy) is not twice differentiable: "
            "backward(create_graph=True) cannot go through its all-reduce. Turn lbe_sync_entropy off for a gradient "
            "penalty, or compute the penalty without create_graph."
        )
    padding = padding_of(mask) if mask is not None else None
    grads = []
    for x, g in zip(layers, grad.unbind(0)):
        x32 = x.float()
        kept = x32 if padding is None else x32.masked_fill(padding, 0)
        deviation = x32 - _batch_mean(kept.unsqueeze(0), mask)[0]
        if padding is not None:
            deviation = deviation.masked_fill(padding, 0)
        grads.append((deviation * (2.0 * g)).to(x.dtype))
    return grads


def squares_of_chunk(
    mean: torch.Tensor | None, layers: list[torch.Tensor], originals: list[torch.Tensor], mask: torch.Tensor | None,
    workspace: torch.Tensor | None,
) -> torch.Tensor:
    """`Σ_b (x − μ)²` `(L_chunk, U)` of one chunk's `layers` (the `(B, U)` views of `originals`, the activations as the
    model made them), about `mean` (`(L_chunk, 1, U)`, pooled across processes) or each layer's own batch mean."""
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in layers)):
        # No autograd.Function where no gradient is wanted.
        return _squared_deviations(mean, layers, mask, workspace)[0]
    squares = _SquaredDeviations.apply(mean, mask, workspace, *layers)
    # Autograd runs the ready node with the highest sequence number first. The estimator's nodes are created after the
    # whole forward pass, so they would all run at the start of the backward, and the gradients of every regularized
    # layer would wait in memory until the model's backward consumes them. Giving the chunk's node the sequence number
    # of its deepest layer's node makes autograd run it just before that layer's backward: one chunk of gradients
    # exists at a time. Only the order changes (the node's dependencies are the same).
    order_backward(squares, originals)
    return squares


def chunk_workspace(units: list[torch.Tensor], chunks: list[list[int]]) -> torch.Tensor | None:
    """One float32 scratch for the stacked copies of all chunks of a call, on CPUs (where a fresh allocation per chunk
    costs page faults and the chunks are processed one after the other); `None` elsewhere or where no float32 chunk of
    several layers is stacked (then each chunk allocates its own)."""
    sizes = [len(chunk) * units[chunk[0]].numel() for chunk in chunks
             if len(chunk) > 1 and units[chunk[0]].dtype == torch.float32 and units[chunk[0]].device.type == "cpu"]
    return torch.empty(max(sizes), dtype=torch.float32, device="cpu") if sizes else None


def local_squares(
    units: list[torch.Tensor], chunks: list[list[int]], originals: Sequence[torch.Tensor],
    masks: list[torch.Tensor | None],
) -> tuple[list[torch.Tensor], list[torch.Tensor | int]]:
    """Per chunk `Σ_b (x − μ)²` `(L_chunk, U)` about each layer's own batch mean, and the number of values per unit
    (the batch size, or `(U,)` counts of real tokens where masked)."""
    squares, counts = [], []
    workspace = chunk_workspace(units, chunks)
    for chunk in chunks:
        mask = masks[chunk[0]]
        squares.append(squares_of_chunk(None, [units[i] for i in chunk], [originals[i] for i in chunk], mask,
                                        workspace))
        counts.append(units[0].shape[0] if mask is None else mask.sum(dim=0))
    return squares, counts
