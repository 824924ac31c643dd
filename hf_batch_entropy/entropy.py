r"""Batch-entropy: how much information about the input a layer's activations still carry.

For activations `a` of shape `(B, ...)`, flattened to `(B, U)` (`B` examples, `U` units), each unit's values over the
mini-batch are taken to be Gaussian with unbiased variance `σ_u²`, and its differential entropy (in nats) is

    H_u = ½ · ln(π·e·σ_u² + 1)

The `+ 1` keeps `H_u ≥ 0` and makes a dead unit (`σ_u = 0`) have entropy exactly 0. The layer's batch-entropy is
`H = mean_u H_u`. It is undefined for `B < 2`.

Two paths compute it:

- `batch_entropy(x)`: one layer, the reference, written as the formula reads.
- `batch_entropies(xs)`: many layers at once. Layers of the same flattened shape and dtype are reduced together, in
  chunks, each in one pass (a custom autograd function that keeps only the per-unit means, not a stacked copy of the
  activations, for the backward), so that on accelerators the number of kernels per step does not grow with depth
  (up to `_MAX_CHUNK_NUMEL` floats per chunk). On CPUs the chunks are cache-sized and the backward goes layer by layer;
  there the cost is the number of operations per layer, so unmasked float32 chunks go through one compiled loop per
  chunk (`cpu_kernel`), which rounds exactly as the operators do. With `sync=True` the per-unit statistics are merged across
  processes first (`torch.distributed`), with gradients flowing through the merge.

Padding. Token-level activations `(B, T, ...)` of a padded batch come with a mask `(B, T)` (1 for a real token, 0
for padding). Then unit `u` at position `t` has the `n_t = Σ_b m_bt` values of the examples with a real token there:

    μ_u  = Σ_b m_bt·x_bu / n_t,      σ_u² = Σ_b m_bt·(x_bu − μ_u)² / (n_t − 1)

and the layer's batch-entropy is the mean of `H_u` over the units at positions with `n_t ≥ 2` (others are left out).
The same examples unpadded, padded on the right or on the left give the same value. Padding is left out by selection,
not by multiplying with the mask, so whatever the padded positions hold (NaN and inf included) never reaches the
statistics or the gradients. A layer without any position of two real tokens has no batch-entropy: it is reported as
not measured (`batch_entropies(..., return_measured=True)`) and its value is 0, never NaN.

Whether a batch can be measured at all is decided in one place, `is_measurable`: at least 2 examples, or any number
when the statistics are pooled across processes (`pools_across_processes`), where the global batch decides.

Everything is computed in float32 whatever the activations' dtype or autocast: bf16 has 8 bits of mantissa, too few for
a variance, and fp16 variances over- and underflow.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
import torch.distributed as dist

from . import cpu_kernel
from ._compat import order_backward

__all__ = [
    "batch_entropies",
    "batch_entropy",
    "entropy_from_variance",
    "is_measurable",
    "pools_across_processes",
    "unit_mask",
]

PI_E = math.pi * math.e

# Layers are stacked in chunks of at most this many floats so that the transient stacked copy stays small. On CPUs the
# chunks are smaller still, 2 MiB, about an L2 cache: the reductions over a chunk then run from the cache, not from
# memory (on the depth-500 MLP of width 256, 16 layers per chunk were a few percent faster than 8 or 64; the values
# do not depend on the chunking, each layer's reductions are its own).
_MAX_CHUNK_NUMEL = 1 << 24
_CPU_CHUNK_NUMEL = 1 << 19

# Where the backward of the fused path computes the gradients layer by layer rather than one stacked chunk at a time.
_PER_LAYER_BACKWARD_DEVICES = ("cpu",)

# `aten::mse_loss`'s `reduction` argument for none (`at::Reduction::None`), and its backward into a given tensor.
_NO_REDUCTION = 0
_MSE_BACKWARD = torch.ops.aten.mse_loss_backward.grad_input


def _chunk_numel(device: torch.device) -> int:
    return min(_MAX_CHUNK_NUMEL, _CPU_CHUNK_NUMEL) if device.type == "cpu" else _MAX_CHUNK_NUMEL


def entropy_from_variance(var: torch.Tensor) -> torch.Tensor:
    """`H = ½·ln(π·e·σ² + 1)`, elementwise, in nats. `var`: per-unit unbiased variances (any shape)."""
    return 0.5 * torch.log1p(PI_E * var)


def pools_across_processes(sync: bool) -> bool:
    """Whether batch statistics are pooled across processes: `sync` (`lbe_sync_entropy`) is asked for and an
    initialized `torch.distributed` group has more than one process."""
    return _sync_active(sync)


def is_measurable(batch_size: int, sync: bool) -> bool:
    """Whether a forward pass of `batch_size` examples (sequences, for token-level activations) has a batch-entropy:
    the one rule, used by the estimator and the trainer alike. It needs 2 examples, or, where the statistics are pooled
    across processes (`pools_across_processes`), any number: the global batch decides (a global batch of one gives an
    infinite variance, which the callers' finiteness checks report)."""
    return batch_size >= 2 or (batch_size >= 1 and pools_across_processes(sync))


def _what(layer: int | None) -> str:
    return "activations" if layer is None else f"activations of layer {layer}"


def _as_units(x: torch.Tensor, layer: int | None = None, to_float: bool = True, sync: bool = False) -> torch.Tensor:
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


def _padding(mask: torch.Tensor) -> torch.Tensor:
    """The padded entries (`True`) of a float unit mask `(B, U)`: what selection leaves out."""
    return mask == 0


def _masked_layer_entropy(squares: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    units = _as_units(x)
    if mask is None:
        return entropy_from_variance(torch.var(units, dim=0, correction=1)).mean()
    m = unit_mask(mask.to(units.device), x.shape)
    padding = _padding(m)
    count = m.sum(dim=0)
    mean = units.masked_fill(padding, 0).sum(dim=0) / count.clamp_min(1)
    squares = (units - mean).masked_fill(padding, 0).square().sum(dim=0)
    return _masked_layer_entropy(squares, count)[0]


def _squared_deviations(
    mean: torch.Tensor | None, layers: Sequence[torch.Tensor], mask: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Σ_b m·(x − μ)²  (L, U), μ  (L, 1, U))` of same-shaped layers `(B, U)`, in float32; `μ` computed if `None`;
    `m` the unit mask `(B, U)` (all ones if `None`). Padded entries are replaced by 0 (selection, not a product, so a
    NaN there stays out). `workspace`: optional float32 scratch of at least `L·B·U` elements for the stacked copy
    (nothing returned refers to it, so one call's chunks can share it). PyTorch's operators; `cpu_kernel` computes the
    same, bit for bit, for the chunks it handles."""
    padding = _padding(mask) if mask is not None else None
    own = True  # whether `stacked` is a copy of ours, to be masked and overwritten in place
    if (workspace is not None and len(layers) > 1 and layers[0].dtype == torch.float32
            and workspace.numel() >= len(layers) * layers[0].numel() and workspace.device == layers[0].device):
        # Stacked into the caller's scratch: no allocation (and no page faults on fresh memory) per chunk.
        stacked = torch.stack(layers, out=workspace[: len(layers) * layers[0].numel()].view(len(layers),
                                                                                            *layers[0].shape))
    elif len(layers) == 1:
        stacked = layers[0].unsqueeze(0)
        own = stacked.dtype != torch.float32  # a float32 layer is used as it is, and must not be written to
        stacked = stacked.float()
    else:
        stacked = torch.stack(layers)
        if stacked.dtype != torch.float32:
            stacked = stacked.float()
    if padding is not None:
        stacked = stacked.masked_fill_(padding, 0) if own else stacked.masked_fill(padding, 0)
        own = True
    if mean is None:
        mean = _batch_mean(stacked, mask)
    squares = _squared_difference(stacked, mean, in_place=own)
    if padding is not None:
        squares.masked_fill_(padding, 0)  # the padding, now at μ², back to 0
    return squares.sum(dim=1), mean


def _squared_difference(x: torch.Tensor, mean: torch.Tensor, in_place: bool) -> torch.Tensor:
    """`(x − μ)²` elementwise, `x` `(L, B, U)`, `μ` `(L, 1, U)`, in one pass (`mse_loss` without reduction rounds as
    `sub` then `square` do: `d = x − μ`, then `d·d`), into `x` itself where `in_place`."""
    target = mean.expand_as(x)
    if in_place:
        return torch._C._nn.mse_loss(x, target, _NO_REDUCTION, out=x)
    return torch._C._nn.mse_loss(x, target, _NO_REDUCTION)


def _batch_mean(masked: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-unit mean `(L, 1, U)` over the batch of `(L, B, U)` whose padding is already zeroed, over the real
    examples only where masked."""
    if mask is None:
        return masked.mean(dim=1, keepdim=True)
    return masked.sum(dim=1, keepdim=True) / mask.sum(dim=0).clamp_min(1)


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

    With `kernel` (`_kernel_chunks`), `cpu_kernel` computes the forward and the backward, bit-identically.
    """

    @staticmethod
    def forward(ctx, mean: torch.Tensor | None, mask: torch.Tensor | None, workspace: torch.Tensor | None,
                kernel: bool, *layers: torch.Tensor) -> torch.Tensor:
        squares, mean = _chunk_squared_deviations(mean, layers, mask, workspace, kernel)
        ctx.masked = mask is not None
        ctx.kernel = kernel
        ctx.save_for_backward(mean, *(([mask]) if mask is not None else []), *layers)
        return squares

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mean, *layers = ctx.saved_tensors
        mask = layers.pop(0) if ctx.masked else None
        if ctx.kernel:
            return (None, None, None, None, *cpu_kernel.squared_deviations_backward(layers, grad, mean))
        coef = grad.unsqueeze(1) * 2.0  # (L, 1, U)
        if layers[0].device.type in _PER_LAYER_BACKWARD_DEVICES or len(layers) == 1:
            # Layer by layer: no stacked copy, and each gradient is its own tensor, freed once autograd has used it.
            # With hundreds of layers the per-operation dispatch cost is a large part of the backward, so a float32
            # layer's gradient is one operation: `mse_loss`'s backward without reduction computes `2·(x − μ)·grad`,
            # which rounds as `(x − μ)·(2·grad)` does (doubling is exact), into a fresh tensor (not its default
            # zero-filled one). Other dtypes take two multi-tensor (`_foreach`) calls, promoting to float32.
            if layers[0].dtype == torch.float32:
                grads = [_MSE_BACKWARD(g, x, m, _NO_REDUCTION, grad_input=torch.empty_like(x))
                         for g, x, m in zip(grad.unsqueeze(1).unbind(0), layers, mean.unbind(0))]
            else:
                grads = torch._foreach_sub(layers, mean.unbind(0))
                torch._foreach_mul_(grads, coef.unbind(0))
            if mask is not None:
                grads = [_masked(g, mask) for g in grads]
            if layers[0].dtype != torch.float32:  # a chunk's layers share one dtype (`_chunks`)
                grads = [g.to(layers[0].dtype) for g in grads]
        else:
            # On accelerators, a few large kernels per chunk rather than a few small ones per layer.
            stacked = torch.stack(layers)
            out = stacked.float() if stacked.dtype != torch.float32 else stacked
            out = _masked(out.sub_(mean).mul_(coef), mask)
            grads = out.to(layers[0].dtype).unbind(0)
        return (None, None, None, None, *grads)


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`x` with its padded entries set to 0, in place (`x` is a fresh tensor of ours); `x` itself without a mask."""
    return x if mask is None else x.masked_fill_(_padding(mask), 0)


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


def _sync_active(sync: bool) -> bool:
    return sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


def _check_same_layout(activations: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None) -> None:
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


def _chunks(units: list[torch.Tensor], mask_keys: Sequence[Hashable] | None = None) -> list[list[list[int]]]:
    """Indices of the layers grouped by shape, dtype, device and padding mask (in first-seen order), each group in
    chunks of bounded size: `groups[g][c]` is the list of layer indices of chunk `c` of group `g`."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(units):
        groups.setdefault((x.shape[1], x.dtype, x.device, mask_keys[i] if mask_keys else None), []).append(i)
    batch = units[0].shape[0]
    chunked = []
    for (num_units, _, device, _), indices in groups.items():
        per_chunk = max(1, _chunk_numel(device) // (batch * num_units))
        chunked.append([indices[start : start + per_chunk] for start in range(0, len(indices), per_chunk)])
    return chunked


def _chunk_squared_deviations(
    mean: torch.Tensor | None, layers: Sequence[torch.Tensor], mask: torch.Tensor | None,
    workspace: torch.Tensor | None, kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_squared_deviations` of a chunk, by `cpu_kernel` where `kernel` (`_kernel_chunks` decided it)."""
    if kernel:
        return cpu_kernel.squared_deviations(layers, mean)
    return _squared_deviations(mean, layers, mask, workspace)


def _squares(
    mean: torch.Tensor | None, layers: list[torch.Tensor], originals: list[torch.Tensor], mask: torch.Tensor | None,
    workspace: torch.Tensor | None, kernel: bool,
) -> torch.Tensor:
    """`_SquaredDeviations` of `layers` (the `(B, U)` views of `originals`, the activations as the model made them)."""
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in layers)):
        # No autograd.Function where no gradient is wanted.
        return _chunk_squared_deviations(mean, layers, mask, workspace, kernel)[0]
    squares = _SquaredDeviations.apply(mean, mask, workspace, kernel, *layers)
    _schedule_with_layers(squares, originals)
    return squares


def _schedule_with_layers(output: torch.Tensor, layers: list[torch.Tensor]) -> None:
    """Run the backward of a chunk when the model's backward reaches the chunk's deepest layer, not first.

    Autograd runs the ready node with the highest sequence number first. The estimator's nodes are created after the
    whole forward pass, so they would all run at the start of the backward, and the gradients of every regularized
    layer (`L·B·U` floats) would wait in memory until the model's backward consumes them, layer after layer, and go
    cold in the cache. Giving the chunk's node the sequence number of its deepest layer's node makes autograd run it
    just before that layer's backward: one chunk of gradients exists at a time. Only the order changes (the node's
    dependencies are the same); skipped where the private hook is missing or under `torch.compile`.
    """
    order_backward(output, layers)


def _kernel_chunks(units: list[torch.Tensor], chunks: list[list[int]], masks: list[torch.Tensor | None]) -> list[bool]:
    """Per chunk, whether `cpu_kernel` computes it (decided once per chunk, for its forward, backward and scratch)."""
    return [cpu_kernel.handles([units[i] for i in chunk], masks[chunk[0]]) for chunk in chunks]


def _workspace(units: list[torch.Tensor], chunks: list[list[int]], kernel: list[bool]) -> torch.Tensor | None:
    """One float32 scratch for the stacked copies of all chunks of a call, on CPUs (where a fresh allocation per chunk
    costs page faults and the chunks are processed one after the other); `None` elsewhere or where no float32 chunk of
    several layers is stacked (then each chunk allocates its own; `cpu_kernel`'s chunks, `kernel`, stack nothing)."""
    sizes = [len(chunk) * units[chunk[0]].numel() for chunk, by_kernel in zip(chunks, kernel)
             if len(chunk) > 1 and units[chunk[0]].dtype == torch.float32 and units[chunk[0]].device.type == "cpu"
             and not by_kernel]
    return torch.empty(max(sizes), dtype=torch.float32, device="cpu") if sizes else None


def _local_squares(
    units: list[torch.Tensor], chunks: list[list[int]], originals: Sequence[torch.Tensor],
    masks: list[torch.Tensor | None],
) -> tuple[list[torch.Tensor], list[torch.Tensor | int]]:
    """Per chunk `Σ_b (x − μ)²` `(L_chunk, U)` about each layer's own batch mean, and the number of values per unit
    (the batch size, or `(U,)` counts of real tokens where masked)."""
    squares, counts = [], []
    kernel = _kernel_chunks(units, chunks, masks)
    workspace = _workspace(units, chunks, kernel)
    for chunk, by_kernel in zip(chunks, kernel):
        mask = masks[chunk[0]]
        squares.append(_squares(None, [units[i] for i in chunk], [originals[i] for i in chunk], mask, workspace,
                                by_kernel))
        counts.append(units[0].shape[0] if mask is None else mask.sum(dim=0))
    return squares, counts


def _global_squares(
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
            layer_sums = [units[i].float() if mask is None else units[i].float().masked_fill(_padding(mask), 0)
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
    kernel = _kernel_chunks(units, chunks, masks)
    workspace = _workspace(units, chunks, kernel)
    local = [
        _squares(mean, [units[i] for i in chunk], [originals[i] for i in chunk], masks[chunk[0]], workspace, by_kernel)
        for mean, chunk, by_kernel in zip(means, chunks, kernel)
    ]
    flat = _AllReduceSum.apply(torch.cat([sq.flatten().to(device) for sq in local]))
    squares, offset = [], 0
    for sq in local:
        squares.append(flat[offset : offset + sq.numel()].view_as(sq).to(sq.device))
        offset += sq.numel()
    return squares, global_counts


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
    distributed = _sync_active(sync)
    fused = fused or distributed
    if distributed:
        _check_same_layout(activations, masks)
    units = [_as_units(x, i, to_float=not fused, sync=sync) for i, x in enumerate(activations)]
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
    groups = _chunks(units, mask_keys)
    chunks = [chunk for group in groups for chunk in group]
    squares, counts = (_global_squares if distributed else _local_squares)(units, chunks, activations, unit_masks)
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
            entropy, measured = _masked_layer_entropy(sq, count.to(sq.device))
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
