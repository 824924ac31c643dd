"""The benchmark of `BatchEntropyTrainer` against plain `transformers.Trainer`: step time and peak memory, same model,
data and seed, alternating turns. Run it with `python scripts/benchmark.py` (or `python -m experiments.benchmark`);
experiments/benchmark/benchmarks.md has the method and the figures. Not imported by `import hf_batch_entropy`.

Modules: `cases` (models and data), `measure` (timers and memory), `cli` (turns, table, command line).
"""

from .cases import ALL_CASES, Case, get_case
from .cli import main

__all__ = ["ALL_CASES", "Case", "get_case", "main"]
