"""The project's research code: the experiments behind the figures in docs/, run from a clone of the repository.

Not part of the installed library (`pip install .` ships `hf_batch_entropy` only); each experiment is a folder with
its entry point and a README, and uses the library through its public API. Run them from the repository root, as
`python scripts/train_vanilla.py`, `python experiments/<name>/<script>.py` or `python -m experiments.<name>`.
"""
