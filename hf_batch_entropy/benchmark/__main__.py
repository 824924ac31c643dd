"""`python -m hf_batch_entropy.benchmark ...`: the same as `python scripts/benchmark.py ...`."""

from .cli import main

main()
