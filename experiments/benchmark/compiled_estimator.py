"""`torch.compile` applied to the estimator: what the ecosystem's way to fuse it buys, as a benchmark variant.

`scripts/benchmark.py --variants trainer lbe lbe_compiled` times `BatchEntropyTrainer` with the estimator's chunks
computed by a compiled function instead of the package's fused operators. Each chunk of same-shaped layers (the
package's own chunking, `entropy.fused.chunk_layers`) goes through one function compiled with `torch.compile`
(inductor): stack, per-unit variance over the batch, `½·ln(π·e·σ² + 1)`, mean over the units; AOTAutograd derives
its backward, and inductor fuses both. The chunks of one model share a shape, so the function compiles once per
chunk size (two sizes at most: the full chunks and the last one), at the first step, and the first turn's warm-up
steps absorb that compile; the time it takes is recorded apart (`compile_seconds`).

Unmasked layers without pooling only (the benchmark's MLP); anything else takes the package's path. The values are
those of the reference formula (`torch.var`), within float32 rounding of the package's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from hf_batch_entropy import regularizer as regularizer_module
from hf_batch_entropy.entropy import batch_entropies, entropy_from_variance
from hf_batch_entropy.entropy.fused import chunk_layers

__all__ = ["install"]


def _chunk_entropies(*layers: torch.Tensor) -> torch.Tensor:
    """`(L,)` batch-entropies of `L` same-shaped `(B, U)` layers: the formula, for the compiler to fuse."""
    stacked = torch.stack(layers).float()
    return entropy_from_variance(torch.var(stacked, dim=1, correction=1)).mean(dim=1)


def install() -> Callable[[], dict[str, float]]:
    """Make the regularizer's estimator the compiled one; returns `restore()`, which puts the package's back and
    returns `{"compile_seconds": ..., "compiled_calls": ...}` (the first calls' time, compile included)."""
    compiled = torch.compile(_chunk_entropies, dynamic=False)
    record = {"compile_seconds": 0.0, "compiled_calls": 0}
    seen: set[tuple] = set()

    def estimator(activations: Sequence[torch.Tensor], *, fused: bool = True, sync: bool = False,
                  masks=None, return_measured: bool = False):
        if sync or (masks is not None and any(m is not None for m in masks)) or not fused:
            return batch_entropies(activations, fused=fused, sync=sync, masks=masks, return_measured=return_measured)
        units = [x.reshape(x.shape[0], -1) for x in activations]
        chunks = [chunk for group in chunk_layers(units) for chunk in group]
        values = []
        for chunk in chunks:
            key = (len(chunk), tuple(units[chunk[0]].shape), units[chunk[0]].dtype)
            start = time.perf_counter()
            values.append(compiled(*[units[i] for i in chunk]))
            if key not in seen:  # this shape's first call compiles
                seen.add(key)
                record["compile_seconds"] += time.perf_counter() - start
            record["compiled_calls"] += 1
        order = torch.tensor([i for chunk in chunks for i in chunk])
        entropies = torch.empty(len(units), device=units[0].device)
        entropies = entropies.index_put((order.to(entropies.device),), torch.cat(values))
        return (entropies, None) if return_measured else entropies

    original = regularizer_module.batch_entropies
    regularizer_module.batch_entropies = estimator

    def restore() -> dict[str, float]:
        regularizer_module.batch_entropies = original
        return dict(record)

    return restore
