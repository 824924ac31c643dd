"""`python -m experiments.benchmark ...`: the same as `python scripts/benchmark.py ...`."""

from .cli import main

main()
